"""Arguments: YAML/JSON files, values taken from the DeepSpeed config, disagreements reported early."""

import json

import pytest

from train.args import ConfigError, expand_config_file, explicit_names, parse, preparse, reconcile_with_ds_config


@pytest.fixture(autouse=True)
def no_leftover_deepspeed_state():
    """TrainingArguments with a DeepSpeed config set process-wide state (env, a ZeRO-3 flag that
    from_pretrained obeys); don't let it reach the other tests in this process."""
    import os

    saved = dict(os.environ)
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.clear()
    os.environ.update(saved)


BASE = ["--model_name_or_path", "/m", "--dataset", "d.jsonl", "--output_dir", "/o"]


def build(argv, world_size=1):
    return parse(preparse(argv), world_size, configured_state=False)


def ds_file(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


PLANNED = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 8,
           "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "gradient_clipping": 0.5}


def test_values_come_from_the_deepspeed_config_when_not_given(tmp_path):
    *_, args, info = build(BASE + ["--deepspeed", ds_file(tmp_path, PLANNED)])
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (4, 2, 0.5)
    assert args.bf16 is False
    assert info["ds_config"]["zero_optimization"]["stage"] == 3


def test_given_arguments_that_disagree_with_the_config_fail_before_loading_anything(tmp_path):
    argv = BASE + ["--deepspeed", ds_file(tmp_path, PLANNED), "--per_device_train_batch_size", "8"]
    with pytest.raises(ConfigError) as e:
        build(argv)
    msg = str(e.value)
    assert "ds train_micro_batch_size_per_gpu=4 vs hf per_device_train_batch_size=8" in msg
    assert "ds train_batch_size=8 vs hf train_batch_size (calculated)=16" in msg


def test_config_made_for_another_world_size_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"train_batch_size 8 != .* x world size 2 = 16 \(was it made for another"):
        build(BASE + ["--deepspeed", ds_file(tmp_path, PLANNED)], world_size=2)


def test_train_batch_size_stands_in_for_accumulation():
    extra, _ = reconcile_with_ds_config({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 16}, set(), 4)
    assert extra["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        reconcile_with_ds_config({"train_micro_batch_size_per_gpu": 3, "train_batch_size": 16}, set(), 4)


def test_auto_config_takes_the_arguments(tmp_path):
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    *_, args, info = build(BASE + ["--deepspeed", ds_file(tmp_path, auto), "--per_device_train_batch_size", "3",
                                   "--learning_rate", "2e-4"])
    assert args.per_device_train_batch_size == 3
    assert args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == 3
    assert args.hf_deepspeed_config.config["optimizer"]["params"]["lr"] == 2e-4


def test_offload_gets_a_deepspeed_optimizer_section():
    _, cfg = reconcile_with_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
                                      set(), 1)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == "auto"
    _, cfg = reconcile_with_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}},
                                      set(), 1)
    assert "optimizer" not in cfg


def test_yaml_file_then_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: /m\ndataset: [a.jsonl, b.jsonl]\noutput_dir: /o\nlora: true\n"
                   "learning_rate: 0.001\nmax_seq_length: 512\n")
    argv = expand_config_file(["--local_rank=0", str(cfg), "--max_seq_length", "1024"])
    model_args, data_args, lora_args, run_args, args, _ = build(argv)
    assert data_args.dataset == ["a.jsonl", "b.jsonl"] and lora_args.lora and args.learning_rate == 0.001
    assert data_args.max_seq_length == 1024
    assert args.save_total_limit is None  # the package rotates checkpoints itself


def test_repeated_dataset_flags_add_up():
    _, data_args, *_ = build(["--model_name_or_path", "/m", "--output_dir=/o", "--dataset=a.jsonl",
                              "--eval_dataset=e.jsonl", "--dataset", "b.jsonl", "c.jsonl", "--bf16", "false"])
    assert data_args.dataset == ["a.jsonl", "b.jsonl", "c.jsonl"] and data_args.eval_dataset == ["e.jsonl"]


def test_package_defaults_and_explicit_names():
    _, data_args, _, run_args, args, info = build(BASE + ["--save_total_limit", "2", "--no_packing"])
    assert args.logging_steps == 5 and args.logging_first_step and not data_args.packing
    assert info["save_total_limit"] == 2 and args.save_total_limit is None
    assert explicit_names(["--a", "1", "--no_b", "--c-d=3", "x"]) == {"a", "b", "no_b", "c_d"}


@pytest.mark.parametrize("argv, message", [
    (["--model_name_or_path", "/m", "--dataset", "d"], "--output_dir is required"),
    (["--model_name_or_path", "/m", "--output_dir", "/o"], "give --dataset"),
    (BASE + ["--frobnicate", "1"], "unknown arguments: --frobnicate 1"),
])
def test_argument_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        preparse(argv)


@pytest.mark.parametrize("extra, message", [
    (["--compile_regions", "true", "--torch_compile", "true"], "choose one"),
    (["--checkpoint_layers", "4"], "needs --gradient_checkpointing true"),
    (["--checkpoint_layers", "0", "--gradient_checkpointing", "true"], "at least 1"),
    (["--sdpa_backend", "fast"], "must be auto, default, cudnn or flash"),
    (["--profile_steps", "5-3"], "must be A or A-B"),
])
def test_speed_option_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        build(BASE + extra)


