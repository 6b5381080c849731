"""The resume plan of a relaunch (module_utils/resume.py): which checkpoint every node of the launch can
load, what is converted and copied, what the re-plan must keep, and the refusals with their reasons.
The surveys are what dsmesh.resume survey reports of a node's output directory."""
import pytest

from ansible_collections.dsmesh.cluster.plugins.filter.job import json_answer
from ansible_collections.dsmesh.cluster.plugins.module_utils.jobctl import rank_errors, resume_summary
from ansible_collections.dsmesh.cluster.plugins.module_utils.resume import (
    ResumeError,
    check_rendered,
    check_rsync,
    check_space,
    launch_hosts,
    plan_resume,
    rank_of,
)

IDENTITY = {"model": "/m/tiny", "max_seq_length": 128, "lora": None, "zero_stage": 3, "world_size": 2,
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "seed": 42}
JOB = {"model_dir": "/m/tiny", "max_seq_length": 128, "global_batch_size": 8, "lora": None, "plan_overrides": {}}
RANK_BYTES = 700_000


def marker(ranks, world=2, micro=4, accum=1):
    return {"step": 0, "world_size": world, "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": accum, "ranks": ranks}


def copy_of(own, files=None, replica=None, marked=True, world=2, micro=4, universal=None):
    """One node's checkpoint-N: its own ranks (marked or not), files present, a replica's ranks."""
    files = sorted(set(own) | set(replica or [])) if files is None else files
    return {"marker": marker(own, world, micro) if marked else None,
            "replica": {"ranks": replica} if replica else None, "universal": universal, "tag": "global_stepN",
            "rank_bytes": {str(r): RANK_BYTES for r in files}}


def survey(checkpoints, run=True, free=10 ** 12, identity=IDENTITY):
    return {"run": {"identity": identity, "starts": [{}]} if run else None, "free_bytes": free, "rsync": True,
            "checkpoints": {str(step): entry for step, entry in checkpoints.items()}}


def hosts(*names):
    return launch_hosts([{"name": n, "address": f"{n}.lab", "slots": 1} for n in names], names[0])


def test_no_checkpoint_anywhere_is_a_fresh_start():
    plan = plan_resume({"n1": survey({}, run=False), "n2": survey({}, run=False)}, hosts("n1", "n2"), JOB, "n1")
    assert plan["state"] == "fresh"


def test_same_nodes_resume_the_newest_checkpoint_as_written_and_pin_its_layout():
    surveys = {"n1": survey({10: copy_of([0], replica=[1]), 20: copy_of([0], replica=[1])}),
               "n2": survey({10: copy_of([1], replica=[0]), 20: copy_of([1], replica=[0])})}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    assert plan["state"] == "resume" and plan["step"] == 20
    assert not plan["universal"] and not plan["convert"] and plan["copies"] == [] and plan["remove"] == {}
    assert plan["plan_overrides"] == {"engine": "deepspeed", "zero_stage": 3, "micro_batch_size": 4}
    assert plan["config_overrides"] == {}


def test_a_crash_between_two_nodes_marks_resumes_from_the_step_every_node_has():
    surveys = {"n1": survey({10: copy_of([0], replica=[1]), 20: copy_of([0])}),
               "n2": survey({10: copy_of([1], replica=[0]), 20: copy_of([1], marked=False)})}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    assert plan["step"] == 10 and plan["copies"] == []
    assert plan["remove"] == {"n1": [20], "n2": [20]}
    text = "\n".join(plan["notes"])
    assert "checkpoint-20: the state of rank(s) 1 of 2 is complete on no node" in text
    assert "n2 hold(s) files of it without a mark (a crash between the nodes' marks)" in text


