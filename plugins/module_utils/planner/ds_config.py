"""ds_config.json for a plan, and the training package's arguments that go with it: both from the
same plan and job values, through the one config <-> TrainingArguments table."""

import copy

from ..trainer_fields import trainer_values
from .errors import PlanError
from .memory import bucket_sizes

# Arguments of the training package (train/args.py) that trainer_args() may add besides HF's
# TrainingArguments.
PACKAGE_ARGS = ("checkpoint_layers", "compile", "chunked_loss")


def _deep_merge(base, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        elif v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def _find_auto(node, path=""):
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _find_auto(v, path + "." + k if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _find_auto(v, f"{path}[{i}]")
    elif isinstance(node, str) and node.strip().lower() == "auto":
        found.append(path)
    return found


def _zero_section(p, model):
    stage = p.zero_stage
    zero = {"stage": stage}
    if stage in (1, 2, 3):
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if stage in (1, 2):
        zero.update({"allgather_partitions": True, "reduce_scatter": True})
    if stage >= 1:
        zero.update(bucket_sizes(model, stage))
    if stage == 3:
        zero.update({
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            # fp32 gradients are built one sub-group at a time; 1e8 elements keeps that copy
            # under 0.4 GB (DeepSpeed's default 1e9 would allow 4 GB).
            "sub_group_size": int(1e8),
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def build_ds_config(p, job, model, config_overrides=None):
    """ds_config.json for the plan: concrete values only, consistent with trainer_args()."""
    cfg = {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "gradient_clipping": job.max_grad_norm,
        "zero_optimization": _zero_section(p, model),
        # The optimizer is named so that ZeRO-Offload gets DeepSpeed's CPU Adam; on the GPU,
        # torch_adam selects torch.optim.AdamW (no JIT-built op). The LR schedule is Trainer's.
        "optimizer": {"type": "AdamW", "params": {
            "lr": job.learning_rate, "betas": [job.adam_beta1, job.adam_beta2], "eps": job.adam_epsilon,
            "weight_decay": job.weight_decay}},
        "checkpoint": {"use_node_local_storage": not job.shared_storage},
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
    }
    if not p.offload_optimizer:
        cfg["optimizer"]["params"]["torch_adam"] = True
    if p.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif p.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                       "hysteresis": 2, "min_loss_scale": 1}
    if p.compile == "deepcompile":
        # DeepSpeed's compiler passes run once the training package calls engine.compile().
        cfg["compile"] = {"deepcompile": True}
    if config_overrides:
        _deep_merge(cfg, copy.deepcopy(config_overrides))
    params = (cfg.get("optimizer") or {}).get("params") or {}
    named = (((config_overrides or {}).get("optimizer") or {}).get("params") or {})
    if p.device == "gpu" and params.get("torch_adam") and "fused" not in named:
        # torch's fused AdamW kernel on the fp32 partitions: DeepSpeed passes the params on to
        # torch.optim.AdamW (the bare ZeRO-3 loop of the H200 measurements used it); after the
        # overrides, since DeepSpeed's own FusedAdam (torch_adam false) takes no such argument
        params["fused"] = True
    validate_ds_config(cfg, p.world_size)
    return cfg


def validate_ds_config(cfg, world_size):
    autos = _find_auto(cfg)
    if autos:
        raise PlanError("ds_config must not contain \"auto\" (HF Trainer would fill it from its own "
                        f"arguments, which the plan cannot see): {', '.join(autos)}")
    try:
        micro = int(cfg["train_micro_batch_size_per_gpu"])
        accum = int(cfg["gradient_accumulation_steps"])
        total = int(cfg["train_batch_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError("ds_config needs integer train_batch_size, train_micro_batch_size_per_gpu and "
                        f"gradient_accumulation_steps ({exc})") from None
    if micro * accum * world_size != total:
        raise PlanError(f"ds_config batch sizes disagree: train_micro_batch_size_per_gpu {micro} x "
                        f"gradient_accumulation_steps {accum} x {world_size} ranks = {micro * accum * world_size}, "
                        f"but train_batch_size is {total}")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise PlanError("ds_config enables both bf16 and fp16")
    params = (cfg.get("optimizer") or {}).get("params") or {}
    if "fused" in params and not params.get("torch_adam"):
        raise PlanError("ds_config optimizer.params.fused is an argument of torch.optim.AdamW, which DeepSpeed "
                        "uses only with optimizer.params.torch_adam true: set torch_adam true or drop fused")


def trainer_args(cfg, p):
    """The training package's arguments for the plan: every TrainingArguments value the config fixes
    (through the table, so HF finds no mismatch), plus what the plan decides beyond the config. The
    torch engine runs without --deepspeed and gets the same values, with fused AdamW."""
    args = {"bf16": False, "fp16": False, **trainer_values(cfg)}
    args["gradient_checkpointing"] = bool(p.gradient_checkpointing)
    args["save_on_each_node"] = bool((cfg.get("checkpoint") or {}).get("use_node_local_storage", False))
    if p.gradient_checkpointing and p.checkpoint_layers and p.checkpoint_layers < p.model["num_hidden_layers"]:
        args["checkpoint_layers"] = int(p.checkpoint_layers)
    if p.compile != "none":
        args["compile"] = p.compile
    if p.chunked_loss:
        args["chunked_loss"] = True
    if p.engine == "torch":
        args["optim"] = "adamw_torch_fused"
    return args
