"""dsmesh's Python API: set up a cluster, check it, launch a training job, watch it and stop it.

Each function runs one of this repository's playbooks with ansible-runner against an inventory,
prints one progress line per task result while it runs, and returns a `Result`:

    from dsmesh import api
    result = api.setup("inventory/mycluster/hosts.yml", password="...")
    if not result.ok:
        for host, task, msg in result.failures:
            print(host, task, msg)
    print(api.status("inventory/mycluster/hosts.yml").job_status)

| function    | playbook                  |
| ----------- | ------------------------- |
| `setup`     | site.yml, `--skip-tags launch` |
| `preflight` | playbooks/preflight.yml   |
| `launch`    | playbooks/launch.yml      |
| `status`    | playbooks/status.yml (its `Result.job_status` is the job's state) |
| `stop`      | playbooks/stop.yml        |

The same is a command line: `python -m dsmesh {setup,preflight,launch,status,stop} -i INVENTORY`
(see dsmesh/__main__.py and docs/api.md).
"""
import configparser
import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import ansible_runner

ROOT = Path(__file__).resolve().parents[1]

PLAYBOOKS = {
    "setup": "site.yml",
    "preflight": "playbooks/preflight.yml",
    "launch": "playbooks/launch.yml",
    "status": "playbooks/status.yml",
    "stop": "playbooks/stop.yml",
}

# The name a playbook gives the job's state: a fact (set_fact), a debug var (debug: var=...) or a
# module's return value. Result.job_status always has JOB_STATUS_KEYS (None where not reported).
JOB_STATUS_VAR = "job_status"
JOB_STATUS_KEYS = ("state", "run_id", "step", "loss", "tokens_per_s", "exit_code", "failed_node", "log")

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


# ---------------------------------------------------------------------------------------------
# Running a playbook.

