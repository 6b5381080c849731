"""How a relaunch resumes a run whose nodes changed (standard library only, no I/O): from what every
node that takes part holds of the run's checkpoints, which step to resume from, whether the change
of world size can be carried, what to convert and which copies to make. dsmesh.resume surveys the
nodes, asks plan_resume(), and carries the plan out.

A node's survey (dsmesh.resume survey) is {"run": run.json or None, "free_bytes": n, "checkpoints":
{"<step>": {"marker", "replica", "universal": the markers (or None), "tag": "global_stepN" or None,
"rank_bytes": {"<rank>": bytes of that rank's files here}, "bytes": the whole copy's}}}.

Checkpoints without shared storage: every node holds the files of its own ranks, marked complete by
the training package (checkpoint_complete.json: layout and ranks), and the supervisor copies each
node's ranks of every new checkpoint to the next node of the ring (replica_complete.json), so that
the state of every rank survives the loss of any one node. A rank's files count where a marker says
they are complete.
"""

import re

from .hostfile import resolve_nodes

# DeepSpeed's per-rank checkpoint files: ZeRO optimizer partitions and (ZeRO-3) model partitions.
RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")
RNG_FILE = re.compile(r"^rng_state_(?P<rank>\d+)\.pth$")
LAYOUT_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
UNIVERSAL_SUFFIX = "_universal"


class ResumeError(ValueError):
    """The run's checkpoints cannot be carried to the nodes of this launch; the message says why and
    what to do."""


def rank_of(name):
    """The global rank a checkpoint file belongs to (DeepSpeed's partition or HF's RNG state), or None."""
    m = RANK_FILE.match(name) or RNG_FILE.match(name)
    return int(m.group("rank")) if m else None


def layout(values):
    return {key: (values or {}).get(key) for key in LAYOUT_KEYS}


def global_batch(values):
    world, micro, accum = (layout(values)[key] for key in LAYOUT_KEYS)
    return world * micro * accum if None not in (world, micro, accum) else None


def describe_layout(values):
    world, micro, accum = (layout(values)[key] for key in LAYOUT_KEYS)
    return f"{world} rank(s) x micro-batch {micro} x {accum} accumulation step(s)"


def rank_ranges(hosts):
    """{node name: [its global ranks]} for hosts in rank order (each host's slots, one after another)."""
    out, first = {}, 0
    for host in hosts:
        out[host["name"]] = list(range(first, first + int(host["slots"])))
        first += int(host["slots"])
    return out


def launch_hosts(nodes, master):
    """The nodes in the order the launch's hostfile gives them ranks (master first)."""
    return resolve_nodes(nodes, master)


def _gib(n):
    return f"{n / 2 ** 30:.1f} GiB"


def identity_changes(identity, job):
    """What the launch's settings change in the run's identity that no resume can carry."""
    changes = []
    model = identity.get("model")
    if model is not None and _norm(model) != _norm(job["model_dir"]):
        changes.append(f"model: {model} -> {job['model_dir']} (training_env_model_dir)")
    seq = identity.get("max_seq_length")
    if seq is not None and int(seq) != int(job["max_seq_length"]):
        changes.append(f"sequence length: {seq} -> {job['max_seq_length']} (deepspeed_job_max_seq_length)")
    old_lora, new_lora = identity.get("lora"), job.get("lora")
    if (old_lora is None) != (new_lora is None):
        changes.append(f"fine-tune: {'full' if old_lora is None else 'lora'} -> {'full' if new_lora is None else 'lora'}"
                       " (deepspeed_job_finetune): the checkpoints hold the state of other trained weights")
    elif old_lora is not None:
        for key in ("r", "alpha", "dropout"):
            if key in old_lora and float(old_lora[key]) != float(new_lora[key]):
                changes.append(f"LoRA {key}: {old_lora[key]} -> {new_lora[key]} (deepspeed_job_lora_{key})")
        targets = list(new_lora.get("target_modules") or [])
        if targets and sorted(targets) != sorted(old_lora.get("target_modules") or []):
            changes.append(f"LoRA target modules: {old_lora.get('target_modules')} -> {targets} "
                           "(deepspeed_job_lora_target_modules)")
    old_batch = global_batch(identity)
    if old_batch is not None and old_batch != int(job["global_batch_size"]):
        changes.append(f"global batch size: {old_batch} -> {job['global_batch_size']} (deepspeed_job_global_batch_size):"
                       " the learning rate schedule and the data position depend on it")
    return changes


