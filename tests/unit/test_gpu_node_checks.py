"""The GPU node e2e's resume check (bench/gpu_node_checks.compare_losses) on the losses of the H200 run:
two uninterrupted runs of one job there drift apart from step 3 (0.6% by step 19), so a check that
demands equality fails for a sound resume, while a resume that lost its state must still fail."""

import pytest

from bench.gpu_node_checks import compare_losses

# bench/results/gpu_node_h200/metrics_*.jsonl, steps 15-30: the uninterrupted reference, the stopped run's first
# attempt (uninterrupted too, stopped after step 30) and its resume from checkpoint-20
REF = {15: 3.6267, 16: 3.77195, 17: 3.84258, 18: 2.52033, 19: 3.30364, 20: 2.38162, 21: 2.5889, 22: 2.17762,
       23: 2.1834, 24: 2.68402, 25: 2.34389, 26: 2.02763, 27: 1.7444, 28: 1.997, 29: 1.98163, 30: 1.98201}
FIRST = {15: 3.61929, 16: 3.76589, 17: 3.86321, 18: 2.52237, 19: 3.30421, 20: 2.36987, 21: 2.55806, 22: 2.15796,
         23: 2.18716, 24: 2.69319, 25: 2.36133, 26: 2.06264, 27: 1.78361, 28: 2.02159, 29: 2.04235, 30: 1.99782}
RESUMED = {**{s: v for s, v in FIRST.items() if s <= 20},
           21: 2.55805, 22: 2.15796, 23: 2.18733, 24: 2.69305, 25: 2.36153, 26: 2.0631, 27: 1.78348, 28: 2.02167,
           29: 2.04271, 30: 1.9976}


def rows(losses):
    return {step: {"step": step, "loss": loss} for step, loss in losses.items()}


def test_identical_runs_pass_at_the_floor():
    ref = rows(REF)
    result = compare_losses(ref, ref, ref, 20, 1e-4)
    assert result["ok"] and result["max_rel_diff"] == 0 and result["tolerance"] == 1e-4
    assert result["basis"] == "the stopped run" and result["steps_compared"] == 10


def test_the_h200_resume_passes():
    result = compare_losses(rows(REF), rows(FIRST), rows(RESUMED), 20, 1e-4)
    assert result["ok"], result
    assert result["first_step_rel"] < 1e-5 and result["max_rel_diff"] < 3e-4
    assert result["noise_between_uninterrupted_runs"] == pytest.approx(abs(FIRST[29] - REF[29]) / REF[29])
    assert result["against_uninterrupted_max_rel"] > 2e-2  # what an equality check with the reference fails on


def test_a_resume_that_reloads_other_weights_fails_on_its_first_step():
    resumed = dict(RESUMED)
    resumed[21] = FIRST[21] * 1.003  # inside the run-to-run noise, but the first step replays a forward pass
    result = compare_losses(rows(REF), rows(FIRST), rows(resumed), 20, 1e-4)
    assert not result["ok"] and result["first_step_rel"] == pytest.approx(3e-3, rel=1e-2)


def test_drift_beyond_the_noise_fails():
    resumed = dict(RESUMED)
    resumed[24] = FIRST[24] * 1.2  # a lost optimizer state or learning-rate step shows up after the first step
    result = compare_losses(rows(REF), rows(FIRST), rows(resumed), 20, 1e-4)
    assert not result["ok"] and result["max_rel_diff"] == pytest.approx(0.2, rel=1e-3)


def test_stopped_at_its_checkpoint_falls_back_to_the_uninterrupted_run():
    first = {s: v for s, v in FIRST.items() if s <= 20}
    result = compare_losses(rows(REF), rows(first), rows(RESUMED), 20, 1e-4)
    # on the GPU the two runs drifted apart before the checkpoint: nothing to compare exactly
    assert result["basis"] == "the uninterrupted run" and result["ok"] is None
    # where they agreed (CPU ranks), step 21 against the reference
    result = compare_losses(rows(FIRST), rows(first), rows(RESUMED), 20, 1e-4)
    assert result["steps_compared"] == 1 and result["ok"] is True


def test_nothing_after_the_checkpoint_fails():
    result = compare_losses(rows(REF), rows(REF), rows({s: v for s, v in REF.items() if s <= 20}), 20, 1e-4)
    assert not result["ok"] and result["steps_compared"] == 0
