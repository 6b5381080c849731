"""The peers of the GPU benchmark: plain Hugging Face Trainer scripts as a user copies them from the docs,
one run per process (bench/gpu_throughput.py starts them with --peer ...)."""

import argparse
import json
import os
import shutil
import tempfile
import time

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
    # The same math as ours: a full fine-tune without DeepSpeed keeps fp32 weights and trains under
    # bf16 autocast (HF's --bf16 on an fp32 model); DeepSpeed's bf16 mode keeps fp32 masters itself.
    dtype = torch.float32 if not a.deepspeed and not a.lora else torch.bfloat16
    torch.manual_seed(a.seed)
    if a.deepspeed:  # ZeRO-3: transformers builds it partitioned (deepspeed.zero.Init)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
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




def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--deepspeed", action="store_true")
    p.add_argument("--result", required=True, help="where the run's JSON result goes")
    run_peer(p.parse_args())


if __name__ == "__main__":
    main()
