"""Command line: Hugging Face TrainingArguments plus this package's own, from the command line or
a YAML/JSON file (`python -m train run.yaml [--flag value ...]`, flags override the file).

Values the DeepSpeed config fixes (micro batch, accumulation, clipping, precision, optimizer
settings) are taken from it when not given as arguments; given ones must agree with it."""

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from ansible_collections.dsmesh.cluster.plugins.module_utils.trainer_fields import get_path, is_set, trainer_values


class ConfigError(ValueError):
    """Arguments or DeepSpeed config that cannot work together."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model directory (config.json, tokenizer, weights)."})
    random_init: bool = field(default=False, metadata={
        "help": "Initialise weights randomly from config.json instead of loading them (benchmarks)."})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 on CUDA if installed, else sdpa), sdpa, flash_attention_2, "
                "flex_attention or eager."})
    chat_template: str | None = field(default=None, metadata={
        "help": "Chat template (Jinja text or a file) replacing the tokenizer's, for `messages` data."})
    sdpa_backend: str = field(default="auto", metadata={
        "help": "Which kernel SDPA attention tries first: auto (cuDNN on Hopper GPUs, where its forward + "
                "backward ran 1.6x faster than flash at seq 2048; PyTorch's order elsewhere), default, cudnn "
                "or flash. Exact attention either way; a kernel that cannot take an input falls back."})
    compile: str = field(default="none", metadata={
        "help": "regions: torch.compile each decoder layer and the loss (regional compilation: the layers share "
                "one compiled graph, so a 64-layer model compiles in about the time of one layer; works with "
                "gradient checkpointing; not with ZeRO-3). deepcompile: DeepSpeed's DeepCompile through "
                "engine.compile() (ZeRO 1-3 on CUDA; the DeepSpeed config must hold \"compile\": {\"deepcompile\": "
                "true}). torch: engine.compile() without DeepCompile. none: eager. On the CPU deepcompile and "
                "torch run eager."})
    deepcompile_schedule: str = field(default="first_step", metadata={
        "help": "When DeepCompile (ZeRO-3) applies its graph passes. first_step: gather/release, prefetch and "
                "selective unsharding in one compile at the first step. warmup: DeepSpeed's own schedule, "
                "gather/release at the first step and a second compile at step 5 that adds prefetch and "
                "unsharding (167 s + 192 s for Qwen2.5-1.5B on an H200)."})
    deepcompile_profiles: str = field(default="reuse", metadata={
        "help": "How a relaunch of a DeepCompile plan treats the profiles its first start recorded beside the "
                "compile caches. reuse: every rank takes the recorded figures without running DeepSpeed's "
                "profiler, so the passes build the first start's graphs and Inductor's cache serves them (W3 on "
                "an H200: first step at 77 s against 206 s). rerun: DeepSpeed profiles again, then the recorded "
                "figures replace its own (the same graphs, the profiling time paid). fresh: DeepSpeed's own way, "
                "every start profiles and compiles anew."})
    zero_grad_norm: str = field(default="foreach", metadata={
        "help": "How ZeRO-3 takes the gradient norm for clipping. foreach: torch's foreach norm accumulating in "
                "fp64 as it reads each gradient (W4 on an H200: 1.0125x the tokens/s). deepspeed: DeepSpeed's "
                "own, each gradient copied whole to fp64 first; the same arithmetic."})
    compile_regions: bool | None = field(default=None, metadata={
        "help": "Deprecated spelling of --compile regions."})
    master_weights: str = field(default="fp32", metadata={
        "help": "fp32: a full fine-tune in 16-bit precision keeps fp32 weights and runs the model under 16-bit "
                "autocast (mixed precision; DeepSpeed's bf16/fp16 modes keep their own fp32 copy); LoRA keeps its "
                "adapters in fp32 over a 16-bit base. none: the weights themselves are 16-bit and the optimizer "
                "updates them in 16 bits (at small learning rates most updates round away; for comparisons only)."})
    checkpoint_layers: int | None = field(default=None, metadata={
        "help": "With gradient checkpointing, checkpoint only the first N decoder layers; the others keep "
                "their activations (faster, more memory). Default: all. The planner sets it."})
    chunked_loss: bool = field(default=False, metadata={
        "help": "Run the LM head and the cross-entropy on chunks of tokens, keeping only the 16-bit gradient "
                "of the logits, so the whole micro-batch's logits never exist (13.9 GiB for a 152k vocabulary "
                "at 16k tokens). The same loss and gradients, no recomputation; Llama, Mistral and Qwen2/3 "
                "models. The planner sets it where it lets a faster plan fit."})


@dataclass
class DataArguments:
    dataset: list[str] | None = field(default=None, metadata={
        "help": "Training data file(s), local: .jsonl, .json, .parquet or .arrow, one of TRL's SFT forms per row "
                "(text; prompt/completion as text or as messages; messages). Repeat the flag, list several, or "
                "separate with commas."})
    eval_dataset: list[str] | None = field(default=None, metadata={"help": "Evaluation data file(s), as --dataset."})
    dataset_text_field: str = field(default="text", metadata={
        "help": "The column holding plain text to train on every token of (TRL's dataset_text_field)."})
    completion_only_loss: bool = field(default=True, metadata={
        "help": "Prompt-completion rows: loss on the completion only; false: on the prompt as well (TRL's "
                "completion_only_loss)."})
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "Chats: loss on the assistant turns only; false: on every token of the chat, the system and user "
                "turns and the template's markup too (TRL's assistant_only_loss, which defaults to false there)."})
    eval_split_ratio: float = field(default=0.0, metadata={
        "help": "Hold out this fraction of the training examples for evaluation."})
    max_seq_length: int = field(default=2048, metadata={
        "help": "Tokens per sequence; longer examples are truncated (and counted)."})
    packing: bool = field(default=True, metadata={
        "help": "Pack several examples into each sequence (attention stays within each example)."})
    synthetic_samples: int = field(default=0, metadata={
        "help": "Train on this many random-token sequences of max_seq_length instead of files (benchmarks)."})
    synthetic_example_length: int = field(default=0, metadata={
        "help": "With --synthetic_samples: pack examples of this many tokens into each sequence, as --packing "
                "packs real ones (attention within each example); 0: one example per sequence."})


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "Module names to adapt, or all-linear."})
    lora_use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Also write the base model with the adapter merged in, to <final_model_dir>_merged."})


@dataclass
class RunArguments:
    resume: bool = field(default=True, metadata={
        "help": "Resume from the newest complete checkpoint in output_dir, if there is one."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Delete checkpoints, metrics and final model already in output_dir and start over."})
    final_model_dir: str | None = field(default=None, metadata={
        "help": "Where the trained model goes (default <output_dir>/final_model)."})
    save_final_model: bool = field(default=True, metadata={
        "help": "Write the final model (benchmarks may skip the gather and write)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak TFLOPS per device for MFU (default: known GPUs' dense bf16/fp16 peak; none on CPU)."})
    profile_steps: str | None = field(default=None, metadata={
        "help": "Profile optimizer steps A-B (e.g. 5-6) with torch.profiler: the top GPU kernels go to the log "
                "and <output_dir>/profile.txt (throughput work)."})
    fsync_checkpoints: bool = field(default=True, metadata={
        "help": "Flush checkpoints to disk before marking them complete."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, RunArguments)

# Defaults that differ from TrainingArguments' when the user says nothing.
OUR_DEFAULTS = {
    "logging_steps": 5,
    "logging_first_step": True,
    "disable_tqdm": True,  # the package draws its own progress bar
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "save_strategy": "steps",
    # NCCL's timeout for one collective (accelerate passes it to init_process_group): a rank that meets
    # the first all-gather only after a cold DeepCompile (minutes) must not make the others time out
    "ddp_timeout": 3600,
}


def expand_config_file(argv):
    """`run.yaml --flag v` -> the file's keys as flags, then the given flags (which win).

    The file must be the first argument (the deepspeed launcher may put --local_rank=N before it)."""
    lead = 0
    while lead < len(argv) and argv[lead].startswith("--local_rank="):
        lead += 1
    if lead >= len(argv) or argv[lead].startswith("-") or not argv[lead].endswith((".yaml", ".yml", ".json")):
        return list(argv)
    path = argv[lead]
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of argument names to values")
    out = []
    for key, value in values.items():
        if value is not None:
            out += _flag(key, value)
    return argv[:lead] + out + argv[lead + 1:]


def merge_repeated(argv, names):
    """`--dataset=a --dataset b c` -> `--dataset a b c` (argparse would keep only the last)."""
    values = {n: [] for n in names}
    out, current = [], None
    for a in argv:
        if a.startswith("-"):
            current = None
            key, eq, value = a[2:].partition("=")
            key = key.replace("-", "_")
            if a.startswith("--") and key in values:
                current = key
                if eq:
                    values[key].append(value)
                continue
        elif current is not None:
            values[current].append(a)
            continue
        out.append(a)
    for name, vals in values.items():
        if vals:
            out += [f"--{name}", *vals]
    return out


def explicit_names(argv):
    """Names of the arguments given (the last occurrence wins, as in argparse)."""
    names = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if name.startswith("no_"):
                names.add(name[3:])
            names.add(name)
    return names


def load_ds_config(value):
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    if value.strip().startswith("{"):
        return json.loads(value)
    if not os.path.isfile(value):
        raise ConfigError(f"--deepspeed {value}: file not found")
    try:
        with open(value) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {value}: invalid JSON: {e}") from None


def zero_stage(ds_config):
    return int(get_path(ds_config, "zero_optimization.stage") or 0) if ds_config else None


def reconcile_with_ds_config(ds_config, given, world_size):
    """Arguments to add so TrainingArguments match the DeepSpeed config, and the config to use.

    `given`: explicitly passed argument values (name -> raw value or True). Returns (extra argv,
    config). Every TrainingArguments value the config fixes (the one table, trainer_fields) is taken
    from it unless given; given ones are left alone: TrainingArguments then records any
    disagreement and check_ds_mismatches() reports it before the model is loaded."""
    cfg = json.loads(json.dumps(ds_config))  # private copy
    extra = {name: value for name, value in trainer_values(cfg).items() if name not in given}
    micro, accum, total = (get_path(cfg, k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                   "train_batch_size"))
    # DeepSpeed lets train_batch_size stand in for one of the other two; work that one out.
    if is_set(total):
        if is_set(micro) and not is_set(accum) and "gradient_accumulation_steps" not in given:
            if total % (micro * world_size):
                raise ConfigError(f"DeepSpeed config: train_batch_size {total} is not a multiple of "
                                  f"train_micro_batch_size_per_gpu {micro} x world size {world_size}")
            extra["gradient_accumulation_steps"] = total // (micro * world_size)
        elif is_set(accum) and not is_set(micro) and "per_device_train_batch_size" not in given:
            if total % (accum * world_size):
                raise ConfigError(f"DeepSpeed config: train_batch_size {total} is not a multiple of "
                                  f"gradient_accumulation_steps {accum} x world size {world_size}")
            extra["per_device_train_batch_size"] = total // (accum * world_size)
        m = extra.get("per_device_train_batch_size", micro if is_set(micro) else None)
        a = extra.get("gradient_accumulation_steps", accum if is_set(accum) else None)
        if m is not None and a is not None and "per_device_train_batch_size" not in given \
                and "gradient_accumulation_steps" not in given and m * a * world_size != total:
            raise ConfigError(f"DeepSpeed config: train_batch_size {total} != train_micro_batch_size_per_gpu {m} "
                              f"x gradient_accumulation_steps {a} x world size {world_size} = {m * a * world_size} "
                              "(was it made for another number of ranks?)")

    # Offloading the optimizer needs DeepSpeed's own (CPU) Adam: HF only builds that from an
    # "optimizer" section, so add one that takes its values from the arguments.
    zero = cfg.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") not in (None, "none")
    offload = offload or (zero.get("offload_param") or {}).get("device") not in (None, "none")
    if offload and "optimizer" not in cfg:
        cfg["optimizer"] = {"type": "AdamW",
                            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return extra, cfg


def check_ds_mismatches(training_args, ds_source):
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    mismatches = list(getattr(hf_config, "mismatches", []) or [])
    if mismatches:
        raise ConfigError(
            f"the DeepSpeed config ({ds_source}) disagrees with the arguments:\n  "
            + "\n  ".join(m.lstrip("- ") for m in mismatches)
            + "\nDrop those arguments (the config's values are then used), make them agree, or set the "
              "config values to \"auto\"."
        )


def _flag(name, value):
    if isinstance(value, bool):
        return [f"--{name}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", str(value)]


def preparse(argv=None):
    """First pass, building nothing: the raw values, the expanded argv, the names given."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = expand_config_file(list(sys.argv[1:] if argv is None else argv))
    argv = merge_repeated(argv, ("dataset", "eval_dataset"))
    parser = HfArgumentParser(ARGUMENT_CLASSES + (TrainingArguments,), prog="python -m train")
    raw, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown arguments: {' '.join(unknown)}")
    if raw.output_dir is None:
        raise ConfigError("--output_dir is required (checkpoints, metrics and the final model go there)")
    if not raw.dataset and not raw.synthetic_samples:
        raise ConfigError("give --dataset FILE.jsonl (or --synthetic_samples N for a benchmark)")
    if raw.synthetic_example_length < 0 or (raw.synthetic_example_length and not raw.synthetic_samples):
        raise ConfigError(f"--synthetic_example_length {raw.synthetic_example_length}: give a positive number of "
                          "tokens, with --synthetic_samples (real data is packed by --packing)")
    return {"parser": parser, "raw": raw, "argv": argv, "given": explicit_names(argv)}