def test_a_node_gone_for_good_converts_on_the_master_from_its_replica():
    surveys = {"n1": survey({10: copy_of([0], replica=[1])})}
    plan = plan_resume(surveys, hosts("n1"), JOB, "n1")
    assert plan["universal"] and plan["convert"] and plan["world_size"] == 1
    assert plan["gather"] == [] and plan["copies"] == []
    assert plan["config_overrides"] == {"checkpoint": {"load_universal": True}}
    # the engine and ZeRO stage stay; the planner picks micro-batch x accumulation for the global batch
    assert plan["plan_overrides"] == {"engine": "deepspeed", "zero_stage": 3}
    assert plan["written"] == {"world_size": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    assert any("converting it to DeepSpeed's universal format on n1; the global batch of 8 is kept" in n
               for n in plan["notes"])


def test_a_node_gone_without_a_replica_is_refused_naming_the_missing_ranks():
    surveys = {"n1": survey({10: copy_of([0])})}
    with pytest.raises(ResumeError) as e:
        plan_resume(surveys, hosts("n1"), JOB, "n1")
    assert "checkpoint-10: the state of rank(s) 1 of 2 is complete on no node of this launch" in str(e.value)
    assert "Add the nodes that hold the missing ranks back to the inventory" in str(e.value)


def test_the_master_gone_the_other_node_converts_with_its_own_run_record():
    surveys = {"n2": survey({10: copy_of([1], replica=[0])})}
    plan = plan_resume(surveys, hosts("n2"), JOB, "n2")
    assert plan["convert"] and plan["gather"] == []


def test_a_second_node_gets_the_universal_copy_and_the_common_files():
    surveys = {"n1": survey({10: copy_of([0], world=1, micro=8)},
                            identity=dict(IDENTITY, world_size=1, per_device_train_batch_size=8)),
               "n2": survey({}, run=False)}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    assert plan["convert"] and plan["written"]["world_size"] == 1 and plan["world_size"] == 2
    assert plan["copies"] == [{"to": "n2", "from": "n1", "ranks": [], "base": True, "universal": True}]
    assert plan["needed_bytes"] == {"n1": RANK_BYTES, "n2": RANK_BYTES}


def test_a_universal_copy_made_before_is_used_not_made_again():
    surveys = {"n1": survey({10: copy_of([0], world=1, micro=8, universal="global_stepN_universal")},
                            identity=dict(IDENTITY, world_size=1, per_device_train_batch_size=8)),
               "n2": survey({10: copy_of([], world=1, micro=8, universal=None)})}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    assert plan["universal"] and not plan["convert"]
    assert plan["copies"] == [{"to": "n2", "from": "n1", "ranks": [], "base": False, "universal": True}]


def test_a_replacement_node_of_the_same_size_gets_the_lost_nodes_ranks_without_conversion():
    surveys = {"n1": survey({10: copy_of([0], replica=[1])}), "n3": survey({}, run=False)}
    plan = plan_resume(surveys, hosts("n1", "n3"), JOB, "n1")
    assert not plan["universal"]
    assert plan["copies"] == [{"to": "n3", "from": "n1", "ranks": [1], "base": True, "universal": False}]


def test_ranks_are_gathered_on_the_master_from_the_nodes_that_hold_them():
    identity = dict(IDENTITY, world_size=4, per_device_train_batch_size=2)
    surveys = {"n1": survey({10: copy_of([0, 1], world=4, micro=2)}, identity=identity),
               "n2": survey({10: copy_of([2, 3], world=4, micro=2)}, identity=identity),
               "n3": survey({})}
    nodes = [{"name": "n1", "address": "n1", "slots": 2}, {"name": "n2", "address": "n2", "slots": 2},
             {"name": "n3", "address": "n3", "slots": 4}]
    plan = plan_resume(surveys, launch_hosts(nodes, "n1"), JOB, "n1")
    assert plan["convert"] and plan["world_size"] == 8
    assert plan["gather"] == [{"to": "n1", "from": "n2", "ranks": [2, 3], "base": False, "universal": False}]
    assert plan["copies"] == [{"to": "n2", "from": "n1", "ranks": [], "base": False, "universal": True},
                              {"to": "n3", "from": "n1", "ranks": [], "base": True, "universal": True}]
    assert plan["needed_bytes"] == {"n1": 6 * RANK_BYTES, "n2": 4 * RANK_BYTES, "n3": 4 * RANK_BYTES}


def test_what_no_resume_can_carry_is_refused_with_each_reason():
    job = dict(JOB, model_dir="/m/other", max_seq_length=256, global_batch_size=16,
               lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": []})
    with pytest.raises(ResumeError) as e:
        plan_resume({"n1": survey({10: copy_of([0], replica=[1])})}, hosts("n1"), job, "n1")
    text = str(e.value)
    for reason in ("model: /m/tiny -> /m/other (training_env_model_dir)",
                   "sequence length: 128 -> 256 (deepspeed_job_max_seq_length)",
                   "fine-tune: full -> lora (deepspeed_job_finetune)",
                   "global batch size: 8 -> 16 (deepspeed_job_global_batch_size)",
                   "use another deepspeed_job_run_name"):
        assert reason in text, text


def test_a_plan_override_against_the_checkpoint_is_refused():
    job = dict(JOB, plan_overrides={"zero_stage": 2})
    with pytest.raises(ResumeError, match="plan_overrides.zero_stage is 2, but the run's checkpoints were written "
                                          "with zero_stage 3"):
        plan_resume({"n1": survey({10: copy_of([0], replica=[1])})}, hosts("n1"), job, "n1")


def test_another_micro_batch_at_the_same_world_size_goes_through_the_universal_copy():
    job = dict(JOB, plan_overrides={"micro_batch_size": 2})
    surveys = {"n1": survey({10: copy_of([0], replica=[1])}), "n2": survey({10: copy_of([1], replica=[0])})}
    plan = plan_resume(surveys, hosts("n1", "n2"), job, "n1")
    assert plan["universal"] and plan["convert"] and "micro_batch_size" not in plan["plan_overrides"]


def test_a_torch_engine_checkpoint_is_not_carried_to_another_world_size():
    identity = dict(IDENTITY, zero_stage=None, world_size=1, per_device_train_batch_size=8)
    surveys = {"n1": survey({10: {"marker": marker([0], world=1, micro=8), "replica": None, "universal": None,
                                  "tag": None, "rank_bytes": {}}}, identity=identity), "n2": survey({})}
    with pytest.raises(ResumeError, match="written by the torch engine"):
        plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    plan = plan_resume({"n1": surveys["n1"]}, hosts("n1"), JOB, "n1")
    assert plan["plan_overrides"] == {"engine": "torch", "micro_batch_size": 8} and plan["copies"] == []


def test_a_node_that_cannot_be_surveyed_stops_the_launch():
    with pytest.raises(ResumeError, match="n2: n2.lab: ssh: connect to host n2.lab port 22: No route to host"):
        plan_resume({"n1": survey({}), "n2": {"error": "n2.lab: ssh: connect to host n2.lab port 22: No route to host"}},
                    hosts("n1", "n2"), JOB, "n1")


def test_checkpoints_without_any_run_record_are_refused():
    with pytest.raises(ResumeError, match="no node has its run.json"):
        plan_resume({"n1": survey({10: copy_of([0], replica=[1])}, run=False)}, hosts("n1"), JOB, "n1")


def test_too_little_space_or_no_rsync_is_refused_before_anything_changes():
    surveys = {"n1": survey({10: copy_of([0], world=1, micro=8)}, free=10 ** 9,
                            identity=dict(IDENTITY, world_size=1, per_device_train_batch_size=8)),
               "n2": survey({}, run=False, free=RANK_BYTES // 2)}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    errors = check_space(plan, surveys)
    assert len(errors) == 1 and errors[0].startswith("n2: 0.0 GiB free in the output directory, resuming from "
                                                     "checkpoint-10 needs about")
    surveys["n2"]["rsync"] = False
    assert check_rsync(plan, surveys) == ["n2: no rsync, which the checkpoint copies of this resume need: install it "
                                          "there (training_env_sync_data_from_master: true installs it with the "
                                          "environment)"]


def test_the_render_must_keep_the_layout_of_a_checkpoint_it_loads_as_written():
    surveys = {"n1": survey({10: copy_of([0], replica=[1])}), "n2": survey({10: copy_of([1], replica=[0])})}
    plan = plan_resume(surveys, hosts("n1", "n2"), JOB, "n1")
    assert check_rendered(plan, {"micro_batch_size": 4, "gradient_accumulation_steps": 1}) == []
    assert "without a universal copy" in check_rendered(plan, {"micro_batch_size": 2, "gradient_accumulation_steps": 2})[0]
    converted = plan_resume({"n1": surveys["n1"]}, hosts("n1"), JOB, "n1")
    assert check_rendered(converted, {"micro_batch_size": 4, "gradient_accumulation_steps": 2}) == []
    assert "global batch 4" in check_rendered(converted, {"micro_batch_size": 4, "gradient_accumulation_steps": 1})[0]


def test_file_names_of_ranks():
    assert rank_of("zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert rank_of("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert rank_of("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1
    assert rank_of("rng_state_7.pth") == 7
    assert rank_of("mp_rank_00_model_states.pt") is None and rank_of("trainer_state.json") is None


def test_status_says_what_the_launch_resumed_and_what_a_rank_said():
    resume = {"state": "resume", "checkpoint": "checkpoint-10", "step": 10, "universal": True, "convert": True,
              "convert_seconds": 2.41, "copies": [{"to": "n2"}],
              "written": {"world_size": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
              "layout": {"world_size": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
              "notes": ["..."]}
    assert resume_summary(resume)["line"] == ("resumed from checkpoint-10, 2 -> 1 rank(s) (micro-batch 4 x 1 -> 8 x 1), "
                                              "converted to the universal format in 2.4s, 1 copy between nodes")
    lines = ["[dsmesh.supervise 10:00:00] error: not a rank", "n2: Traceback (most recent call last):",
             "n2: error: n2: no space left on the device of /out (0.0 MiB free) while writing checkpoint-20"]
    assert rank_errors(lines) == [lines[2]]


def test_the_answer_of_a_node_program_is_its_last_json_line():
    assert json_answer({"stdout_lines": ["progress", '{"state": "fresh"}']}) == {"state": "fresh"}
    assert json_answer({"stdout": "Traceback ..."}) == {} and json_answer(None) == {}