def _host_key_checking():
    """ansible.cfg's host_key_checking: ansible-runner turns it off unless the environment says."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "ansible.cfg")
    return config.get("defaults", "host_key_checking", fallback="True")


def runner_envvars():
    env = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    if "ANSIBLE_HOST_KEY_CHECKING" not in os.environ:
        env["ANSIBLE_HOST_KEY_CHECKING"] = _host_key_checking()
    # The runner spawns `ansible-playbook` from PATH: find the one next to this interpreter even
    # when the virtualenv is not activated (`.venv/bin/python -m dsmesh`).
    bindir = Path(sys.executable).parent
    if (bindir / "ansible-playbook").exists():
        env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


@contextlib.contextmanager
def cancel_on_interrupt():
    """A cancel callback for the runner that turns Ctrl-C/SIGTERM into a clean stop of ansible.

    Without it the runner installs its own handlers and never restores them, and an interrupt
    outside the runner's loop would leave ansible-playbook running on its own."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    interrupted = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: interrupted.set())
    try:
        yield interrupted.is_set
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _as_list(value):
    """'a,b', ['a', 'b'] or None -> ['a', 'b'] / []."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [item.strip() for item in value if item and item.strip()]


def _join(value):
    return ",".join(_as_list(value)) or None


def run(action, inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
        extravars=None, progress=print_to_stderr, keep_artifacts=None, timeout=None, verbosity=0):
    """Run the playbook of `action` (a key of PLAYBOOKS) against `inventory` and return a Result.

    tags, skip_tags, limit: as ansible-playbook's --tags/--skip-tags/--limit (a list or 'a,b');
        setup always skips the tag launch.
    check: --check (dry run).
    password: the nodes' login password (ansible_password, as an extra var: it overrides the
        inventory's). Needed only for the first setup of nodes that still take passwords.
    extravars: a dict of extra vars (-e).
    progress: called with each progress line (str); None prints nothing. Default: stderr.
    keep_artifacts: a directory to keep the runner's artifacts in (events, stdout, the command);
        by default nothing is kept.
    timeout: seconds before the run is stopped (status 'timeout').
    """
    playbook = PLAYBOOKS[action]
    if action == "setup":  # setup prepares the cluster; only launch() starts a job
        skip_tags = ["launch", *[tag for tag in _as_list(skip_tags) if tag != "launch"]]
    inventory = Path(inventory).resolve()
    # The runner would take a path that does not exist for inventory *text* and run against nothing.
    if not inventory.exists():
        raise FileNotFoundError(f"inventory {inventory} does not exist")
    extravars = dict(extravars or {})
    if password is not None:
        extravars["ansible_password"] = password
    collector = EventCollector(progress, keep_artifacts=keep_artifacts is not None)
    private_data_dir = tempfile.mkdtemp(prefix="dsmesh-runner-")
    try:
        options = dict(
            private_data_dir=private_data_dir,
            project_dir=str(ROOT),  # the runner's cwd: playbook paths are relative to the repo
            playbook=playbook,
            inventory=str(inventory),
            # Written by the runner to <private_data_dir>/env/extravars (0600) and passed as -e @file,
            # so a password never shows on a command line.
            extravars=extravars,
            tags=_join(tags),
            skip_tags=_join(skip_tags),
            limit=_join(limit),
            cmdline="--check" if check else None,
            verbosity=verbosity or None,
            envvars=runner_envvars(),
            event_handler=collector,
            quiet=True,
            timeout=timeout,
            # The runner polls its cancel callback after each expect() timeout: answer Ctrl-C within 1 s.
            settings={"pexpect_timeout": 1},
            ident=f"{action}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
        )
        if keep_artifacts is not None:
            Path(keep_artifacts).mkdir(parents=True, exist_ok=True)
            options["artifact_dir"] = str(Path(keep_artifacts).resolve())
        with cancel_on_interrupt() as cancel_callback:
            runner = ansible_runner.run(cancel_callback=cancel_callback, **options)
        artifact_dir = runner.config.artifact_dir if keep_artifacts is not None else None
        return build_result(collector.events, action=action, playbook=playbook, status=runner.status,
                            rc=runner.rc, artifact_dir=artifact_dir)
    finally:
        shutil.rmtree(private_data_dir, ignore_errors=True)


def setup(inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
          progress=print_to_stderr, keep_artifacts=None, timeout=None, **extravars):
    """Take the inventory's nodes to a working cluster: site.yml without its launch part
    (`--skip-tags launch` is always added). tags=['ssh', 'pdsh'] for the SSH mesh and pdsh only."""
    return run("setup", inventory, tags=tags, skip_tags=skip_tags, limit=limit, check=check, password=password,
               extravars=extravars, progress=progress, keep_artifacts=keep_artifacts, timeout=timeout)


def preflight(inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
              progress=print_to_stderr, keep_artifacts=None, timeout=None, **extravars):
    """Check every node before a launch (playbooks/preflight.yml)."""
    return run("preflight", inventory, tags=tags, skip_tags=skip_tags, limit=limit, check=check,
               password=password, extravars=extravars, progress=progress, keep_artifacts=keep_artifacts,
               timeout=timeout)


def launch(inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
           progress=print_to_stderr, keep_artifacts=None, timeout=None, **extravars):
    """Launch the training job with `deepspeed --hostfile` on the master (playbooks/launch.yml)."""
    return run("launch", inventory, tags=tags, skip_tags=skip_tags, limit=limit, check=check,
               password=password, extravars=extravars, progress=progress, keep_artifacts=keep_artifacts,
               timeout=timeout)


def status(inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
           progress=print_to_stderr, keep_artifacts=None, timeout=None, **extravars):
    """The job's state (playbooks/status.yml): Result.job_status is a dict with keys state
    (running|finished|failed|none), run_id, step, loss, tokens_per_s, exit_code, failed_node, log,
    taken from the task that reports `job_status` (see docs/api.md); None if no task did."""
    return run("status", inventory, tags=tags, skip_tags=skip_tags, limit=limit, check=check,
               password=password, extravars=extravars, progress=progress, keep_artifacts=keep_artifacts,
               timeout=timeout)


def stop(inventory, *, tags=None, skip_tags=None, limit=None, check=False, password=None,
         progress=print_to_stderr, keep_artifacts=None, timeout=None, **extravars):
    """Stop the running job on every node (playbooks/stop.yml)."""
    return run("stop", inventory, tags=tags, skip_tags=skip_tags, limit=limit, check=check,
               password=password, extravars=extravars, progress=progress, keep_artifacts=keep_artifacts,
               timeout=timeout)


ACTIONS = {"setup": setup, "preflight": preflight, "launch": launch, "status": status, "stop": stop}
