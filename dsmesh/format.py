"""Human forms of what the playbooks report (pure functions: tests/unit/test_api_events.py): numbers,
durations, the job's status, a playbook run's recap. The plan's table is dsmesh/plan_table.py."""
import datetime
import time


def duration(seconds):
    """45s, 3m20s, 2h05m, 3d04h."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def count(value):
    """812, 12.3k, 4.56M, 1.2B: three significant digits past a thousand."""
    if value is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.3g}{unit}" if scaled < 100 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}"


def loss(value):
    return "?" if value is None else f"{value:.4f}"


def percent(fraction):
    return "?" if fraction is None else f"{100 * fraction:.1f}%"


def gib(value):
    return "?" if value is None else f"{value:.2f}"


def started_at(job):
    """The newest launch's start (launches.json's started) as a unix time, else None."""
    try:
        return datetime.datetime.strptime(job.get("started") or "", "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def current_phase(job):
    """phase.json's record when this launch wrote it: a relaunch into the same output directory finds
    the last launch's ("done") until its own rank 0 writes one."""
    phase = job.get("phase") or {}
    started = started_at(job)
    if not phase.get("phase") or (started and phase.get("since") and phase["since"] < started - 1):
        return {}
    return phase


def local_time(stamp):
    """HH:MM:SS of launches.json's started (%Y-%m-%dT%H:%M:%S%z) or a unix time, in local time."""
    if stamp is None:
        return None
    try:
        when = (datetime.datetime.fromtimestamp(stamp) if isinstance(stamp, (int, float))
                else datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").astimezone())
    except (TypeError, ValueError):
        return str(stamp)
    return when.strftime("%H:%M:%S")


def max_steps(job):
    """The run's step count where the status reports it (the last metrics line, or the summary)."""
    for source in (job, job.get("metrics") or {}, job.get("summary") or {}):
        if source.get("max_steps"):
            return int(source["max_steps"])
    return None


def eta_seconds(job, now=None):
    """Seconds left: the trainer's estimate at its last log line, less the time since that line."""
    metrics = job.get("metrics") or {}
    eta = metrics.get("eta_s")
    if eta is None:
        return None
    logged = metrics.get("time")
    now = time.time() if now is None else now
    return max(0.0, eta - (now - logged)) if logged else eta


def phase_text(job, now=None):
    """'compiling (42s)': what the run is doing and for how long (phase.json), while it runs."""
    phase = current_phase(job)
    if not phase:
        return None
    since = phase.get("since")
    now = time.time() if now is None else now
    return f"{phase['phase']} ({duration(now - since)})" if since else phase["phase"]


def throughput(job):
    """'1.23k tokens/s' with the prediction beside it when the status carries one."""
    measured = job.get("tokens_per_s")
    if measured is None:
        return None
    text = f"{count(measured)} tokens/s"
    predicted = job.get("predicted_tokens_per_s")
    if predicted:
        text += f" (predicted {count(predicted)}, {percent(measured / predicted)} of it)"
    return text


def progress_fields(job, now=None):
    """The parts of a progress line, in order: step, loss, tokens/s, MFU, ETA (those known)."""
    metrics = job.get("metrics") or {}
    total = max_steps(job)
    parts = []
    if job.get("step") is not None:
        parts.append(f"step {job['step']}/{total}" if total else f"step {job['step']}")
    if job.get("loss") is not None:
        parts.append(f"loss {loss(job['loss'])}")
    if throughput(job):
        parts.append(throughput(job))
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {percent(metrics['mfu'])}")
    eta = eta_seconds(job, now)
    if eta is not None and job.get("state") == "running":
        parts.append(f"ETA {duration(eta)}")
    return parts


def status_line(job, now=None):
    """One line for a job status: 'running, training (3m10s) | step 12/40 | loss 3.7073 | ...'."""
    state = job.get("state") or "unknown"
    head = state
    phase = phase_text(job, now) if state == "running" else None
    if phase:
        head += f", {phase}"
    elif state == "running" and job.get("step") is None:
        head += ", starting"
    return " | ".join([head, *progress_fields(job, now)])


def finished_lines(job):
    summary = job.get("summary") or {}
    lines = []
    if summary:
        losses = ""
        if summary.get("loss_first") is not None and summary.get("loss_last") is not None:
            losses = f", loss {loss(summary['loss_first'])} -> {loss(summary['loss_last'])}"
        rate = f" ({count(summary['tokens_per_s'])} tokens/s)" if summary.get("tokens_per_s") else ""
        lines.append(f"  {summary.get('steps')} steps{losses}, {count(summary.get('tokens'))} tokens in "
                     f"{duration(summary.get('seconds'))} of training{rate}, {duration(summary.get('wall_seconds'))} "
                     f"wall, world size {summary.get('world_size')}")
        if summary.get("resumed_from_step"):
            lines.append(f"  resumed from step {summary['resumed_from_step']}")
        if summary.get("eval_loss") is not None:
            lines.append(f"  eval loss {loss(summary['eval_loss'])}")
        if summary.get("output_dir"):
            lines.append(f"  checkpoints: {summary['output_dir']}/checkpoint-* on every node")
        if summary.get("final_model"):
            lines.append(f"  final model (Hugging Face format): {summary['final_model']} on the master")
        if summary.get("final_model_merged"):
            lines.append(f"  merged model: {summary['final_model_merged']} on the master")
    return lines


def clipped(line, width=160):
    return line if len(line) <= width else line[:width - 3] + "..."


def failed_lines(job):
    lines = []
    failure = job.get("failure") or {}
    if failure.get("reason"):
        lines.append(f"  {failure.get('node')}: {failure['reason']}")
    tail = job.get("log_tail") or []
    if tail:
        lines.append("  last lines of the log (dsmesh logs for more):")
        lines += [f"    {clipped(line)}" for line in tail]
    return lines


def job_summary(job, now=None):
    """The job's status as a few lines: the run and its state, its progress, where to look."""
    if not job:
        return ["job: no status was reported"]
    state = job.get("state")
    if state == "none":
        return [f"no job has run in {job.get('run_dir', 'this run directory')}"]
    head = f"run {job.get('run_id')}: {state}"
    if state == "running":
        started = local_time(job.get("started"))
        if started:
            head += f" since {started}"
        phase = phase_text(job, now)
        if phase:
            head += f", {phase}"
    elif state == "failed":
        head += f" (exit {job.get('exit_code')})" if job.get("exit_code") else ""
        # failed_node is where it started; the other nodes' ranks ended because of it
        if job.get("failed_node"):
            head += f" on {job['failed_node']}"
    lines = [head]
    progress = progress_fields(job, now)
    if progress and state != "finished":
        lines.append("  " + " | ".join(progress))
    if state == "finished":
        lines += finished_lines(job)
    elif state == "failed":
        lines += failed_lines(job)
    if job.get("log"):
        lines.append(f"  log: {job['log']} on the master (dsmesh logs)")
    return lines


def recap_lines(result):
    """The run's per-host counts (as ansible's PLAY RECAP), failures and ansible's own errors."""
    lines = []
    width = max([len(host) for host in result.hosts] + [8])
    for host, counts in result.hosts.items():
        lines.append(f"{host:<{width}}  " + "  ".join(f"{name}={n}" for name, n in counts.items()))
    return lines + problem_lines(result)


def problem_lines(result):
    lines = [f"FAILED {host}: {task}: {msg}" for host, task, msg in result.failures]
    return lines + [f"ERROR {error}" for error in result.errors]


def outcome_line(result):
    return f"{result.action}: {result.status} (rc={result.rc}, {result.playbook})"
