"""Checkpoints that survive crashes, and which run an output directory belongs to.

The Trainer writes checkpoint-N/ in place. Only after every rank has finished writing (and the
files are flushed to disk) does rank 0 add checkpoint-N/checkpoint_complete.json, written
atomically; without shared storage every node marks its own copy, naming the batch layout that
wrote it and the ranks whose files it holds. Resuming only ever uses a checkpoint with that marker;
a directory without it is what a crash mid-save leaves, and is removed before training goes on. Old
checkpoints are rotated out only after the new one is marked, so the last good one is never at risk.

output_dir/run.json (on every node) records what defines the run (model, data hashes, sequence
length, batch layout, world size, LoRA, seed...). A restart whose definition differs is refused while
checkpoints exist, instead of silently mixing two runs. The world size and how the global batch is
split over it may change only by resuming from a checkpoint's universal copy (the launch converts
one when the nodes change) with checkpoint.load_universal on; the global batch itself never.
"""

import json
import os
import shutil
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.rundir import write_json_atomic

MARKER = rundir.CHECKPOINT_MARKER
RUN_FILE = rundir.RUN_RECORD
# What a run may change only through a universal checkpoint: the world size and its batch layout.
LAYOUT_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
checkpoint_dirs = rundir.checkpoint_dirs


class RunMismatch(ValueError):
    """output_dir holds checkpoints of a different run."""


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


def marker_fields(args):
    """What a node's marker says of the copy it completes: the batch layout that wrote it and the
    global ranks whose files are in it (this node's, or all of them on shared storage)."""
    world = args.world_size
    if args.save_on_each_node:
        from train.distributed import ranks_per_node

        local = ranks_per_node(default=world)
        first = args.process_index - args.local_process_index
        ranks = list(range(first, min(first + local, world)))
    else:
        ranks = list(range(world))
    return {"world_size": world, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "ranks": ranks}


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


def write_run(output_dir, record):
    """run.json as rank 0 recorded it, on another node (a node that becomes the master needs it)."""
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, RUN_FILE), record)


def layout(values):
    return {key: values.get(key) for key in LAYOUT_KEYS}


def global_batch(values):
    world, micro, accum = (values.get(key) for key in LAYOUT_KEYS)
    return world * micro * accum if None not in (world, micro, accum) else None


def describe_layout(values):
    world, micro, accum = (values.get(key) for key in LAYOUT_KEYS)
    return f"{world} rank(s) x micro-batch {micro} x {accum} accumulation step(s)"


def has_universal(path):
    """checkpoint-N holds a complete universal copy, the one its latest_universal tag names."""
    return rundir.universal_tag(path) is not None


def check_resume_layout(path, written, identity, universal):
    """Refuse a resume DeepSpeed could not load; the note for the log when it changes the layout."""
    name = os.path.basename(os.path.normpath(path))
    if layout(written) == layout(identity):
        if universal and not has_universal(path):
            raise RunMismatch(f"checkpoint.load_universal is on in the DeepSpeed config, but {name} has no complete "
                              f"universal copy ({rundir.UNIVERSAL_MARKER}); it was written by this run's layout "
                              f"({describe_layout(written)}): remove checkpoint.load_universal")
        return None
    if not universal or not has_universal(path):
        raise RunMismatch(
            f"{name} was written by {describe_layout(written)}; this run is {describe_layout(identity)}. A ZeRO "
            "checkpoint loads only at the world size and layout that wrote it: launch through the deepspeed_job "
            "role (playbooks/launch.yml), which converts it to DeepSpeed's universal format, or convert it "
            f"(python -m deepspeed.checkpoint.ds_to_universal), mark it ({rundir.UNIVERSAL_MARKER}) and set "
            "checkpoint.load_universal in the DeepSpeed config")
    return (f"{name} was written by {describe_layout(written)}: resuming on {describe_layout(identity)} from its "
            f"universal copy (global batch {global_batch(identity)} kept)")


def prepare_output_dir(output_dir, identity, resume=True, overwrite=False, resume_from=None, universal=False):
    """Decide how this run starts; rank 0 only (the caller broadcasts the result). `universal`:
    DeepSpeed loads checkpoints from their universal copy (checkpoint.load_universal).

    Returns (checkpoint to resume from or None, [notes for the log]). Raises RunMismatch before
    anything in output_dir is changed."""
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
        old = previous.get("identity", {})
        changes = _diff({k: v for k, v in old.items() if k not in LAYOUT_KEYS},
                        {k: v for k, v in identity.items() if k not in LAYOUT_KEYS})
        if changes:
            raise RunMismatch(
                f"{output_dir} holds checkpoints of another run; what differs:\n  " + "\n  ".join(changes)
                + "\nUse another --output_dir, restore the original settings to resume, or --overwrite_output_dir "
                  "to delete the old checkpoints")
        if global_batch(old) is not None and global_batch(old) != global_batch(identity):
            raise RunMismatch(
                f"{output_dir} holds checkpoints of a run with a global batch of {global_batch(old)} sequences per "
                f"step ({describe_layout(old)}); this run's is {global_batch(identity)} ({describe_layout(identity)}). "
                "The learning rate schedule and the data position depend on it: restore the global batch size, use "
                "another --output_dir, or --overwrite_output_dir to delete the old checkpoints")

    later = []
    if resume_from:
        if not os.path.isdir(resume_from):
            raise RunMismatch(f"--resume_from_checkpoint {resume_from}: no such directory")
        m = rundir.CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(resume_from)))
        if os.path.dirname(os.path.abspath(resume_from)) == os.path.abspath(output_dir):
            if not is_complete(resume_from):
                raise RunMismatch(f"--resume_from_checkpoint {resume_from} is incomplete")
            # steps after it will be trained again: their checkpoints must not linger
            later = [path for step, path in checkpoints if m and step > int(m.group(1))]
    elif resume:
        resume_from = latest_complete(output_dir)
    elif checkpoints:
        raise RunMismatch(f"--no_resume, but {output_dir} holds checkpoints; use --overwrite_output_dir to start over")
    if resume_from:
        written = rundir.read_json(os.path.join(resume_from, MARKER), {})
        fallback = (previous or {}).get("identity", identity)
        note = check_resume_layout(resume_from, {k: written.get(k, fallback.get(k)) for k in LAYOUT_KEYS},
                                   identity, universal)
        if note:
            notes.append(note)

    for path in remove_incomplete(output_dir):
        notes.append(f"removed {os.path.basename(path)}: incomplete (a save was interrupted)")
    for path in later:
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {os.path.basename(path)}: after the requested resume point")

    record = previous or {"identity": identity, "starts": []}
    record["identity"] = identity
    record.setdefault("starts", []).append({
        "time": time.time(),
        "resumed_from": os.path.basename(os.path.normpath(resume_from)) if resume_from else None,
        **layout(identity),
    })
    write_json_atomic(os.path.join(output_dir, RUN_FILE), record)
    return resume_from, notes
