"""The launch command: `deepspeed --hostfile ... --module train ...` for a run, built from the job and
its plan (standard library only). The preview and the launch both take it from here."""

import json
import os
import shlex

from .rundir import rank_marker
from .trainer_fields import OPTIMIZER_FIELDS, PLAN_FIELDS


class LaunchError(ValueError):
    """The job's settings cannot make a launch command; the message names the setting and the fix."""


# Training arguments the launch itself sets, each with the job setting a user changes instead.
OWNED_ARGS = {
    "output_dir": "the run's name and directory (deepspeed_job_run_name, deepspeed_job_runs_dir)",
    "deepspeed": "the plan (its engine decides whether a ds_config.json is passed)",
    "model_name_or_path": "the model directory (training_env_model_dir)",
    "dataset": "the datasets (training_env_datasets)",
    "eval_dataset": "the evaluation datasets (training_env_eval_datasets)",
    "max_seq_length": "deepspeed_job_max_seq_length",
    "gradient_checkpointing": "the plan (plan override gradient_checkpointing)",
    "checkpoint_layers": "the plan (plan override checkpoint_layers)",
    "compile": "the plan (plan override compile)",
    "chunked_loss": "the plan (plan override chunked_loss)",
    "save_on_each_node": "deepspeed_job_shared_storage",
    "lora": "deepspeed_job_finetune",
    "lora_r": "deepspeed_job_lora_r",
    "lora_alpha": "deepspeed_job_lora_alpha",
    "lora_dropout": "deepspeed_job_lora_dropout",
    "lora_target_modules": "deepspeed_job_lora_target_modules",
}
OWNED_ARGS.update({name: "the plan (batch layout: plan override micro_batch_size) or the GPUs (precision)"
                   for name in PLAN_FIELDS})


def split_train_args(train_args):
    """A user's training arguments split into the optimizer settings (which the planner writes into
    ds_config.json and the arguments alike) and the rest, passed through to the training package.
    An argument the launch sets itself is refused, naming the setting to change instead."""
    optimizer, rest = {}, {}
    for name, value in (train_args or {}).items():
        if name in OWNED_ARGS:
            raise LaunchError(f"deepspeed_job_train_args: {name} is set by the launch from {OWNED_ARGS[name]}; "
                              "remove it from the training arguments")
        if name in OPTIMIZER_FIELDS:
            optimizer[name] = value
        else:
            rest[name] = value
    return optimizer, rest


def package_flags(args):
    """{name: value} -> the training package's flags: `--name=value` (one token each), booleans as
    true/false, floats exact, mappings as JSON, lists as `--name v1 v2` (HfArgumentParser's nargs)."""
    flags = []
    for name, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{name}={'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            flags += [f"--{name}"] + [str(v) for v in value]
        elif isinstance(value, dict):
            flags.append(f"--{name}={json.dumps(value, sort_keys=True)}")
        elif isinstance(value, float):
            flags.append(f"--{name}={value!r}")
        else:
            flags.append(f"--{name}={value}")
    return flags


def launcher_argv(deepspeed, hostfile, master_addr, master_port, launcher_args=()):
    """`deepspeed --hostfile` up to the program: the job's and the preflight's all-reduce's alike.
    --force_multi gives one path for any node count: the runner reads .deepspeed_env only in its
    multi-node mode (pdsh, also to the one node)."""
    launcher_args = list(launcher_args)
    return [deepspeed, "--hostfile", hostfile, "--launcher", "pdsh", "--master_addr", str(master_addr),
            "--master_port", str(master_port),
            *([] if "--force_multi" in launcher_args else ["--force_multi"]), *launcher_args]


def launch_command(*, python, run_dir, output_dir, master_addr, master_port, launcher_args, engine, model_dir,
                   datasets, eval_datasets, max_seq_length, lora, trainer_args, extra_args):
    """The launcher's argv. DeepSpeed's pdsh runner starts every rank with the launcher's own
    interpreter and working directory, so both are the same paths on every node.

    lora: None for a full fine-tune, else {"r", "alpha", "dropout", "target_modules"}.
    trainer_args: the plan's (planner.trainer_args); extra_args: the user's pass-through ones."""
    argv = launcher_argv(os.path.join(os.path.dirname(python), "deepspeed"), os.path.join(run_dir, "hostfile"),
                         master_addr, master_port, launcher_args)
    argv += ["--module", "train", rank_marker(output_dir)]
    if engine == "deepspeed":
        argv.append(f"--deepspeed={os.path.join(run_dir, 'ds_config.json')}")
    package = {"model_name_or_path": model_dir, "max_seq_length": int(max_seq_length)}
    argv += package_flags(package)
    argv += [f"--dataset={path}" for path in datasets]
    argv += [f"--eval_dataset={path}" for path in eval_datasets]
    if lora is not None:
        argv += package_flags({"lora": True, "lora_r": int(lora["r"]), "lora_alpha": lora["alpha"],
                               "lora_dropout": float(lora["dropout"])})
        if lora.get("target_modules"):
            argv += package_flags({"lora_target_modules": list(lora["target_modules"])})
    argv += package_flags(dict(sorted(trainer_args.items())))
    argv += package_flags(extra_args)
    return argv


def launch_script(argv, code_dir, env_file, master, label):
    """launch.sh: the same command, to run by hand on the master."""
    return (
        "#!/usr/bin/env bash\n"
        f"# The launch of this run on the master ({master}), as the launch stage runs it.\n"
        f"# Plan: {label}.\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(code_dir)}\n"
        f"export DS_ENV_FILE={shlex.quote(env_file)}\n"
        f"exec {' '.join(shlex.quote(a) for a in argv)}\n"
    )
