"""GPU throughput: the training package with the planner's plan ("ours") against what a user would
copy from the Hugging Face docs ("peer"), on one GPU, random-init models of real shapes, synthetic
tokens, the same global batch and sequence length for every variant.

    python bench/gpu_throughput.py                       # W1 and W2, every variant
    python bench/gpu_throughput.py --workloads w1 --steps 30 --warmup 5 --out /tmp/gpu_bench

Variants (each a fresh process, so peak memory is its own):
  peer_ds3        plain HF Trainer + DeepSpeed ZeRO-3 with HF's documented "auto" config, SDPA,
                  gradient checkpointing on
  peer_plain      plain HF Trainer, DeepSpeed off, bf16 weights, SDPA, gradient checkpointing on
  ours            python -m train with the planner's plan for this GPU, as the deepspeed_config module
                  renders it: on one GPU that is plain PyTorch (no --deepspeed), fused AdamW, compiled
                  layers, and as few checkpointed layers and as large a micro-batch as fit
  ours_deepspeed  the same with the plan override engine=deepspeed: the planner's ds_config.json
                  (ZeRO-0 on one GPU) and trainer arguments
--ours-overrides '{"micro_batch_size": 1}' adds plan overrides to both (experiments).

Throughput: tokens/s over the steps after --warmup (wall clock per optimizer step, each step ends with
a loss read, i.e. a GPU sync). MFU = tokens/s x FLOPs per token / 989e12 (H100 SXM dense bf16), with
FLOPs per token = 6 x matmul weights (4 x frozen weights under LoRA + 6 x LoRA weights) + 12 x layers
x q_dim x seq_len (attention); the input embedding is not counted, the LM head is; recomputation
(checkpointing) is not counted.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "plugins", "module_utils"))
sys.path.insert(0, REPO)

PEAK_FLOPS = 989e12

WORKLOADS = {
    # name: preset, fine-tune, global batch (sequences per optimizer step), peer micro-batch, steps scale
    "w1": {"preset": "qwen2.5-1.5b", "finetune": "full", "global_batch": 8, "peer_micro": 4, "lr": 1e-5},
    "w2": {"preset": "deepseek-r1-distill-qwen-32b", "finetune": "lora", "global_batch": 4, "peer_micro": 1,
           "lr": 2e-4},
}

# Hugging Face's documented ZeRO-3 config (transformers docs, "DeepSpeed" -> ZeRO-3 example), without
# the CPU offload sections (slower; a one-GPU user with room would drop them).
HF_ZERO3_AUTO = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                  "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def flops_per_token(cfg, seq_len, lora_r=None):
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    q, kvd = heads * hd, kv * hd
    per_layer = h * q + 2 * h * kvd + q * h + 3 * h * inter
    dense = layers * per_layer + vocab * h  # LM head counted (tied or not), embedding lookup not
    attention = 12 * layers * q * seq_len
    if lora_r:
        adapters = layers * lora_r * ((h + q) + 2 * (h + kvd) + (q + h) + 2 * (h + inter) + (inter + h))
        return 4 * dense + 6 * adapters + attention
    return 6 * dense + attention


def gpu_facts():
    import ds_gpu

    out = subprocess.run(["nvidia-smi", "--query-gpu=" + ds_gpu.NVIDIA_SMI_FIELDS_OLD, "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    gpu = ds_gpu.parse_nvidia_smi(out)[0]
    return gpu["name"], gpu["memory_mib"] / 1024.0


def host_memory_gib():
    import ds_gpu

    with open("/proc/meminfo") as f:
        return ds_gpu.parse_meminfo(f.read())


def make_plan(model_dir, wl, seq_len, overrides=None):
    import ds_planner

    gpu_name, gpu_gib = gpu_facts()
    model = ds_planner.load_model_shape(model_dir=model_dir)
    cluster = ds_planner.Cluster([1], gpu_memory_gib=gpu_gib, host_memory_gib=max(host_memory_gib(), 64.0),
                                 gpu_model=gpu_name)
    job = ds_planner.Job(seq_len=seq_len, global_batch_size=wl["global_batch"], finetune=wl["finetune"],
                         learning_rate=wl["lr"])
    p = ds_planner.plan(model, cluster, job, overrides=overrides)
    cfg = ds_planner.build_ds_config(p, job, model)
    return p, cfg, ds_planner.trainer_argv(ds_planner.trainer_args(cfg, p))


# ---------------------------------------------------------------------------------------------
# The peer: a plain HF Trainer script (runs in its own process)


def run_peer(a):
    if a.deepspeed:
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
            os.environ.setdefault(k, v)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from train.data import SyntheticDataset

    fields = TrainingArguments.__dataclass_fields__
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    out_dir = tempfile.mkdtemp(prefix="peer.")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.accum,
        max_steps=a.steps, learning_rate=a.lr, bf16=True, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, seed=a.seed, disable_tqdm=True,
        deepspeed=dict(HF_ZERO3_AUTO) if a.deepspeed else None,
        # DeepSpeed 0.19.8's WarmupLR rejects warmup_num_steps 0 (what "auto" becomes by default)
        warmup_steps=1 if a.deepspeed else 0,
        **{ckpt: True, ckpt + "_kwargs": {"use_reentrant": False}})
    config = AutoConfig.from_pretrained(a.model_dir)
    config.use_cache = False
    torch.manual_seed(a.seed)
    if a.deepspeed:  # ZeRO-3: transformers builds it partitioned (deepspeed.zero.Init)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if a.lora:
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    data = SyntheticDataset(a.steps * a.micro * a.accum, a.seq_len, config.vocab_size, a.seed)
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                torch.cuda.synchronize()
                times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            if state.global_step == a.warmup:
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
    trainer.train()
    step_s = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    steady = step_s[a.warmup:]
    tokens_per_step = a.micro * a.accum * a.seq_len
    result = {"step_seconds": step_s, "losses": losses,
              "tokens_per_s": tokens_per_step * len(steady) / sum(steady),
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    with open(a.result, "w") as f:
        json.dump(result, f)
    shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(cmd, log_path, timeout, env=None):
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                                env=dict(os.environ, **(env or {}))).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t0


def tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def run_ours(model_dir, wl, seq_len, steps, warmup, seed, work, plan, ds_cfg, argv, log_path, timeout):
    """python -m train as the launch role runs it: the plan's trainer arguments, --deepspeed only
    when the plan's engine is DeepSpeed."""
    out_dir = os.path.join(work, "ours_run")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", "--model_name_or_path", model_dir, "--random_init",
           "--synthetic_samples", str(steps * wl["global_batch"]), "--max_seq_length", str(seq_len),
           "--output_dir", out_dir, "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no",
           "--save_final_model", "false", "--seed", str(seed), "--attn_implementation", "sdpa",
           "--report_to", "none"] + argv
    if wl["finetune"] == "lora":
        cmd += ["--lora", "--lora_r", "16"]
    if plan["engine"] == "deepspeed":
        path = os.path.join(work, "ds_config.json")
        with open(path, "w") as f:
            json.dump(ds_cfg, f, indent=2)
        cmd += ["--deepspeed", path]
    rc, wall = run_child(cmd, log_path, timeout)
    if rc != 0:
        return {"rc": rc, "wall_s": wall, "error": tail(log_path)}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        hist = [json.loads(line) for line in f if line.strip()]
    by_step = {h["step"]: h for h in hist}
    first, last = by_step[warmup], hist[-1]
    tps = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    with open(os.path.join(out_dir, "summary.json")) as f:
        package_mfu = json.load(f)["mfu"]
    return {"rc": 0, "wall_s": wall, "losses": [h["loss"] for h in hist], "tokens_per_s": tps,
            "peak_allocated_gib": max(h.get("memory_gb") or 0 for h in hist[1:] or hist),
            "peak_reserved_gib": max(h.get("memory_reserved_gb") or 0 for h in hist[1:] or hist) or None,
            "package_mfu": package_mfu}


