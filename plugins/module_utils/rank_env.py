"""The .deepspeed_env file for DeepSpeed's multi-node runner (stdlib only).

DeepSpeed's pdsh runner forwards only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* variables to remote
ranks; everything else must be in .deepspeed_env. The runner reads it line by line with
`key, val = line.split('=', 1)` (a blank line or a comment without '=' crashes it) and exports
each value in the remote shell, wrapped in double quotes when it holds characters outside
[\\w@%+=:,./-]. So: KEY=VALUE lines only, and no characters that a double-quoted shell string
would expand ($, `, \\, ") or that end a line.
"""


import ipaddress
import re
import socket
import struct
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


def parse_if_inet6(text):
    """[(interface, address)] from /proc/net/if_inet6: the address as 32 hex digits, then the
    interface's index, prefix length, scope and flags, and its name last."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            continue
        out.append((parts[5], str(ipaddress.IPv6Address(int(parts[0], 16)))))
    return out


SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address


def ipv4_addresses():
    """[(interface, address)] of this node's interfaces that have an IPv4 address, asked of the kernel
    (SIOCGIFADDR gives each interface's primary address; secondary ones are not listed)."""
    import fcntl

    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # EADDRNOTAVAIL: no IPv4 address on it
                continue
            out.append((name, socket.inet_ntoa(answer[20:24])))
    return out


def local_addresses(if_inet6_path="/proc/net/if_inet6"):
    """[(interface, address)] of this node, read from the kernel itself: for nodes without `ip`
    (iproute2), like the H200 machine, whose image has no `ip`."""
    pairs = ipv4_addresses()
    try:
        with open(if_inet6_path) as f:
            pairs += parse_if_inet6(f.read())
    except OSError:  # IPv6 disabled
        pass
    return pairs


def interface_holding(pairs, address, resolver=resolve):
    """The interface of [(interface, address)] that holds `address` (an IP or a name resolved on this
    node), or None; lo never counts (a cluster address on lo reaches no other node)."""
    wanted = resolver(address)
    for iface, ip in pairs:
        if ip in wanted and iface != "lo":
            return iface
    return None


def interface_for_address(ip_addr_text, address, resolver=resolve):
    """The interface that holds `address` (an IP or a name resolved on this node), per `ip -o addr show`."""
    return interface_holding(parse_ip_addr(ip_addr_text), address, resolver)


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


def compile_cache_env(cache_dir):
    """The variables that keep a start's compiled work under `cache_dir` (each node's local disk), so a
    relaunch of the same plan reuses it: Inductor's graphs, Triton's kernels, and Python's bytecode
    where the interpreter writes none (train.bytecode reads TRAIN_PYCACHE_DIR)."""
    base = cache_dir.rstrip("/")
    return OrderedDict(TORCHINDUCTOR_CACHE_DIR=base + "/inductor", TRITON_CACHE_DIR=base + "/triton",
                       TRAIN_PYCACHE_DIR=base + "/pycache")


def build_env(user_vars=None, venv=None, omp_num_threads=1, hf_home=None, torch_extensions_dir=None,
              interfaces=None, compile_cache_dir=None, prefix_kind="venv"):
    """Ordered variables: what remote ranks need, then the user's (the user's win).

    venv: the training environment's prefix (a virtualenv, a conda env: prefix_kind).
    compile_cache_dir: a directory on each node's local disk for the compile caches (compile_cache_env),
    so a relaunch of the same plan reuses the first start's compilation."""
    env = OrderedDict()
    if venv:
        env.update(prefix_env(venv, prefix_kind))
    env["OMP_NUM_THREADS"] = str(int(omp_num_threads))
    if hf_home:
        env["HF_HOME"] = hf_home
    if torch_extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir
    if compile_cache_dir:
        env.update(compile_cache_env(compile_cache_dir))
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
