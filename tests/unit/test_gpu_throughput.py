"""bench/gpu_throughput.py's steady tokens/s: the warm-up and the profiled steps left out (the W3 profile
call on the H200 reported 15,975 tokens/s for steps that ran 39-41k, its profiled step at 3.1k)."""

import shutil
from argparse import Namespace

import pytest
from ds_testlib import DATA

from bench import gpu_throughput
from bench.gpu_throughput import profiled_steps, recompiles_at_step_6, run_child, steady_tokens_per_s


def test_profiled_steps_from_the_extra_arguments():
    assert profiled_steps("--profile_steps 12-12") == {12}
    assert profiled_steps("--checkpoint_layers 40 --profile_steps=5-6") == {5, 6}
    assert profiled_steps("") == set() and profiled_steps(None) == set()


def test_steady_rate_leaves_out_warmup_and_profiled_steps():
    hist, tokens, elapsed = [], 0, 0.0
    for step in range(1, 15):
        # 16,384 tokens a step: 167 s compiling step 1 and 192 s step 6, 0.41 s a step else, 5.3 s profiled
        elapsed += {1: 167.0, 6: 192.0, 12: 5.3}.get(step, 0.41)
        tokens += 16384
        hist.append({"step": step, "tokens": tokens, "elapsed_s": elapsed})
    assert steady_tokens_per_s(hist, 6, {12}) == pytest.approx(16384 / 0.41)
    assert steady_tokens_per_s(hist, 6) < 16384 / 0.41 / 2  # what the summary said with the profiled step in
    assert steady_tokens_per_s(hist[:6], 6) is None


def test_the_second_deepcompile_warmup_only_with_deepspeeds_schedule():
    assert recompiles_at_step_6("--deepcompile_schedule warmup --profile_steps 12-12")
    assert recompiles_at_step_6("--deepcompile_schedule=warmup")
    assert not recompiles_at_step_6("--deepcompile_schedule first_step")
    assert not recompiles_at_step_6("")


def test_a_run_past_its_budget_leaves_its_stack_in_the_log(tmp_path):
    """The W3 call's cached start was killed at its share of the budget with nothing in its log to say
    where it was; now it is aborted with faulthandler on, which writes every thread's stack first."""
    import sys

    log = tmp_path / "run.log"
    slow = "import time\ndef waiting_for_something():\n    time.sleep(60)\nwaiting_for_something()\n"
    rc, wall, _ = run_child([sys.executable, "-c", slow], str(log), timeout=2)
    assert rc == "timeout" and wall < 20
    text = log.read_text()
    assert "Fatal Python error: Aborted" in text and "waiting_for_something" in text
    assert run_child([sys.executable, "-c", "print('ok')"], str(log), timeout=30)[0] == 0