def compare_losses(a, b, n=10):
    pairs = list(zip(a, b))[:n]
    if not pairs:
        return None
    return max(abs(x - y) / abs(y) for x, y in pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="w1,w2")
    p.add_argument("--variants", default="peer_ds3,peer_plain,ours")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (W2 runs a third of them)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--out", default="gpu_bench")
    p.add_argument("--ours-overrides", type=json.loads, default={},
                   help="plan overrides (JSON) for the ours* variants, e.g. '{\"micro_batch_size\": 1}'")
    p.add_argument("--ours-extra", default="", help="extra `python -m train` arguments for the ours* variants, "
                   "appended after the plan's (experiments beyond the plan, e.g. '--checkpoint_layers 40')")
    # internal: one peer run
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir")
    p.add_argument("--micro", type=int)
    p.add_argument("--accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--deepspeed", action="store_true")
    p.add_argument("--result")
    a = p.parse_args()
    if a.peer:
        return run_peer(a)

    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions")
    results_path = os.path.join(a.out, "gpu_throughput.jsonl")
    rows = []
    for name in a.workloads.split(","):
        wl = WORKLOADS[name]
        steps = a.steps if name == "w1" else max(a.warmup + 5, a.steps // 3)
        warmup = a.warmup if name == "w1" else max(2, a.warmup // 2)
        work = tempfile.mkdtemp(prefix="gpu_bench_%s." % name)
        model_dir = os.path.join(work, "model")
        subprocess.run([sys.executable, "-m", "train.tiny_model", "--preset", wl["preset"], model_dir], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        fpt = flops_per_token(cfg, a.seq_len, 16 if wl["finetune"] == "lora" else None)
        plans = {"ours": make_plan(model_dir, wl, a.seq_len, a.ours_overrides)}
        if "ours_deepspeed" in a.variants.split(","):
            plans["ours_deepspeed"] = make_plan(model_dir, wl, a.seq_len, dict(a.ours_overrides, engine="deepspeed"))
        if a.ours_extra:
            plans = dict((v, (p_, c_, argv_ + a.ours_extra.split())) for v, (p_, c_, argv_) in plans.items())
        for variant, (plan, _, argv) in plans.items():
            print("[%s] %s plan: %s; predicted peak %.1f GiB allocated, %.1f reserved; %s" % (
                name, variant, plan["label"], plan["predicted_peak_allocated_gib"], plan["predicted_peak_reserved_gib"],
                " ".join(argv)), flush=True)
        res = {}
        for variant in a.variants.split(","):
            log_path = os.path.join(a.out, "%s_%s.log" % (name, variant))
            t0 = time.time()
            if variant.startswith("peer"):
                micro = wl["peer_micro"]
                result_path = os.path.join(work, variant + ".json")
                cmd = [sys.executable, os.path.abspath(__file__), "--peer", "--model-dir", model_dir,
                       "--micro", str(micro), "--accum", str(wl["global_batch"] // micro), "--steps", str(steps),
                       "--warmup", str(warmup), "--seq-len", str(a.seq_len), "--lr", str(wl["lr"]),
                       "--seed", str(a.seed), "--result", result_path]
                cmd += ["--lora"] if wl["finetune"] == "lora" else []
                cmd += ["--deepspeed"] if variant == "peer_ds3" else []
                rc, wall = run_child(cmd, log_path, a.timeout)
                r = {"rc": rc, "wall_s": wall}
                if rc == 0:
                    with open(result_path) as f:
                        r.update(json.load(f))
                else:
                    r["error"] = tail(log_path)
                r["layout"] = "ZeRO-%s, micro %d x accum %d, checkpointing" % (
                    "3 (HF auto)" if variant == "peer_ds3" else "off (no DeepSpeed)", micro,
                    wl["global_batch"] // micro)
            else:
                plan, ds_cfg, argv = plans[variant]
                r = run_ours(model_dir, wl, a.seq_len, steps, warmup, a.seed, work, plan, ds_cfg, argv, log_path,
                             a.timeout)
                r["layout"] = plan["label"] + ", x %d accumulation" % plan["gradient_accumulation_steps"]
                r["predicted_peak_allocated_gib"] = plan["predicted_peak_allocated_gib"]
            r.update({"workload": name, "variant": variant, "steps": steps, "warmup": warmup,
                      "global_batch": wl["global_batch"], "seq_len": a.seq_len, "flops_per_token": fpt})
            if r.get("tokens_per_s"):
                r["mfu"] = r["tokens_per_s"] * fpt / PEAK_FLOPS
            res[variant] = r
            with open(results_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print("[%s] %-10s rc=%s %.0fs %s tokens/s=%s mfu=%s peak=%s GiB (reserved %s) losses[:5]=%s" % (
                name, variant, r["rc"], time.time() - t0, r["layout"],
                "%.0f" % r["tokens_per_s"] if r.get("tokens_per_s") else "-",
                "%.3f" % r["mfu"] if r.get("mfu") else "-",
                "%.1f" % r["peak_allocated_gib"] if r.get("peak_allocated_gib") else "-",
                "%.1f" % r["peak_reserved_gib"] if r.get("peak_reserved_gib") else "-",
                [round(x, 4) for x in r.get("losses", [])[:5]]), flush=True)
            if r["rc"] != 0:
                print(r.get("error", ""), flush=True)
        peers = [res[v]["tokens_per_s"] for v in ("peer_ds3", "peer_plain") if res.get(v, {}).get("tokens_per_s")]
        best_peer = max(peers) if peers else None
        for v in ("ours", "ours_deepspeed"):
            r = res.get(v)
            if r and r.get("tokens_per_s") and best_peer:
                r["ratio_vs_best_peer"] = r["tokens_per_s"] / best_peer
                ref = res.get("peer_plain", {}).get("losses")
                r["max_rel_loss_diff_vs_peer_plain_first10"] = compare_losses(r["losses"], ref) if ref else None
                ref3 = res.get("peer_ds3", {}).get("losses")
                r["max_rel_loss_diff_vs_peer_ds3_first10"] = compare_losses(r["losses"], ref3) if ref3 else None
        rows += list(res.values())
        shutil.rmtree(work, ignore_errors=True)

    print("\n| workload | variant | layout | tokens/s/GPU | MFU | peak alloc GiB | ours/best peer | "
          "loss rel diff vs peer_plain (first 10) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["workload"], r["variant"], r["layout"],
            "%.0f" % r["tokens_per_s"] if r.get("tokens_per_s") else "failed (rc %s)" % r["rc"],
            "%.1f%%" % (100 * r["mfu"]) if r.get("mfu") else "-",
            "%.1f" % r["peak_allocated_gib"] if r.get("peak_allocated_gib") else "-",
            "%.2fx" % r["ratio_vs_best_peer"] if r.get("ratio_vs_best_peer") else "",
            "%.4f" % r["max_rel_loss_diff_vs_peer_plain_first10"]
            if r.get("max_rel_loss_diff_vs_peer_plain_first10") is not None else ""))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
