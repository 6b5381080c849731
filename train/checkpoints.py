"""Checkpoints that survive crashes, and which run an output directory belongs to.

The Trainer writes checkpoint-N/ in place. Only after every rank has finished writing (and the
files are flushed to disk) does rank 0 add checkpoint-N/checkpoint_complete.json, written
atomically. Resuming only ever uses a checkpoint with that marker; a directory without it is
what a crash mid-save leaves, and is removed before training goes on. Old checkpoints are rotated
out only after the new one is marked, so the last good one is never at risk.

output_dir/run.json records what defines the run (model, data hashes, sequence length, batch
layout, world size, LoRA, seed...). A restart whose definition differs is refused while
checkpoints exist, instead of silently mixing two runs.
"""

import json
import os
import re
import shutil
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils.rundir import write_json_atomic

MARKER = "checkpoint_complete.json"
RUN_FILE = "run.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class RunMismatch(ValueError):
    """output_dir holds checkpoints of a different run."""


def checkpoint_dirs(output_dir):
    """[(step, path)] of checkpoint-N directories, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def is_complete(path):
    return os.path.isfile(os.path.join(path, MARKER))


def latest_complete(output_dir):
    complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def ensure_latest_tag(path, step):
    """DeepSpeed writes its `latest` tag file on the first node only; a node without shared storage
    needs its own to load its shards on resume (HF's resume reads the tag from `latest`)."""
    tag = f"global_step{step}"
    latest = os.path.join(path, "latest")
    if os.path.isdir(os.path.join(path, tag)) and not os.path.exists(latest):
        tmp = latest + ".tmp"
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, latest)


def mark_complete(path, step, **info):
    write_json_atomic(os.path.join(path, MARKER), {"step": step, "time": time.time(), **info})


def remove_incomplete(output_dir):
    """Delete checkpoint directories a crash left half-written. Returns their paths."""
    removed = []
    for _, path in checkpoint_dirs(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate(output_dir, keep):
    """Keep the newest `keep` complete checkpoints (by step number, not mtime)."""
    if not keep or keep < 1:
        return []
    complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
    doomed = complete[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def flush_to_disk():
    """Push everything this host wrote to stable storage (one call per host is enough)."""
    os.sync()


def _diff(old, new, prefix=""):
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def read_run(output_dir):
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def prepare_output_dir(output_dir, identity, resume=True, overwrite=False, resume_from=None):
    """Decide how this run starts; rank 0 only (the caller broadcasts the result).

    Returns (checkpoint to resume from or None, [notes for the log]). Raises RunMismatch."""
    notes = []
    os.makedirs(output_dir, exist_ok=True)
    checkpoints = checkpoint_dirs(output_dir)
    previous = read_run(output_dir)
    if overwrite:
        for _, path in checkpoints:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(output_dir):
            if name in (RUN_FILE, "metrics.jsonl", "eval.jsonl", "summary.json", "tensorboard") \
                    or name.startswith("final_model"):
                p = os.path.join(output_dir, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        if checkpoints:
            notes.append(f"--overwrite_output_dir: removed {len(checkpoints)} checkpoint(s) and earlier results")
        checkpoints, previous = [], None

    if checkpoints:
        if previous is None:
            raise RunMismatch(
                f"{output_dir} holds checkpoints ({os.path.basename(checkpoints[-1][1])}, ...) that no run of this "
                f"package recorded (no {RUN_FILE}); use another --output_dir, or --overwrite_output_dir to delete them")
        changes = _diff(previous.get("identity", {}), identity)
        if changes:
            raise RunMismatch(
                f"{output_dir} holds checkpoints of another run; what differs:\n  " + "\n  ".join(changes)
                + "\nUse another --output_dir, restore the original settings to resume, or --overwrite_output_dir "
                  "to delete the old checkpoints")

    for path in remove_incomplete(output_dir):
        notes.append(f"removed {os.path.basename(path)}: incomplete (a save was interrupted)")
    if resume_from:
        if not os.path.isdir(resume_from):
            raise RunMismatch(f"--resume_from_checkpoint {resume_from}: no such directory")
        m = _CKPT.match(os.path.basename(os.path.normpath(resume_from)))
        if os.path.dirname(os.path.abspath(resume_from)) == os.path.abspath(output_dir):
            if not is_complete(resume_from):
                raise RunMismatch(f"--resume_from_checkpoint {resume_from} is incomplete")
            # steps after it will be trained again: their checkpoints must not linger
            for step, path in checkpoint_dirs(output_dir):
                if m and step > int(m.group(1)):
                    shutil.rmtree(path, ignore_errors=True)
                    notes.append(f"removed {os.path.basename(path)}: after the requested resume point")
    elif resume:
        resume_from = latest_complete(output_dir)
    elif checkpoint_dirs(output_dir):
        raise RunMismatch(f"--no_resume, but {output_dir} holds checkpoints; use --overwrite_output_dir to start over")

    record = previous or {"identity": identity, "starts": []}
    record["identity"] = identity
    record.setdefault("starts", []).append({
        "time": time.time(),
        "resumed_from": os.path.basename(os.path.normpath(resume_from)) if resume_from else None,
    })
    write_json_atomic(os.path.join(output_dir, RUN_FILE), record)
    return resume_from, notes