def parse(pre, world_size, configured_state):
    """Second pass: build the dataclasses, TrainingArguments last (it sets up the accelerator
    state, so the caller's distributed set-up must come first).

    Returns (model_args, data_args, lora_args, run_args, training_args, info)."""
    from transformers import TrainingArguments

    parser, raw, argv, given = pre["parser"], pre["raw"], pre["argv"], pre["given"]
    extra = {k: v for k, v in OUR_DEFAULTS.items() if k not in given}
    # non-reentrant checkpointing works with frozen embeddings (LoRA) and ZeRO-3; transformers 5.2x
    # renamed gradient_checkpointing* to activation_checkpointing*
    ckpt_kwargs = ("activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in
                   TrainingArguments.__dataclass_fields__ else "gradient_checkpointing_kwargs")
    if not given & {"activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"}:
        extra[ckpt_kwargs] = {"use_reentrant": False}
    if torch.cuda.is_available() and "bf16" not in given and "fp16" not in given:
        extra["bf16"] = True
    if not torch.cuda.is_available() and "dataloader_pin_memory" not in given:
        extra["dataloader_pin_memory"] = False
    ds_config = load_ds_config(raw.deepspeed)
    if ds_config is not None:
        adopted, ds_config = reconcile_with_ds_config(ds_config, given, world_size)
        extra.update(adopted)
        extra["deepspeed"] = ds_config
        if adopted.get("fp16") and "bf16" not in adopted:
            extra.pop("bf16", None)  # the config asks for fp16; don't default to bf16 as well
    # The Trainer would rotate checkpoints before this package marks the new one complete; the
    # package rotates them itself (checkpoints.py).
    save_total_limit = raw.save_total_limit
    extra["save_total_limit"] = None
    if configured_state:
        extra["accelerator_config"] = {"use_configured_state": True}

    full = list(argv)
    for name, value in extra.items():
        full = _strip_flag(full, name) if value is None else full + _flag(name, value)
    model_args, data_args, lora_args, run_args, training_args = parser.parse_args_into_dataclasses(args=full)
    if os.path.exists(model_args.model_name_or_path):  # (a missing one is reported as given)
        model_args.model_name_or_path = os.path.abspath(model_args.model_name_or_path)
    ds_source = raw.deepspeed if isinstance(raw.deepspeed, str) and not raw.deepspeed.lstrip().startswith("{") \
        else "inline"
    info = {"given": sorted(given), "ds_config": ds_config, "save_total_limit": save_total_limit,
            "ds_source": ds_source, "argv": argv}
    if ds_config is not None:
        check_ds_mismatches(training_args, ds_source)
    check_speed_options(model_args, training_args, ds_config, ds_source)
    if run_args.profile_steps is not None:
        check_profile_steps(run_args.profile_steps)
    return model_args, data_args, lora_args, run_args, training_args, info


