"""Checkpoint bookkeeping: completeness markers, resume choice, rotation, run ownership (fast)."""

import json
import os

import pytest

from train import checkpoints
from train.checkpoints import RunMismatch, prepare_output_dir

IDENTITY = {"model": "/m", "data": {"train": ["abc"], "eval": []}, "max_seq_length": 256, "world_size": 2,
            "lora": None}


def make_ckpt(out, step, complete=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints.mark_complete(str(path), step)
    return path


def test_fresh_dir_records_the_run(tmp_path):
    out = tmp_path / "out"
    resume, notes = prepare_output_dir(str(out), IDENTITY)
    assert resume is None and notes == []
    run = json.loads((out / "run.json").read_text())
    assert run["identity"] == IDENTITY and len(run["starts"]) == 1


def test_resumes_from_newest_complete_and_drops_a_half_written_one(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10)
    make_ckpt(out, 20)
    make_ckpt(out, 30, complete=False)  # what a crash during the save leaves
    resume, notes = prepare_output_dir(str(out), IDENTITY)
    assert resume == str(out / "checkpoint-20")
    assert not (out / "checkpoint-30").exists()
    assert any("checkpoint-30: incomplete" in n for n in notes)
    assert [s["resumed_from"] for s in json.loads((out / "run.json").read_text())["starts"]] == [None, "checkpoint-20"]


def test_checkpoints_of_another_run_are_refused(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10)
    other = dict(IDENTITY, max_seq_length=512, data={"train": ["def"], "eval": []})
    with pytest.raises(RunMismatch) as e:
        prepare_output_dir(str(out), other)
    assert "max_seq_length: 256 -> 512" in str(e.value)
    assert "data.train: ['abc'] -> ['def']" in str(e.value)
    assert (out / "checkpoint-10").exists()  # nothing touched
    # --overwrite_output_dir starts over
    resume, notes = prepare_output_dir(str(out), other, overwrite=True)
    assert resume is None and not (out / "checkpoint-10").exists()
    assert json.loads((out / "run.json").read_text())["identity"]["max_seq_length"] == 512


def test_checkpoints_nobody_recorded_are_refused(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 5)
    with pytest.raises(RunMismatch, match="that no run of this package recorded"):
        prepare_output_dir(str(out), IDENTITY)


def test_a_changed_but_checkpointless_dir_is_simply_reused(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    resume, _ = prepare_output_dir(str(out), dict(IDENTITY, max_seq_length=1024))
    assert resume is None


def test_no_resume_with_checkpoints_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    make_ckpt(out, 10)
    with pytest.raises(RunMismatch, match="--overwrite_output_dir"):
        prepare_output_dir(str(out), IDENTITY, resume=False)


def test_explicit_resume_point_removes_later_checkpoints(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(str(out), IDENTITY)
    for step in (10, 20, 30):
        make_ckpt(out, step)
    resume, notes = prepare_output_dir(str(out), IDENTITY, resume_from=str(out / "checkpoint-10"))
    assert resume == str(out / "checkpoint-10")
    assert sorted(os.listdir(out)) == ["checkpoint-10", "run.json"]


def test_rotation_keeps_newest_complete_by_step_number(tmp_path):
    out = tmp_path / "out"
    for step in (5, 10, 100, 50):
        make_ckpt(out, step)
    removed = checkpoints.rotate(str(out), 2)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-10", "checkpoint-5"]
    assert [s for s, _ in checkpoints.checkpoint_dirs(str(out))] == [50, 100]
    assert checkpoints.rotate(str(out), None) == []


def test_marker_is_written_atomically(tmp_path):
    path = make_ckpt(tmp_path, 7)
    assert json.loads((path / checkpoints.MARKER).read_text())["step"] == 7
    assert [p.name for p in path.iterdir() if ".tmp" in p.name] == []


def test_eta_goes_by_the_median_step_time(tmp_path):
    """On the H200 a DeepCompile run compiled 167 s in step 1 and 192 s in step 6, then took 0.4 s a step:
    a mean from the start said 36 minutes left at step 1 and 3m46s at step 7. The median of the recent
    intervals' step times is the steady one from the third log on, whatever compiled in between."""
    from types import SimpleNamespace

    from train import trainer
    from train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    printer = trainer.ProgressPrinter(writer)
    state = SimpleNamespace(global_step=0, max_steps=14, is_world_process_zero=False)
    printer.on_train_begin(None, state, None)
    state.is_world_process_zero = True
    for step, seconds in [(1, 167.0), (2, 0.4), (3, 0.4), (4, 0.4), (5, 0.4), (6, 192.0), (7, 0.4)]:
        state.global_step = step
        printer.on_log(None, state, None, logs={"loss": 3.0, "tokens_per_s": 1.0, "interval_tokens": 10,
                                                "interval_s": seconds, "mfu": None, "memory_gib": 1.0})
    writer.file.flush()
    eta = [json.loads(line)["eta_s"] for line in open(tmp_path / "metrics.jsonl")]
    assert eta[0] == pytest.approx(167.0 * 13)  # nothing steady to go by yet
    assert eta[2:] == pytest.approx([0.4 * (14 - step) for step in range(3, 8)])


def test_steady_throughput_leaves_out_each_starts_first_interval():
    """The H200 node's resumed run said 65.0k tokens/s steady where both of its starts ran 91-100k: the
    relaunch's loading and compile sat inside its first interval after checkpoint-20."""
    from types import SimpleNamespace

    from train.sft import steady_throughput

    rows, tokens, elapsed = [], 0, 0.0
    for step in range(1, 51):
        elapsed += {1: 60.0, 21: 30.0}.get(step, 0.33)  # the first start's compile, the relaunch's
        tokens += 32768
        rows.append({"step": step, "tokens": tokens, "elapsed_s": elapsed})
    meter = SimpleNamespace(flops_per_token=1.0, peak_flops=None, world_size=1)
    assert steady_throughput(rows, meter, 20)["tokens_per_s_steady"] == pytest.approx(32768 / 0.33)
    assert steady_throughput(rows, meter)["tokens_per_s_steady"] < 32768 / 0.33 / 2  # a run never resumed
    assert steady_throughput(rows[:1], meter)["tokens_per_s_steady"] is None
