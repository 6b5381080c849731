"""The .deepspeed_env file for DeepSpeed's multi-node runner (stdlib only).

DeepSpeed's pdsh runner forwards only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* variables to remote
ranks; everything else must be in .deepspeed_env. The runner reads it line by line with
`key, val = line.split('=', 1)` (a blank line or a comment without '=' crashes it) and exports
each value in the remote shell, wrapped in double quotes when it holds characters outside
[\\w@%+=:,./-]. So: KEY=VALUE lines only, and no characters that a double-quoted shell string
would expand ($, `, \\, ") or that end a line.
"""


import re
import socket
from collections import OrderedDict

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Used when the nodes' cluster interfaces are not known (render without contacting nodes):
# NCCL already skips lo and docker*; bridges of docker compose (br-*), libvirt (virbr*),
# podman/CNI and veth pairs are the usual wrong picks.
NCCL_IFNAME_FALLBACK = "^lo,docker,br-,virbr,veth,cni,podman,flannel,cali"

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BAD_VALUE_RE = re.compile(r"[$`\\\"\n\r\x00]")


class EnvError(Exception):
    pass


def parse_ip_addr(text):
    """[(interface, address)] from `ip -o addr show` output (IPv4 and IPv6)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] not in ("inet", "inet6"):
            continue
        iface = parts[1].split("@", 1)[0]
        address = parts[3].split("/", 1)[0]
        out.append((iface, address))
    return out


def resolve(address):
    """IP addresses a name or address stands for (the address itself if it is one)."""
    try:
        infos = socket.getaddrinfo(address, None)
    except (socket.gaierror, UnicodeError):
        return [address]
    ips = []
    for info in infos:
        ip = info[4][0]
        if ip not in ips:
            ips.append(ip)
    return ips or [address]


def interface_for_address(ip_addr_text, address, resolver=resolve):
    """The interface that holds `address` (an IP or a name resolved on this node), or None."""
    wanted = resolver(address)
    for iface, ip in parse_ip_addr(ip_addr_text):
        if ip in wanted and iface != "lo":
            return iface
    return None


def nccl_socket_ifname(interfaces):
    """NCCL_SOCKET_IFNAME for the nodes' cluster interfaces (one entry per node, None if unknown).

    One .deepspeed_env serves every node, so the value lists each node's interface; the leading
    '=' makes NCCL match names exactly (eth1 must not also select eth10).
    """
    if not interfaces or any(not i for i in interfaces):
        return None
    names = sorted(set(interfaces))
    return "=" + ",".join(names)


def omp_threads(cpu_cores, ranks_per_node):
    if not cpu_cores or not ranks_per_node:
        return 1
    return max(1, int(cpu_cores) // int(ranks_per_node))


PREFIX_KINDS = ("venv", "conda", "plain")


def prefix_env(prefix, kind="venv"):
    """What activating the training environment at `prefix` sets, in the order it matters: its bin
    first on PATH, and VIRTUAL_ENV for a virtualenv or CONDA_PREFIX / CONDA_DEFAULT_ENV for a conda
    environment (a conda env's activate.d scripts do not run: what they set goes in the job's env)."""
    if kind not in PREFIX_KINDS:
        raise EnvError(f"environment kind {kind!r} must be one of {', '.join(PREFIX_KINDS)}")
    prefix = prefix.rstrip("/")
    env = OrderedDict(PATH=prefix + "/bin:" + SYSTEM_PATH)
    if kind == "venv":
        env["VIRTUAL_ENV"] = prefix
    elif kind == "conda":
        env["CONDA_PREFIX"] = prefix
        env["CONDA_DEFAULT_ENV"] = prefix.rsplit("/", 1)[-1]
    return env


def build_env(user_vars=None, venv=None, omp_num_threads=1, hf_home=None, torch_extensions_dir=None,
              interfaces=None, compile_cache_dir=None, prefix_kind="venv"):
    """Ordered variables: what remote ranks need, then the user's (the user's win).

    venv: the training environment's prefix (a virtualenv, a conda env: prefix_kind).
    compile_cache_dir: a directory on each node's local disk for torch.compile's caches (Inductor's
    graphs and Triton's kernels), so a relaunch of the same plan reuses the first start's compilation."""
    env = OrderedDict()
    if venv:
        env.update(prefix_env(venv, prefix_kind))
    env["OMP_NUM_THREADS"] = str(int(omp_num_threads))
    if hf_home:
        env["HF_HOME"] = hf_home
    if torch_extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir
    if compile_cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir.rstrip("/") + "/inductor"
        env["TRITON_CACHE_DIR"] = compile_cache_dir.rstrip("/") + "/triton"
    ifname = nccl_socket_ifname(interfaces)
    if ifname:
        env["NCCL_SOCKET_IFNAME"] = ifname
        uniform = sorted(set(interfaces))
        if len(uniform) == 1:
            # gloo (CPU ranks, and torch's own store) takes one interface name, not a list.
            env["GLOO_SOCKET_IFNAME"] = uniform[0]
    else:
        env["NCCL_SOCKET_IFNAME"] = NCCL_IFNAME_FALLBACK
    for key, value in (user_vars or {}).items():
        if value is None:
            env.pop(key, None)
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        env[key] = str(value)
    return env


def render_env(env):
    lines = []
    for key, value in env.items():
        if not _KEY_RE.match(str(key)):
            raise EnvError(f"{key!r} is not a valid environment variable name")
        value = str(value)
        if _BAD_VALUE_RE.search(value):
            raise EnvError(f"{key}: value {value!r} holds $, `, \\, \" or a line break, which DeepSpeed's runner would "
                           "hand to the remote shell unescaped")
        if value != value.strip():
            raise EnvError(f"{key}: value {value!r} has leading or trailing whitespace, which DeepSpeed's runner strips")
        lines.append(f"{key}={value}\n")
    return "".join(lines)
