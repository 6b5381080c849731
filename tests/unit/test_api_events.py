"""dsmesh.api's event handling, fed with ansible-runner events recorded from real runs
(tests/unit/data/runner_events.json says which): progress lines, per-host results, failures,
job_status. No playbook runs here."""
import argparse
import copy
import json
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

from dsmesh import api, events  # noqa: E402
from dsmesh.__main__ import exit_code, format_summary  # noqa: E402

RUNS = json.loads((Path(__file__).parent / "data" / "runner_events.json").read_text())["runs"]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\S+)\s+(ok|changed|FAILED|UNREACHABLE|skipped|ignored|retrying|ERROR|WARNING)"
                  r"\s+(.+)$")


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def lines(run):
    return [line for line in (events.progress_line(e) for e in RUNS[run]) if line is not None]


def result(run, status="failed", rc=2):
    return events.build_result(RUNS[run], action="setup", playbook="site.yml", status=status, rc=rc)


def test_one_line_per_task_result_and_nothing_for_other_events(utc):
    events = RUNS["setup_first"]
    for event in events:
        line = events.progress_line(event)
        if event["event"] in ("runner_on_ok", "runner_on_skipped"):
            host, word, task = LINE.match(line).groups()
            assert host == event["event_data"]["host"]
            assert task == event["event_data"]["task"]
            expected = "skipped" if event["event"] == "runner_on_skipped" else (
                "changed" if event["event_data"]["res"]["changed"] else "ok")
            assert word == expected
            # the runner stamps events in UTC; shown in local time (UTC here)
            assert line.startswith(f"[{event['created'][11:19]}]")
        else:  # play/task starts, runner_on_start, loop items, stats
            assert line is None, event["event"]
    assert {LINE.match(line).group(2) for line in lines("setup_first")} == {"ok", "changed", "skipped"}


def test_times_are_shown_in_local_time(monkeypatch):
    event = RUNS["two_masters"][-1]
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        stamp = events.event_time(event)
    finally:
        monkeypatch.undo()
        time.tzset()
    hour = (int(event["created"][11:13]) + 8) % 24
    assert stamp == f"{hour:02d}{event['created'][13:19]}"


def test_failure_line_names_host_task_and_message():
    (line,) = [line for line in lines("two_masters") if "FAILED" in line]
    host, word, rest = LINE.match(line).groups()
    assert (host, word) == ("dsapi-node1", "FAILED")
    assert rest.startswith("Check the inventory's cluster model => inventory: group 'master' must hold exactly one "
                           "host, it holds 2: dsapi-node1, dsapi-node2.")


def test_unreachable_ignored_retry_and_hidden_results():
    shapes = lines("shapes")
    assert any(LINE.match(l).groups()[:2] == ("node-down", "UNREACHABLE") and "Connection refused" in l for l in shapes)
    ignored = [l for l in shapes if LINE.match(l).group(2) == "ignored"]
    assert len(ignored) == 2
    assert "A failure that is ignored => non-zero return code" in ignored[0]
    assert "Loop with a failing item => item a: non-zero return code" in ignored[1]
    more = lines("more")
    assert any("retrying" in l and l.endswith("Wait for a file that never comes (attempt 1/2)") for l in more)
    assert any("FAILED" in l and "'no_log: true' was specified" in l for l in more)


def test_per_host_results_come_from_the_recap():
    first = result("setup_first", "successful", 0)
    assert first.ok and first.failures == [] and first.errors == []
    assert first.hosts == {
        "dsapi-node1": dict(ok=37, changed=9, failed=0, unreachable=0, skipped=5, rescued=0, ignored=0),
        "dsapi-node2": dict(ok=30, changed=9, failed=0, unreachable=0, skipped=3, rescued=0, ignored=0),
    }
    second = result("setup_second", "successful", 0)
    assert all(counts["changed"] == 0 for counts in second.hosts.values()) and len(second.hosts) == 2
    shapes = result("shapes")
    assert shapes.hosts["node-down"]["unreachable"] == 1 and shapes.hosts["node-down"]["ok"] == 0
    assert shapes.hosts["node-a"]["ignored"] == 2 and shapes.hosts["node-a"]["failed"] == 1


def test_failures_are_failed_and_unreachable_results_not_ignored_ones():
    two_masters = result("two_masters")
    assert not two_masters.ok
    (failure,) = two_masters.failures
    assert failure.host == "dsapi-node1" and failure.task == "Check the inventory's cluster model"
    assert "group 'master' must hold exactly one host, it holds 2" in failure.msg
    host, task, msg = failure  # unpacks as (host, task, msg)
    assert [(f.host, f.task) for f in result("shapes").failures] == [
        ("node-down", "Touch a file"), ("node-a", "Stop here")]
    assert result("shapes").failures[1].msg == "the node is not ready: no GPU"
    assert "Connection refused" in result("shapes").failures[0].msg