DEEPCOMPILE = dict(PLANNED, compile={"deepcompile": True})


@pytest.mark.parametrize("config, extra, message", [
    (PLANNED, ["--compile", "deepcompile"], r'--compile deepcompile needs "compile": \{"deepcompile": true\} in .*ds.json'),
    (DEEPCOMPILE, [], r'ds.json turns DeepCompile on .* but --compile is none: pass --compile deepcompile'),
    (DEEPCOMPILE, ["--compile", "torch"], "but --compile is torch"),
    (PLANNED, ["--compile", "regions"], "does not work with ZeRO-3 .* use --compile deepcompile"),
    (PLANNED, ["--compile_regions", "true"], "does not work with ZeRO-3"),
    (DEEPCOMPILE, ["--compile", "deepcompile", "--compile_regions", "true"], "disagree: give --compile alone"),
    (DEEPCOMPILE, ["--compile", "deepcompile", "--torch_compile", "true"], "choose one"),
    (None, ["--compile", "deepcompile"], "compiles the DeepSpeed engine and needs --deepspeed"),
    (None, ["--compile", "fast"], "must be one of regions, deepcompile, torch, none"),
    (None, ["--master_weights", "bf16"], "must be fp32 or none"),
    (DEEPCOMPILE, ["--compile", "deepcompile", "--deepcompile_schedule", "late"],
     "--deepcompile_schedule must be one of first_step, warmup, got 'late'"),
    (DEEPCOMPILE, ["--compile", "deepcompile", "--deepcompile_profiles", "keep"],
     "--deepcompile_profiles must be one of rerun, reuse, fresh, got 'keep'"),
    (DEEPCOMPILE, ["--zero_grad_norm", "fp64"], "--zero_grad_norm must be one of deepspeed, foreach, got 'fp64'"),
    (None, ["--master_weights", "none", "--bf16", "false"], "needs --bf16 true or --fp16 true"),
    (PLANNED, ["--master_weights", "none"], "DeepSpeed's bf16/fp16 modes always keep fp32 master weights"),
])
def test_compile_and_master_weight_refusals(tmp_path, config, extra, message):
    argv = BASE + extra + (["--deepspeed", ds_file(tmp_path, config)] if config else [])
    with pytest.raises(ConfigError, match=message):
        build(argv)


def test_compile_choices_that_work(tmp_path):
    model_args, *_ = build(BASE + ["--compile_regions", "true"])  # the old spelling
    assert model_args.compile == "regions"
    model_args, *_ = build(BASE + ["--compile", "deepcompile", "--deepspeed", ds_file(tmp_path, DEEPCOMPILE)])
    assert model_args.compile == "deepcompile" and model_args.master_weights == "fp32"
    model_args, *_ = build(BASE + ["--compile", "torch", "--deepspeed", ds_file(tmp_path, PLANNED)])
    assert model_args.compile == "torch"


def test_engine_compile_choice(monkeypatch):
    """What runs for --compile deepcompile|torch (the line the package logs says why). DeepSpeed's own
    test for DeepCompile (CUDA, torch >= 2.6) is stood in for to reach the CUDA branches here."""
    import deepspeed.compile.util as dc_util

    from train.trainer import choose_engine_compile

    assert choose_engine_compile("deepcompile", 3, cuda=False)[0] == "none"
    assert "CPU run" in choose_engine_compile("torch", 3, cuda=False)[1]
    assert choose_engine_compile("regions", 0, cuda=False)[0] == "none"
    monkeypatch.setattr(dc_util, "is_deepcompile_supported", lambda: True)
    assert choose_engine_compile("deepcompile", 3, cuda=True)[0] == "deepcompile"
    assert choose_engine_compile("deepcompile", 1, cuda=True)[0] == "deepcompile"
    assert choose_engine_compile("deepcompile", 0, cuda=True) == ("torch", "DeepCompile supports ZeRO 1-3, this plan "
                                                                            "is ZeRO-0")
    assert choose_engine_compile("torch", 3, cuda=True)[0] == "torch"
    monkeypatch.setattr(dc_util, "is_deepcompile_supported", lambda: False)
    assert choose_engine_compile("deepcompile", 3, cuda=True)[0] == "torch"


def test_deepcompile_schedule_runs_deepspeeds_passes_in_one_compile():
    """first_step hands engine.compile() DeepSpeed's own step-5 pass list (gather/release, prefetch,
    selective unsharding) for step 0, in a form its scheduler takes; warmup and ZeRO-1/2 keep
    DeepSpeed's default schedule (None)."""
    from deepspeed.compile import backend
    from deepspeed.compile.passes import prefetch, selective_gather, zero3_compile

    from train.trainer import deepcompile_schedule

    schedule, why = deepcompile_schedule("first_step", 3)
    assert schedule == [(0, [zero3_compile.add_z3_gather_release, prefetch.schedule_prefetch,
                             selective_gather.selective_gather])]
    assert why == "; its passes in one compile at the first step"
    backend.init_schedule(schedule)
    assert list(backend.remaining_schedule) == schedule
    assert deepcompile_schedule("warmup", 3) == (None, "; DeepSpeed's schedule, prefetch and unsharding "
                                                       "recompiled at step 5")
    assert deepcompile_schedule("first_step", 2) == (None, "")
    assert deepcompile_schedule("first_step", 1) == (None, "")
