"""The run directory's protocol (standard library only): its files, the job's states, atomic writes,
and the marker that finds a run's ranks on any node. The deepspeed_job module (jobctl) on the
master, dsmesh.supervise beside the launcher and the training package all use it; the nodes get it
with the node programs.

A run directory on the master holds:

    launches.json        every launch of this run (id, command, pid, start time), newest last
    plan.json            the plan the render chose (with its predicted memory and speed)
    launch_command.json  the newest launch's argv, which dsmesh.supervise runs
    logs/<id>.log        the launcher's output for each launch; launch.log points to the newest
    exit_code            written when the launcher ends: its code, or "stopped"
    failure.json         the node lost and why, when the supervisor ended the job for it
    resume.json          what the launch's resume step did (converted, copied, re-planned), until the
                         start files it into launches.json
    output/              the training package's: metrics.jsonl, summary.json, phase.json, run.json,
                         checkpoints (checkpoint-N/ on every node, each node's copy marked complete)
"""

import json
import os
import re
import shlex
import tempfile

LAUNCHES = "launches.json"
PLAN = "plan.json"
LAUNCH_COMMAND = "launch_command.json"
LOGS = "logs"
LAUNCH_LOG = "launch.log"
EXIT_CODE = "exit_code"
FAILURE = "failure.json"
RESUME = "resume.json"
# In the output directory, written by rank 0 of the training package.
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PHASE = "phase.json"
RUN_RECORD = "run.json"
# In checkpoint-N/ on each node: its copy is complete (the training package, or the resume step that
# put it there); the ranks' files it holds for another node (the supervisor's replication); a complete
# universal copy (DeepSpeed's world-size-free format, the resume step's conversion).
CHECKPOINT_MARKER = "checkpoint_complete.json"
REPLICA_MARKER = "replica_complete.json"
UNIVERSAL_MARKER = "universal_complete.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")

STATES = ("none", "running", "finished", "failed", "stopped")
STOPPED = "stopped"  # exit_code of a run stop.yml ended


def checkpoint_dirs(output_dir):
    """[(step, path)] of the checkpoint-N directories in output_dir, oldest first."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = []
    for name in names:
        m = CHECKPOINT_DIR.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def universal_tag(checkpoint):
    """The tag of checkpoint-N's complete universal copy (its marker and latest_universal agree and
    the directory is there), or None."""
    marker = read_json(os.path.join(checkpoint, UNIVERSAL_MARKER)) or {}
    tag = read_text(os.path.join(checkpoint, "latest_universal"))
    if tag and marker.get("tag") == tag and os.path.isdir(os.path.join(checkpoint, tag)):
        return tag
    return None


def fsync_dir(path):
    """Make a rename in `path` durable; some filesystems refuse fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data, mode=0o644):
    """Replace `path` with `data` (str or bytes) so that a crash leaves the old file or the new one,
    never a part: a temporary file in the same directory, flushed, then renamed over it."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def tail_lines(path, lines=20, window=32768):
    """The last `lines` lines of a (possibly large) text file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - window))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def rank_marker(output_dir):
    """The argument token that names this run's ranks (the launch passes it to every rank)."""
    return f"--output_dir={output_dir}"


def marker_pattern(output_dir):
    """pgrep/pkill -f pattern for the run's ranks; "[-]" keeps it from matching the shell running it."""
    return "[-]" + rank_marker(output_dir)[1:]


def find_ranks_command(output_dir):
    """Shell command printing "left" where a rank of this run still runs."""
    pattern = shlex.quote(marker_pattern(output_dir))
    return f"pgrep -f -- {pattern} >/dev/null && echo left || true"


def kill_ranks_command(output_dir, grace_seconds=2):
    """Shell command ending every rank of this run on a node: TERM, a grace, then KILL."""
    pattern = shlex.quote(marker_pattern(output_dir))
    return f"pkill -TERM -f -- {pattern} && sleep {grace_seconds}; pkill -KILL -f -- {pattern}; true"
