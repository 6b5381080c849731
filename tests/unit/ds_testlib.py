"""Helpers shared by the tests: model shapes, running Ansible, and loopback ports for a launch's master."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Real config.json shapes of public models (written from their Hugging Face configs).
DATA = Path(__file__).resolve().parent / "data" / "models"

MODEL_NAMES = sorted(p.stem for p in DATA.glob("*.json"))


def model_config(name):
    with open(DATA / (name + ".json")) as fd:
        return json.load(fd)


def ansible_env():
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    })
    return env


def run_playbook(playbook, *args):
    """Run an ansible-playbook; return (returncode, parsed json callback output, stderr)."""
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), playbook] + list(args)
    proc = subprocess.run(cmd, cwd=str(REPO), env=ansible_env(), capture_output=True, text=True, timeout=300)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"ansible-playbook printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}") from None
    return proc.returncode, out, proc.stderr


# A launch's --master_port (or MASTER_PORT): pytest-xdist worker gwN hands out the PORT_BLOCK ports from
# PORT_BASE + N * PORT_BLOCK (N modulo PORT_WORKERS; one process without xdist counts as gw0), all
# below Linux's default ephemeral range (ip_local_port_range, 32768-60999) and clear of torch's 29500.
PORT_BASE, PORT_BLOCK, PORT_WORKERS = 21000, 500, 16
_port_offset = None  # this process's next port in its block, from a random start (another session's likely elsewhere)


def free_port():
    """A free port of this xdist worker's own block, not the ephemeral range's: bind(0) gave both workers one port."""
    global _port_offset
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = PORT_BASE + (int(worker) if worker.isdigit() else 0) % PORT_WORKERS * PORT_BLOCK
    if _port_offset is None:
        _port_offset = random.Random().randrange(PORT_BLOCK)
    for _ in range(PORT_BLOCK):
        port, _port_offset = first + _port_offset, (_port_offset + 1) % PORT_BLOCK  # each call a new port
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every IPv4 address, as the launcher's store binds it
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


def port_taken(proc):
    """Whether a launch failed because its master port was taken (torch's store: EADDRINUSE)."""
    out = (proc.stdout or "") + (proc.stderr or "")
    return proc.returncode != 0 and ("EADDRINUSE" in out or "address already in use" in out.lower())


def run_launch(argv, **run_kwargs):
    """subprocess.run(argv(port)) of a `deepspeed`/`torchrun` launch on a free_port(); once more on a new
    port if it failed only because that port was taken (nothing is written before the ranks' store is up)."""
    proc = subprocess.run(argv(free_port()), **run_kwargs)
    if port_taken(proc):
        proc = subprocess.run(argv(free_port()), **run_kwargs)
    return proc
