"""A run resumed at another world size: the rows each optimizer step trains (the same at any ranks x
micro-batch x accumulation, as accelerate shards them), the run identity's rule (world size and
layout change only through a universal copy, the global batch never), and a real 2-rank ZeRO-3 run
resumed on 1 rank from the universal copy the launch's resume step makes (dsmesh.resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.data_loader import BatchSamplerShard
from ds_testlib import run_launch
from torch.utils.data import BatchSampler

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from train import checkpoints
from train.checkpoints import RunMismatch, prepare_output_dir
from train.data import DataError, GlobalBatchOrder

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = {"world_size": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
IDENTITY = {"model": "/m", "max_seq_length": 128, "lora": None, "zero_stage": 3, **LAYOUT}


def rows_per_step(num_rows, world, micro, accum, epoch, seed=42):
    """The rows of every optimizer step of an epoch, as accelerate hands them to the ranks."""
    order = GlobalBatchOrder(num_rows, world * micro * accum, seed)
    order.set_epoch(epoch)
    shards = [list(BatchSamplerShard(BatchSampler(order, micro, drop_last=False), num_processes=world,
                                     process_index=r)) for r in range(world)]
    steps = []
    for k in range(len(shards[0]) // accum):
        steps.append(sorted(i for r in range(world) for b in shards[r][k * accum:(k + 1) * accum] for i in b))
    return steps


@pytest.mark.parametrize("layout", [(1, 8, 1), (1, 4, 2), (4, 1, 2), (8, 1, 1), (2, 2, 2)])
def test_each_step_trains_the_same_rows_at_any_layout_of_the_global_batch(layout):
    for epoch in (0, 1):
        want = rows_per_step(150, 2, 4, 1, epoch)
        assert rows_per_step(150, *layout, epoch) == want
        assert len(want) == 150 // 8 and all(len(rows) == 8 for rows in want)
    assert rows_per_step(150, 2, 4, 1, 0) != rows_per_step(150, 2, 4, 1, 1)  # a new order each epoch


def test_data_smaller_than_one_global_batch_is_a_clear_error():
    with pytest.raises(DataError, match="the training data has 6 sequences, fewer than one global batch of 8"):
        GlobalBatchOrder(6, 8, 42)


def make_ckpt(out, step, layout=LAYOUT, universal=False):
    path = out / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    checkpoints.mark_complete(str(path), step, **layout, ranks=list(range(layout["world_size"])))
    if universal:
        (path / f"global_step{step}_universal").mkdir()
        rundir.write_atomic(str(path / "latest_universal"), f"global_step{step}_universal")
        rundir.write_json_atomic(str(path / rundir.UNIVERSAL_MARKER), {"tag": f"global_step{step}_universal"})
    return path


def one_rank(micro=8, accum=1):
    return dict(IDENTITY, world_size=1, per_device_train_batch_size=micro, gradient_accumulation_steps=accum)


def test_another_world_size_is_refused_without_a_universal_copy_and_says_how(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10)
    with pytest.raises(RunMismatch) as e:
        prepare_output_dir(str(out), one_rank())
    assert ("checkpoint-10 was written by 2 rank(s) x micro-batch 4 x 1 accumulation step(s); this run is 1 rank(s) "
            "x micro-batch 8 x 1 accumulation step(s)") in str(e.value)
    assert "playbooks/launch.yml" in str(e.value) and "load_universal" in str(e.value)
    with pytest.raises(RunMismatch):  # the switch alone is not enough
        prepare_output_dir(str(out), one_rank(), universal=True)
    assert (out / "checkpoint-10" / checkpoints.MARKER).exists()


def test_another_world_size_resumes_from_the_universal_copy_keeping_the_global_batch(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10, universal=True)
    resume, notes = prepare_output_dir(str(out), one_rank(4, 2), universal=True)
    assert resume == str(out / "checkpoint-10")
    assert any("resuming on 1 rank(s) x micro-batch 4 x 2 accumulation step(s) from its universal copy (global batch "
               "8 kept)" in n for n in notes)
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["world_size"] == 1 and run["starts"][-1]["gradient_accumulation_steps"] == 2


def test_the_global_batch_and_other_settings_never_change(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10, universal=True)
    with pytest.raises(RunMismatch, match="global batch of 8 sequences per step .* this run's is 16"):
        prepare_output_dir(str(out), one_rank(16), universal=True)
    with pytest.raises(RunMismatch, match="max_seq_length: 128 -> 256"):
        prepare_output_dir(str(out), dict(one_rank(), max_seq_length=256), universal=True)


def test_universal_loading_of_a_checkpoint_without_a_copy_is_refused(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10)
    with pytest.raises(RunMismatch, match="checkpoint.load_universal is on .* checkpoint-10 has no complete universal"):
        prepare_output_dir(str(out), IDENTITY, universal=True)


def launch(tiny_dir, out, ranks, micro, universal=False):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "train_batch_size": micro * ranks, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
              "gradient_clipping": 1.0, "checkpoint": {"use_node_local_storage": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.0, "torch_adam": True}}}
    if universal:
        config["checkpoint"]["load_universal"] = True
    path = Path(f"{out}-{ranks}.json")
    path.write_text(json.dumps(config))
    cmd = lambda port: [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
        "--module", "train", "--model_name_or_path", str(tiny_dir), "--dataset", str(tiny_dir / "data" / "train.jsonl"),
        "--output_dir", str(out), "--deepspeed", str(path), "--max_seq_length", "128", "--max_steps", "24",
        "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "1", "--save_steps", "10",
        "--save_on_each_node", "true", "--save_final_model", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    env.pop("TRAIN_FAULT_INJECT", None)
    proc = run_launch(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out):
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()}


def test_two_ranks_resumed_on_one_from_the_converted_checkpoint_follow_the_uninterrupted_run(tmp_path, tiny_dir):
    whole = tmp_path / "whole"
    launch(tiny_dir, whole, 2, 4)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("run.json", "metrics.jsonl", "checkpoint-10"):
        subprocess.run(["cp", "-a", str(whole / name), str(resumed / name)], check=True)
    # the launch's resume step on one node: it converts, since the checkpoint was written by 2 ranks
    nodes = json.dumps([{"name": "m", "address": "localhost", "slots": 1}])
    job = json.dumps({"model_dir": str(tiny_dir), "max_seq_length": 128, "global_batch_size": 8, "lora": None,
                      "plan_overrides": {}})
    step = subprocess.run([sys.executable, "-m", "dsmesh.resume", "apply", "--run-dir", str(tmp_path / "run"),
                           "--output-dir", str(resumed), "--nodes-json", nodes, "--master", "m", "--job-json", job,
                           "--rendered-plan-json", json.dumps({"micro_batch_size": 8, "gradient_accumulation_steps": 1})],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert step.returncode == 0, step.stdout + step.stderr
    report = json.loads(step.stdout.splitlines()[-1])
    assert report["convert"] and report["checkpoint"] == "checkpoint-10" and report["convert_seconds"] > 0
    proc = launch(tiny_dir, resumed, 1, 8, universal=True)
    assert "resuming on 1 rank(s) x micro-batch 8 x 1 accumulation step(s) from its universal copy" in proc.stdout
    got, want = losses(resumed), losses(whole)
    # past the epoch's end (150 rows: 18 steps) too; fp32 sums in another order, hence not exact
    assert [got[s] for s in range(11, 25)] == pytest.approx([want[s] for s in range(11, 25)], rel=1e-5)


def test_universal_loading_without_deepspeeds_optimizer_is_refused(tmp_path, tiny_dir):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                  "zero_optimization": {"stage": 3}, "checkpoint": {"load_universal": True}}))
    proc = subprocess.run([sys.executable, "-m", "train", "--model_name_or_path", str(tiny_dir), "--dataset",
                           str(tiny_dir / "data" / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
                           "--deepspeed", str(config)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {config}: checkpoint.load_universal needs an \"optimizer\" section" in proc.stderr
