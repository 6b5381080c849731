"""dsmesh.api's event handling, fed with ansible-runner events recorded from real runs
(tests/unit/data/runner_events.json says which): progress lines, per-host results, failures,
job_status. No playbook runs here."""
import copy
import io
import json
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]

from dsmesh import api, events  # noqa: E402
from dsmesh import format as fmt  # noqa: E402
from dsmesh.__main__ import exit_code, format_summary  # noqa: E402
from dsmesh.follow import StatusView  # noqa: E402
from dsmesh.logs import LogFollower, master_host, node_names, shown  # noqa: E402
from dsmesh.options import OptionError, extra_vars_args, vault_args  # noqa: E402
from dsmesh.plan_table import plan_lines  # noqa: E402

RUNS = json.loads((Path(__file__).parent / "data" / "runner_events.json").read_text())["runs"]
CLI_RUNS = json.loads((Path(__file__).parent / "data" / "cli_runs.json").read_text())["runs"]
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
    for event in RUNS["setup_first"]:
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


def test_preflight_report_from_the_preflight_task():
    recorded = json.loads((Path(__file__).parent / "data" / "preflight_event.json").read_text())["event"]
    found = events.build_result([recorded], action="preflight", playbook="playbooks/preflight.yml",
                                status="successful", rc=0).preflight
    assert set(found) == set(events.PREFLIGHT_KEYS)
    assert found["report"][0].startswith("ok    ssh ") and found["report"][-1].startswith("ok    all-reduce ")
    assert [r["check"] for r in found["rows"]][:3] == ["ssh", "pdsh", "versions"]
    assert found["collective"]["backend"] == "gloo" and found["collective"]["world_size"] == 1
    # other tasks' results carry no preflight
    assert result("setup_first", "successful", 0).preflight is None


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
    status = events.build_result(RUNS["status_none"], action="status", playbook="playbooks/status.yml",
                                 status="successful", rc=0)
    summary = format_summary(status).splitlines()
    assert summary[0] == "no job has run in /var/lib/dsmesh/runs/lab"
    assert summary[-1] == "status: successful (rc=0, playbooks/status.yml)"


def test_missing_inventory_is_refused_before_ansible_runs(tmp_path):
    # ansible-runner would take a path that does not exist for inventory text
    with pytest.raises(FileNotFoundError):
        api.setup(tmp_path / "nope.yml", progress=None)
    assert api._as_list("ssh, pdsh") == ["ssh", "pdsh"] and api._as_list(["env"]) == ["env"]
    assert api._as_list(None) == [] and api._join([]) is None


# ---------------------------------------------------------------------------------------------
# The command line's -e and vault options, passed on as ansible-playbook takes them.

