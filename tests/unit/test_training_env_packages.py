"""training_env's env stage asks a node for its package list only when a package could be missing:
an existing interpreter with no data copy needs none. The H200 node runs its job from the image's own
interpreter, which has no apt bindings (neither may the system Python of such an image): package_facts
would fail there, before anything else of the stage ran. Run with connection local; the interpreter
check gets /bin/true (the stack's imports are not what is tested)."""

import json
import shutil
import subprocess

import pytest
from ds_testlib import run_playbook

PLAYBOOK = "tests/unit/playbooks/training_env_local.yml"
FACTS = "Find the training environment's system packages"
INSTALL = "Install the system packages the environment lacks (rsync for the data copy, venv for `venv` mode)"


def results(out):
    """{task name: its result on localhost}."""
    return {task["task"]["name"].split(" : ")[-1]: task["hosts"]["localhost"]
            for play in out["plays"] for task in play["tasks"]}


def env_stage(tmp_path, *extra):
    rc, out, err = run_playbook(PLAYBOOK, "-e", "training_env_mode=existing", "-e", "training_env_python=/bin/true",
                                "-e", f"training_env_code_dir={tmp_path}/src", *extra)
    assert rc == 0, json.dumps(out)[-3000:] + err
    return results(out)


def test_an_existing_interpreter_without_data_copy_needs_no_package_list(tmp_path):
    tasks = env_stage(tmp_path)
    assert tasks[FACTS].get("skipped") and tasks[INSTALL].get("skipped")
    assert (tmp_path / "src" / "train" / "sft.py").is_file()  # the stage went on


def test_a_data_copy_looks_for_rsync_and_installs_nothing_present(tmp_path):
    # package_facts with a Python that has apt's bindings: this machine's own (the venv running the
    # tests has none, and under mitogen package_facts does not move to another interpreter)
    probe = subprocess.run(["/usr/bin/python3", "-c", "import apt"], capture_output=True)
    if probe.returncode != 0 or shutil.which("rsync") is None:
        pytest.skip("needs rsync and a system Python with apt's bindings here")
    tasks = env_stage(tmp_path, "-e", "training_env_sync_data_from_master=true",
                      "-e", "ansible_python_interpreter=/usr/bin/python3")
    assert not tasks[FACTS].get("skipped")
    # rsync is installed: nothing for apt to do (its list was once filtered only for python3-venv)
    assert tasks[INSTALL].get("skipped")
