"""Job control for a detached `deepspeed --hostfile` launch on the master: start it under a run id,
read its state, stop it, end ranks left on any node. The files are the run directory's protocol
(rundir.py); the deepspeed_job module wraps these functions."""

import json
import os
import signal
import subprocess
import time

from . import rundir
from .pdsh import failed_nodes, pdsh_argv


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
    launches = rundir.read_json(os.path.join(run_dir, rundir.LAUNCHES), {}).get("launches", [])
    return launches[-1] if launches else None


def last_metrics(metrics_path):
    """The last logged training step (a dict) from metrics.jsonl, or None."""
    for line in reversed(rundir.tail_lines(metrics_path, lines=200, window=65536)):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row and "loss" in row:
            return row
    return None


def job_status(run_dir, output_dir):
    """state (one of rundir.STATES) with the run's numbers."""
    run = current_run(run_dir)
    if run is None:
        return {"state": "none", "run_dir": run_dir}
    exit_code = rundir.read_text(os.path.join(run_dir, rundir.EXIT_CODE))
    log = os.path.join(run_dir, rundir.LOGS, f"{run['id']}.log")
    if pid_alive(run.get("pid")) and exit_code is None:
        state = "running"
    elif exit_code == "0":
        state = "finished"
    elif exit_code == rundir.STOPPED:
        state = "stopped"
    else:
        state = "failed"
    status = {"state": state, "run_id": run["id"], "run_dir": run_dir, "pid": run.get("pid"),
              "started": run.get("started"), "exit_code": exit_code, "log": log}
    if run.get("resume"):
        status["resume"] = resume_summary(run["resume"])
    metrics = last_metrics(os.path.join(output_dir, rundir.METRICS))
    if metrics:
        status.update(step=metrics.get("step"), loss=metrics.get("loss"),
                      tokens_per_s=metrics.get("tokens_per_s"), metrics=metrics)
    predicted = (rundir.read_json(os.path.join(run_dir, rundir.PLAN)) or {}).get("predicted_tokens_per_s")
    if predicted:
        status["predicted_tokens_per_s"] = predicted
        if status.get("tokens_per_s"):
            status["speed_vs_predicted"] = round(status["tokens_per_s"] / predicted, 3)
    phase = rundir.read_json(os.path.join(output_dir, rundir.PHASE))
    if phase and state == "running" and not stale_phase(phase, run):
        status["phase"] = phase
    summary = rundir.read_json(os.path.join(output_dir, rundir.SUMMARY))
    if summary and state == "finished":
        status["summary"] = summary
    if state == "failed":
        status["failed_nodes"] = failed_nodes("\n".join(rundir.tail_lines(log, 400)))
        failure = rundir.read_json(os.path.join(run_dir, rundir.FAILURE))
        if failure:
            status["failure"] = failure
            if not status["failed_nodes"] and failure.get("node"):
                status["failed_nodes"] = [failure["node"]]
        status["failed_node"] = status["failed_nodes"][0] if status["failed_nodes"] else None
        status["log_tail"] = rundir.tail_lines(log, 15)
        errors = rank_errors(rundir.tail_lines(log, 400))
        if errors:
            status["error"] = errors[-1]
    return status


def stale_phase(phase, run):
    """phase.json from an earlier launch into the same output directory (its "done" is not this
    launch's) until this launch's rank 0 writes its own."""
    started = run.get("started_unix")
    return bool(started and phase.get("since") and phase["since"] < started - 1)


def rank_errors(lines):
    """`node: error: ...` lines: what a rank said before it stopped (a bad input, a full disk)."""
    return [line.strip() for line in lines if ": error: " in line and not line.startswith("[dsmesh.")]


def resume_summary(resume):
    """What the launch's resume step did, for status: the checkpoint, the change of world size and
    layout, conversion and copies."""
    out = {"state": resume.get("state"), "notes": resume.get("notes", [])}
    if resume.get("state") != "resume":
        return out
    written, now = resume.get("written") or {}, resume.get("layout") or {}
    out.update(checkpoint=resume.get("checkpoint"), step=resume.get("step"), universal=resume.get("universal"),
               converted=resume.get("convert"), convert_seconds=resume.get("convert_seconds"),
               copies=len(resume.get("copies") or []), removed=resume.get("remove") or {},
               from_layout=written, to_layout=now)
    out["line"] = (f"resumed from {resume.get('checkpoint')}"
                   + (f", {written.get('world_size')} -> {now.get('world_size')} rank(s)"
                      f" (micro-batch {written.get('per_device_train_batch_size')} x {written.get('gradient_accumulation_steps')}"
                      f" -> {now.get('per_device_train_batch_size')} x {now.get('gradient_accumulation_steps')})"
                      if resume.get("universal") else "")
                   + (f", converted to the universal format in {resume['convert_seconds']:.1f}s"
                      if resume.get("convert_seconds") is not None else "")
                   + (f", {len(resume['copies'])} cop{'y' if len(resume['copies']) == 1 else 'ies'} between nodes"
                      if resume.get("copies") else ""))
    return out


def start(run_dir, command, cwd, env, run_id, supervisor=None):
    """Start the launcher's `command` detached (its own session) under the run id; return the run's
    record. With `supervisor` (argv of dsmesh.supervise, less --run-dir), that runs and reads the
    command from run_dir/launch_command.json, and writes exit_code itself."""
    os.makedirs(os.path.join(run_dir, rundir.LOGS), exist_ok=True)
    rundir.write_json_atomic(os.path.join(run_dir, rundir.LAUNCH_COMMAND), command)
    argv = list(supervisor) + ["--run-dir", run_dir] if supervisor else command
    log = os.path.join(run_dir, rundir.LOGS, f"{run_id}.log")
    for stale in (rundir.EXIT_CODE, rundir.FAILURE):
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(os.environ, **env), stdin=devnull,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    link = os.path.join(run_dir, rundir.LAUNCH_LOG)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join(rundir.LOGS, f"{run_id}.log"), link)
    record = {"id": run_id, "pid": proc.pid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "started_unix": time.time(), "command": command, "cwd": cwd}
    # what the launch's resume step did before this start belongs to this launch
    resume_path = os.path.join(run_dir, rundir.RESUME)
    resume = rundir.read_json(resume_path)
    if resume is not None:
        record["resume"] = resume
        os.remove(resume_path)
    launches = rundir.read_json(os.path.join(run_dir, rundir.LAUNCHES), {}).get("launches", [])
    rundir.write_json_atomic(os.path.join(run_dir, rundir.LAUNCHES), {"launches": launches + [record]})
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
    exit_path = os.path.join(run_dir, rundir.EXIT_CODE)
    if not os.path.exists(exit_path):
        rundir.write_atomic(exit_path, rundir.STOPPED + "\n")
    return True


def end_leftover_ranks(nodes, output_dir, run=subprocess.run):
    """Nodes where a rank of this run was still alive (and is now ended)."""
    if not nodes:
        return []
    check = run(pdsh_argv(nodes, rundir.find_ranks_command(output_dir), command_timeout=30),
                capture_output=True, text=True)
    leftovers = sorted(line.split(":", 1)[0] for line in check.stdout.splitlines() if line.endswith("left"))
    if leftovers:
        run(pdsh_argv(leftovers, rundir.kill_ranks_command(output_dir), command_timeout=30),
            capture_output=True, text=True)
    return leftovers
