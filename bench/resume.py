"""`make bench-resume`: the time from a relaunch to its first training step, with and without
converting the checkpoint to DeepSpeed's universal format (dsmesh.resume).

1. The lab's tiny Qwen2 (ZeRO-3, sequence 128, global batch 8) on a 2-node lab (LAB_PREFIX=dsbench-resume,
   removed at the end): a run stopped after checkpoint-10, relaunched (ansible-playbook launch.yml,
   without the preflight) on the same 2 nodes as written, on the same 2 nodes with another
   micro-batch (converted), and on 1 node (converted). Timed from the playbook's start to the first
   new line of metrics.jsonl (the containers share this machine's clock).
2. A real model's shape converted on the CPU: Qwen2.5-0.5B (random weights, ZeRO-3, 2 CPU ranks on
   this machine, sequence 64), one step and a checkpoint, then relaunched with the deepspeed launcher
   on 2 ranks as written and on 1 rank after the launch's resume step converted it.

Prints a table and, last, one JSON line. BENCH_PARTS="lab real" chooses the parts.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import Lab

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
RUNS = "/var/lib/dsmesh/runs"
TRAIN = {"max_steps": 20, "save_steps": 10, "logging_steps": 1, "learning_rate": 0.003, "warmup_steps": 2}
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": 1, "DEEPSPEED_TIMEOUT": 2}


def lab_inventory(lab, names):
    data = lab.load_inventory()
    hosts = data["all"]["children"]["cluster"]["hosts"]
    data["all"]["children"]["cluster"]["hosts"] = {n: hosts[n] for n in names}
    data["all"]["children"]["master"]["hosts"] = {names[0]: None}
    return lab.write_inventory(data, lab.state / f"bench-{len(names)}.yml")


def lab_launch(lab, inv, name, **variables):
    args = dict({"deepspeed_job_run_name": name, "deepspeed_job_train_args": TRAIN}, **variables)
    return lab.playbook("playbooks/launch.yml", "--skip-tags", "preflight", "-e", json.dumps(args), inventory=inv,
                        check=True)


def wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def first_step_after(lab, master, name, step, since):
    """The time of the first step after `step` logged since `since` (the stopped launch logged some)."""
    def found():
        out = lab.exec(master, f"cat {RUNS}/{name}/output/metrics.jsonl 2>/dev/null || true").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return next((r["time"] for r in rows if r["step"] > step and r["time"] > since), None)
    return wait(found, 300, f"{name}: a step after {step}")


def lab_part():
    lab = Lab("dsbench-resume", 2).up(fresh=True)
    rows = []
    try:
        lab.playbook("site.yml", "--skip-tags", "launch", check=True)
        master, other = lab.names()
        both, alone = lab_inventory(lab, [master, other]), lab_inventory(lab, [master])
        cases = [("as written, 2 -> 2 nodes", "same", both, {}),
                 ("converted, 2 -> 2 nodes, micro-batch 4 -> 2", "micro", both,
                  {"deepspeed_job_plan_overrides": {"zero_stage": 3, "micro_batch_size": 2}}),
                 ("converted, 2 -> 1 node", "shrink", alone, {})]
        for _, name, _, _ in cases:  # each: checkpoint-10 complete, stopped inside the save of checkpoint-20
            lab_launch(lab, both, name, deepspeed_job_env=dict(ENV, TRAIN_FAULT_INJECT="pause_before_save_barrier:20:300"))
            wait(lambda n=name: '"saving"' in lab.exec(master, f"cat {RUNS}/{n}/output/phase.json 2>/dev/null || true").stdout,
                 240, f"{name}: the save of checkpoint-20")
            lab.playbook("playbooks/stop.yml", "-e", f"deepspeed_job_run_name={name}", inventory=both, check=True)
        for label, name, inv, variables in cases:
            started = time.time()
            lab_launch(lab, inv, name, **variables)
            played = time.time()
            first = first_step_after(lab, master, name, 10, started)
            resume = json.loads(lab.exec(master, f"cat {RUNS}/{name}/launches.json").stdout)["launches"][-1]["resume"]
            rows.append({"model": "tiny Qwen2 (lab)", "case": label, "to_first_step_s": round(first - started, 1),
                         "playbook_s": round(played - started, 1), "resume_step_s": resume.get("seconds"),
                         "convert_s": resume.get("convert_seconds")})
            lab.playbook("playbooks/stop.yml", "-e", f"deepspeed_job_run_name={name}", inventory=inv, check=True)
    finally:
        lab.down()
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train(model, out, ranks, micro, steps, universal=False, after=0):
    """The deepspeed launcher on this machine; returns the unix time of its first step after `after`."""
    # few parameters gathered at a time: two ranks of a 0.5B model must fit a 24 GiB machine
    zero = {"stage": 3, "stage3_max_live_parameters": 10 ** 7, "stage3_prefetch_bucket_size": 10 ** 7,
            "stage3_param_persistence_threshold": 10 ** 4, "reduce_bucket_size": 10 ** 7, "sub_group_size": 10 ** 8,
            "overlap_comm": False}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": zero, "bf16": {"enabled": False}, "gradient_clipping": 1.0,
              "checkpoint": {"use_node_local_storage": True, **({"load_universal": True} if universal else {})},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.0, "torch_adam": True}}}
    path = Path(f"{out}-{ranks}.json")
    path.write_text(json.dumps(config))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", free_port(), "--module", "train",
           "--model_name_or_path", str(model), "--random_init", "true", "--synthetic_samples", "64",
           "--output_dir", str(out), "--deepspeed", str(path), "--max_seq_length", "64", "--max_steps", str(steps),
           "--logging_steps", "1", "--save_steps", "1", "--save_on_each_node", "true", "--save_final_model", "false"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)), DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["time"] for r in rows if r["step"] > after)


def real_part():
    work = Path(tempfile.mkdtemp(prefix="dsmesh-bench-resume-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    model = work / "qwen2.5-0.5b"
    subprocess.run([str(BIN / "python"), "-m", "train.tiny_model", "--preset", "qwen2.5-0.5b", str(model)], cwd=ROOT,
                   check=True, capture_output=True)
    rows = []
    try:
        base = work / "base"
        train(model, base, 2, 1, 1)
        size = sum(f.stat().st_size for f in (base / "checkpoint-1" / "global_step1").iterdir())
        same = work / "same"
        subprocess.run(["cp", "-a", str(base), str(same)], check=True)
        started = time.time()
        first = train(model, same, 2, 1, 2, after=1)
        rows.append({"model": "Qwen2.5-0.5B shape (CPU)", "case": "as written, 2 -> 2 ranks",
                     "to_first_step_s": round(first - started, 1), "resume_step_s": None, "convert_s": None,
                     "checkpoint_gib": round(size / 2 ** 30, 2)})
        conv = work / "conv"
        subprocess.run(["cp", "-a", str(base), str(conv)], check=True)
        started = time.time()
        nodes = json.dumps([{"name": "this", "address": "localhost", "slots": 1}])
        job = json.dumps({"model_dir": str(model), "max_seq_length": 64, "global_batch_size": 2, "lora": None,
                          "plan_overrides": {}})
        step = subprocess.run([str(BIN / "python"), "-m", "dsmesh.resume", "apply", "--run-dir", str(work / "run"),
                               "--output-dir", str(conv), "--nodes-json", nodes, "--master", "this", "--job-json", job,
                               "--rendered-plan-json", json.dumps({"micro_batch_size": 2, "gradient_accumulation_steps": 1})],
                              cwd=ROOT, capture_output=True, text=True)
        if step.returncode != 0:
            raise SystemExit(f"the resume step failed:\n{step.stdout}\n{step.stderr[-3000:]}")
        report = json.loads(step.stdout.splitlines()[-1])
        first = train(model, conv, 1, 2, 2, universal=True, after=1)
        rows.append({"model": "Qwen2.5-0.5B shape (CPU)", "case": "converted, 2 -> 1 rank",
                     "to_first_step_s": round(first - started, 1), "resume_step_s": report["seconds"],
                     "convert_s": round(report["convert_seconds"], 1), "checkpoint_gib": round(size / 2 ** 30, 2)})
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    return rows


def table(rows):
    def cell(value):
        return f"{value:.1f}s" if isinstance(value, (int, float)) else "-"
    print(f"\n{'model':<26} {'relaunch':<44} {'to 1st step':>11} {'resume step':>11} {'convert':>8}", flush=True)
    for r in rows:
        print(f"{r['model']:<26} {r['case']:<44} {cell(r['to_first_step_s']):>11} {cell(r['resume_step_s']):>11} "
              f"{cell(r['convert_s']):>8}", flush=True)


def main():
    parts = os.environ.get("BENCH_PARTS", "lab real").split()
    rows = []
    for name, part in (("lab", lab_part), ("real", real_part)):
        if name in parts:
            rows += part()
            table(rows)  # each part's figures as soon as they are there
    print(json.dumps({"bench": "resume", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
