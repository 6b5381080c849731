"""The run directory's protocol and pdsh's command line and parsers: atomic writes, the rank
marker against real processes, what pdsh prints about nodes."""

import subprocess
import sys
import time

import pytest

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh import (
    failed_nodes,
    node_errors,
    node_exit,
    node_lines,
    pdsh_argv,
)


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "exit_code"
    rundir.write_atomic(str(path), "0\n")
    assert path.read_text() == "0\n" and oct(path.stat().st_mode & 0o777) == "0o644"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        rundir.write_json_atomic(str(path), {"big": "x" * 100})
    assert path.read_text() == "0\n" and [p.name for p in tmp_path.iterdir()] == ["exit_code"]


def test_read_helpers_tolerate_missing_and_broken_files(tmp_path):
    assert rundir.read_json(str(tmp_path / "none.json"), {}) == {}
    (tmp_path / "bad.json").write_text("{half")
    assert rundir.read_json(str(tmp_path / "bad.json")) is None
    assert rundir.read_text(str(tmp_path / "none")) is None
    (tmp_path / "log").write_text("".join(f"line {i}\n" for i in range(1000)))
    assert rundir.tail_lines(str(tmp_path / "log"), 3) == ["line 997", "line 998", "line 999"]


@pytest.fixture
def rank(tmp_path):
    """A stand-in rank: a real process whose command line carries the run's marker."""
    out = str(tmp_path / "run" / "output")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", rundir.rank_marker(out)])
    yield out, proc
    proc.kill()
    proc.wait()


def test_the_marker_finds_and_ends_the_runs_ranks_only(rank, tmp_path):
    out, proc = rank
    other = str(tmp_path / "other" / "output")
    assert subprocess.run(["sh", "-c", rundir.find_ranks_command(other)], capture_output=True, text=True).stdout == ""
    # the shell running the check carries the pattern too; "[-]" keeps it from finding itself
    found = subprocess.run(["sh", "-c", rundir.find_ranks_command(out)], capture_output=True, text=True).stdout
    assert found.strip() == "left"
    subprocess.run(["sh", "-c", rundir.kill_ranks_command(out, grace_seconds=1)], check=True)
    deadline = time.time() + 10
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.returncode is not None


def test_pdsh_argv():
    assert pdsh_argv(["a", "b"], "date") == ["pdsh", "-R", "ssh", "-t", "10", "-w", "a,b", "date"]
    assert pdsh_argv(["a"], "true", connect_timeout=5, command_timeout=30)[3:7] == ["-t", "5", "-u", "30"]


# Lines as pdsh and DeepSpeed's launcher printed them in the lab's runs.
LAUNCH_LOG = """\
lab-node1: [2026-11-30 10:01:02,123] [INFO] [launch.py:256:main] process 812 spawned with command: [...]
lab-node2: Traceback (most recent call last):
lab-node2: [2026-11-30 10:01:09,001] [INFO] [launch.py:335:sigkill_handler] Killing subprocess 455
lab-node2: [2026-11-30 10:01:09,002] [ERROR] [launch.py:341:sigkill_handler] ['python'] exits with return code = -9
pdsh@lab-node1: lab-node3: ssh exited with exit code 255
pdsh@lab-node1: lab-node2: ssh exited with exit code 1
"""


def test_failed_nodes_put_the_lost_node_first():
    assert failed_nodes(LAUNCH_LOG) == ["lab-node3", "lab-node2"]
    assert node_exit("pdsh@lab-node1: lab-node3: ssh exited with exit code 255") == ("lab-node3", "255")
    assert node_exit("lab-node1: step 10/40 | loss 3.1") is None


def test_node_lines_and_errors():
    out = 'lab-node1: {"hostname": "lab-node1"}\nlab-node2: {"hostname": "lab-node2"}\nnoise\n'
    assert node_lines(out) == {"lab-node1": ['{"hostname": "lab-node1"}'], "lab-node2": ['{"hostname": "lab-node2"}']}
    err = "pdsh@lab-node1: lab-node2: ssh: connect to host lab-node2 port 22: Connection refused\n"
    assert node_errors(err, ["lab-node1", "lab-node2"]) == {
        "lab-node2": "ssh: connect to host lab-node2 port 22: Connection refused"}


def test_job_status_shows_only_this_launchs_phase(tmp_path):
    """A relaunch into the same output directory finds the last launch's phase.json ("done"); status
    leaves it out until this launch's rank 0 writes its own, and keeps the plan's predicted speed."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils import jobctl

    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out.mkdir()
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        now = time.time()
        rundir.write_json_atomic(str(run_dir / rundir.LAUNCHES), {"launches": [
            {"id": "r2", "pid": rank.pid, "started": "2026-12-01T09:00:00+0000", "started_unix": now}]})
        rundir.write_json_atomic(str(run_dir / rundir.PLAN), {"predicted_tokens_per_s": 1000.0})
        rundir.write_json_atomic(str(out / rundir.PHASE), {"phase": "done", "since": now - 1080})
        status = jobctl.job_status(str(run_dir), str(out))
        assert status["state"] == "running" and "phase" not in status
        assert status["predicted_tokens_per_s"] == 1000.0
        rundir.write_json_atomic(str(out / rundir.PHASE), {"phase": "compiling", "since": now + 2})
        assert jobctl.job_status(str(run_dir), str(out))["phase"]["phase"] == "compiling"
    finally:
        rank.kill()
        rank.wait()
