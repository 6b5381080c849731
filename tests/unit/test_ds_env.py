"""deepspeed_env: the variables remote ranks need, read back by DeepSpeed's own runner."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.dsmesh.cluster.plugins.module_utils.rank_env import (
    NCCL_IFNAME_FALLBACK,
    EnvError,
    build_env,
    interface_for_address,
    interface_holding,
    local_addresses,
    nccl_socket_ifname,
    omp_threads,
    parse_if_inet6,
    parse_ip_addr,
    render_env,
)
from train.bytecode import PYCACHE_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]

# `ip -o addr show` on a machine with podman bridges (captured on the CI machine).
IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever preferred_lft forever
4: eth0    inet6 fd00::2/64 scope global nodad \\       valid_lft forever preferred_lft forever
5: podman1    inet 10.89.0.1/24 brd 10.89.0.255 scope global podman1\\       valid_lft forever preferred_lft forever
8: veth0    inet6 fe80::dc55:2ff:fe2f:6ab7/64 scope link \\       valid_lft forever preferred_lft forever
12: bond0@if3    inet 172.16.80.33/24 brd 172.16.80.255 scope global bond0\\       valid_lft forever
"""


def test_interface_that_holds_the_cluster_address():
    assert ("eth0", "192.0.2.2") in parse_ip_addr(IP_ADDR)
    assert interface_for_address(IP_ADDR, "192.0.2.2") == "eth0"
    assert interface_for_address(IP_ADDR, "fd00::2") == "eth0"
    assert interface_for_address(IP_ADDR, "172.16.80.33") == "bond0"
    assert interface_for_address(IP_ADDR, "10.89.0.1") == "podman1"
    assert interface_for_address(IP_ADDR, "node33", resolver=lambda name: ["172.16.80.33"]) == "bond0"
    assert interface_for_address(IP_ADDR, "127.0.0.1") is None
    assert interface_for_address(IP_ADDR, "203.0.113.9") is None


# /proc/net/if_inet6 of a machine of the workplace's VM layout (eth0 192.0.2.2 / fd00::2, the
# addresses the H200 node's `hostname -I` printed; that node has no `ip`).
IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fe80000000000000d00cdbfffe5dbda9 a4 40 20 80  podman2
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_interface_without_iproute2_from_the_kernels_tables():
    pairs = parse_if_inet6(IF_INET6)
    assert pairs[0] == ("eth0", "fd00::2") and ("lo", "::1") in pairs
    assert ("podman2", "fe80::d00c:dbff:fe5d:bda9") in pairs
    assert interface_holding(pairs + [("eth0", "192.0.2.2")], "192.0.2.2") == "eth0"
    assert interface_holding(pairs, "fd00::2") == "eth0"
    assert interface_holding(pairs, "::1") is None


def test_kernel_tables_agree_with_ip_on_this_machine():
    """The fallback lists what `ip -o addr show` lists (each interface's primary IPv4 address)."""
    proc = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no ip here to compare with")
    from_kernel = set(local_addresses())
    from_ip = set(parse_ip_addr(proc.stdout))
    # containers of other labs come and go meanwhile: compare the interfaces both saw
    both = {i for i, _ in from_ip} & {i for i, _ in from_kernel}
    assert "lo" in both
    from_ip = {p for p in from_ip if p[0] in both}
    from_kernel = {p for p in from_kernel if p[0] in both}
    assert from_kernel <= from_ip
    assert {p for p in from_ip if ":" in p[1]} == {p for p in from_kernel if ":" in p[1]}
    # every interface with an IPv4 address has one in the fallback
    assert {i for i, a in from_ip if "." in a} == {i for i, a in from_kernel if "." in a}


def test_nccl_interfaces_exact_names_for_every_node():
    assert nccl_socket_ifname(["bond0", "bond0"]) == "=bond0"
    assert nccl_socket_ifname(["eth1", "eth10"]) == "=eth1,eth10"
    assert nccl_socket_ifname(["eth0", None]) is None
    env = build_env(interfaces=["eth0", None])
    assert env["NCCL_SOCKET_IFNAME"] == NCCL_IFNAME_FALLBACK and "GLOO_SOCKET_IFNAME" not in env
    env = build_env(interfaces=["eth0", "eth0"])
    assert env["NCCL_SOCKET_IFNAME"] == "=eth0" and env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert "GLOO_SOCKET_IFNAME" not in build_env(interfaces=["eth0", "ens5"])