def test_extra_vars_are_passed_on_in_order_with_files_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "vars.yml").write_text("steps: 10\n")
    monkeypatch.chdir(tmp_path)
    given = ["a=1 b='two words'", "@vars.yml", '{"deepspeed_job_train_args": {"max_steps": 5}}',
             "{lr: 1.0e-5}", "url=http://x/?q=1"]
    assert extra_vars_args(given) == [
        "-e", "a=1 b='two words'", "-e", f"@{tmp_path}/vars.yml",
        "-e", '{"deepspeed_job_train_args": {"max_steps": 5}}', "-e", "{lr: 1.0e-5}", "-e", "url=http://x/?q=1"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert extra_vars_args(["@~/vars.yml"], cwd="/") == ["-e", f"@{tmp_path}/vars.yml"]


@pytest.mark.parametrize("value, reason", [
    ("novalue", "expected key=value, inline JSON/YAML or @file"),
    ("./vars.yml", "a file of variables is written @./vars.yml"),
    ("{lr: ", "not JSON or YAML"),
    ("[1, 2]", "not a mapping of variables"),
    ("@missing.yml", "no such file"),
])
def test_extra_vars_ansible_playbook_would_refuse_are_refused_first(value, reason, tmp_path):
    with pytest.raises(OptionError, match=re.escape(reason)):
        extra_vars_args([value], cwd=tmp_path)


def test_vault_options(tmp_path):
    (tmp_path / "pass").write_text("secret\n")
    args, prompts = vault_args(password_files=["pass"], vault_ids=["prod@pass", "dev@prompt", "prompt"],
                               ask_vault_pass=False, cwd=tmp_path)
    assert args == ["--vault-password-file", f"{tmp_path}/pass", "--vault-id", f"prod@{tmp_path}/pass"]
    assert prompts == ["dev", "default"]
    with pytest.raises(OptionError, match="asked for twice"):
        vault_args(vault_ids=["prompt"], ask_vault_pass=True)
    with pytest.raises(OptionError, match="no such file"):
        vault_args(vault_ids=["prod@nope"], cwd=tmp_path)
    # the prompts ansible-playbook prints (ansible.cli's vault prompt formats), answered by run()
    assert re.match(api.vault_prompt_pattern("default"), "Vault password: ")
    assert re.match(api.vault_prompt_pattern("dev"), "Vault password (dev): ")
    assert not re.match(api.vault_prompt_pattern("dev"), "Vault password (prod): ")


# ---------------------------------------------------------------------------------------------
# Human formatting of what the playbooks report (CLI_RUNS: real runs on the demo lab).

def cli_result(run, action):
    return events.build_result(CLI_RUNS[run], action=action, playbook=api.PLAYBOOKS[action], status="successful", rc=0)


def test_numbers_in_words():
    assert [fmt.duration(s) for s in (None, 0.4, 45, 200, 7500, 3 * 86400 + 4 * 3600)] == [
        "?", "0s", "45s", "3m20s", "2h05m", "3d04h"]
    assert [fmt.count(n) for n in (812, 12345, 4_560_000, 1.2e9, 987_654)] == ["812", "12.3k", "4.56M", "1.2B", "988k"]
    assert fmt.loss(3.707343101501465) == "3.7073" and fmt.percent(0.3966) == "39.7%" and fmt.gib(90.7234) == "90.72"


def test_status_of_a_training_run_in_words():
    job = cli_result("status_training", "status").job_status
    now = job["metrics"]["time"] + 1.5  # 1.5 s after the trainer logged step 10
    assert job["loss"] == 3.707343101501465  # what the status reports, in full
    assert fmt.status_line(job, now=now) == "running, training (1s) | step 10 | loss 3.7073 | 8.77k tokens/s | ETA 2s"
    assert fmt.job_summary(job, now=now) == [
        "run rec-20261201-090845: running since " + fmt.local_time("2026-12-01T09:08:46+0000") + ", training (1s)",
        "  step 10 | loss 3.7073 | 8.77k tokens/s | ETA 2s",
        "  log: /var/lib/dsmesh/runs/rec/logs/rec-20261201-090845.log on the master (dsmesh logs)"]
    # where the status carries them: the run's length, MFU, the prediction
    more = {**job, "max_steps": 40, "predicted_tokens_per_s": 10000.0,
            "metrics": {**job["metrics"], "mfu": 0.412}}
    assert fmt.status_line(more, now=now) == ("running, training (1s) | step 10/40 | loss 3.7073 | 8.77k tokens/s "
                                              "(predicted 10k, 87.7% of it) | MFU 41.2% | ETA 2s")
    compiling = {**job, "step": None, "loss": None, "tokens_per_s": None, "metrics": None,
                 "phase": {"phase": "compiling", "since": now - 7}}
    assert fmt.status_line(compiling, now=now) == "running, compiling (7s)"
    # a relaunch into the same output directory: the last launch's phase.json is not this one's
    stale = {**compiling, "phase": {"phase": "done", "since": fmt.started_at(job) - 600}}
    assert fmt.status_line(stale, now=now) == "running, starting"


def test_finished_failed_and_starting_runs_in_words():
    finished = fmt.job_summary(cli_result("status_finished", "status").job_status)
    assert finished[:2] == [
        "run rec-20261201-090845: finished",
        "  40 steps, loss 8.0987 -> 3.3339, 40.5k tokens in 5s of training (7.91k tokens/s), 8s wall, world size 2"]
    assert "  final model (Hugging Face format): /var/lib/dsmesh/runs/rec/output/final_model on the master" in finished
    failed = fmt.job_summary(cli_result("status_failed", "status").job_status)
    assert failed[0] == "run recfail-20261201-091024: failed (exit 247) on dsmesh-node2"
    assert failed[2] == "  dsmesh-node2: pdsh@dsmesh-node1: dsmesh-node2: ssh exited with exit code 247"
    assert all(len(line) <= 164 for line in failed)  # the launch command's long lines are clipped
    starting = fmt.job_summary(cli_result("status_starting", "status").job_status)
    assert len(starting) == 2 and starting[0].startswith("run rec-20261201-090845: running since ")
    for lines in (finished, failed, starting):  # no raw floats or dicts anywhere
        assert not re.search(r"\d\.\d{5,}|[{}]", "\n".join(lines)), lines


def test_the_plan_as_tables():
    report = cli_result("plan_example", "plan").plan
    assert report["plan"]["zero_stage"] == 3 and report["argv"][0].endswith("deepspeed")
    lines = plan_lines(report)
    text = "\n".join(lines)
    assert lines[0] == "Model: DeepSeek-R1-Distill-Qwen-32B, 32.8B parameters, full fine-tune, sequence 4096, global batch 64"
    memory = lines[lines.index("GPU memory per rank    GiB"):]
    assert memory[2:6] == ["model states         37.23", "  parameters          3.81", "  gradients           7.63",
                           "  optimizer states   22.89"]
    assert "peak reserved        90.72" in memory and "of 91.62 GiB usable (96.00 on the device)" in memory
    assert "GPU: 8 rank(s) x 90.72 reserved  725.76" in text and "host: peak                       109.03" in text
    assert "Speed: predicted 4.51k tokens/s over 16 GPU(s) (MFU 39.7% of 148 TFLOP/s per GPU), 58s per step" in text
    assert "Time to finish: ~2d13h per billion tokens; the job counts epochs" in text
    fast = {**report, "plan": {**report["plan"], "predicted_step_seconds": 0.2514}}  # the 0.5B plan on the H200
    assert any(line.endswith("), 0.25s per step") for line in plan_lines(fast))
    assert "Time to finish: ~5d03h for 2B tokens (as given)" in plan_lines(report, tokens=2e9)
    with_steps = {**report, "argv": [*report["argv"], "--max_steps=1000"]}
    assert ("Time to finish: ~16h07m for 262M tokens (max_steps 1000 x global batch 64 x seq 4096)"
            in plan_lines(with_steps))
    assert "  0.86  ZeRO-0, no offload, no checkpointing, micro-batch 1, compiled layers" in text
    assert not re.search(r"\d\.\d{5,}|[{}]", text)
    unknown = {**report, "plan": {k: v for k, v in report["plan"].items() if not k.startswith("predicted_")},
               "summary": ["speed: NVIDIA X9 is not in the GPU table (plugins/module_utils/gpus.py): no absolute prediction"]}
    assert "Speed: no prediction (NVIDIA X9 is not in the GPU table (plugins/module_utils/gpus.py): no absolute " \
           "prediction)" in plan_lines(unknown)


def test_log_lines_followed_and_filtered_by_node():
    running = cli_result("logs_running", "logs")
    entry = running.logs["dsmesh-node1"]
    assert entry["path"] == running.job_status["log"] and entry["first_line"] == 17
    follower = LogFollower()
    lines = follower.update(running)
    assert len(lines) == entry["text"].count("\n") and {host for host, _ in lines} == {"dsmesh-node1"}
    assert follower.start_lines() == {"dsmesh-node1": 17 + len(lines)}
    # a line still being written waits for the next read, unless the job ended
    partial = copy.deepcopy(running)
    partial.logs["dsmesh-node1"]["text"] = "dsmesh-node1: step 2/40\ndsmesh-node1: step 4"
    assert LogFollower().update(partial) == [("dsmesh-node1", "dsmesh-node1: step 2/40")]
    assert LogFollower().update(partial, final=True)[-1] == ("dsmesh-node1", "dsmesh-node1: step 4")
    # another run: the lines read from the old run's offsets are dropped, the next read starts over
    other = copy.deepcopy(running)
    other.job_status["run_id"] = other.logs["dsmesh-node1"]["run_id"] = "rec-2"
    assert follower.update(other) == [] and follower.start_lines() == {}

    failed = cli_result("logs_failed", "logs")
    names = node_names(failed)
    assert names == {"dsmesh-node1": "dsmesh-node1", "dsmesh-node2": "dsmesh-node2"}
    master = master_host(failed)
    assert master == "dsmesh-node1" and failed.logs["dsmesh-node2"]["path"] is None
    read = LogFollower().update(failed, final=True)
    only2 = [shown(host, line, master, "dsmesh-node2", names) for host, line in read]
    only2 = [line for line in only2 if line is not None]
    assert only2 and all(line.startswith("dsmesh-node2: ") for line in only2)
    assert any("[dsmesh.supervise" in shown(h, line, master) for h, line in read)  # unfiltered: as it is
    assert shown("dsmesh-node2", "own line", master) == "dsmesh-node2: own line"


def test_followed_status_on_a_terminal_and_in_a_pipe():
    job = cli_result("status_training", "status").job_status
    later = {**cli_result("status_finished", "status").job_status, "max_steps": 40}
    pipe = io.StringIO()
    with StatusView(Console(file=pipe, width=200)) as view:
        view.update(job)
        view.update(job)  # no change: no line
        view.update(later)
    printed = pipe.getvalue().splitlines()
    assert len(printed) == 2 and printed[0].endswith("running, training (" + printed[0].split("training (")[1])
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] finished \| step 40/40 \| loss 3\.3339 \| 9\.27k tokens/s", printed[1])
    terminal = io.StringIO()
    with StatusView(Console(file=terminal, width=160, force_terminal=True)) as view:
        view.update({**job, "max_steps": 40})
    screen = terminal.getvalue()
    assert "10/40" in screen and "loss 3.7073 | 8.77k tokens/s" in screen and "\x1b[" in screen
