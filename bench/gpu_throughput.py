"""GPU throughput: the training package with the planner's plan ("ours") against what a user would
copy from the Hugging Face docs ("peer"), on one GPU, random-init models of real shapes, synthetic
tokens, the same global batch and sequence length for every variant. One workload per device call:

    python bench/gpu_throughput.py --workloads w3          # its default variants, steps and budget
    python bench/gpu_throughput.py --workloads w1 --variants peer_plain,ours --steps 20

Workloads (WORKLOADS below):
  w1  Qwen2.5-1.5B shape, full fine-tune, seq 2048, global batch 8: the planner's one-GPU plan
  w2  DeepSeek-R1-Distill-Qwen-32B shape, LoRA r16, seq 2048, global batch 4: torch engine vs DeepSpeed
  w3  the w1 shape with the plan forced to ZeRO-3: DeepSpeed path (compiled) vs torch engine vs ZeRO-3 peer
  w4  the 32B shape cut to 8 of 64 layers (5.46B parameters), full, seq 4096, global batch 8, the plan
      forced to ZeRO-3, vs both peers

Variants (each a fresh process, so peak memory is its own):
  peer_ds3             plain HF Trainer + DeepSpeed ZeRO-3 with HF's documented "auto" config, SDPA,
                       gradient checkpointing on (DeepSpeed's bf16 mode: fp32 master weights)
  peer_plain           plain HF Trainer, DeepSpeed off, gradient checkpointing on; full fine-tunes load
                       fp32 weights and train with bf16=True (autocast, fp32 master weights, as ours);
                       LoRA: a bf16 base, fp32 adapters
  ours                 python -m train with the planner's plan for this GPU on the torch engine (no
                       --deepspeed): fp32 master weights under bf16 autocast, fused AdamW, compiled layers
  ours_deepspeed       the plan with engine=deepspeed (and the workload's forced ZeRO stage): the planner's
                       ds_config.json; compiled as the plan says (DeepCompile for ZeRO-3)
  ours_deepspeed_eager the same plan with --compile none (the loss reference for the compiled run)
  ours_deepspeed_lever the ours_deepspeed plan with --ds-config-override merged into its ds_config.json
                       and --lever-extra on its command line: a lever measured side by side with the
                       planner's config in one call
  ours_lever           the ours plan with --lever-extra, e.g. FlexAttention for packed rows
                       (--ours-extra "--synthetic_example_length 512" --lever-extra
                       "--attn_implementation flex_attention")

Every ours* run is started twice with the same compile cache directories (its own, empty at the
first start): the first start writes a checkpoint `--resume-steps` steps before the end, the second
resumes from it ("resume") and must log the same losses; w4's checkpoint (76 GB of ZeRO-3 state)
would not fit the disk, so its second start is a fresh 2-step run ("fresh") on the first start's data,
whose two losses must equal the first start's first two. Both report the time from launch to the
first step's log line: first start (cold caches) and cached start.

Throughput: tokens/s over the steps after the warm-up (wall clock per optimizer step, each step ends with
a loss read, i.e. a GPU sync; DeepCompile runs leave out its two compiles, steps 1 and 6). MFU =
tokens/s x FLOPs per token / 989e12 (H100/H200 dense bf16), FLOPs per token = 6 x matmul weights (4 x
frozen weights under LoRA + 6 x LoRA weights) + 12 x layers x q_dim x seq_len (attention); the input
embedding is not counted, the LM head is; recomputation (checkpointing) is not counted.

The driver keeps to --budget seconds for the whole call (the device's 10-minute limit): each run gets
what is left, less a reserve, and a run that would not fit is skipped and says so. The Markdown table
is printed last; every run's JSON goes to OUT/gpu_throughput.jsonl and OUT/summary.json.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

# Run as `python -m bench.gpu_throughput` from the repository root (bench/gpu.sh does): the planner
# and the GPU table come by their collection path, the training package from the root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESERVE_S = 15  # left at the end of the budget for the table and the JSON

WORKLOADS = {
    # variants: the default set, most important first (what the budget leaves out comes last); steps and
    # warmup per run; overrides: plan overrides for every ours* variant; second_start: how ours* runs
    # start the second time, and second_start_variants which of them (a 32B start takes minutes; W3's
    # DeepSpeed start takes 4-6 min, so its default call holds one start of each variant, side by side)
    "w1": {"preset": "qwen2.5-1.5b", "finetune": "full", "global_batch": 8, "seq_len": 2048, "lr": 1e-5,
           "peer_micro": 4, "steps": 20, "warmup": 5, "variants": "peer_plain,ours,peer_ds3",
           "second_start": "resume", "second_start_variants": ("ours",), "budget": 540},
    "w2": {"preset": "deepseek-r1-distill-qwen-32b", "finetune": "lora", "global_batch": 4, "seq_len": 2048,
           "lr": 2e-4, "peer_micro": 1, "steps": 10, "warmup": 3, "variants": "ours,ours_deepspeed",
           "second_start": "resume", "second_start_variants": ("ours_deepspeed",), "budget": 540},
    "w3": {"preset": "qwen2.5-1.5b", "finetune": "full", "global_batch": 8, "seq_len": 2048, "lr": 1e-5,
           "peer_micro": 4, "steps": 14, "warmup": 3, "overrides": {"zero_stage": 3},
           "variants": "ours_deepspeed,ours,peer_ds3", "second_start": "none", "budget": 540},
    "w4": {"preset": "deepseek-r1-distill-qwen-32b-8layers", "finetune": "full", "global_batch": 8, "seq_len": 4096,
           "lr": 1e-5, "peer_micro": 2, "peer_plain_micro": 1, "steps": 10, "warmup": 3,
           "overrides": {"zero_stage": 3}, "variants": "ours_deepspeed,peer_plain,peer_ds3", "second_start": "fresh",
           "budget": 540},
}
# With DeepSpeed's own schedule (--deepcompile_schedule warmup) DeepCompile compiles at step 1 and
# again at step 6 (prefetch and selective unsharding from its 5th global step): tokens/s starts after that.
DEEPCOMPILE_WARMUP = 6


def recompiles_at_step_6(ours_extra):
    """Whether the ours* runs keep DeepSpeed's two-compile schedule (the package's default is one)."""
    return extra_flag(ours_extra, "--deepcompile_schedule") == "warmup"

def gpu_facts():
    from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus

    out = subprocess.run(["nvidia-smi", f"--query-gpu={gpus.NVIDIA_SMI_FIELDS_OLD}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    gpu = gpus.parse_nvidia_smi(out)[0]
    return gpu["name"], gpu["memory_mib"] / 1024.0


def host_memory_gib():
    from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus

    with open("/proc/meminfo") as f:
        return gpus.parse_meminfo(f.read())


def make_plan(model_dir, wl, overrides=None, config_overrides=None):
    """(plan, ds_config, the package's flags) exactly as the launch renders them."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils import planner
    from ansible_collections.dsmesh.cluster.plugins.module_utils.launch import package_flags

    gpu_name, gpu_gib = gpu_facts()
    model = planner.load_model_shape(model_dir=model_dir)
    cluster = planner.Cluster([1], gpu_memory_gib=gpu_gib, host_memory_gib=max(host_memory_gib(), 64.0),
                              gpu_model=gpu_name)
    job = planner.Job(seq_len=wl["seq_len"], global_batch_size=wl["global_batch"], finetune=wl["finetune"],
                      learning_rate=wl["lr"])
    p = planner.plan(model, cluster, job, overrides=overrides)
    cfg = planner.build_ds_config(p, job, model, config_overrides=config_overrides)
    return p, cfg, package_flags(planner.trainer_args(cfg, p))


LEVERS = ("ours_lever", "ours_deepspeed_lever")


def ours_plans(model_dir, wl, variants, a):
    """The plan of each ours* variant: the torch engine for `ours` and `ours_lever`, DeepSpeed (the
    workload's ZeRO stage) for `ours_deepspeed*`; `ours_deepspeed_eager` is the same plan uncompiled,
    `ours_deepspeed_lever` the same plan with --ds-config-override in its config (the only variant that
    takes it)."""
    base = dict(wl.get("overrides") or {}, **a.ours_overrides)
    plans = {}
    for v in variants:
        if v in ("ours", "ours_lever"):  # (the torch engine has no ZeRO stage to force)
            plans[v] = make_plan(model_dir, wl, dict({k: x for k, x in base.items() if k != "zero_stage"},
                                                     engine="torch"))
        elif v in ("ours_deepspeed", "ours_deepspeed_eager", "ours_deepspeed_lever"):
            overrides = dict(base, engine="deepspeed")
            if v == "ours_deepspeed_eager":
                overrides["compile"] = "none"
            plans[v] = make_plan(model_dir, wl, overrides,
                                 (a.ds_config_override or None) if v == "ours_deepspeed_lever" else None)
    return plans


class Budget:
    """Seconds left of the call; each run gets what is left less the reserve."""

    def __init__(self, seconds, per_run):
        self.end = time.time() + seconds
        self.per_run = per_run

    def timeout(self):
        return min(self.per_run, self.end - time.time() - RESERVE_S)


LAUNCH_TIME = re.compile(r"^\[ *\d+\.\ds\] ")


def copy_with_times(stream, log, t0):
    """Each line of a run's output into its log after the seconds since launch: where a start spends its time."""
    for line in iter(stream.readline, b""):
        log.write(f"[{time.time() - t0:7.1f}s] ".encode() + line)
        log.flush()


def run_child(cmd, log_path, timeout, env=None):
    """A run that outlives its share of the budget is aborted with SIGABRT first: with faulthandler on,
    every thread's Python stack goes to its log (where it was: compiling, loading, waiting)."""
    t0 = time.time()
    with open(log_path, "ab") as log:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                 env=dict(os.environ, PYTHONFAULTHANDLER="1", **(env or {})))
        copier = threading.Thread(target=copy_with_times, args=(child.stdout, log, t0), daemon=True)
        copier.start()
        try:
            rc = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            rc = "timeout"
        copier.join(timeout=10)  # (a grandchild holding the pipe open must not hold the driver)
    return rc, time.time() - t0, t0


def tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ours_cmd(model_dir, wl, steps, seed, out_dir, plan, ds_cfg, argv, work, variant, data_steps=None):
    """python -m train as the launch runs it: the plan's flags, --deepspeed only when the plan's
    engine is DeepSpeed. data_steps: the steps' worth of synthetic examples (default `steps`; the same
    data and seed give the same batches in the same order)."""
    cmd = [sys.executable, "-m", "train", "--model_name_or_path", model_dir, "--random_init",
           "--synthetic_samples", str((data_steps or steps) * wl["global_batch"]), "--max_seq_length", str(wl["seq_len"]),
           "--output_dir", out_dir, "--max_steps", str(steps), "--logging_steps", "1",
           "--save_final_model", "false", "--seed", str(seed), "--attn_implementation", "sdpa",
           "--report_to", "none"] + argv
    if wl["finetune"] == "lora":
        cmd += ["--lora", "--lora_r", "16"]
    if plan.engine == "deepspeed":
        path = os.path.join(work, f"ds_config_{variant}.json")
        with open(path, "w") as f:
            json.dump(ds_cfg, f, indent=2)
        cmd += ["--deepspeed", path]
    return cmd


def extra_flag(extra, flag):
    """The value of `flag` (`--flag V` or `--flag=V`) in the extra `python -m train` arguments, or None."""
    words = shlex.split(extra or "")
    for i, word in enumerate(words):
        value = word.split("=", 1)[1] if word.startswith(flag + "=") else (
            words[i + 1] if word == flag and i + 1 < len(words) else None)
        if value:
            return value
    return None


