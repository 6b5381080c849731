"""dsmesh.api and `python -m dsmesh` against a fresh 2-node container lab (LAB_PREFIX=dsapi).

Order matters: the bad inventory comes first and must change nothing; then setup builds the mesh
from root-with-password, a second setup changes nothing, and the CLI runs once more.
"""
import copy
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from lab import Lab

ROOT = Path(__file__).resolve().parents[2]

from dsmesh import api  # noqa: E402

pytestmark = pytest.mark.lab

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\S+)\s+(ok|changed|FAILED|UNREACHABLE|skipped|ignored|retrying)\s+\S")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab("dsapi", 2).up(fresh=True)
    # Own ssh control sockets: a master connection to a container of an earlier lab with the same
    # address would be reused otherwise.
    previous = os.environ.get("ANSIBLE_SSH_CONTROL_PATH_DIR")
    os.environ["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(tmp_path_factory.mktemp("cp"))
    yield lab
    if previous is None:
        os.environ.pop("ANSIBLE_SSH_CONTROL_PATH_DIR")
    else:
        os.environ["ANSIBLE_SSH_CONTROL_PATH_DIR"] = previous
    lab.down()


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    """The lab's inventory without its password: setup() gets it as an argument."""
    inv = copy.deepcopy(lab.load_inventory())
    del inv["all"]["vars"]["ansible_password"]
    return lab.write_inventory(inv, tmp_path_factory.mktemp("inv") / "hosts.yml")


@pytest.fixture
def runner_tmp(tmp_path, monkeypatch):
    """Where the API's temporary private data dirs go, to check that none is left behind."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_bad_inventory_fails_naming_the_host_and_changes_nothing(lab, tmp_path, runner_tmp):
    inv = copy.deepcopy(lab.load_inventory())
    nodes = lab.names()
    inv["all"]["children"]["master"]["hosts"] = {nodes[0]: None, nodes[1]: None}
    lines = []
    result = api.setup(lab.write_inventory(inv, tmp_path / "hosts.yml"), tags=["ssh", "pdsh"],
                       progress=lines.append, keep_artifacts=tmp_path / "artifacts")
    assert not result.ok and result.status == "failed" and result.rc != 0
    assert [f.host for f in result.failures] == [nodes[0]]
    assert "group 'master' must hold exactly one host, it holds 2: dsapi-node1, dsapi-node2" in result.failures[0].msg
    assert set(result.hosts) == set(nodes) and all(c["changed"] == 0 for c in result.hosts.values())
    assert any(LINE.match(line) and "FAILED" in line and "must hold exactly one host" in line for line in lines)
    # artifacts kept on request, the private data dir (extra vars, env) removed
    assert list(Path(result.artifact_dir).glob("job_events/*.json"))
    assert (Path(result.artifact_dir) / "stdout").exists()
    assert list(runner_tmp.iterdir()) == []


def test_setup_builds_the_mesh_from_root_with_a_password(lab, inventory):
    lines = []
    result = api.setup(inventory, tags=["ssh", "pdsh"], password=lab.password(), progress=lines.append)
    assert result.ok and result.rc == 0, (result.failures, result.errors, lines[-10:])
    assert set(result.hosts) == set(lab.names())
    assert all(c["changed"] > 0 and c["failed"] == 0 and c["unreachable"] == 0 for c in result.hosts.values())
    assert result.failures == [] and result.job_status is None
    matched = [LINE.match(line) for line in lines]
    assert all(matched), [line for line, m in zip(lines, matched) if not m]
    assert {m.group(1) for m in matched} == set(lab.names())
    assert {"ok", "changed", "skipped"} <= {m.group(2) for m in matched}
    assert any(line.endswith("Write the sshd drop-in (checked with sshd -t before it is put in place)") for line in lines)
    # the lockout guards ran (not skipped) before password login went off
    for guard in ("Log in from the controller to every node with the key alone",
                  "Log in from this node to its share of the nodes with the key alone"):
        assert any(m.group(2) == "ok" and line.endswith(guard) for line, m in zip(lines, matched)), guard


def test_second_setup_changes_nothing_with_keys_only(lab, inventory, runner_tmp):
    # no password: after the first run the nodes take keys only
    result = api.setup(inventory, tags="ssh,pdsh", progress=None)
    assert result.ok, (result.failures, result.errors)
    assert set(result.hosts) == set(lab.names())
    assert all(c["changed"] == 0 and c["failed"] == 0 and c["ok"] > 0 for c in result.hosts.values()), result.hosts
    assert list(runner_tmp.iterdir()) == []


def _cli(args, cwd):
    # From another directory, with the virtualenv's bin not on PATH, as `.venv/bin/python -m dsmesh`.
    env = {key: value for key, value in os.environ.items() if key not in ("ANSIBLE_CONFIG", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "dsmesh", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_setup_prints_progress_and_exits_0(lab, inventory, tmp_path):
    proc = _cli(["setup", "-i", str(inventory), "--tags", "ssh,pdsh"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    progress = [LINE.match(line) for line in proc.stderr.splitlines()]
    assert {m.group(1) for m in progress if m} == set(lab.names())
    for node in lab.names():
        assert re.search(rf"^{node}\s+ok=\d+\s+changed=0\s+failed=0\s+unreachable=0", proc.stdout, re.M), proc.stdout
    assert "setup: successful (rc=0, site.yml)" in proc.stdout


def test_cli_exit_code_reflects_failure(lab, tmp_path):
    inv = copy.deepcopy(lab.load_inventory())
    del inv["all"]["children"]["master"]
    proc = _cli(["setup", "-i", str(lab.write_inventory(inv, tmp_path / "hosts.yml")), "--tags", "ssh,pdsh", "-q"],
                cwd=tmp_path)
    assert proc.returncode not in (0, None), proc.stdout
    assert "group 'master' must hold exactly one host, it holds 0" in proc.stdout
    assert proc.stderr.strip() == ""  # -q: no progress lines


@pytest.mark.skipif(not (ROOT / "playbooks" / "status.yml").exists(),
                    reason="playbooks/status.yml is not written yet (the lead's part of issue 5)")
def test_status_without_a_job_reports_state_none(inventory):
    result = api.status(inventory, progress=None)
    assert result.job_status is not None and result.job_status["state"] == "none", result.job_status
    assert set(api.JOB_STATUS_KEYS) <= set(result.job_status)
    assert result.ok, (result.failures, result.errors)
