"""ds_testlib's ports for a launch's master: a new free port each call, from the xdist worker's own block
outside the kernel's ephemeral range, and run_launch's one retry when the launcher found its port taken."""

import socket
import sys
from pathlib import Path

import ds_testlib
from ds_testlib import PORT_BLOCK, free_port, run_launch


def test_each_call_gives_another_port_that_can_be_bound():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_workers_blocks_are_apart_and_outside_the_ephemeral_range(monkeypatch):
    blocks = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks[worker] = {free_port() for _ in range(5)}
    assert max(blocks["gw0"]) < min(blocks["gw1"])
    assert max(blocks["gw1"]) - min(blocks["gw0"]) < 2 * PORT_BLOCK
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if ephemeral.exists():
        low, high = map(int, ephemeral.read_text().split())
        assert all(not low <= port <= high for block in blocks.values() for port in block)


def test_a_port_in_use_is_skipped(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    port = free_port()
    monkeypatch.setattr(ds_testlib, "_port_offset", port - ds_testlib.PORT_BASE)  # the next call's first try
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        assert free_port() != port


def fake_launcher(message):
    """argv(port) of a launch that fails with `message` on the first port it is given."""
    ports = []

    def argv(port):
        ports.append(port)
        fails = len(ports) == 1
        return [sys.executable, "-c", f"import sys; print({message!r}, file=sys.stderr); sys.exit({int(fails)})"]

    return argv, ports


def test_run_launch_retries_once_on_a_new_port_when_the_port_was_taken():
    argv, ports = fake_launcher(f"DistNetworkError: port: {free_port()}, code: -98, name: EADDRINUSE")
    proc = run_launch(argv, capture_output=True, text=True)
    assert proc.returncode == 0 and len(ports) == 2 and ports[0] != ports[1]


def test_run_launch_does_not_retry_another_failure():
    argv, ports = fake_launcher("RuntimeError: loss is nan")
    proc = run_launch(argv, capture_output=True, text=True)
    assert proc.returncode == 1 and len(ports) == 1
