"""The knobs of the memory and speed models (each one a `planner_settings` override), and units."""

import copy

from .errors import PlanError

GIB = float(1024 ** 3)


def gib(nbytes):
    return round(nbytes / GIB, 2)


# Knobs of the memory and speed models. Every one can be overridden (planner_settings).
DEFAULT_SETTINGS = {
    # GPU memory outside PyTorch's allocator: CUDA context, NCCL buffers, cuBLAS workspaces.
    "gpu_reserved_gib": 1.5,
    # Caching-allocator fragmentation: reserved = allocated * (1 + fragmentation). The training
    # package runs with expandable segments (PYTORCH_CUDA_ALLOC_CONF), which keep it small: on the
    # H100, 0.2 GiB reserved beyond 77.6 GiB allocated. (Fixed blocks measured up to 5%.)
    "fragmentation": 0.02,
    # Never plan to the last byte: fraction of the GPU kept free.
    "gpu_headroom": 0.03,
    # Host: OS, page cache floor, daemons (per node; default min(16 GiB, 10% of RAM)) and each
    # rank's own process (torch, CUDA host side, dataloader; default 4 GiB, 1 GiB for CPU ranks).
    "host_reserved_gib": None,
    "host_per_rank_gib": None,
    # DeepSpeed's estimators multiply CPU-side offload memory by this (pinned buffers).
    "offload_buffer_factor": 1.5,
    # Size of one checkpoint shard file (HF writes ~5 GB shards); ZeRO-3 loads one at a time.
    "checkpoint_shard_gib": 5.0,
    # Speed model (relative time per optimizer step, lower is faster). See docs/planner.md.
    "checkpointing_cost": 4.0 / 3.0,
    "micro_tokens_half_efficiency": 1024,
    "zero_comm": {"0": 0.0, "1": 0.01, "2": 0.03, "3": 0.12},
    "zero_comm_reference_tokens": 4096,
    "multi_node_comm_factor": 2.0,
    "offload_optimizer_cost": 1.5,
    "offload_param_cost": 2.0,
    "max_micro_batch": 64,
    # micro_tokens_half_efficiency holds for this hidden size; wider matmuls reach the same
    # efficiency with proportionally fewer tokens.
    "micro_efficiency_hidden": 1536,
    # One GPU (world size 1) needs no partitioning, so the planner also weighs plain PyTorch (the
    # "torch" engine: fused AdamW). On the H200 with fp32 master weights on both sides, DeepSpeed
    # ZeRO-0 took 1.05x the torch engine's time (32B LoRA, compiled layers; docs/gpu-benchmarks.md).
    "deepspeed_single_gpu_cost": 1.05,
    # Compute time with compilation over eager, per COMPILE_MODES entry: the torch engine's compiled
    # layers 0.8 (H100); DeepSpeed's engine.compile() 0.86 (H200, bare ZeRO-3 loop); DeepCompile 0.82,
    # from its ZeRO-3 run at 0.87x the torch engine side by side (Qwen2.5-1.5B, H200).
    "compile_cost": {"regions": 0.8, "deepcompile": 0.82, "torch": 0.86, "none": 1.0},
    # The chunked loss (the training package's --chunked_loss) over transformers' own: the same FLOPs,
    # no recomputation; its head matmuls come in chunks of about 1k tokens.
    "chunked_loss_cost": 1.0,
    # ZeRO-3's per-module hooks cost time even on one GPU: the package's eager ZeRO-3 took 1.32x the
    # time of the torch engine, eager, for Qwen2.5-1.5B at 16384 tokens per micro-batch (H200). Per 4096 tokens at
    # hidden size micro_efficiency_hidden; wider layers spend less of their time in the hooks.
    "zero3_hook_cost": 1.27,
    # The part of that hook time left under DeepCompile, which replaces the hooks by graph passes
    # (a bare ZeRO-3 loop on an H200: 19.8k -> 41.3k tokens/s).
    "deepcompile_hook_cost": 0.1,
    # MFU of a step of relative time 1.0 under the speed model: predicted MFU = this / relative step
    # time. Fitted to the package's six H200 runs (docs/gpu-benchmarks.md: Qwen2.5-1.5B torch engine,
    # ZeRO-3 DeepCompile and eager; the 32B shape in 8 layers ZeRO-3 DeepCompile; 32B LoRA torch
    # engine and ZeRO-0), which it predicts within -17% to +19%.
    "base_mfu": 0.46,
}


def merge_settings(settings):
    s = copy.deepcopy(DEFAULT_SETTINGS)
    for k, v in (settings or {}).items():
        if k not in s:
            raise PlanError(f"unknown planner setting {k!r} (known: {', '.join(sorted(s))})")
        if isinstance(s[k], dict):
            s[k].update({str(kk): vv for kk, vv in v.items()})
        else:
            s[k] = v
    return s
