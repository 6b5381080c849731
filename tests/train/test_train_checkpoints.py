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


def test_eta_counts_from_the_first_logged_step(tmp_path, monkeypatch):
    """The H200's first step took 94 s of compiling: an ETA from the start said 9m51s for a run that ended
    in 25 s. From the second log on it is the steady rate's."""
    from types import SimpleNamespace

    from train import trainer
    from train.metrics import MetricsWriter

    clock = iter([0.0, 94.0, 96.0])
    monkeypatch.setattr(trainer.time, "time", lambda: next(clock))
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    printer = trainer.ProgressPrinter(writer)
    state = SimpleNamespace(global_step=0, max_steps=100, is_world_process_zero=False)
    printer.on_train_begin(None, state, None)
    state.is_world_process_zero = True
    logs = {"loss": 3.0, "tokens_per_s": 1.0, "interval_tokens": 10, "interval_s": 1.0, "mfu": None, "memory_gib": 1.0}
    for step in (10, 20):
        state.global_step = step
        printer.on_log(None, state, None, logs=dict(logs))
    writer.file.flush()
    first, second = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert first["eta_s"] == pytest.approx(94.0 / 10 * 90)  # nothing steady to go by yet
    assert second["eta_s"] == pytest.approx(2.0 / 10 * 80)
