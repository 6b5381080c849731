"""What bench/gpu_node_e2e.py checks on the one node, read from the node's own files and tools (the
node is this machine): the runs' metrics and checkpoints' markers, nvidia-smi's memory, the final
model; the loss comparison, the measured peak, and the summary table. Standard library only at
import: `python -m bench.gpu_node_checks generate DIR` runs in the training interpreter alone."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = "/var/lib/dsmesh/runs"


def run_dir(name):
    return f"{RUNS}/{name}"


def output_dir(name):
    return f"{RUNS}/{name}/output"


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def metrics(name):
    """{step: row} of a run's metrics.jsonl (a relaunch's rows win over the first attempt's)."""
    rows = {}
    try:
        with open(f"{output_dir(name)}/metrics.jsonl") as f:
            for line in f:
                row = json.loads(line) if line.strip() else {}
                if "step" in row and "loss" in row:
                    rows[row["step"]] = row
    except OSError:
        pass
    return rows


def complete_checkpoints(name):
    """Steps of the run's checkpoints that carry the training package's completion marker."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir

    return [step for step, path in rundir.checkpoint_dirs(output_dir(name))
            if os.path.isfile(os.path.join(path, rundir.CHECKPOINT_MARKER))]


def wait_for_checkpoint(name, deadline):
    """The step of the run's first complete checkpoint (looked for every 0.2 s), or None when the run
    ended without one or the deadline passed."""
    while time.time() < deadline:
        done = complete_checkpoints(name)
        if done:
            return done[-1]
        if os.path.exists(f"{run_dir(name)}/exit_code"):
            return None
        time.sleep(0.2)
    return None


def parse_gpu_memory(used_csv, apps_csv):
    """(MiB used per GPU, [(pid, MiB)] of the processes on them) from `nvidia-smi
    --query-gpu=memory.used` and `--query-compute-apps=pid,used_memory` (csv, noheader, nounits);
    a field nvidia-smi cannot tell ([N/A]) is left out."""
    used = [int(float(v)) for v in used_csv.split() if v.replace(".", "", 1).isdigit()]
    procs = []
    for line in apps_csv.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit():
            procs.append((int(fields[0]), fields[1]))
    return used, procs


def gpu_memory():
    """parse_gpu_memory() of this machine's nvidia-smi, or None without one (a CPU node)."""
    if not shutil.which("nvidia-smi"):
        return None

    def query(flag):
        try:
            return subprocess.run(["nvidia-smi", flag, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):  # a hung or broken driver: nothing read
            return ""

    return parse_gpu_memory(query("--query-gpu=memory.used"), query("--query-compute-apps=pid,used_memory"))


def gpu_memory_freed(baseline, wait_s=30, slack_mib=512):
    """The stop's check on the GPU: no process on it and its memory back to the baseline (within
    slack), waited for up to wait_s (the driver frees a dead process's memory shortly after)."""
    if baseline is None:
        return {"ok": None, "note": "no nvidia-smi (CPU node)"}
    deadline = time.time() + wait_s
    while True:
        used, procs = gpu_memory()
        ok = not procs and max(used, default=0) <= max(baseline[0], default=0) + slack_mib
        if ok or time.time() > deadline:
            return {"before_MiB": baseline[0], "after_MiB": used, "processes": procs, "ok": ok}
        time.sleep(0.5)


def ranks_left(address, name):
    """The stop's own check, through pdsh as jobctl runs it: the lines of a rank of this run still alive."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
    from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh import pdsh_argv

    proc = subprocess.run(pdsh_argv([address], rundir.find_ranks_command(output_dir(name)), command_timeout=30),
                          capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line.endswith("left")]


def _rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def _worst(first, second, steps):
    return max((_rel(first[s]["loss"], second[s]["loss"]) for s in steps), default=None)


def compare_losses(reference, first_attempt, resumed, after_step, rtol, noise_factor=2.0):
    """The resumed run's losses after its checkpoint `after_step`, judged against what two uninterrupted runs
    of the same job differ by on this machine (a GPU's kernels are not bitwise reproducible: its
    atomics reorder sums, so two identical runs drift apart from the first few steps on).

    first_attempt: the stopped run's own rows before the relaunch, which continued from the same state as
    the resumed run. The first step after the checkpoint (one forward pass from the restored weights on the
    same batch) must equal the first attempt's within rtol; the steps the two share after it may differ by
    no more than noise_factor times what the uninterrupted reference and the first attempt differ by over
    the same steps (with rtol as the floor). Without such steps, the reference stands in for the first
    attempt where the two runs agreed within rtol up to the checkpoint (a reproducible machine, CPU ranks);
    elsewhere nothing can be compared exactly and the verdict is None."""
    shared = sorted(s for s in resumed if s > after_step and s in first_attempt)
    if shared:
        continued, noise_steps, basis = first_attempt, [s for s in shared if s in reference], "the stopped run"
    else:
        continued, basis = reference, "the uninterrupted run"  # which has drifted from it: no exact first step
        shared = sorted(s for s in resumed if s > after_step and s in reference)[:1]
        noise_steps = sorted(s for s in first_attempt if s <= after_step and s in reference)
    noise = _worst(reference, first_attempt, noise_steps) or 0.0
    tolerance = max(rtol, noise_factor * noise)
    first = _rel(continued[shared[0]]["loss"], resumed[shared[0]]["loss"]) if shared else None
    worst = _worst(continued, resumed, shared)
    comparable = continued is first_attempt or noise <= rtol
    rows = [{"step": s, "reference": reference.get(s, {}).get("loss"), "first_attempt": first_attempt.get(s, {}).get("loss"),
             "resumed": resumed[s]["loss"]} for s in sorted(s for s in resumed if s > after_step)]
    return {"after_step": after_step, "basis": basis, "steps_compared": len(shared), "first_step_rel": first,
            "first_step_tolerance": rtol, "max_rel_diff": worst,
            "noise_between_uninterrupted_runs": noise, "rtol": rtol, "tolerance": tolerance,
            "against_uninterrupted_max_rel": _worst(reference, resumed, [r["step"] for r in rows if r["reference"]]),
            "ok": (bool(shared) and first <= rtol and worst <= tolerance) if comparable else None,
            "rows": rows}


def measured_peak(rows):
    """Peak allocated and reserved GiB over the logged intervals after the first (the steady state the
    plan describes), and over all of them."""
    ordered = [rows[s] for s in sorted(rows)]
    steady = ordered[1:] or ordered

    def peak(entries, key):
        values = [e[key] for e in entries if e.get(key) is not None]
        return max(values) if values else None

    return {"allocated_gib": peak(steady, "memory_gib"), "reserved_gib": peak(steady, "memory_reserved_gib"),
            "allocated_gib_first_interval_included": peak(ordered, "memory_gib")}


def final_model_facts(name):
    """The final model's files, and the time from the last logged step to its newest file (the save)."""
    final = (read_json(f"{output_dir(name)}/summary.json") or {}).get("final_model")
    if not final or not os.path.isdir(final):
        return {"final_model": final}
    files = [p for p in Path(final).rglob("*") if p.is_file()]
    rows = metrics(name)
    last_step_time = rows[max(rows)].get("time") if rows else None
    newest = max((p.stat().st_mtime for p in files), default=None)
    return {"final_model": final, "files": len(files), "gib": round(sum(p.stat().st_size for p in files) / 2**30, 2),
            "save_seconds_after_last_step": round(newest - last_step_time, 1) if newest and last_step_time else None}


def launch_logs(name):
    """Every launch's log of a run, in order (logs/<run id>.log), as one text."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir

    parts = []
    for launch in (read_json(f"{run_dir(name)}/{rundir.LAUNCHES}") or {}).get("launches", []):
        try:
            text = Path(f"{run_dir(name)}/{rundir.LOGS}/{launch['id']}.log").read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"==== {launch['id']} ({launch.get('started')})\n{text}")
    return "\n".join(parts)


def tail_of(path, limit=4 << 20):
    """The last `limit` bytes of a file, b"" if there is none (a device call brings back 16 MiB a file at most)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read()
    except OSError:
        return b""


def summary_lines(report):
    """The summary table: each stage's wall time, the memory and runs, then each check's verdict."""
    out = ["", "== summary", f"{'stage':<64} {'seconds':>8}",
           f"{'setup (bench/gpu_node_e2e.sh: debs, sshd, wheels)':<64} {report['setup_seconds']:>8.1f}"]
    out += [f"{row['stage']:<64} {row['seconds']:>8.1f}{'' if row['ok'] else '  FAILED'}" for row in report["stages"]]
    out.append(f"{'whole call (the setup and the stages)':<64} {report['wall_seconds']:>8.1f}")
    memory = report.get("memory")
    if memory:
        m = memory["measured"]
        out.append(f"peak memory per rank (GiB): predicted {memory['predicted_peak_allocated_gib']} allocated / "
                   f"{memory['predicted_peak_reserved_gib']} reserved; measured {m['allocated_gib']} / "
                   f"{m['reserved_gib']} (first interval included: {m['allocated_gib_first_interval_included']})")
    for key, name in (("reference_summary", "uninterrupted run"), ("resumed_summary", "stopped and resumed run")):
        s = report.get(key) or {}
        if s:
            out.append(f"{name}: {s.get('steps')} steps, loss {s.get('loss_first')} -> {s.get('loss_last')}, "
                       f"steady {s.get('tokens_per_s_steady')} tokens/s, MFU {s.get('mfu')}, resumed from "
                       f"{s.get('resumed_from_step')}, {s.get('wall_seconds')} s wall")
    final = report.get("final_model") or {}
    if final.get("files"):
        out.append(f"final model: {final['final_model']} ({final['files']} files, {final['gib']} GiB), its last "
                   f"file written {final['save_seconds_after_last_step']} s after the last logged step")
    g = report.get("generate")
    if g:
        out.append(f"from_pretrained: {g['dtype']}, {g['parameters']} parameters on {g['device']} in "
                   f"{g['load_seconds']} s; {g['prompt']!r} -> {g['generated']!r}")
    out += ["", f"{'check':<44} result"]
    for name, check in report["checks"].items():
        verdict = {True: "ok", False: "FAIL", None: "n/a"}[check.get("ok")]
        if "rows" in check:
            g = {k: "-" if check.get(k) is None else f"{check[k]:.2g}" for k in (
                "first_step_rel", "first_step_tolerance", "max_rel_diff", "tolerance",
                "noise_between_uninterrupted_runs", "against_uninterrupted_max_rel")}
            detail = (f"against {check['basis']}, {check['steps_compared']} logged steps after checkpoint "
                      f"{check['after_step']}: the first {g['first_step_rel']} (tolerance {g['first_step_tolerance']}), "
                      f"the largest {g['max_rel_diff']} (tolerance {g['tolerance']}: two uninterrupted runs differ "
                      f"by {g['noise_between_uninterrupted_runs']}); against the uninterrupted run to the end "
                      f"{g['against_uninterrupted_max_rel']}")
        else:
            detail = ", ".join(f"{k}={v}" for k, v in check.items() if k != "ok")
        out.append(f"{name:<44} {verdict:<4} {detail}")
    if report.get("error"):
        out += ["", f"error: {report['error']}"]
    return out


def generate_main(model_dir):
    """from_pretrained + 8 greedy tokens; the facts as a DSMESH_GENERATE json line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    loaded = time.time() - started
    prompt = "count from 3:"
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    facts = {"dtype": str(next(model.parameters()).dtype), "parameters": sum(p.numel() for p in model.parameters()),
             "device": device, "load_seconds": round(loaded, 1), "prompt": prompt, "generated": text,
             "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])}
    print(f"loaded {model_dir} ({facts['dtype']}, {facts['parameters'] / 1e6:.1f}M parameters) on {device} in "
          f"{loaded:.1f} s; {prompt!r} -> {text!r}")
    print("DSMESH_GENERATE " + json.dumps(facts))


if __name__ == "__main__" and sys.argv[1:2] == ["generate"]:
    generate_main(sys.argv[2])