def test_job_status_from_set_fact_or_debug_var():
    job_status = result("shapes").job_status
    assert job_status["state"] == "none"
    assert set(job_status) == {"state", "run_id", "step", "loss", "tokens_per_s", "exit_code", "failed_node", "log"}
    # each of the two reporting events carries it on its own
    set_fact, debug = [e for e in RUNS["shapes"] if e["event"] == "runner_on_ok" and e["event_data"]["task"] in
                       ("Set the job's status as a fact", "Report the job's status")]
    for event in (set_fact, debug):
        found = events.build_result([event], action="status", playbook="x", status="successful", rc=0).job_status
        assert found == job_status
    # debug: var=job_status when the fact is missing prints a string: that is no job status
    undefined = copy.deepcopy(debug)
    undefined["event_data"]["res"]["job_status"] = "VARIABLE IS NOT DEFINED!"
    assert events.build_result([undefined], action="status", playbook="x", status="successful", rc=0).job_status is None
    assert result("setup_first", "successful", 0).job_status is None


def test_job_status_from_the_status_playbook_has_every_key():
    # playbooks/status.yml's module returns job_status and set_fact copies it; a dict with only
    # the keys the module knew still comes back with all of them
    status = events.build_result(RUNS["status_none"], action="status", playbook="playbooks/status.yml",
                              status="failed", rc=2)
    assert status.job_status["state"] == "none"
    assert set(events.JOB_STATUS_KEYS) <= set(status.job_status)
    assert status.job_status["exit_code"] is None and status.job_status["run_dir"] == "/var/lib/dsmesh/runs/lab"


def test_ansible_errors_before_any_task():
    missing = result("missing_playbook", rc=1)
    assert missing.errors == ["the playbook: playbooks/nope.yml could not be found"]
    assert missing.hosts == {} and missing.failures == []
    (line,) = lines("missing_playbook")
    assert LINE.match(line).groups() == ("(ansible)", "ERROR", "the playbook: playbooks/nope.yml could not be found")


def test_collector_keeps_what_a_result_needs_and_survives_a_broken_progress_sink():
    seen = []
    collector = events.EventCollector(progress=seen.append)
    for event in RUNS["two_masters"]:
        assert collector(event) is False  # nothing written to the runner's artifacts unless kept
    assert len(seen) == 4 and seen == lines("two_masters")
    assert {e["event"] for e in collector.events} <= events.EventCollector.KEEP

    def broken(line):
        raise BrokenPipeError
    collector = events.EventCollector(progress=broken, keep_artifacts=True)
    assert all(collector(event) is True for event in RUNS["two_masters"])
    assert collector.progress is None
    silent = events.EventCollector(progress=None)
    for event in RUNS["two_masters"]:
        silent(event)
    assert events.build_result(silent.events, action="setup", playbook="site.yml", status="failed", rc=2) \
        == result("two_masters")


def test_result_as_json_summary_and_exit_code():
    failed = result("two_masters")
    assert json.loads(json.dumps(failed.to_dict()))["failures"][0]["host"] == "dsapi-node1"
    assert exit_code(failed) == 2
    assert exit_code(result("setup_first", "successful", 0)) == 0
    assert exit_code(events.Result("stop", "playbooks/stop.yml", "canceled", 254)) == 130
    summary = format_summary(failed)
    assert "dsapi-node1  ok=2  changed=0  failed=1  unreachable=0" in summary
    assert "FAILED dsapi-node1: Check the inventory's cluster model: inventory: group 'master'" in summary
    status = events.build_result(RUNS["shapes"], action="status", playbook="playbooks/status.yml", status="failed", rc=2)
    assert "job: state=none  run_id=None" in format_summary(status)


def test_extravars_and_tags_parsing(tmp_path):
    varfile = tmp_path / "vars.yml"
    varfile.write_text("steps: 10\nmodel: tiny\n")
    assert parse_extravars(["a=1", f"@{varfile}", "model=big", "url=http://x/?q=1"]) == {
        "a": "1", "steps": 10, "model": "big", "url": "http://x/?q=1"}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_extravars(["novalue"])
    assert api._as_list("ssh, pdsh") == ["ssh", "pdsh"] and api._as_list(["env"]) == ["env"]
    assert api._as_list(None) == [] and api._join([]) is None


def test_missing_inventory_is_refused_before_ansible_runs(tmp_path):
    # ansible-runner would take a path that does not exist for inventory text
    with pytest.raises(FileNotFoundError):
        api.setup(tmp_path / "nope.yml", progress=None)