def test_defaults_and_user_variables():
    env = build_env(user_vars={"WANDB_MODE": "offline", "OMP_NUM_THREADS": 4, "HF_HOME": None},
                    venv="/opt/ds-venv/", omp_num_threads=12, hf_home="/root/.cache/huggingface",
                    torch_extensions_dir="/root/.cache/torch_extensions", interfaces=["eth0"])
    assert env["PATH"].startswith("/opt/ds-venv/bin:/usr/local/sbin:")
    assert env["OMP_NUM_THREADS"] == "4"  # the user's value wins
    assert "HF_HOME" not in env           # null removes a default
    assert env["WANDB_MODE"] == "offline"
    assert omp_threads(96, 8) == 12 and omp_threads(None, 8) == 1 and omp_threads(4, 8) == 1


@pytest.mark.parametrize("key,value", [("A B", "1"), ("X", "$HOME/x"), ("X", "a`id`"), ("X", 'say "hi"'),
                                       ("X", "two\nlines"), ("X", " padded")])
def test_values_the_runner_would_mangle_are_refused(key, value):
    with pytest.raises(EnvError):
        render_env({key: value})


def test_deepspeed_runner_exports_the_file_on_remote_ranks(tmp_path):
    """Run DeepSpeed's real launcher (pdsh runner) with a pdsh that records its command line."""
    launch = tmp_path / "launch"
    home = tmp_path / "home"
    fakebin = tmp_path / "bin"
    for d in (launch, home, fakebin):
        d.mkdir()
    record = tmp_path / "pdsh-args"
    pdsh = fakebin / "pdsh"
    pdsh.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    pdsh.chmod(pdsh.stat().st_mode | stat.S_IEXEC)
    (launch / "hostfile").write_text("172.16.80.33 slots=8\n172.16.80.31 slots=8\n")
    cache = tmp_path / "cache"
    env_vars = build_env(user_vars={"WANDB_MODE": "offline"}, venv="/opt/ds-venv", omp_num_threads=12,
                         hf_home="/root/.cache/huggingface", torch_extensions_dir="/root/.cache/torch_extensions",
                         interfaces=["bond0", "ens5"], compile_cache_dir=str(cache))
    (launch / ".deepspeed_env").write_text(render_env(env_vars))
    # the image's setting, which the runner exports to remote ranks too (PYTHON* variables), before the file's;
    # and no bytecode prefix of its own (make test sets one)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    run_env = dict(plain, HOME=str(home), PATH=str(fakebin) + os.pathsep + os.environ["PATH"],
                   PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "hostfile",
                           "--launcher", "pdsh", "--master_addr", "172.16.80.33", "--no_ssh_check",
                           "train.py", "--deepspeed", "ds_config.json"],
                          cwd=str(launch), env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    assert args[args.index("-w") + 1] == "172.16.80.33,172.16.80.31"
    remote = " ".join(args)
    for key, value in env_vars.items():
        quoted = value if all(c.isalnum() or c in "_@%+=:,./-" for c in value) else f'"{value}"'
        assert f"export {key}={quoted};" in remote
    assert "--master_addr=172.16.80.33" in remote
    # what a remote rank's Python does with those exports (the image's PYTHONDONTWRITEBYTECODE among them):
    # the training package writes its bytecode under the node's cache
    exports = remote[remote.index("export "):remote.index(" cd ")]
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "rank_module.py").write_text("X = 1\n")
    probe = (f"{exports} cd {tmp_path / 'mod'}; PYTHONPATH={ROOT}:$PYTHONPATH {sys.executable} -c "
             "'import sys; from train.bytecode import keep_bytecode; keep_bytecode(); import rank_module; "
             "print(sys.dont_write_bytecode, sys.pycache_prefix)'")
    out = subprocess.run(["bash", "-c", probe], env=plain, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", str(cache / "pycache")]
    assert list((cache / "pycache").rglob("rank_module.*.pyc"))
    assert not (tmp_path / "mod" / "__pycache__").exists()


def test_compile_caches_on_the_node_disk():
    env = build_env(compile_cache_dir="/var/cache/dsmesh/")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/var/cache/dsmesh/inductor"
    assert env["TRITON_CACHE_DIR"] == "/var/cache/dsmesh/triton"
    assert env[PYCACHE_DIR_ENV] == "/var/cache/dsmesh/pycache"  # the name train.bytecode reads
    # a user who wants no bytecode written anywhere says so, and wins
    assert PYCACHE_DIR_ENV not in build_env(compile_cache_dir="/c", user_vars={PYCACHE_DIR_ENV: None})
