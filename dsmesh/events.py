"""ansible-runner's events as dsmesh reads them (pure functions: tests/unit/test_api_events.py): a
progress line per task result, and a Result per playbook run - the recap's per-host counts, the
failures, ansible's own errors, and what the playbooks report: the job's status (status.yml), the
plan (render.yml's deepspeed_render result) and the run's logs (logs.yml)."""
import datetime
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

# The name a playbook gives the job's state: a fact (set_fact), a debug var (debug: var=...) or a
# module's return value. Result.job_status always has JOB_STATUS_KEYS (None where not reported).
JOB_STATUS_VAR = "job_status"
JOB_STATUS_KEYS = ("state", "run_id", "step", "loss", "tokens_per_s", "exit_code", "failed_node", "log")
# The module whose result is the plan, and the fact logs.yml sets per node with its log's new lines.
PLAN_ACTION = "dsmesh.cluster.deepspeed_render"
# The module whose result is the preflight's report (its task never fails: a FAIL line fails the next one).
PREFLIGHT_ACTION = "dsmesh.cluster.dsmesh_preflight"
PREFLIGHT_KEYS = ("report", "rows", "collective", "nccl", "seconds")
RUN_LOG_VAR = "dsmesh_run_log"

# Per-host counts in a Result, named as in ansible's PLAY RECAP, and where the stats event keeps them.
STATS_KEYS = {"ok": "ok", "changed": "changed", "failed": "failures", "unreachable": "dark",
              "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}

# The task result events that get a progress line, and the word the line shows.
RESULT_WORDS = {"runner_on_ok": "ok", "runner_on_failed": "FAILED", "runner_on_unreachable": "UNREACHABLE",
                "runner_on_skipped": "skipped", "runner_on_async_failed": "FAILED", "runner_retry": "retrying"}

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

log = logging.getLogger(__name__)


class Failure(NamedTuple):
    host: str
    task: str
    msg: str


@dataclass
class Result:
    """What one playbook run did.

    status: ansible-runner's final status: 'successful' or 'failed' ('timeout' past `timeout`,
        'canceled' on Ctrl-C/SIGTERM).
    rc: ansible-playbook's exit code.
    hosts: {host: {ok, changed, failed, unreachable, skipped, rescued, ignored}}, the PLAY RECAP's
        counts (ok counts changed results too, as in the recap); empty when no play ran.
    failures: one Failure(host, task, msg) per failed (not ignored) or unreachable task result.
    errors: ansible's own error lines, for runs that stopped before any task (a missing playbook,
        an inventory that does not parse, a --limit that matches nothing).
    job_status: the dict a task reported as `job_status` (status() fills it), else None.
    plan: deepspeed_render's result (plan(): `plan`, `summary`, `argv`), else None.
    preflight: dsmesh_preflight's result (preflight(), launch(): `report` as printed, `rows`,
        `collective`, `nccl`, `seconds`), else None.
    logs: {host: {path, address, first_line, text}}, what logs.yml read on each node (logs()).
    artifact_dir: where the runner's artifacts were kept (keep_artifacts), else None.
    """
    action: str
    playbook: str
    status: str
    rc: int
    hosts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    job_status: dict | None = None
    plan: dict | None = None
    preflight: dict | None = None
    logs: dict = field(default_factory=dict)
    artifact_dir: str | None = None

    @property
    def ok(self):
        return self.status == "successful"

    def to_dict(self):
        data = asdict(self)
        data["failures"] = [f._asdict() for f in self.failures]
        return data


# ---------------------------------------------------------------------------------------------
# Events -> progress lines and a Result (pure functions: tests/unit/test_api_events.py).

def event_time(event):
    """The event's time as local HH:MM:SS (the runner stamps events in UTC)."""
    created = event.get("created")
    if not created:
        return datetime.datetime.now().strftime("%H:%M:%S")
    stamp = datetime.datetime.fromisoformat(created)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.astimezone().strftime("%H:%M:%S")


def one_line(text):
    return " ".join(str(text).split())


def failure_message(res):
    """The useful part of a failed or unreachable result: msg, the failed items of a loop, stderr."""
    if not isinstance(res, dict):
        return str(res or "")
    if res.get("censored"):  # no_log
        return res["censored"]
    msg = res.get("msg")
    msg = "" if msg is None else str(msg).strip()
    items = [r for r in res.get("results") or [] if isinstance(r, dict) and r.get("failed")]
    if items:  # a loop's own msg is only "One or more items failed"
        msg = "; ".join(f"item {str(r.get('_ansible_item_label', r.get('item')))[:60]}: {failure_message(r)}"
                        for r in items)
    stderr = str(res.get("stderr") or "").strip()
    if stderr:
        tail = "\n".join(stderr.splitlines()[-3:])[-300:]
        msg = f"{msg}: {tail}" if msg else tail
    return msg or "(no message)"


def ansible_message(event):
    """('ERROR'|'WARNING', text) for a line ansible printed itself (not a task result), else None."""
    if event.get("event") != "verbose":
        return None
    text = ANSI_ESCAPE.sub("", event.get("stdout") or "").strip()
    for word in ("ERROR", "WARNING"):
        for prefix in (f"[{word}]:", f"{word}!"):
            if text.startswith(prefix):
                return word, text[len(prefix):].strip()
    return None


def progress_line(event, host_width=16):
    """One line for a task result or an ansible error/warning, None for any other event:
    `[HH:MM:SS] host  ok|changed|FAILED|UNREACHABLE|skipped|ignored|retrying  task name[ => msg]`"""
    kind = event.get("event")
    if kind == "verbose":
        message = ansible_message(event)
        if message is None:
            return None
        return f"[{event_time(event)}] {'(ansible)':<{host_width}}  {message[0]:<11}  {one_line(message[1])}"
    if kind not in RESULT_WORDS:
        return None
    data = event.get("event_data") or {}
    res = data.get("res") or {}
    word = RESULT_WORDS[kind]
    detail = ""
    if kind == "runner_on_ok" and isinstance(res, dict) and res.get("changed"):
        word = "changed"
    elif kind in ("runner_on_failed", "runner_on_async_failed", "runner_on_unreachable"):
        if data.get("ignore_errors"):
            word = "ignored"
        detail = f" => {one_line(failure_message(res))}"
    elif kind == "runner_retry":
        # the result's retries is the number of attempts allowed in all
        detail = f" (attempt {res.get('attempts', '?')}/{res.get('retries', '?')})"
    return f"[{event_time(event)}] {data.get('host', ''):<{host_width}}  {word:<11}  {data.get('task', '')}{detail}"


def reported_job_status(res):
    """The job_status dict a result carries: set_fact's ansible_facts, debug var's key, or a
    module's return value of that name, with every key of JOB_STATUS_KEYS. Anything else (e.g.
    debug's 'VARIABLE IS NOT DEFINED!') is not one."""
    if not isinstance(res, dict):
        return None
    for value in ((res.get("ansible_facts") or {}).get(JOB_STATUS_VAR), res.get(JOB_STATUS_VAR)):
        if isinstance(value, dict):
            return {**dict.fromkeys(JOB_STATUS_KEYS), **value}
    return None


def reported_plan(data):
    """deepspeed_render's result ({plan, summary, argv, ...}) from a task's event data, else None."""
    res = data.get("res")
    # task_action is the module's name as the task spells it, with or without the collection
    action = str(data.get("task_action") or "")
    if action.rsplit(".", 1)[-1] == PLAN_ACTION.rsplit(".", 1)[-1] and isinstance(res, dict) and isinstance(res.get("plan"), dict):
        return {key: res.get(key) for key in ("plan", "summary", "argv", "hosts", "files")}
    return None


def reported_preflight(data):
    """dsmesh_preflight's result ({report, rows, collective, nccl, seconds}) from a task's event data, else None."""
    res = data.get("res")
    action = str(data.get("task_action") or "")
    if (action.rsplit(".", 1)[-1] == PREFLIGHT_ACTION.rsplit(".", 1)[-1] and isinstance(res, dict)
            and isinstance(res.get("report"), list)):
        return {key: res.get(key) for key in PREFLIGHT_KEYS}
    return None


def reported_run_log(res):
    """The dsmesh_run_log fact a result sets (logs.yml), else None."""
    value = (res.get("ansible_facts") or {}).get(RUN_LOG_VAR) if isinstance(res, dict) else None
    return value if isinstance(value, dict) else None


def host_counts(stats):
    """{host: {ok, changed, failed, unreachable, skipped, rescued, ignored}} from playbook_on_stats' data."""
    hosts = {}
    for key in ("processed", *STATS_KEYS.values()):
        for host in stats.get(key) or {}:
            hosts.setdefault(host, None)
    return {host: {name: int((stats.get(key) or {}).get(host, 0)) for name, key in STATS_KEYS.items()}
            for host in hosts}


def build_result(events, *, action, playbook, status, rc, artifact_dir=None):
    """A Result from a run's events (in order), its final status and its exit code."""
    result = Result(action=action, playbook=playbook, status=status, rc=rc, artifact_dir=artifact_dir)
    for event in events:
        kind = event.get("event")
        data = event.get("event_data") or {}
        res = data.get("res") or {}
        if kind == "playbook_on_stats":
            result.hosts = host_counts(data)
        elif kind == "runner_on_unreachable" or (
                kind in ("runner_on_failed", "runner_on_async_failed") and not data.get("ignore_errors")):
            result.failures.append(Failure(data.get("host", ""), data.get("task", ""), failure_message(res)))
        elif kind == "runner_on_ok":
            job_status = reported_job_status(res)
            if job_status is not None:
                result.job_status = job_status  # the last one reported wins
            plan = reported_plan(data)
            if plan is not None:
                result.plan = plan
            preflight = reported_preflight(data)
            if preflight is not None:
                result.preflight = preflight
            run_log = reported_run_log(res)
            if run_log is not None:
                result.logs[data.get("host", "")] = run_log
        elif kind == "verbose":
            message = ansible_message(event)
            if message and message[0] == "ERROR":
                result.errors.append(message[1])
    return result


def print_to_stderr(line):
    print(line, file=sys.stderr, flush=True)


class EventCollector:
    """The runner's event_handler: prints progress lines and keeps the events a Result needs."""

    KEEP = {"playbook_on_stats", "runner_on_ok", "runner_on_failed", "runner_on_async_failed",
            "runner_on_unreachable", "verbose"}

    def __init__(self, progress=print_to_stderr, keep_artifacts=False):
        self.progress = progress
        self.keep_artifacts = keep_artifacts
        self.events = []
        self.host_width = 16

    def __call__(self, event):
        if event.get("event") in self.KEEP:
            self.events.append(event)
        if self.progress is not None:
            host = (event.get("event_data") or {}).get("host") or ""
            self.host_width = max(self.host_width, len(host))
            line = progress_line(event, self.host_width)
            if line is not None:
                try:
                    self.progress(line)
                except Exception:  # a broken progress sink (closed pipe) must not abort the run
                    log.exception("progress callback failed; no more progress lines")
                    self.progress = None
        # True: the runner writes the event to its artifacts, only worth it when they are kept.
        return self.keep_artifacts
