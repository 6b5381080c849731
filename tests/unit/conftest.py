"""Shared set-up for the unit tests of the deepspeed_* modules and their module_utils.

The modules import their logic as `ansible.module_utils.ds_planner` etc. (ansible.cfg points
module_utils at plugins/module_utils, and AnsiballZ ships the files with the module). The tests
import it under the same names: appending plugins/module_utils to the `ansible.module_utils`
package path is what Ansible's own loader does, so no test-only import path exists.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ansible.module_utils
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"

if str(REPO / "plugins" / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "plugins" / "module_utils"))

MODEL_NAMES = sorted(p.stem for p in DATA.glob("*.json"))


def model_config(name):
    with open(DATA / (name + ".json")) as fd:
        return json.load(fd)


@pytest.fixture(scope="session")
def model_configs():
    return dict((name, model_config(name)) for name in MODEL_NAMES)


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


def run_module(module, args, check=False, diff=False):
    """Run a module of plugins/modules on localhost through Ansible; return its result dict."""
    cmd = [str(Path(sys.executable).parent / "ansible"), "localhost", "-m", module, "-a", json.dumps(args),
           "-e", "ansible_python_interpreter=" + sys.executable]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    proc = subprocess.run(cmd, cwd=str(REPO), env=ansible_env(), capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("ansible printed no JSON (rc %d):\n%s\n%s" % (proc.returncode, proc.stdout, proc.stderr))
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"]


def run_playbook(playbook, *args):
    """Run an ansible-playbook; return (returncode, parsed json callback output, stderr)."""
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), playbook] + list(args)
    proc = subprocess.run(cmd, cwd=str(REPO), env=ansible_env(), capture_output=True, text=True, timeout=300)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("ansible-playbook printed no JSON (rc %d):\n%s\n%s"
                             % (proc.returncode, proc.stdout, proc.stderr))
    return proc.returncode, out, proc.stderr