def profiled_steps(extra):
    """The steps `--profile_steps A-B` in the extra arguments puts under torch.profiler (slowed by it)."""
    spec = extra_flag(extra, "--profile_steps")
    if not spec:
        return set()
    first, _, last = spec.partition("-")
    return set(range(int(first), int(last or first) + 1))


def steady_tokens_per_s(hist, warmup, skip=()):
    """Tokens/s of the logged intervals after step `warmup`, those of the steps in `skip` left out."""
    from train.metrics import interval_tokens_per_s

    return interval_tokens_per_s(hist, {h["step"] for h in hist if h["step"] <= warmup} | set(skip))


def extra_args(a, variant):
    """The `python -m train` arguments after the plan's: --ours-extra for every ours* variant, then
    --lever-extra for the lever variants alone (the later of two equal flags wins)."""
    return shlex.split(a.ours_extra) + (shlex.split(a.lever_extra) if variant in LEVERS else [])


def run_ours(model_dir, wl, steps, warmup, a, work, plan, ds_cfg, argv, log_path, budget, variant):
    """Two starts with the variant's own compile caches: cold, then cached (a resume from the first
    start's checkpoint, or a fresh 2-step run)."""
    from ansible_collections.dsmesh.cluster.plugins.module_utils.rank_env import compile_cache_env

    env = compile_cache_env(os.path.join(work, "cache", variant))  # the launch's node-local caches
    out_dir = os.path.join(work, f"run_{variant}")
    second = a.second_start or wl["second_start"]
    if variant not in wl.get("second_start_variants", (variant,)):
        second = "none"
    save_at = steps - a.resume_steps if second == "resume" else None
    cmd = ours_cmd(model_dir, wl, steps, a.seed, out_dir, plan, ds_cfg, argv + extra_args(a, variant), work, variant)
    cmd += ["--save_strategy", "steps", "--save_steps", str(save_at)] if save_at else ["--save_strategy", "no"]
    rc, wall, launched = run_child(cmd, log_path, budget.timeout(), env)
    hist = read_metrics(out_dir)
    r = {"rc": rc, "wall_s": wall, "first_start_s": hist[0]["time"] - launched if hist else None,
         "losses": [h["loss"] for h in hist]}
    if rc != 0:
        r["error"] = tail(log_path)
        return r
    r["tokens_per_s"] = steady_tokens_per_s(hist, warmup, profiled_steps(a.ours_extra))
    r["peak_allocated_gib"] = max(h.get("memory_gib") or 0 for h in hist[1:] or hist)
    r["peak_reserved_gib"] = max(h.get("memory_reserved_gib") or 0 for h in hist[1:] or hist) or None
    with open(os.path.join(out_dir, "summary.json")) as f:
        r["package_mfu"] = json.load(f)["mfu"]
    r["log_lines"] = package_lines(log_path)
    if second == "none" or budget.timeout() < 60:
        r["second_start"] = "skipped" if second != "none" else "none"
        shutil.rmtree(out_dir, ignore_errors=True)
        return r
    if second == "resume":
        # the same command from checkpoint-<save_at> (the Trainer also saved one at the last step)
        resume = ["--resume_from_checkpoint", os.path.join(out_dir, f"checkpoint-{save_at}")]
        rc2, wall2, launched2 = run_child(cmd + resume, log_path, budget.timeout(), env)
        again = [h for h in read_metrics(out_dir) if h["step"] > save_at]
        r.update({"second_start": "resume", "second_rc": rc2, "second_wall_s": wall2,
                  "cached_start_s": again[0]["time"] - launched2 if again else None,
                  "resumed_losses": [h["loss"] for h in again]})
        ref = {h["step"]: h["loss"] for h in hist}
        same_steps = [h for h in again if h["step"] in ref]
        r["resume_max_rel_loss_diff"] = max_rel_diff([h["loss"] for h in same_steps], [ref[h["step"]] for h in same_steps])
    else:
        # the first start's data: its first two steps see the same batches after the same updates (both
        # start at the full learning rate), so their losses check the cached graphs and replayed profiles
        fresh_dir = out_dir + "_fresh"
        cmd2 = ours_cmd(model_dir, wl, 2, a.seed, fresh_dir, plan, ds_cfg, argv + extra_args(a, variant), work, variant,
                        data_steps=steps)
        rc2, wall2, launched2 = run_child(cmd2 + ["--save_strategy", "no"], log_path, budget.timeout(), env)
        again = read_metrics(fresh_dir)
        r.update({"second_start": "fresh", "second_rc": rc2, "second_wall_s": wall2,
                  "cached_start_s": again[0]["time"] - launched2 if again else None,
                  "fresh_losses": [h["loss"] for h in again],
                  "fresh_max_rel_loss_diff": max_rel_diff([h["loss"] for h in again], r["losses"])})
        shutil.rmtree(fresh_dir, ignore_errors=True)
    r["second_log_lines"] = package_lines(log_path)[len(r["log_lines"]):]  # its compile line: what the caches gave
    shutil.rmtree(out_dir, ignore_errors=True)  # a 1.5B checkpoint is ~20 GB of the device's disk
    return r


