import subprocess

from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh_clock import (
    check_clocks,
    clock_report,
    parse_dates,
    pdsh_command,
)


def test_parse_keeps_only_date_lines():
    out = "n1: 1700000000.250000000\nn2: 1700000054.000000000\npdsh@n1: n3: ssh exited with exit code 255\n"
    assert parse_dates(out) == {"n1": 1700000000.25, "n2": 1700000054.0}


def test_the_seeds_54_second_skew_is_reported():
    # The seed's nodes: 54 s apart, and nobody noticed.
    report = clock_report(["n1", "n2", "n3"], {"n1": 1000.2, "n2": 1054.2}, started=1000.0, finished=1000.4)
    assert report["missing"] == ["n3"]
    assert report["answered"] == ["n1", "n2"]
    assert report["offsets_seconds"] == {"n1": 0.0, "n2": 54.0}
    assert report["skew_seconds"] == 54.0
    assert report["uncertainty_seconds"] == 0.4


def test_pdsh_runs_date_over_ssh_on_every_host():
    cmd = pdsh_command(["a", "b"], 7)
    assert cmd[:2] == ["pdsh", "-R"] and cmd[2] == "ssh" and "-w" in cmd
    assert cmd[cmd.index("-w") + 1] == "a,b" and cmd[-1] == "date +%s.%N"


def test_check_clocks_with_pdsh_exec_on_this_machine(tmp_path):
    # pdsh's exec rcmd runs the command locally for each "host": a real pdsh run, no ssh needed.
    if subprocess.run(["which", "pdsh"], capture_output=True).returncode != 0:
        import pytest
        pytest.skip("pdsh is not installed")

    def run_exec(cmd, **kw):
        hosts = cmd[cmd.index("-w") + 1]
        return subprocess.run(["pdsh", "-R", "exec", "-w", hosts, "date", "+%s.%N"], **kw)

    report = check_clocks(["h1", "h2"], connect_timeout=5, run=run_exec)
    assert report["rc"] == 0, report["stderr"]
    assert report["answered"] == ["h1", "h2"] and report["missing"] == []
    assert report["skew_seconds"] <= report["uncertainty_seconds"] + 0.01
