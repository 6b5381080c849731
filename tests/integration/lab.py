"""Helpers for tests that run against a container lab (scripts/lab.sh) with real sshd."""
import os
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


def podman_env():
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(ROOT / ".state" / "podman" / "containers.conf")
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


class Lab:
    """A lab of N nodes under its own prefix (containers PREFIX-node1..N)."""

    def __init__(self, prefix, nodes, sudo_user=None, shared_dir=None):
        self.prefix = prefix
        self.nodes = nodes
        self.env = podman_env()
        self.env["LAB_PREFIX"] = prefix
        # One directory of this machine at /var/lib/dsmesh/shared on every node (shared storage).
        if shared_dir:
            self.env["LAB_SHARED_DIR"] = str(shared_dir)
        # Nodes like a usual Ubuntu server: root may not log in, sudo_user logs in and uses sudo.
        if sudo_user:
            self.env["LAB_SUDO_USER"] = sudo_user
        self.inventory = ROOT / "inventory" / "lab" / f"{prefix}.yml"
        self.state = ROOT / ".state" / f"lab-{prefix}"

    def lab(self, *args):
        subprocess.run(["bash", str(ROOT / "scripts" / "lab.sh"), *args], env=self.env, check=True)

    def up(self, fresh=False):
        if fresh:
            self.lab("down")
        self.lab("up", str(self.nodes))
        return self

    def down(self):
        self.lab("down")

    def hosts(self):
        return self.load_inventory()["all"]["children"]["cluster"]["hosts"]

    def names(self):
        return list(self.hosts())

    def load_inventory(self):
        return yaml.safe_load(self.inventory.read_text())

    def write_inventory(self, data, path):
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def playbook(self, *args, inventory=None, check=False, env=None):
        cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory or self.inventory), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
        return proc

    def exec(self, node, command, check=True, user=None, stdin=None, privileged=False):
        """Run a shell command inside a node through podman (not through the mesh under test), as root
        or as `user`; `privileged` for what a container's root may not do (mount a small filesystem)."""
        options = (["--user", user] if user else []) + (["-i"] if stdin is not None else []) \
            + (["--privileged"] if privileged else [])
        proc = subprocess.run(["podman", "exec", *options, node, "bash", "-c", command], env=self.env,
                              capture_output=True, text=True, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{node}: {command!r} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def wait_until(self, node, condition, timeout, interval=0.5):
        """Wait up to `timeout` s for the shell test `condition` to hold in `node`, polled inside the node:
        one podman exec for the whole wait instead of one per poll (each costs ~0.1 s of CPU, taken from
        the lab's ranks on 2 cores). True if it held; False on timeout or when the node is gone."""
        script = f"until {condition}; do sleep {interval}; done"
        try:
            proc = subprocess.run(["podman", "exec", node, "timeout", f"{max(timeout, 0.1):.1f}", "sh", "-c", script],
                                  env=self.env, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def password(self):
        return (self.state / "root_password").read_text().strip()


def recap(stdout):
    """{host: {'ok': n, 'changed': n, 'failed': n, 'unreachable': n}} from the PLAY RECAP."""
    result = {}
    for m in re.finditer(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", stdout, re.M):
        result[m.group(1)] = dict(ok=int(m.group(2)), changed=int(m.group(3)),
                                  unreachable=int(m.group(4)), failed=int(m.group(5)))
    return result