def log_lines(log_path):
    """A run's log as the run printed it: each line without the launch time copy_with_times put before it."""
    with open(log_path, errors="replace") as f:
        return [LAUNCH_TIME.sub("", line, count=1).rstrip("\n") for line in f]


def package_lines(log_path, starts=("weights:", "compile:", "compile caches", "DeepSpeed's DeepCompile op",
                                   "compiled and ran")):
    """The training package's lines on weights, compiling, DeepSpeed's op and the compile caches, in a run's log."""
    return [line.strip() for line in log_lines(log_path) if line.startswith(starts)]


def run_peer_variant(variant, wl, steps, warmup, a, work, model_dir, log_path, budget):
    micro = wl.get(f"{variant}_micro", wl["peer_micro"])
    result_path = os.path.join(work, variant + ".json")
    cmd = [sys.executable, "-m", "bench.gpu_peers", "--model-dir", model_dir,
           "--micro", str(micro), "--accum", str(wl["global_batch"] // micro), "--steps", str(steps),
           "--warmup", str(warmup), "--seq-len", str(wl["seq_len"]), "--lr", str(wl["lr"]),
           "--seed", str(a.seed), "--result", result_path]
    cmd += ["--lora"] if wl["finetune"] == "lora" else []
    cmd += ["--deepspeed"] if variant == "peer_ds3" else []
    rc, wall, _ = run_child(cmd, log_path, budget.timeout())
    r = {"rc": rc, "wall_s": wall}
    if rc == 0:
        with open(result_path) as f:
            r.update(json.load(f))
    else:
        r["error"] = tail(log_path)
    weights = "bf16 base, fp32 adapters" if wl["finetune"] == "lora" else (
        "DeepSpeed bf16 (fp32 masters)" if variant == "peer_ds3" else "fp32 weights, bf16 autocast")
    r["layout"] = (f"{'ZeRO-3 (HF auto)' if variant == 'peer_ds3' else 'no DeepSpeed'}, micro {micro} x accum "
                   f"{wl['global_batch'] // micro}, checkpointing, {weights}")
    return r


def second_start_loss_diff(r):
    """How far the second start's losses are from the first start's at the same steps."""
    key = "fresh_max_rel_loss_diff" if r.get("second_start") == "fresh" else "resume_max_rel_loss_diff"
    return r.get(key)


def max_rel_diff(a, b, n=None):
    pairs = list(zip(a, b))[:n]
    return max(abs(x - y) / abs(y) for x, y in pairs) if pairs else None


def fmt(value, spec, missing="-"):
    return format(value, spec) if value is not None else missing


def ratios(name, res):
    """The workload's comparisons (issue 13's targets) on one call's figures."""
    tps = {v: r.get("tokens_per_s") for v, r in res.items()}
    lines = []

    def ratio(a_, b_, target=None):
        if tps.get(a_) and tps.get(b_):
            x = tps[a_] / tps[b_]
            lines.append(f"{a_} / {b_} = {x:.2f}x" + (f" (target >= {target}x: {'met' if x >= target else 'NOT met'})"
                                                      if target else ""))
    peers = [v for v in ("peer_plain", "peer_ds3") if tps.get(v)]
    best_peer = max(peers, key=lambda v: tps[v]) if peers else None
    if name == "w1":
        ratio("ours", best_peer, 1.6)
    elif name == "w2":
        ratio("ours_deepspeed", "ours", 0.9)
    elif name == "w3":
        ratio("ours_deepspeed", "ours", 0.85)
        ratio("ours_deepspeed", "peer_ds3", 4.5)
    elif name == "w4":
        ratio("ours_deepspeed", best_peer, 1.25)
        ratio("ours_deepspeed", "peer_ds3", 1.4)
        mfu = res.get("ours_deepspeed", {}).get("mfu")
        if mfu:
            lines.append(f"ours_deepspeed MFU {100 * mfu:.1f}% (target >= 50%: {'met' if mfu >= 0.5 else 'NOT met'})")
    for v, r in res.items():
        if r.get("cached_start_s") and r.get("first_start_s"):
            x = r["cached_start_s"] / r["first_start_s"]
            lines.append(f"{v} cached start {r['cached_start_s']:.0f}s / first start {r['first_start_s']:.0f}s = "
                         f"{x:.2f} (target <= 0.5: {'met' if x <= 0.5 else 'NOT met'})")
        if second_start_loss_diff(r) is not None:
            lines.append(f"{v} {r['second_start']} second start vs first start: max rel loss diff "
                         f"{second_start_loss_diff(r):.2e}")
    for base, other in (("ours_deepspeed", "ours_deepspeed_eager"), ("ours_deepspeed", "ours_deepspeed_lever"),
                        ("ours", "ours_lever")):
        ref, losses = res.get(base, {}).get("losses"), res.get(other, {}).get("losses")
        if ref and losses:
            lines.append(f"{base} vs {other}: max rel loss diff over {min(len(ref), len(losses))} "
                         f"steps {max_rel_diff(ref, losses):.2e}")
    ratio("ours_deepspeed_lever", "ours_deepspeed")
    ratio("ours_lever", "ours")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="w1", help="comma-separated; one per device call (see --budget)")
    p.add_argument("--variants", default=None, help="comma-separated (default: the workload's own set)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the workload's)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default: the workload's; "
                   f"DeepCompile runs at least {DEEPCOMPILE_WARMUP})")
    p.add_argument("--resume-steps", type=int, default=4, help="steps the second start of an ours* run resumes for")
    p.add_argument("--second-start", choices=("resume", "fresh", "none"), default=None,
                   help="how ours* runs start again with warm caches (default: the workload's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=None, help="seconds for the whole call (default: the workload's, "
                   "540: the device's 10-minute limit less start-up)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run at most")
    p.add_argument("--out", default="gpu_bench")
    p.add_argument("--ours-overrides", type=json.loads, default={},
                   help="plan overrides (JSON) for the ours* variants, e.g. '{\"micro_batch_size\": 4}'")
    p.add_argument("--ds-config-override", type=json.loads, default={},
                   help="merged into the ours_deepspeed_lever variant's ds_config.json, e.g. DeepSpeed's FusedAdam: "
                        "'{\"optimizer\": {\"params\": {\"torch_adam\": false}}}', or "
                        "'{\"zero_optimization\": {\"stage3_prefetch_bucket_size\": 200000000}}'")
    p.add_argument("--ours-extra", default="", help="extra `python -m train` arguments for the ours* variants, "
                   "appended after the plan's (experiments beyond the plan, e.g. '--checkpoint_layers 40')")
    p.add_argument("--lever-extra", default="", help="extra `python -m train` arguments for the lever variants "
                   f"alone ({', '.join(LEVERS)}), after --ours-extra, e.g. '--attn_implementation flex_attention'")
    a = p.parse_args()
    chosen = (a.variants or "").split(",")
    if a.ds_config_override and "ours_deepspeed_lever" not in chosen:
        p.error("--ds-config-override is the config of the ours_deepspeed_lever variant: add it to --variants")
    if a.lever_extra and not set(LEVERS) & set(chosen):
        p.error(f"--lever-extra goes to the lever variants ({', '.join(LEVERS)}): add one to --variants")

    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions")
    results_path = os.path.join(a.out, "gpu_throughput.jsonl")
    rows, notes = [], []
    names = a.workloads.split(",")
    budget_s = a.budget or sum(WORKLOADS[n]["budget"] for n in names)
    budget = Budget(budget_s, a.timeout)
    for name in names:
        wl = WORKLOADS[name]
        steps = a.steps or wl["steps"]
        variants = (a.variants or wl["variants"]).split(",")
        work = tempfile.mkdtemp(prefix=f"gpu_bench_{name}.")
        model_dir = os.path.join(work, "model")
        subprocess.run([sys.executable, "-m", "train.tiny_model", "--preset", wl["preset"], model_dir], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus, planner

        shape = planner.ModelShape.from_config(cfg)
        fpt = shape.training_flops_per_token(wl["seq_len"], 16 if wl["finetune"] == "lora" else None)
        peak_flops = gpus.gpu_spec(gpu_facts()[0])["peak_tflops"] * 1e12
        plans = ours_plans(model_dir, wl, variants, a)
        for variant, (plan, _, argv) in plans.items():
            print(f"[{name}] {variant} plan: {plan.label}; compile {plan.compile}; predicted peak "
                  f"{plan.predicted_peak_allocated_gib:.1f} GiB allocated, {plan.predicted_peak_reserved_gib:.1f} "
                  f"reserved; {' '.join(argv)}", flush=True)
        res = {}
        for variant in variants:
            log_path = os.path.join(a.out, f"{name}_{variant}.log")
            t0 = time.time()
            deepcompile = variant in plans and plans[variant][0].compile == "deepcompile"
            warmup = a.warmup or wl["warmup"]
            if deepcompile and recompiles_at_step_6(a.ours_extra):
                warmup = max(warmup, DEEPCOMPILE_WARMUP)
            run_steps = max(steps, warmup + 3 + (a.resume_steps if variant in plans else 0))
            if budget.timeout() < 60:
                r = {"rc": "skipped (budget)"}
            elif variant.startswith("peer"):
                r = run_peer_variant(variant, wl, run_steps, warmup, a, work, model_dir, log_path, budget)
            else:
                plan, ds_cfg, argv = plans[variant]
                r = run_ours(model_dir, wl, run_steps, warmup, a, work, plan, ds_cfg, argv, log_path, budget, variant)
                r["layout"] = f"{plan.label}, x {plan.gradient_accumulation_steps} accumulation, compile {plan.compile}"
                if variant in LEVERS:
                    # the lever's own settings come after the plan's and win
                    r["layout"] += f"; then {' '.join(extra_args(a, variant)) or 'no flags'}"
                    if variant == "ours_deepspeed_lever" and a.ds_config_override:
                        r["layout"] += f" and ds_config {json.dumps(a.ds_config_override, sort_keys=True)}"
                r["predicted_peak_allocated_gib"] = plan.predicted_peak_allocated_gib
                r["ds_config"] = ds_cfg if plan.engine == "deepspeed" else None
            r.update({"workload": name, "variant": variant, "steps": run_steps, "warmup": warmup,
                      "global_batch": wl["global_batch"], "seq_len": wl["seq_len"], "flops_per_token": fpt})
            if r.get("tokens_per_s"):
                r["mfu"] = r["tokens_per_s"] * fpt / peak_flops
            res[variant] = r
            with open(results_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{name}] {variant:<20} rc={r['rc']} {time.time() - t0:.0f}s {r.get('layout', '')} tokens/s="
                  f"{fmt(r.get('tokens_per_s'), '.0f')} mfu={fmt(r.get('mfu'), '.3f')} peak="
                  f"{fmt(r.get('peak_allocated_gib'), '.1f')} GiB (reserved {fmt(r.get('peak_reserved_gib'), '.1f')}) "
                  f"first start {fmt(r.get('first_start_s'), '.0f')}s cached start {fmt(r.get('cached_start_s'), '.0f')}s"
                  f" losses[:5]={[round(x, 4) for x in r.get('losses', [])[:5]]}", flush=True)
            for line in r.get("log_lines", []):
                print(f"[{name}] {variant:<20}   {line}", flush=True)
            for line in r.get("second_log_lines", []):
                print(f"[{name}] {variant:<20}   second start: {line}", flush=True)
            if r["rc"] != 0 and r.get("error"):
                print(r["error"], flush=True)
        peers = [res[v]["tokens_per_s"] for v in ("peer_ds3", "peer_plain") if res.get(v, {}).get("tokens_per_s")]
        for v, r in res.items():
            if v.startswith("ours") and r.get("tokens_per_s"):
                r["ratio_vs_best_peer"] = r["tokens_per_s"] / max(peers) if peers else None
                ref = res.get("peer_plain", {}).get("losses")
                r["max_rel_loss_diff_vs_peer_plain_first10"] = max_rel_diff(r["losses"], ref, 10) if ref else None
        notes += [f"{name}: {line}" for line in ratios(name, res)]
        rows += list(res.values())
        shutil.rmtree(work, ignore_errors=True)

    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({"rows": rows, "notes": notes}, f, indent=1)
    print("\n" + "\n".join(notes))
    print("\n| workload | variant | layout | tokens/s/GPU | MFU | peak alloc GiB | first start s | cached start s | "
          "ours/best peer | second start: max rel loss diff | vs peer_plain (first 10) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['variant']} | {r.get('layout', '')} | "
              f"{fmt(r.get('tokens_per_s'), ',.0f', 'failed (rc ' + str(r['rc']) + ')')} | "
              f"{fmt(100 * r['mfu'] if r.get('mfu') else None, '.1f')}{'%' if r.get('mfu') else ''} | "
              f"{fmt(r.get('peak_allocated_gib'), '.1f')} | {fmt(r.get('first_start_s'), '.0f')} | "
              f"{fmt(r.get('cached_start_s'), '.0f')} ({r.get('second_start', '')}) | "
              f"{fmt(r.get('ratio_vs_best_peer'), '.2f', '')} | {fmt(second_start_loss_diff(r), '.1e', '')} | "
              f"{fmt(r.get('max_rel_loss_diff_vs_peer_plain_first10'), '.1e', '')} |")


if __name__ == "__main__":
    sys.exit(main())
