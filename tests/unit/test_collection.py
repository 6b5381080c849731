"""The repository is the Ansible collection dsmesh.cluster: `ansible-galaxy collection build` works
offline, and a playbook in another directory, seeing only the installed collection, uses its role
and module (the render of the example cluster) and reads their documentation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collection")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", ANSIBLE_COLLECTIONS_PATH=str(tmp / "collections"),
               ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false", ANSIBLE_NOCOLOR="1")
    run([BIN / "ansible-galaxy", "collection", "build", "--output-path", tmp, ROOT], cwd=tmp, env=env)
    tarball = next(tmp.glob("dsmesh-cluster-*.tar.gz"))
    run([BIN / "ansible-galaxy", "collection", "install", "--offline", "--no-deps", "-p", tmp / "collections",
         tarball], cwd=tmp, env=env)
    return tmp, env


def test_the_built_collection_holds_the_project_and_nothing_local(installed):
    tmp, _ = installed
    root = tmp / "collections" / "ansible_collections" / "dsmesh" / "cluster"
    files = {e["name"] for e in json.loads((root / "FILES.json").read_text())["files"]}
    for wanted in ("plugins/modules/deepspeed_render.py", "plugins/module_utils/planner/search.py",
                   "roles/deepspeed_job/meta/argument_specs.yml", "playbooks/render.yml", "train/sft.py",
                   "dsmesh/supervise.py", "meta/runtime.yml"):
        assert wanted in files
    assert not {f for f in files if f.split("/")[0] in (".venv", ".state", ".ansible", ".cache", ".git", "inventory")
                and f != "inventory"} - {f for f in files if f.startswith("inventory/example")}


def test_a_playbook_elsewhere_uses_the_installed_role_and_module(installed):
    tmp, env = installed
    project = tmp / "project"
    shutil.copytree(ROOT / "inventory" / "example", project / "inventory")
    (project / "play.yml").write_text("""\
- name: Render the example cluster's run with the installed collection
  hosts: master
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
    deepspeed_job_render_dir: "{{ playbook_dir }}/out"
  tasks:
    - name: The render directory
      ansible.builtin.file:
        path: "{{ deepspeed_job_render_dir }}"
        state: directory
        mode: "0755"
    - name: The role's render entry point
      ansible.builtin.import_role:
        name: dsmesh.cluster.deepspeed_job
        tasks_from: render
""")
    proc = run([BIN / "ansible-playbook", "-i", "inventory", "play.yml"], cwd=project, env=env)
    assert "ok=" in proc.stdout and "failed=0" in proc.stdout
    assert (project / "out" / "ds_config.json").is_file() and (project / "out" / "launch.sh").is_file()
    module_doc = run([BIN / "ansible-doc", "-t", "module", "dsmesh.cluster.deepspeed_render"], cwd=project, env=env)
    assert str(tmp / "collections") in module_doc.stdout.splitlines()[0] and "ds_config_json" in module_doc.stdout
    role_doc = run([BIN / "ansible-doc", "-t", "role", "dsmesh.cluster.deepspeed_job"], cwd=project, env=env)
    assert "deepspeed_job_global_batch_size" in role_doc.stdout
