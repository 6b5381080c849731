"""The launch command, built in Python: the launcher's part, the package's flags, what the plan and
the user's arguments contribute, and what the launch refuses to take from the user."""

import shlex

import pytest

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.launch import (
    LaunchError,
    launch_command,
    launch_script,
    package_flags,
    split_train_args,
)

BASE = dict(python="/opt/venv/bin/python", run_dir="/runs/r1", output_dir="/runs/r1/output", master_addr="node1",
            master_port=29500, launcher_args=["--num_accelerators", "1"], model_dir="/models/m",
            datasets=["/data/a.jsonl", "/data/b.parquet"], eval_datasets=["/data/e.jsonl"], max_seq_length=4096)


def test_deepspeed_engine_command():
    argv = launch_command(**BASE, engine="deepspeed", lora=None,
                          trainer_args={"per_device_train_batch_size": 4, "bf16": True, "learning_rate": 1e-5},
                          extra_args={"num_train_epochs": 2})
    assert argv[:13] == ["/opt/venv/bin/deepspeed", "--hostfile", "/runs/r1/hostfile", "--launcher", "pdsh",
                         "--master_addr", "node1", "--master_port", "29500", "--force_multi", "--num_accelerators", "1",
                         "--module"]
    assert argv[13:16] == ["train", rundir.rank_marker("/runs/r1/output"), "--deepspeed=/runs/r1/ds_config.json"]
    assert argv[16:] == ["--model_name_or_path=/models/m", "--max_seq_length=4096", "--dataset=/data/a.jsonl",
                         "--dataset=/data/b.parquet", "--eval_dataset=/data/e.jsonl", "--bf16=true",
                         "--learning_rate=1e-05", "--per_device_train_batch_size=4", "--num_train_epochs=2"]


def test_torch_engine_and_lora_command():
    argv = launch_command(**BASE, engine="torch", lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                                       "target_modules": ["q_proj", "v_proj"]},
                          trainer_args={"optim": "adamw_torch_fused", "compile": "regions"}, extra_args={})
    assert not any(a.startswith("--deepspeed") for a in argv)
    assert argv[argv.index("--lora=true"):] == ["--lora=true", "--lora_r=8", "--lora_alpha=16", "--lora_dropout=0.0",
                                                "--lora_target_modules", "q_proj", "v_proj", "--compile=regions",
                                                "--optim=adamw_torch_fused"]


def test_package_flags():
    assert package_flags({"a": True, "b": False, "c": 0.1, "d": [1, 2], "e": {"x": 1}, "f": None, "g": "s p"}) == [
        "--a=true", "--b=false", "--c=0.1", "--d", "1", "2", '--e={"x": 1}', "--g=s p"]


def test_split_train_args():
    optimizer, rest = split_train_args({"adam_beta2": 0.95, "max_grad_norm": 0.5, "save_steps": 100})
    assert optimizer == {"adam_beta2": 0.95, "max_grad_norm": 0.5} and rest == {"save_steps": 100}
    for owned, setting in (("per_device_train_batch_size", "micro_batch_size"), ("bf16", "precision"),
                           ("lora_alpha", "deepspeed_job_lora_alpha"), ("output_dir", "deepspeed_job_run_name"),
                           ("gradient_checkpointing", "gradient_checkpointing")):
        with pytest.raises(LaunchError, match=setting):
            split_train_args({owned: 1})


def test_launch_script_runs_the_same_command():
    argv = launch_command(**BASE, engine="deepspeed", lora=None, trainer_args={}, extra_args={"run_name": "a b"})
    script = launch_script(argv, "/opt/dsmesh/src", "/runs/r1/.deepspeed_env", "node1", "ZeRO-3")
    lines = script.splitlines()
    assert lines[4:6] == ["cd /opt/dsmesh/src", "export DS_ENV_FILE=/runs/r1/.deepspeed_env"]
    assert shlex.split(lines[-1]) == ["exec"] + argv
