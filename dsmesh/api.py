"""dsmesh's Python API: set up a cluster, check it, plan, launch a training job, watch it and stop it.

Each function runs one of the collection's playbooks with ansible-runner against an inventory,
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
| `plan`      | playbooks/render.yml, on the controller (its `Result.plan` is the plan) |
| `launch`    | playbooks/launch.yml      |
| `status`    | playbooks/status.yml (its `Result.job_status` is the job's state) |
| `logs`      | playbooks/logs.yml (its `Result.logs` holds each node's log lines) |
| `stop`      | playbooks/stop.yml        |

`follow_status` and `follow_logs` repeat status and logs while the job runs. The same is the
command line `dsmesh` (dsmesh/__main__.py, docs/api.md).
"""
import configparser
import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ansible_runner

from dsmesh.events import (  # noqa: F401 (the API's names, re-exported)
    JOB_STATUS_KEYS,
    EventCollector,
    Failure,
    Result,
    build_result,
    print_to_stderr,
    progress_line,
)
from dsmesh.logs import LogFollower


def collection_root():
    """Where the collection dsmesh.cluster (site.yml, playbooks/, roles/, ansible.cfg) is: the
    checkout this package runs from, else the installed one, found on the Python path as Ansible
    finds collections (`pip install` puts it in site-packages/ansible_collections/dsmesh/cluster)."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "galaxy.yml").is_file() and (checkout / "site.yml").is_file():
        return checkout
    for entry in sys.path:
        installed = Path(entry or ".") / "ansible_collections" / "dsmesh" / "cluster"
        if (installed / "site.yml").is_file():
            return installed.resolve()
    raise RuntimeError("the collection dsmesh.cluster is not installed: pip install dsmesh, or run from its checkout")


ROOT = collection_root()

PLAYBOOKS = {
    "setup": "site.yml",
    "preflight": "playbooks/preflight.yml",
    "plan": "playbooks/render.yml",
    "launch": "playbooks/launch.yml",
    "status": "playbooks/status.yml",
    "logs": "playbooks/logs.yml",
    "stop": "playbooks/stop.yml",
}

# ansible-playbook's vault prompts (ansible.cli's PromptVaultSecret): --ask-vault-pass asks for the
# default id, --vault-id LABEL@prompt for LABEL.
VAULT_DEFAULT_ID = "default"


def vault_prompt_pattern(label):
    """The regex ansible-runner answers the vault prompt of `label` with."""
    if label == VAULT_DEFAULT_ID:
        return r"^Vault password: ?$"
    return rf"^Vault password \({re.escape(label)}\): ?$"


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
        extravars=None, ansible_args=(), vault_passwords=None, progress=print_to_stderr, keep_artifacts=None,
        timeout=None, verbosity=0):
    """Run the playbook of `action` (a key of PLAYBOOKS) against `inventory` and return a Result.

    tags, skip_tags, limit: as ansible-playbook's --tags/--skip-tags/--limit (a list or 'a,b');
        setup always skips the tag launch.
    check: --check (dry run).
    password: the nodes' login password (ansible_password, as an extra var: it overrides the
        inventory's). Needed only for the first setup of nodes that still take passwords.
    extravars: a dict of extra vars; they win over ansible_args' -e.
    ansible_args: more ansible-playbook options, as it takes them (dsmesh.options builds them from
        -e and the vault options): ['-e', 'a=1', '-e', '@/abs/vars.yml', '--vault-id', 'prod@/abs/file'].
    vault_passwords: {vault id: password} answering ansible's vault prompts: 'default' adds
        --ask-vault-pass, any other id --vault-id ID@prompt.
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
    cmdline = ["--check"] if check else []
    cmdline += list(ansible_args)
    passwords = {}
    for label, secret in (vault_passwords or {}).items():
        cmdline += ["--ask-vault-pass"] if label == VAULT_DEFAULT_ID else ["--vault-id", f"{label}@prompt"]
        passwords[vault_prompt_pattern(label)] = secret
    collector = EventCollector(progress, keep_artifacts=keep_artifacts is not None)
    private_data_dir = tempfile.mkdtemp(prefix="dsmesh-runner-")
    try:
        options = dict(
            private_data_dir=private_data_dir,
            project_dir=str(ROOT),  # the runner's cwd: playbook paths are relative to the collection
            playbook=playbook,
            inventory=str(inventory),
            # Written by the runner to <private_data_dir>/env/extravars (0600) and passed as -e @file,
            # so a password never shows on a command line; likewise the vault passwords (env/passwords).
            extravars=extravars,
            passwords=passwords or None,
            tags=_join(tags),
            skip_tags=_join(skip_tags),
            limit=_join(limit),
            cmdline=shlex.join(cmdline) if cmdline else None,
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


# The options every action takes besides its extra vars (run()'s keywords).
RUN_OPTIONS = ("tags", "skip_tags", "limit", "check", "password", "ansible_args", "vault_passwords", "progress",
               "keep_artifacts", "timeout")


def _split(kwargs):
    """run()'s options and the extra vars among an action's keyword arguments."""
    options = {key: kwargs.pop(key) for key in RUN_OPTIONS if key in kwargs}
    return options, kwargs


def setup(inventory, **kwargs):
    """Take the inventory's nodes to a working cluster: site.yml without its launch part
    (`--skip-tags launch` is always added). tags=['ssh', 'pdsh'] for the SSH mesh and pdsh only."""
    options, extravars = _split(kwargs)
    return run("setup", inventory, extravars=extravars, **options)


def preflight(inventory, **kwargs):
    """Check every node before a launch (playbooks/preflight.yml)."""
    options, extravars = _split(kwargs)
    return run("preflight", inventory, extravars=extravars, **options)


def launch(inventory, **kwargs):
    """Launch the training job with `deepspeed --hostfile` on the master (playbooks/launch.yml)."""
    options, extravars = _split(kwargs)
    return run("launch", inventory, extravars=extravars, **options)


def status(inventory, **kwargs):
    """The job's state (playbooks/status.yml): Result.job_status is a dict with keys state
    (none|running|finished|failed|stopped), run_id, step, loss, tokens_per_s, exit_code,
    failed_node, log and what else the deepspeed_job module reports (metrics, phase, summary...);
    None if no task reported one (see docs/api.md)."""
    options, extravars = _split(kwargs)
    return run("status", inventory, extravars=extravars, **options)


def stop(inventory, **kwargs):
    """Stop the running job on every node (playbooks/stop.yml)."""
    options, extravars = _split(kwargs)
    return run("stop", inventory, extravars=extravars, **options)


def plan(inventory, render_dir=None, **kwargs):
    """The job's plan for `inventory`, planned on the controller without contacting any node
    (playbooks/render.yml: the launch's own render step). Result.plan is the deepspeed_render
    module's result: `plan` (the dict), `summary` (its lines), `argv` (the launch command),
    `hosts`, `files`. render_dir keeps the rendered files (hostfile, ds_config.json, .deepspeed_env,
    plan.json, launch.sh); by default they go to a temporary directory that is removed."""
    options, extravars = _split(kwargs)
    with tempfile.TemporaryDirectory(prefix="dsmesh-plan-") as scratch:
        extravars["render_dir"] = str(Path(render_dir).resolve()) if render_dir else scratch
        return run("plan", inventory, extravars=extravars, **options)


def logs(inventory, lines=100, start=None, **kwargs):
    """The run's logs (playbooks/logs.yml): Result.logs is {host: {path, address, first_line, text}}
    for each node that has a log of the run - the master's holds every rank's output, each line
    prefixed by pdsh with its node - and Result.job_status the job's state. `lines`: how many of the
    last lines to read; start: {host: first line} reads each of those nodes from that line on."""
    options, extravars = _split(kwargs)
    extravars.update(logs_lines=int(lines), logs_from=dict(start or {}))
    return run("logs", inventory, extravars=extravars, **options)


def job_state(result):
    return (result.job_status or {}).get("state")


def follow_status(inventory, interval=5.0, retries=3, **kwargs):
    """Yield a status Result every `interval` seconds while the job runs, the first one that is
    not running last. A status that cannot be read is yielded too and tried again, `retries` times
    in a row at most; a canceled run (Ctrl-C) ends it."""
    failures = 0
    while True:
        started = time.monotonic()
        result = status(inventory, **kwargs)
        yield result
        failures = 0 if result.ok else failures + 1
        if result.status == "canceled" or failures > retries or (result.ok and job_state(result) != "running"):
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def follow_logs(inventory, lines=100, interval=2.0, retries=3, **kwargs):
    """Yield (Result, [(host, line), ...]) with the lines each logs() read adds, every `interval`
    seconds while the job runs; the first read gives the last `lines` lines. It ends as
    follow_status does."""
    follower = LogFollower()
    failures = 0
    while True:
        started = time.monotonic()
        result = logs(inventory, lines=lines, start=follower.start_lines(), **kwargs)
        running = job_state(result) == "running"
        yield result, follower.update(result, final=not running) if result.ok else []
        failures = 0 if result.ok else failures + 1
        if result.status == "canceled" or failures > retries or (result.ok and not running):
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


ACTIONS = {"setup": setup, "preflight": preflight, "plan": plan, "launch": launch, "status": status,
           "logs": logs, "stop": stop}