def _norm(path):
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def _run_record(surveys, master):
    """run.json from the master, else the one of another node with the most starts."""
    if (surveys.get(master) or {}).get("run"):
        return surveys[master]["run"], master
    found = [(len(s["run"].get("starts", [])), name) for name, s in surveys.items() if s.get("run")]
    if not found:
        return None, None
    name = max(found)[1]
    return surveys[name]["run"], name


def _copies_of(surveys, step):
    """For one step: ({node: its checkpoint entry}, {rank: [nodes holding it complete]}, marked nodes,
    nodes with a complete universal copy)."""
    entries = {name: s["checkpoints"][step] for name, s in surveys.items() if step in s.get("checkpoints", {})}
    holders, marked, universal = {}, [], []
    for name, entry in entries.items():
        ranks = set()
        present = {int(r) for r in entry.get("rank_bytes", {})}
        if entry.get("marker"):
            marked.append(name)
            # a marker of an older package names no ranks: its node's files are all its own
            ranks |= set(entry["marker"].get("ranks", present))
        if entry.get("replica"):
            ranks |= set(entry["replica"].get("ranks", []))
        for rank in sorted(ranks & present):
            holders.setdefault(rank, []).append(name)
        if entry.get("universal"):
            universal.append(name)
    return entries, holders, marked, universal


def _prefer(candidates, master, order):
    """A source among candidates: the master first (its own disk), then in rank order."""
    if master in candidates:
        return master
    return sorted(candidates, key=order.index)[0]


def _pins(identity, written, world, user_overrides):
    """Plan overrides that keep the checkpoint loadable, whether the layout changes (universal), and
    refusals of the user's overrides that contradict the checkpoint."""
    errors, pins = [], {}
    stage = identity.get("zero_stage")
    engine = "torch" if stage is None else "deepspeed"
    pins["engine"] = engine
    if stage is not None:
        pins["zero_stage"] = int(stage)
    for key, value in pins.items():
        if key in user_overrides and user_overrides[key] != value:
            errors.append(f"deepspeed_job_plan_overrides.{key} is {user_overrides[key]!r}, but the run's checkpoints "
                          f"were written with {key} {value!r}, which a resume cannot change: remove the override, or "
                          "use another deepspeed_job_run_name to start a new run")
    universal = written["world_size"] != world
    micro = user_overrides.get("micro_batch_size")
    if not universal:
        if micro is None:
            pins["micro_batch_size"] = written["per_device_train_batch_size"]
        elif int(micro) != written["per_device_train_batch_size"]:
            universal = True
    if universal and engine == "torch":
        errors.append(f"the checkpoints were written by the torch engine ({describe_layout(written)}), whose state "
                      f"cannot be carried to {world} rank(s); launch on the nodes that wrote them, or use another "
                      "deepspeed_job_run_name to start a new run")
    return pins, universal, errors


def plan_resume(surveys, hosts, job, master):
    """The resume of a relaunch on `hosts` ([{"name", "slots", ...}] in rank order, master first).

    surveys: {node name: survey} of every node in hosts. job: {"model_dir", "max_seq_length", "lora"
    (None or {"r", "alpha", "dropout", "target_modules"}), "global_batch_size", "plan_overrides"}.
    Returns {"state": "fresh" | "resume", "notes": [...], and for a resume "step", "checkpoint", "tag",
    "written" (its layout), "world_size", "universal" (load the universal copy), "convert" (make it on
    the master), "gather" / "copies" ([{"to", "from", "ranks", "base", "universal"}]), "remove"
    ({node: [later steps]}), "plan_overrides", "config_overrides"}. Raises ResumeError."""
    order = [h["name"] for h in hosts]
    world = sum(int(h["slots"]) for h in hosts)
    unreachable = {name: s["error"] for name, s in surveys.items() if s.get("error")}
    if unreachable:
        raise ResumeError("cannot see the run's checkpoints on " + "; ".join(
            f"{name}: {why}" for name, why in sorted(unreachable.items()))
            + ". Bring the node back, or remove it from the inventory to resume without it")
    steps = sorted({int(step) for s in surveys.values() for step in s.get("checkpoints", {})}, reverse=True)
    if not steps:
        return {"state": "fresh", "notes": ["no checkpoint of this run on any node: the run starts from step 0"]}
    run, run_node = _run_record(surveys, master)
    if run is None:
        raise ResumeError(f"checkpoints of this run are on {', '.join(sorted(n for n in surveys if surveys[n].get('checkpoints')))} "
                          "but no node has its run.json (what defines the run); use another deepspeed_job_run_name, or "
                          "delete the output directory's checkpoints to start over")
    identity = run.get("identity", {})
    changes = identity_changes(identity, job)
    if changes:
        raise ResumeError("this launch cannot resume the run's checkpoints; it changes what defines the run:\n  "
                          + "\n  ".join(changes) + "\nRestore those settings to resume, or use another "
                          "deepspeed_job_run_name to start a new run")
    notes = [] if run_node == master else [f"run.json taken from {run_node} (the master has none)"]
    skipped = []
    for step in steps:
        plan = _plan_step(str(step), surveys, hosts, order, world, master, identity, job, skipped)
        if plan:
            break
    else:
        raise ResumeError("no checkpoint of this run can be resumed on the nodes of this launch:\n  "
                          + "\n  ".join(skipped) + "\nAdd the nodes that hold the missing ranks back to the "
                          "inventory, or use another deepspeed_job_run_name to start a new run")
    newer = [s for s in steps if s > plan["step"]]
    plan["remove"] = {name: sorted(int(s) for s in survey.get("checkpoints", {}) if int(s) in newer)
                      for name, survey in surveys.items()}
    plan["remove"] = {name: gone for name, gone in plan["remove"].items() if gone}
    plan["notes"] = notes + skipped + plan["notes"]
    if plan["remove"]:
        plan["notes"].append("removed (their steps are trained again): " + "; ".join(
            f"{name}: {', '.join(f'checkpoint-{s}' for s in gone)}" for name, gone in sorted(plan["remove"].items())))
    return plan