def check_profile_steps(spec):
    import re

    m = re.fullmatch(r"(\d+)(?:-(\d+))?", spec or "")
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
        raise ConfigError(f"--profile_steps must be A or A-B with 1 <= A <= B (optimizer steps), got {spec!r}")


COMPILE_MODES = ("regions", "deepcompile", "torch", "none")
DEEPCOMPILE_SCHEDULES = ("first_step", "warmup")
DEEPCOMPILE_PROFILES = ("rerun", "reuse", "fresh")
ZERO_GRAD_NORMS = ("deepspeed", "foreach")
MASTER_WEIGHTS = ("fp32", "none")


def deepcompile_in_config(ds_config):
    return bool(get_path(ds_config, "compile.deepcompile")) if ds_config else False


def check_speed_options(model_args, training_args, ds_config, ds_source="the DeepSpeed config"):
    if model_args.sdpa_backend not in ("auto", "default", "cudnn", "flash"):
        raise ConfigError(f"--sdpa_backend must be auto, default, cudnn or flash, got {model_args.sdpa_backend!r}")
    check_compile(model_args, training_args, ds_config, ds_source)
    check_master_weights(model_args, training_args, ds_config)
    if model_args.checkpoint_layers is not None:
        if model_args.checkpoint_layers < 1:
            raise ConfigError(f"--checkpoint_layers must be at least 1, got {model_args.checkpoint_layers} "
                              "(for no checkpointing, pass --gradient_checkpointing false)")
        if not checkpointing_enabled(training_args):
            raise ConfigError("--checkpoint_layers needs --gradient_checkpointing true")


