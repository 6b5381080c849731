"""A run whose nodes change, on a 3-node lab (real sshd, the real launcher, CPU ranks, ZeRO-3 of the
lab's tiny Qwen2 at sequence 128, global batch 8, 20 steps with a checkpoint every 10):

- 1 node -> 2 nodes: stopped (playbooks/stop.yml) while checkpoint-20 is being written, relaunched on
  two nodes: checkpoint-20 was never marked, checkpoint-10 is converted to the universal format and
  the new node gets it; the losses from step 11 on are those of an uninterrupted 2-node run;
- a crash between the two nodes' marks of checkpoint-20: the relaunch resumes from checkpoint-10;
- the disk fills on one node during a save: the job fails naming the node and the path, checkpoint-10
  is intact, and after space is freed the relaunch resumes from it;
- the master lost for good (its container removed) after checkpoint-10: the node that remains holds
  the master's ranks too (the supervisor's ring copy) and its run.json, converts and resumes alone.

The losses after each resume are compared with an uninterrupted run of the same global batch. They
agree to about 1e-7 relative, not exactly: 2 ranks x 4 sequences and 1 rank x 8 sum the same
gradients in another order in fp32 (and gloo's all-reduce adds its own order).
"""
import copy
import json
import subprocess
import time

import pytest
from lab import Lab

pytestmark = pytest.mark.lab

RUNS = "/var/lib/dsmesh/runs"
TRAIN = {"deepspeed_job_train_args": {"max_steps": 20, "save_steps": 10, "logging_steps": 1, "learning_rate": 0.003,
                                      "warmup_steps": 2}}
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": 1, "DEEPSPEED_TIMEOUT": 2}
TOLERANCE = {"rel": 1e-5, "abs": 1e-6}


@pytest.fixture(scope="module")
def lab():
    lab = Lab("dsresume", 3).up(fresh=True)
    lab.playbook("site.yml", "--skip-tags", "launch", check=True)
    yield lab
    lab.down()


def node(lab, i):
    return lab.names()[i - 1]


def inventory(lab, numbers, master=None):
    """An inventory of the lab's nodes `numbers` (master: the first, or `master`)."""
    data = copy.deepcopy(lab.load_inventory())
    hosts = data["all"]["children"]["cluster"]["hosts"]
    names = [node(lab, i) for i in numbers]
    data["all"]["children"]["cluster"]["hosts"] = {n: hosts[n] for n in names}
    data["all"]["children"]["master"]["hosts"] = {node(lab, master or numbers[0]): None}
    return lab.write_inventory(data, lab.state / f"inventory-{'-'.join(map(str, numbers))}-m{master or numbers[0]}.yml")


def launch(lab, inv, name, fault=None, extra=None, check=True):
    variables = dict(TRAIN, deepspeed_job_run_name=name, **(extra or {}))
    if fault:
        variables["deepspeed_job_env"] = dict(ENV, TRAIN_FAULT_INJECT=fault)
    return lab.playbook("playbooks/launch.yml", "--skip-tags", "preflight", "-e", json.dumps(variables),
                        inventory=inv, check=check)


def text(proc):
    """A play's output as one line, as its messages read (YAML doubles the quote in it's)."""
    return " ".join(proc.stdout.split()).replace("''", "'")


def play(lab, inv, playbook, name):
    return text(lab.playbook(playbook, "-e", f"deepspeed_job_run_name={name}", inventory=inv, check=True))


def read(lab, where, path, default=""):
    out = lab.exec(where, f"cat {path} 2>/dev/null || true").stdout
    return out if out.strip() else default