def _plan_step(step, surveys, hosts, order, world, master, identity, job, skipped):
    entries, holders, marked, universal_on = _copies_of(surveys, step)
    name = f"checkpoint-{step}"
    if not marked:
        skipped.append(f"{name}: marked complete on no node of this launch (a save that never finished)")
        return None
    marker = (entries.get(master) or {}).get("marker") or entries[marked[0]]["marker"]
    written = {key: marker.get(key, identity.get(key)) for key in LAYOUT_KEYS}
    if None in written.values():
        written = layout(identity)
    pins, universal, errors = _pins(identity, written, world, job.get("plan_overrides") or {})
    partitioned = any(e.get("rank_bytes") for e in entries.values())
    if universal and not partitioned:
        errors.append(f"{name} holds no partitioned DeepSpeed state ({describe_layout(written)}); this launch has "
                      f"{world} rank(s) and only a ZeRO checkpoint is converted: launch on the nodes that wrote it, "
                      "or use another deepspeed_job_run_name to start a new run")
    if errors:
        raise ResumeError("\n".join(errors))
    unmarked = [n for n in order if n in entries and n not in marked]
    wanted = list(range(written["world_size"])) if universal else \
        [r for ranks in rank_ranges(hosts).values() for r in ranks] if partitioned else []
    missing = [r for r in wanted if r not in holders and not (universal and universal_on)]
    if missing:
        skipped.append(_missing_note(name, missing, written, marked, unmarked))
        return None
    base_source = _prefer(marked, master, order)
    convert = universal and not universal_on
    gather, copies = [], []
    if convert:
        by_source = {}
        for rank in wanted:
            if master not in holders[rank]:
                by_source.setdefault(_prefer(holders[rank], master, order), []).append(rank)
        gather = [_copy(master, src, ranks) for src, ranks in by_source.items()]
        if master not in marked:
            gather.append(_copy(master, base_source, [], base=True))
    source = master if convert else _prefer(universal_on, master, order) if universal else None
    new_ranks = rank_ranges(hosts)
    for node in order:
        have = entries.get(node) or {}
        base = not have.get("marker") and not (convert and node == master)
        if universal:
            get_universal = not have.get("universal") and not (convert and node == master)
            if get_universal or base:
                copies.append(_copy(node, source if get_universal else base_source, [], base=base,
                                    universal=get_universal))
            continue
        by_source = {}
        for rank in new_ranks[node] if partitioned else []:
            if node not in holders[rank]:
                by_source.setdefault(_prefer(holders[rank], master, order), []).append(rank)
        for src, ranks in by_source.items():
            copies.append(_copy(node, src, ranks, base=base and src in marked))
            base = base and src not in marked
        if base:
            copies.append(_copy(node, base_source, [], base=True))
    notes = []
    if unmarked:
        notes.append(f"{name}: no mark on {', '.join(unmarked)} (a crash between the nodes' marks): "
                     "it gets a complete copy")
    if universal_on and universal:
        notes.append(f"{name}: its universal copy (made at an earlier launch) is on {', '.join(sorted(universal_on))}")
    if universal:
        notes.append(f"{name} was written by {describe_layout(written)}; this launch has {world} rank(s): "
                     + (f"converting it to DeepSpeed's universal format on {master}" if convert else
                        "resuming from its universal copy") + f"; the global batch of {global_batch(written)} is kept")
    else:
        notes.append(f"resuming from {name} as written ({describe_layout(written)})")
    for copy in gather + copies:
        what = [f"rank(s) {', '.join(map(str, copy['ranks']))}"] if copy["ranks"] else []
        what += ["the universal copy"] if copy["universal"] else []
        what += ["the checkpoint's common files and mark"] if copy["base"] else []
        notes.append(f"{name}: {copy['to']} gets {' and '.join(what)} from {copy['from']}")
    tag = next((e["tag"] for e in entries.values() if e.get("tag")), f"global_step{step}")
    plan = {"state": "resume", "step": int(step), "checkpoint": name, "tag": tag, "written": written,
            "world_size": world, "universal": universal, "convert": convert, "gather": gather, "copies": copies,
            "notes": notes, "plan_overrides": pins,
            "config_overrides": {"checkpoint": {"load_universal": True}} if universal else {}}
    plan["needed_bytes"] = _space(entries, plan, master)
    return plan


