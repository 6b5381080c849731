"""Job control for a detached `deepspeed --hostfile` launch on the master: start it under a run id,
read its state, stop it. A run directory holds:

    run.json          the runs so far (id, command, pid, start time), newest last
    logs/<id>.log     the launcher's output for each run; launch.log points to the newest
    exit_code         written by the wrapper when the launcher ends ("stopped" when stop.yml ended it)
and the training package writes <output_dir>/metrics.jsonl and summary.json.
Pure functions plus small process helpers; the deepspeed_job module wraps them.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import time

# pdsh's own report of a node whose ssh session ended badly, e.g.
# "pdsh@node1: node2: ssh exited with exit code 255"
_PDSH_EXIT = re.compile(r"pdsh@\S+: (?P<node>[^\s:]+): ssh exited with exit code (?P<code>\d+)")
# DeepSpeed's per-node launcher on a rank that died: "node2: ... exits with return code = -9"
_RANK_EXIT = re.compile(r"^(?P<node>[^\s:@]+): .*exits with return code = (?P<code>-?\d+)")
_TRACEBACK = re.compile(r"^(?P<node>[^\s:@]+): Traceback")


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json_atomic(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own finished child) is not running
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def current_run(run_dir):
    runs = read_json(os.path.join(run_dir, "run.json"), {}).get("runs", [])
    return runs[-1] if runs else None


def last_metrics(metrics_path):
    """The last logged training step (a dict) from metrics.jsonl, or None."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row and "loss" in row:
            return row
    return None


def failed_nodes(log_text):
    """Nodes the launcher's log blames, the likeliest cause first.

    When one rank dies, its peers fail too a moment later (their collectives lose it), so order of
    appearance is not enough: a node whose ssh session was lost (exit 255) comes first, then a node
    whose rank was killed by a signal (return code < 0), then the others in the order seen."""
    lost, killed, others = [], [], []
    for line in log_text.splitlines():
        m = _PDSH_EXIT.search(line)
        if m:
            (lost if m.group("code") == "255" else others).append(m.group("node"))
            continue
        m = _RANK_EXIT.search(line)
        if m and m.group("code") != "0":
            (killed if m.group("code").startswith("-") else others).append(m.group("node"))
            continue
        m = _TRACEBACK.search(line)
        if m:
            others.append(m.group("node"))
    ordered = []
    for node in lost + killed + others:
        if node not in ordered:
            ordered.append(node)
    return ordered


def tail(path, lines=20):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 32768))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def job_status(run_dir, output_dir):
    """state: none | running | finished | failed | stopped, with the run's numbers."""
    run = current_run(run_dir)
    if run is None:
        return {"state": "none", "run_dir": run_dir}
    exit_path = os.path.join(run_dir, "exit_code")
    exit_code = open(exit_path).read().strip() if os.path.exists(exit_path) else None
    log = os.path.join(run_dir, "logs", f"{run['id']}.log")
    if pid_alive(run.get("pid")) and exit_code is None:
        state = "running"
    elif exit_code == "0":
        state = "finished"
    elif exit_code == "stopped":
        state = "stopped"
    else:
        state = "failed"
    status = {"state": state, "run_id": run["id"], "run_dir": run_dir, "pid": run.get("pid"),
              "started": run.get("started"), "exit_code": exit_code, "log": log}
    metrics = last_metrics(os.path.join(output_dir, "metrics.jsonl"))
    if metrics:
        status.update(step=metrics.get("step"), loss=metrics.get("loss"),
                      tokens_per_s=metrics.get("tokens_per_s"), metrics=metrics)
    summary = read_json(os.path.join(output_dir, "summary.json"))
    if summary and state == "finished":
        status["summary"] = summary
    if state == "failed":
        text = "\n".join(tail(log, 400))
        status["failed_nodes"] = failed_nodes(text)
        failure = read_json(os.path.join(run_dir, "failure.json"))
        if failure:
            status["failure"] = failure
            if not status["failed_nodes"] and failure.get("node"):
                status["failed_nodes"] = [failure["node"]]
        status["failed_node"] = status["failed_nodes"][0] if status["failed_nodes"] else None
        status["log_tail"] = tail(log, 15)
    return status


def start(run_dir, command, cwd, env, run_id, supervisor=None):
    """Start the launcher's `command` detached (its own session) under the run id; return the run's
    record. With `supervisor` (argv of dsmesh.supervise, less --run-dir), that runs and reads the
    command from run_dir/launch_command.json, and writes exit_code itself."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "launch_command.json"), command)
    argv = list(supervisor) + ["--run-dir", run_dir] if supervisor else command
    log = os.path.join(run_dir, "logs", f"{run_id}.log")
    for stale in ("exit_code", "failure.json"):
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(os.environ, **env), stdin=devnull,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    link = os.path.join(run_dir, "launch.log")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join("logs", f"{run_id}.log"), link)
    record = {"id": run_id, "pid": proc.pid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
              "cwd": cwd}
    runs = read_json(os.path.join(run_dir, "run.json"), {}).get("runs", [])
    write_json_atomic(os.path.join(run_dir, "run.json"), {"runs": runs + [record]})
    return record


def stop(run_dir, timeout=90):
    """Stop the run: SIGTERM to its supervisor (dsmesh.supervise interrupts the launcher, which ends
    the ranks on every node, then kills any rank left), SIGKILL to the whole group if it lingers.
    True if it was running."""
    run = current_run(run_dir)
    if not run or not pid_alive(run.get("pid")):
        return False
    pgid = int(run["pid"])
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig) if sig == signal.SIGKILL else os.kill(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and pid_alive(pgid):
            time.sleep(0.5)
        if not pid_alive(pgid):
            break
    exit_path = os.path.join(run_dir, "exit_code")
    if not os.path.exists(exit_path):
        with open(exit_path, "w") as f:
            f.write("stopped\n")
    return True


def kill_ranks_command(marker):
    """The shell command that ends any rank still running for this run on a node."""
    return f"pkill -TERM -f -- {shlex.quote(marker)} && sleep 2; pkill -KILL -f -- {shlex.quote(marker)}; true"
