"""Helpers for the deepspeed_* unit tests: model shapes and running Ansible."""

import json
import os
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