def check_compile(model_args, training_args, ds_config, ds_source):
    """--compile against the engine and the DeepSpeed config; folds --compile_regions into it."""
    mode = model_args.compile
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if model_args.deepcompile_schedule not in DEEPCOMPILE_SCHEDULES:
        raise ConfigError(f"--deepcompile_schedule must be one of {', '.join(DEEPCOMPILE_SCHEDULES)}, "
                          f"got {model_args.deepcompile_schedule!r}")
    if model_args.deepcompile_profiles not in DEEPCOMPILE_PROFILES:
        raise ConfigError(f"--deepcompile_profiles must be one of {', '.join(DEEPCOMPILE_PROFILES)}, "
                          f"got {model_args.deepcompile_profiles!r}")
    if model_args.zero_grad_norm not in ZERO_GRAD_NORMS:
        raise ConfigError(f"--zero_grad_norm must be one of {', '.join(ZERO_GRAD_NORMS)}, "
                          f"got {model_args.zero_grad_norm!r}")
    if model_args.compile_regions:
        if mode not in ("none", "regions"):
            raise ConfigError(f"--compile_regions (the old spelling of --compile regions) and --compile {mode} "
                              "disagree: give --compile alone")
        mode = model_args.compile = "regions"
    if mode != "none" and training_args.torch_compile:
        raise ConfigError(f"--compile {mode} and --torch_compile both compile the model: choose one")
    stage = zero_stage(ds_config)
    if mode == "regions" and stage == 3:
        raise ConfigError("--compile regions does not work with ZeRO-3 (its parameter hooks break the compiled "
                          "layers): use --compile deepcompile (with \"compile\": {\"deepcompile\": true} in the "
                          "DeepSpeed config) or --compile torch")
    if mode in ("deepcompile", "torch") and ds_config is None:
        raise ConfigError(f"--compile {mode} compiles the DeepSpeed engine and needs --deepspeed; without DeepSpeed "
                          "use --compile regions")
    in_config = deepcompile_in_config(ds_config)
    if mode == "deepcompile" and not in_config:
        raise ConfigError(f"--compile deepcompile needs \"compile\": {{\"deepcompile\": true}} in {ds_source} "
                          "(DeepSpeed reads it when the engine is built): add it, or use --compile torch")
    if in_config and mode != "deepcompile":
        raise ConfigError(f"{ds_source} turns DeepCompile on (\"compile\": {{\"deepcompile\": true}}) but "
                          f"--compile is {mode}: pass --compile deepcompile, or remove compile.deepcompile from the "
                          "config")


def check_master_weights(model_args, training_args, ds_config):
    choice = model_args.master_weights
    if choice not in MASTER_WEIGHTS:
        raise ConfigError(f"--master_weights must be fp32 or none, got {choice!r}")
    if choice == "none":
        if ds_config is not None:
            raise ConfigError("--master_weights none is for the torch engine only: DeepSpeed's bf16/fp16 modes "
                              "always keep fp32 master weights; drop the flag or --deepspeed")
        if not (training_args.bf16 or training_args.fp16):
            raise ConfigError("--master_weights none (16-bit weights updated in 16 bits) needs --bf16 true or "
                              "--fp16 true; in fp32 precision the weights are fp32 anyway")


def checkpointing_enabled(training_args):
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing
    return bool(getattr(training_args, "activation_checkpointing", None)
                or getattr(training_args, "gradient_checkpointing", None))


def _strip_flag(argv, name):
    out, skip = [], False
    for a in argv:
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        key = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else None
        if key == name:
            skip = "=" not in a
            continue
        out.append(a)
    return out