def losses(lab, where, name):
    rows = [json.loads(line) for line in read(lab, where, f"{RUNS}/{name}/output/metrics.jsonl").splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def wait_for(predicate, timeout, what, ready=None):
    """`ready(seconds)`: waits for what the predicate needs first, within the same timeout."""
    deadline = time.time() + timeout
    if ready:
        ready(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.time() >= deadline:
            break
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def exit_code(lab, master, name, timeout=240):
    path = f"{RUNS}/{name}/exit_code"
    return wait_for(lambda: read(lab, master, path).strip(), timeout, f"{name} to end",
                    ready=lambda seconds: lab.wait_until(master, f"test -s {path}", seconds))


def marks(lab, where, name, step):
    """What a node holds of checkpoint-`step`: its own mark, a replica's mark, a universal copy."""
    base = f"{RUNS}/{name}/output/checkpoint-{step}"
    out = lab.exec(where, f"cd {base} 2>/dev/null && ls -d checkpoint_complete.json replica_complete.json "
                          "universal_complete.json global_step*_universal 2>/dev/null || true").stdout.split()
    return {"marked": "checkpoint_complete.json" in out, "replica": "replica_complete.json" in out,
            "universal": "universal_complete.json" in out}


def assert_same_losses(got, want, after):
    steps = [s for s in sorted(want) if s > after]
    assert steps and all(s in got for s in steps), (sorted(got), steps)
    for s in steps:
        assert got[s] == pytest.approx(want[s], **TOLERANCE), (s, got[s], want[s])


@pytest.fixture(scope="module")
def reference(lab):
    """The same job on two nodes, never interrupted."""
    master = node(lab, 1)
    launch(lab, inventory(lab, [1, 2]), "reference")
    assert exit_code(lab, master, "reference") == "0"
    return losses(lab, master, "reference")


def test_one_node_stopped_mid_save_resumes_on_two_nodes(lab, reference):
    one, two = inventory(lab, [1]), inventory(lab, [1, 2])
    master = node(lab, 1)
    # one node: the fault hook reaches the ranks through .deepspeed_env (the launch's --force_multi)
    launch(lab, one, "grow", fault="pause_before_save_barrier:20:120")
    wait_for(lambda: '"saving"' in read(lab, master, f"{RUNS}/grow/output/phase.json")
             and '"step": 20' in read(lab, master, f"{RUNS}/grow/output/phase.json"), 180, "the save of checkpoint-20")
    assert "stopped run grow-" in play(lab, one, "playbooks/stop.yml", "grow")
    assert exit_code(lab, master, "grow") == "stopped"
    # the checkpoint being written when the job was stopped is not counted
    assert marks(lab, master, "grow", 20)["marked"] is False
    assert marks(lab, master, "grow", 10)["marked"] is True

    out = text(launch(lab, two, "grow"))
    assert "checkpoint-20: marked complete on no node of this launch" in out, out
    assert (f"checkpoint-10 was written by 1 rank(s) x micro-batch 8 x 1 accumulation step(s); this launch has 2 "
            f"rank(s): converting it to DeepSpeed's universal format on {master}; the global batch of 8 is kept") in out
    assert f"{node(lab, 2)} gets the universal copy and the checkpoint's common files and mark from {master}" in out
    assert exit_code(lab, master, "grow") == "0"
    assert marks(lab, node(lab, 2), "grow", 10) == {"marked": True, "replica": False, "universal": True}
    summary = json.loads(read(lab, master, f"{RUNS}/grow/output/summary.json"))
    assert summary["resumed_from_step"] == 10 and summary["world_size"] == 2
    assert_same_losses(losses(lab, master, "grow"), reference, after=10)
    status = play(lab, two, "playbooks/status.yml", "grow")
    assert "finished run grow-" in status and "resumed from checkpoint-10, 1 -> 2 rank(s) (micro-batch 8 x 1 -> 4 x 1)" \
        in status and "converted to the universal format in" in status, status


def test_a_crash_between_the_nodes_marks_resumes_from_the_step_both_have(lab, reference):
    inv = inventory(lab, [1, 2])
    master, other = node(lab, 1), node(lab, 2)
    launch(lab, inv, "marks", fault="kill_before_mark:20:1")
    assert exit_code(lab, master, "marks") not in ("0", "stopped")
    assert marks(lab, master, "marks", 20)["marked"] and not marks(lab, other, "marks", 20)["marked"]

    out = text(launch(lab, inv, "marks"))
    assert "checkpoint-20: the state of rank(s) 1 of 2 is complete on no node of this launch" in out, out
    assert f"{other} hold(s) files of it without a mark (a crash between the nodes' marks)" in out
    assert f"removed (their steps are trained again): {master}: checkpoint-20; {other}: checkpoint-20" in out
    assert exit_code(lab, master, "marks") == "0"
    assert json.loads(read(lab, master, f"{RUNS}/marks/output/summary.json"))["resumed_from_step"] == 10
    assert_same_losses(losses(lab, master, "marks"), reference, after=10)


def test_a_full_disk_on_one_node_fails_the_job_naming_it_and_a_relaunch_resumes(lab, reference):
    inv = inventory(lab, [1, 2])
    master, other = node(lab, 1), node(lab, 2)
    output = f"{RUNS}/full/output"
    # room on the second node for checkpoint-10 of its rank (0.8 MB), not for a second one
    lab.exec(other, f"mkdir -p {output} && mount -t tmpfs -o size=1200k tmpfs {output}", privileged=True)
    try:
        launch(lab, inv, "full")
        assert exit_code(lab, master, "full") not in ("0", "stopped")
        status = play(lab, inv, "playbooks/status.yml", "full")
        assert f"failed on {other}" in status, status
        assert f"no space left on the device of {output}" in status and "while writing checkpoint-20" in status, status
        for where in (master, other):
            assert marks(lab, where, "full", 10)["marked"] and not marks(lab, where, "full", 20)["marked"]

        lab.exec(other, f"mount -o remount,size=64m {output}", privileged=True)
        out = text(launch(lab, inv, "full"))
        assert "resuming from checkpoint-10 as written" in out, out
        assert exit_code(lab, master, "full") == "0"
        assert json.loads(read(lab, master, f"{output}/summary.json"))["resumed_from_step"] == 10
        assert_same_losses(losses(lab, master, "full"), reference, after=10)
    finally:
        lab.exec(other, f"umount {output} || true", privileged=True, check=False)


def test_the_master_lost_for_good_the_node_left_converts_and_resumes_alone(lab, reference):
    lost, left = node(lab, 3), node(lab, 2)
    launch(lab, inventory(lab, [2, 3], master=3), "shrink", fault="pause_before_save_barrier:20:120")
    # checkpoint-10 complete on both, each holding the other's ranks too, and the job inside its next save
    wait_for(lambda: all(marks(lab, n, "shrink", 10) == {"marked": True, "replica": True, "universal": False}
                         for n in (lost, left)), 180, "checkpoint-10 on both nodes with each other's ranks")
    wait_for(lambda: '"saving"' in read(lab, lost, f"{RUNS}/shrink/output/phase.json"), 120, "the save of checkpoint-20")
    subprocess.run(["podman", "rm", "-f", "-t", "0", lost], env=lab.env, check=True, capture_output=True)

    alone = inventory(lab, [2])
    out = text(launch(lab, alone, "shrink"))
    assert (f"checkpoint-10 was written by 2 rank(s) x micro-batch 4 x 1 accumulation step(s); this launch has 1 "
            f"rank(s): converting it to DeepSpeed's universal format on {left}") in out, out
    assert exit_code(lab, left, "shrink") == "0"
    summary = json.loads(read(lab, left, f"{RUNS}/shrink/output/summary.json"))
    assert summary["resumed_from_step"] == 10 and summary["world_size"] == 1
    assert_same_losses(losses(lab, left, "shrink"), reference, after=10)
    status = play(lab, alone, "playbooks/status.yml", "shrink")
    assert "resumed from checkpoint-10, 2 -> 1 rank(s) (micro-batch 4 x 1 -> 8 x 1)" in status, status


def test_a_change_no_resume_can_carry_is_refused_before_anything_changes(lab):
    left = node(lab, 2)
    listing = f"ls -lR --time-style=full-iso {RUNS}/shrink/output"
    before = lab.exec(left, listing).stdout
    proc = launch(lab, inventory(lab, [2]), "shrink", extra={"deepspeed_job_max_seq_length": 256}, check=False)
    out = text(proc)
    assert proc.returncode != 0
    assert "this launch cannot resume the run's checkpoints; it changes what defines the run:" in out, out
    assert "sequence length: 128 -> 256 (deepspeed_job_max_seq_length)" in out and "started on" not in out
    assert lab.exec(left, listing).stdout == before
