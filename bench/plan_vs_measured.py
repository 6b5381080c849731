"""Compare the planner's predicted peak GPU memory with what a real run measures.

For one plan (a model shape, a sequence length, and the plan choices), this builds the plan and
its ds_config.json with the planner (plugins/module_utils/planner), trains a random-init model of that
shape for a few steps with HF Trainer + DeepSpeed, and prints predicted vs measured peak memory
(torch.cuda.max_memory_allocated / max_memory_reserved over the steps after the first, the
steady state the plan describes; the set-up + first-step peak is reported next to it) as a
small table and a JSON line.

    # one GPU (single process; use `deepspeed --num_gpus N` for more ranks)
    python -m bench.plan_vs_measured --config tests/unit/data/models/Qwen2.5-0.5B.json \
        --seq-len 2048 --micro-batch 4 --stage 2 --no-checkpointing
    # CPU smoke test (tiny shape, fp32): checks the script runs; measured memory is "n/a"
    python -m bench.plan_vs_measured --cpu

No Ansible needed: the planner is plain Python. No weights are downloaded: the model is built
from the config's shape with random weights.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus, planner
from ansible_collections.dsmesh.cluster.plugins.module_utils.planner.settings import GIB

TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False,
        "max_position_embeddings": 2048}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a model config.json (default: a tiny Qwen2 shape)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (fit a wide shape on one GPU)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-param", action="store_true")
    p.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=True)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--finetune", choices=["full", "lora"], default="full")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; memory is measured from step 2 on")
    p.add_argument("--cpu", action="store_true", help="CPU smoke test (fp32, measured memory n/a)")
    p.add_argument("--out", help="append the JSON result to this file")
    return p.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_memory_gib():
    with open("/proc/meminfo") as fd:
        return gpus.parse_meminfo(fd.read())


def main():
    args = parse_args()
    # A single process needs the rendezvous variables a launcher would set.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")

    import torch

    use_gpu = torch.cuda.is_available() and not args.cpu
    if args.config:
        with open(args.config) as fd:
            cfg = json.load(fd)
        name = os.path.splitext(os.path.basename(args.config))[0]
        if os.path.basename(args.config) == "config.json":
            name = os.path.basename(os.path.dirname(os.path.abspath(args.config)))
    else:
        cfg, name = dict(TINY), "tiny-qwen2"
    if args.layers:
        cfg = dict(cfg, num_hidden_layers=args.layers)
        name += f"-{args.layers}L"
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])

    shape = planner.ModelShape.from_config(cfg, name=name)
    if use_gpu:
        torch.cuda.set_device(local_rank)
        props = torch.cuda.get_device_properties(local_rank)
        cluster = planner.Cluster([world], gpu_memory_gib=props.total_memory / GIB,
                                     host_memory_gib=host_memory_gib(), bf16=torch.cuda.is_bf16_supported(),
                                     gpu_model=props.name)
    else:
        cluster = planner.Cluster([world], host_memory_gib=host_memory_gib(), device="cpu")
    job = planner.Job(seq_len=args.seq_len, global_batch_size=args.micro_batch * args.accum * world,
                         finetune=args.finetune, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
                         lora_dropout=args.lora_dropout)
    overrides = {"engine": "deepspeed", "zero_stage": args.stage, "compile": "none", "offload_optimizer": args.offload_optimizer,
                 "offload_param": args.offload_param, "gradient_checkpointing": args.checkpointing,
                 "micro_batch_size": args.micro_batch}
    try:
        plan = planner.plan(shape, cluster, job, overrides=overrides)
    except planner.PlanError as exc:
        print(f"the planner says this plan does not fit:\n{exc}", file=sys.stderr)
        return 2
    ds_config = planner.build_ds_config(plan, job, shape)
    targs = {k: v for k, v in planner.trainer_args(ds_config, plan).items() if k not in planner.PACKAGE_ARGS}

    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    if not use_gpu:
        # machine-facts: without a GPU accelerate sets up no backend; give it gloo explicitly.
        from accelerate import PartialState
        PartialState(backend="gloo")
    out_dir = tempfile.mkdtemp(prefix="plan_vs_measured.")
    extra = {} if use_gpu else {"use_cpu": True, "accelerator_config": {"use_configured_state": True}}
    training_args = TrainingArguments(
        output_dir=out_dir, deepspeed=ds_config, max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, remove_unused_columns=False, **dict(extra, **targs))

    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    config = AutoConfig.for_model(**cfg)
    config.use_cache = False
    dtype = torch.bfloat16 if plan.precision == "bf16" else (torch.float16 if plan.precision == "fp16"
                                                                else torch.float32)
    torch.manual_seed(0)
    # Under ZeRO-3, TrainingArguments registered the config: from_config partitions at creation.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if args.finetune == "lora":
        from peft import LoraConfig, get_peft_model
        lora = plan.lora
        model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"]))
        if args.checkpointing:
            model.enable_input_require_grads()

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return job.global_batch_size * args.steps

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, shape.vocab_size, (args.seq_len,), generator=g)
            return {"input_ids": ids, "labels": ids.clone()}

    from transformers import TrainerCallback

    whole_run = {}

    class SteadyStatePeak(TrainerCallback):
        """The plan predicts the training peak: measure it from the second optimizer step on,
        when DeepSpeed's set-up and the first step's optimizer-state creation are behind."""

        def on_step_begin(self, train_args, state, control, **kwargs):
            if use_gpu and state.global_step == 1:
                whole_run["allocated"] = torch.cuda.max_memory_allocated(local_rank)
                whole_run["reserved"] = torch.cuda.max_memory_reserved(local_rank)
                torch.cuda.reset_peak_memory_stats(local_rank)

    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(), callbacks=[SteadyStatePeak()])
    start = time.time()
    result = trainer.train()
    elapsed = time.time() - start

    row = {
        "model": name,
        "parameters_b": shape.describe()["parameters_b"],
        "plan": plan.label,
        "finetune": args.finetune,
        "seq_len": args.seq_len,
        "world_size": world,
        "device": torch.cuda.get_device_name(local_rank) if use_gpu else "cpu",
        "predicted_allocated_gib": plan.predicted_peak_allocated_gib,
        "predicted_reserved_gib": plan.predicted_peak_reserved_gib,
        "predicted_breakdown_gib": dict((k, v) for k, v in plan.gpu_memory_gib.items()
                                        if k in ("model_states", "activations", "buffers", "fragmentation")),
        "measured_allocated_gib": "n/a",
        "measured_reserved_gib": "n/a",
        "error_allocated_pct": "n/a",
        "error_reserved_pct": "n/a",
        "train_loss": round(result.training_loss, 4),
        "seconds": round(elapsed, 1),
    }
    if use_gpu:
        alloc = torch.cuda.max_memory_allocated(local_rank) / GIB
        reserved = torch.cuda.max_memory_reserved(local_rank) / GIB
        row["measured_allocated_gib"] = round(alloc, 2)
        row["measured_reserved_gib"] = round(reserved, 2)
        row["error_allocated_pct"] = round((plan.predicted_peak_allocated_gib - alloc) / alloc * 100, 1)
        row["error_reserved_pct"] = round((plan.predicted_peak_reserved_gib - reserved) / reserved * 100, 1)
        # Set-up and first step included (DeepSpeed flattens parameters, Adam creates its state).
        row["measured_allocated_gib_first_step"] = round(whole_run.get("allocated", 0) / GIB, 2)
        row["measured_reserved_gib_first_step"] = round(whole_run.get("reserved", 0) / GIB, 2)
    if rank == 0:
        print(f"\nplan: {row['plan']} ({name}, {args.finetune}, seq {args.seq_len}, {world} rank(s))")
        for label, a, b in (("", "allocated", "reserved"),
                            ("predicted", row["predicted_allocated_gib"], row["predicted_reserved_gib"]),
                            ("measured", row["measured_allocated_gib"], row["measured_reserved_gib"]),
                            ("error %", row["error_allocated_pct"], row["error_reserved_pct"])):
            print(f"{label:<10} {a!s:>12} {b!s:>12}")
        print("RESULT " + json.dumps(row, sort_keys=True))
        if args.out:
            with open(args.out, "a") as fd:
                fd.write(json.dumps(row, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