def test_a_lever_is_measured_beside_the_planners_config(tmp_path, monkeypatch):
    """--ds-config-override goes into ours_deepspeed_lever's config alone, so one call holds the planner's
    ZeRO-3 config and the lever side by side, and the summary gives their ratio and loss difference."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(DATA / "Qwen2.5-1.5B.json", model_dir / "config.json")
    monkeypatch.setattr(gpu_throughput, "gpu_facts", lambda: ("NVIDIA H200", 139.8))
    a = Namespace(ours_overrides={}, ds_config_override={"optimizer": {"params": {"torch_adam": False}}})
    plans = gpu_throughput.ours_plans(str(model_dir), gpu_throughput.WORKLOADS["w3"],
                                      ["ours_deepspeed", "ours_deepspeed_lever"], a)
    (plan, cfg, _), (lever_plan, lever_cfg, _) = plans["ours_deepspeed"], plans["ours_deepspeed_lever"]
    assert plan.zero_stage == lever_plan.zero_stage == 3 and plan.compile == lever_plan.compile == "deepcompile"
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert lever_cfg["optimizer"]["params"]["torch_adam"] is False and "fused" not in lever_cfg["optimizer"]["params"]
    assert {k: v for k, v in lever_cfg.items() if k != "optimizer"} == {k: v for k, v in cfg.items() if k != "optimizer"}

    res = {"ours_deepspeed": {"tokens_per_s": 40000.0, "losses": [12.25, 12.24]},
           "ours_deepspeed_lever": {"tokens_per_s": 42000.0, "losses": [12.25, 12.2412]}}
    lines = gpu_throughput.ratios("w3", res)
    assert "ours_deepspeed_lever / ours_deepspeed = 1.05x" in lines
    assert any(line.startswith("ours_deepspeed vs ours_deepspeed_lever: max rel loss diff over 2 steps") for line in lines)


def test_an_override_without_the_lever_variant_is_refused(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu_throughput.py", "--workloads", "w3", "--variants", "ours_deepspeed",
                                     "--ds-config-override", '{"optimizer": {"params": {"torch_adam": false}}}'])
    with pytest.raises(SystemExit) as exc:
        gpu_throughput.main()
    assert exc.value.code == 2
    assert "add it to --variants" in capsys.readouterr().err


def test_lever_extra_goes_to_the_lever_variants_alone(tmp_path, monkeypatch):
    """--lever-extra (e.g. FlexAttention for packed rows) lands after --ours-extra on the lever variants'
    command lines only, and ours_lever runs the torch engine's plan, so one call holds both."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(DATA / "Qwen2.5-1.5B.json", model_dir / "config.json")
    monkeypatch.setattr(gpu_throughput, "gpu_facts", lambda: ("NVIDIA H200", 139.8))
    a = Namespace(ours_overrides={}, ds_config_override={}, ours_extra="--synthetic_example_length 512",
                  lever_extra="--attn_implementation flex_attention")
    plans = gpu_throughput.ours_plans(str(model_dir), gpu_throughput.WORKLOADS["w1"], ["ours", "ours_lever"], a)
    assert plans["ours"][0].label == plans["ours_lever"][0].label and plans["ours_lever"][0].engine == "torch"
    assert gpu_throughput.extra_args(a, "ours") == ["--synthetic_example_length", "512"]
    lever = gpu_throughput.extra_args(a, "ours_lever")
    assert lever == ["--synthetic_example_length", "512", "--attn_implementation", "flex_attention"]
    assert gpu_throughput.extra_args(a, "ours_deepspeed_lever") == lever
    res = {"ours": {"tokens_per_s": 40000.0, "losses": [12.25]}, "ours_lever": {"tokens_per_s": 50000.0, "losses": [12.25]}}
    assert "ours_lever / ours = 1.25x" in gpu_throughput.ratios("w1", res)


def test_lever_extra_without_a_lever_variant_is_refused(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu_throughput.py", "--workloads", "w1", "--variants", "ours",
                                     "--lever-extra", "--attn_implementation flex_attention"])
    with pytest.raises(SystemExit) as exc:
        gpu_throughput.main()
    assert exc.value.code == 2 and "add one to --variants" in capsys.readouterr().err


def test_a_fresh_second_start_trains_the_first_starts_batches(tmp_path):
    """The fresh second start (W4's, whose checkpoint would not fit the disk) gets the first start's
    data, so its two losses check the cached start against the first (on the H200 its 16 examples
    against the first start's 80 gave other batches: 12.9551 against 12.9583 at step 1)."""
    from types import SimpleNamespace

    from train.tiny_model import write_tiny

    model_dir = write_tiny(str(tmp_path / "tiny"))
    wl = {"global_batch": 2, "seq_len": 64, "finetune": "full", "second_start": "fresh"}
    a = Namespace(second_start=None, resume_steps=2, seed=3, ours_extra="", lever_extra="")
    argv = ["--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--bf16", "false"]
    r = gpu_throughput.run_ours(model_dir, wl, 5, 1, a, str(tmp_path), SimpleNamespace(engine="torch"), None, argv,
                                str(tmp_path / "run.log"), gpu_throughput.Budget(600, 600), "ours")
    assert r["rc"] == 0 and r["second_rc"] == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert len(r["losses"]) == 5 and len(r["fresh_losses"]) == 2
    assert r["fresh_max_rel_loss_diff"] < 1e-5, (r["losses"], r["fresh_losses"])
    assert r["cached_start_s"] > 0
    line = f"ours fresh second start vs first start: max rel loss diff {r['fresh_max_rel_loss_diff']:.2e}"
    assert line in gpu_throughput.ratios("w3", {"ours": r})


def test_a_runs_log_gives_each_line_its_time_since_launch(tmp_path):
    """Where a start spends its time (W2's cached start: 35 s against 54, nothing in its log said where)."""
    import sys

    log = tmp_path / "run.log"
    said = "import time\nprint('weights: fp32', flush=True)\ntime.sleep(1.2)\nprint('compiled and ran the first step in 1s')\n"
    assert run_child([sys.executable, "-c", said], str(log), timeout=30)[0] == 0
    stamps = [float(line.split("s]")[0].strip("[ ")) for line in log.read_text().splitlines()]
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 1.1
    assert gpu_throughput.package_lines(str(log)) == ["weights: fp32", "compiled and ran the first step in 1s"]