def _copy(to, source, ranks, base=False, universal=False):
    return {"to": to, "from": source, "ranks": list(ranks), "base": base, "universal": universal}


def _missing_note(name, missing, written, marked, unmarked):
    where = (f"; {', '.join(unmarked)} hold(s) files of it without a mark (a crash between the nodes' marks)"
             if unmarked else "")
    return (f"{name}: the state of rank(s) {', '.join(map(str, missing))} of {written['world_size']} is complete on "
            f"no node of this launch (marked on {', '.join(marked)}{where})")


def _space(entries, plan, master):
    """Bytes each node gets: rank files, and the universal copy (about the size of all ranks' files)."""
    size = {}
    for entry in entries.values():
        for rank, n in entry.get("rank_bytes", {}).items():
            size[int(rank)] = max(size.get(int(rank), 0), n)
    everything = sum(size.values())
    need = {}
    if plan["convert"]:
        need[master] = everything
    for copy in plan["gather"] + plan["copies"]:
        need[copy["to"]] = need.get(copy["to"], 0) + sum(size.get(r, 0) for r in copy["ranks"]) \
            + (everything if copy["universal"] else 0)
    return need


def check_space(plan, surveys, margin=1.1):
    """Refusals for nodes whose output directory has too little free space for what they get."""
    errors = []
    for node, need in sorted(plan.get("needed_bytes", {}).items()):
        free = surveys.get(node, {}).get("free_bytes")
        if free is not None and need * margin > free:
            errors.append(f"{node}: {_gib(free)} free in the output directory, resuming from {plan['checkpoint']} "
                          f"needs about {_gib(need * margin)} there (the copies and the universal conversion): "
                          "free space on that node and launch again")
    return errors


def check_rsync(plan, surveys):
    """Refusals for nodes a copy needs rsync on (both ends of it) that have none."""
    nodes = sorted({n for copy in plan.get("gather", []) + plan.get("copies", []) for n in (copy["to"], copy["from"])})
    lacking = [n for n in nodes if surveys.get(n, {}).get("rsync") is False]
    if not lacking:
        return []
    return [f"{', '.join(lacking)}: no rsync, which the checkpoint copies of this resume need: install it there "
            "(training_env_sync_data_from_master: true installs it with the environment)"]


def check_rendered(plan, rendered_plan):
    """The render's plan must keep what the resume relies on (the pins it was given)."""
    if plan.get("state") != "resume":
        return []
    errors = []
    micro, accum = rendered_plan.get("micro_batch_size"), rendered_plan.get("gradient_accumulation_steps")
    new = {"world_size": plan["world_size"], "per_device_train_batch_size": micro,
           "gradient_accumulation_steps": accum}
    if global_batch(new) is not None and global_batch(new) != global_batch(plan["written"]):
        errors.append(f"the plan's global batch {global_batch(new)} differs from the checkpoint's "
                      f"{global_batch(plan['written'])}")
    if not plan["universal"] and layout(new) != layout(plan["written"]):
        errors.append(f"the plan ({describe_layout(new)}) differs from {plan['checkpoint']}'s layout "
                      f"({describe_layout(plan['written'])}) without a universal copy")
    return errors
