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


def compare_losses(reference, resumed, after_step, rtol):
    """The resumed run's logged losses after `after_step` against the uninterrupted run's, step by step."""
    diffs = []
    for step in sorted(s for s in resumed if s > after_step and s in reference):
        a, b = reference[step]["loss"], resumed[step]["loss"]
        diffs.append({"step": step, "reference": a, "resumed": b, "rel": abs(a - b) / max(abs(a), 1e-12)})
    worst = max((d["rel"] for d in diffs), default=None)
    return {"after_step": after_step, "steps_compared": len(diffs), "max_rel_diff": worst, "rtol": rtol,
            "ok": bool(diffs) and worst <= rtol, "rows": diffs}


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
            detail = (f"{check['steps_compared']} logged steps after step {check['after_step']}, max relative "
                      f"difference {check['max_rel_diff']} (tolerance {check['rtol']})")
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
