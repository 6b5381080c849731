"""Issue 15: the job stages against this machine as a one-node cluster, through dsmesh's API (the
playbooks, over the node's sshd). bench/gpu_node_e2e.sh sets the node up and runs this; alone:

    python -m bench.gpu_node_e2e --out DIR --address ADDR --python PY [--lab]

Stages, each timed: the model (a `train.tiny_model` preset of a real shape, random init, with its
dataset; --lab: the lab's tiny model), a one-node inventory, site.yml's env and data stages,
playbooks/preflight.yml (its report printed), playbooks/launch.yml (the plan printed) and
playbooks/status.yml followed to the end of a reference run; a second run stopped with
playbooks/stop.yml as soon as a checkpoint is complete (no rank left, the GPU's memory free again),
then launched again: it resumes from the last complete checkpoint, and its losses from there are
compared with the reference run's. The final 16-bit model is loaded with from_pretrained and
generates. Last the summary table. OUT gets summary.json, preflight.json, plan.json, both runs'
metrics and launch logs: with the shell's e2e.log 8 files, what a device call brings back.

The run directories are on this machine, the cluster's only node: the checks (bench/gpu_node_checks.py)
read its files directly, as the lab tests read a node's through podman.
"""

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import gpu_node_checks as node

REPO = Path(__file__).resolve().parents[1]
MODELS = "/var/lib/dsmesh/models"
NODE = "gpu-node"
REF, STOPPED = "e2e-ref", "e2e-stop"

# What each mode trains. gpu: a Qwen2.5-0.5B shape (the planner's plan on the H200: ZeRO-0, compiled
# layers, ~0.3 s a step predicted), random init; a checkpoint is ~7 GB (bf16 weights, fp32 masters, Adam
# moments): one kept, saves at 20, 40 and 50 (the end). After the first, 30 steps and two saves (~30 s)
# leave room for the stop (playbooks/stop.yml took 7-10 s from start to the ranks' end on the loaded
# 2-core lab machine) before the run's end. lab: the lab's tiny Qwen2 on one CPU rank (the lab's
# settings, more steps: a step takes ~50 ms there).
PROFILES = {
    "gpu": {"model": "qwen2.5-0.5b", "preset": "qwen2.5-0.5b", "train_examples": 20000, "seq": 2048, "batch": 16,
            "train_args": {"max_steps": 50, "save_steps": 20, "save_total_limit": 1, "logging_steps": 1,
                           "learning_rate": 3.0e-4, "warmup_steps": 5, "random_init": True},
            "env": {}, "min_free_gib": 30, "loss_rtol": 1e-4},
    "lab": {"model": "tiny-qwen2", "preset": None, "train_examples": 1200, "seq": 128, "batch": 8,
            "train_args": {"max_steps": 200, "save_steps": 20, "save_total_limit": 1, "logging_steps": 2,
                           "learning_rate": 0.003, "warmup_steps": 2},
            "env": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": 1, "DEEPSPEED_TIMEOUT": 2}, "min_free_gib": 1,
            "loss_rtol": 1e-4},
}


def say(text=""):
    print(text, flush=True)


class StageFailed(RuntimeError):
    pass


class Stages:
    """Wall time of each stage, in order; a stage that raises is recorded as failed."""

    def __init__(self):
        self.rows = []

    def run(self, name, fn, *args, **kwargs):
        say(f"\n== {name}")
        started = time.time()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.rows.append({"stage": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            seconds = round(time.time() - started, 1)
            if not self.rows or self.rows[-1]["stage"] != name:
                self.rows.append({"stage": name, "ok": True})
            self.rows[-1]["seconds"] = seconds
            say(f"== {name}: {seconds} s{'' if self.rows[-1]['ok'] else ' (FAILED)'}")


def training_env(controller_path):
    """This process's environment less the controller's packages (PYTHONPATH), as a rank has it."""
    import os

    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != controller_path]
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        env.pop("PYTHONPATH", None)
    return env


def write_model(args, profile):
    model_dir = f"{MODELS}/{profile['model']}"
    if Path(model_dir, "config.json").is_file():
        say(f"{model_dir} exists: kept")
        return model_dir
    cmd = [args.python, "-m", "train.tiny_model", *(["--preset", profile["preset"]] if profile["preset"] else []),
           "--train-examples", str(profile["train_examples"]), model_dir]
    say("$ " + shlex.join(cmd))
    subprocess.run(cmd, cwd=REPO, env=training_env(args.controller_path), check=True)
    return model_dir


def write_inventory(args, profile, model_dir, path):
    import yaml

    inventory = {"all": {
        "vars": {
            "cluster_user": "root",
            "ansible_user": "root",
            "training_env_mode": "existing",
            "training_env_python": args.python,
            "training_env_model_dir": model_dir,
            "training_env_datasets": [f"{model_dir}/data/train.jsonl"],
            "deepspeed_job_max_seq_length": profile["seq"],
            "deepspeed_job_global_batch_size": profile["batch"],
            # the multi-GPU path, also on one GPU (where the planner would take the torch engine)
            "deepspeed_job_plan_overrides": {"engine": "deepspeed"},
            "deepspeed_job_train_args": profile["train_args"],
            "deepspeed_job_preflight_min_free_gib": profile["min_free_gib"],
            "deepspeed_job_env": profile["env"],
        },
        "children": {
            "cluster": {"hosts": {NODE: {"ansible_host": args.address, "cluster_address": args.address, "gpus": 1,
                                         "ansible_python_interpreter": args.python}}},
            "master": {"hosts": {NODE: None}},
        },
    }}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(inventory, sort_keys=False))
    say(Path(path).read_text())
    return Path(path).read_text()


class Driver:
    """The playbooks through dsmesh.api, each bounded by what is left of the call's budget."""

    def __init__(self, args, deadline):
        from dsmesh import api

        self.api, self.args, self.deadline = api, args, deadline

    def left(self):
        return max(30, int(self.deadline - time.time()))

    def call(self, action, what, **kwargs):
        """api.<action>(inventory, ...) that must succeed: the Result, else StageFailed with ansible's words."""
        from dsmesh import format as fmt

        result = getattr(self.api, action)(self.args.inventory, timeout=self.left(), **kwargs)
        if not result.ok:
            raise StageFailed(f"{what}: " + "; ".join(fmt.problem_lines(result) or [fmt.outcome_line(result)]))
        return result

    def status(self, name):
        return self.api.status(self.args.inventory, progress=None, timeout=60, deepspeed_job_run_name=name).job_status

    def follow(self, name, lines):
        """playbooks/status.yml every 3 s while the run runs, each change a line (dsmesh's own status
        view, as `dsmesh status --follow` prints it in a log), until the deadline. The last status."""
        from rich.console import Console

        from dsmesh import format as fmt
        from dsmesh.follow import StatusView, stamp

        last = None
        with StatusView(Console(file=sys.stdout, force_terminal=False, width=200)) as view:
            for result in self.api.follow_status(self.args.inventory, interval=3.0, progress=None, timeout=60,
                                                 deepspeed_job_run_name=name):
                if result.ok and result.job_status:
                    last = result.job_status
                    view.update(last)
                    line = fmt.status_line(last)
                    if not lines or lines[-1]["line"] != line:
                        lines.append({"time": stamp(), "run": name, "line": line})
                else:
                    view.note("could not read the status: " + "; ".join(fmt.problem_lines(result)))
                if time.time() > self.deadline:
                    break
        return last


def generate(args, model_dir):
    """from_pretrained + a few greedy tokens, in the training interpreter's own process."""
    proc = subprocess.run([args.python, "-m", "bench.gpu_node_checks", "generate", model_dir], cwd=REPO,
                          env=training_env(args.controller_path), capture_output=True, text=True, timeout=300)
    sys.stdout.write(proc.stdout[-3000:])
    found = [x for x in proc.stdout.splitlines() if x.startswith("DSMESH_GENERATE ")]
    if proc.returncode != 0 or not found:
        raise StageFailed(f"from_pretrained/generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found[-1].split(" ", 1)[1])


def stages_of_the_job(args, profile, run, stages, report):
    """Everything after the setup, in order; raises StageFailed (or anything) where it stops."""
    from dsmesh.plan_table import plan_lines

    out, checks, lines = Path(args.out), report["checks"], report["status_lines"]
    model_dir = stages.run("model: python -m train.tiny_model" + (f" --preset {profile['preset']}" if profile["preset"]
                                                                  else ""), write_model, args, profile)
    report["inventory"] = stages.run("inventory", write_inventory, args, profile, model_dir, args.inventory)
    stages.run("site.yml --tags env", run.call, "setup", "env", tags="env")
    stages.run("site.yml --tags data", run.call, "setup", "data", tags="data")

    pre = stages.run("playbooks/preflight.yml", lambda: run.api.preflight(args.inventory, timeout=run.left()))
    report["preflight"] = pre.preflight
    (out / "preflight.json").write_text(json.dumps(pre.preflight, indent=2, default=str))
    say("\n".join((pre.preflight or {}).get("report") or ["(no preflight report)"]))
    checks["preflight"] = {"ok": pre.ok, "seconds": (pre.preflight or {}).get("seconds")}
    if not pre.ok:
        raise StageFailed("preflight failed: see its report")

    launched = stages.run(f"playbooks/launch.yml --skip-tags preflight ({REF})", run.call, "launch", "launch",
                          skip_tags="preflight", deepspeed_job_run_name=REF)
    say("\n".join(plan_lines(launched.plan)) if launched.plan else "(no plan reported)")
    for name in ("hostfile", ".deepspeed_env"):  # what gpu_facts found (NCCL_SOCKET_IFNAME) reaches the ranks so
        say(f"-- {name}\n" + node.tail_of(f"{node.run_dir(REF)}/{name}").decode(errors="replace"))
    (out / "plan.json").write_bytes(node.tail_of(f"{node.run_dir(REF)}/plan.json"))
    ref = stages.run(f"{REF}: playbooks/status.yml followed to its end", run.follow, REF, lines) or {}
    checks["uninterrupted run finished"] = {"ok": ref.get("state") == "finished", "state": ref.get("state")}
    plan = node.read_json(f"{node.run_dir(REF)}/plan.json") or {}
    report["memory"] = {"predicted_peak_allocated_gib": plan.get("predicted_peak_allocated_gib"),
                        "predicted_peak_reserved_gib": plan.get("predicted_peak_reserved_gib"),
                        "measured": node.measured_peak(node.metrics(REF))}
    report["reference_summary"] = node.read_json(f"{node.output_dir(REF)}/summary.json")
    if ref.get("state") != "finished":
        raise StageFailed(f"{REF} ended {ref.get('state')}")

    stages.run(f"playbooks/launch.yml --skip-tags preflight ({STOPPED})", run.call, "launch", "launch",
               skip_tags="preflight", deepspeed_job_run_name=STOPPED)
    # Status lines in a thread while this one stops the run as soon as a checkpoint is complete.
    follower = threading.Thread(target=run.follow, args=(STOPPED, lines), daemon=True)
    follower.start()
    step = stages.run(f"{STOPPED}: until a checkpoint is complete", node.wait_for_checkpoint, STOPPED, run.deadline)
    if step is None:
        follower.join(timeout=30)
        raise StageFailed(f"{STOPPED}: no complete checkpoint before it ended or the deadline")
    say(f"checkpoint-{step} is complete: stopping {STOPPED}")
    stages.run("playbooks/stop.yml", run.call, "stop", "stop", deepspeed_job_run_name=STOPPED)
    follower.join(timeout=30)
    stopped = run.status(STOPPED) or {}
    complete_at_stop = node.complete_checkpoints(STOPPED)
    max_steps = profile["train_args"]["max_steps"]
    checks["stopped mid-way after a checkpoint"] = {
        "ok": stopped.get("state") == "stopped" and bool(complete_at_stop) and (stopped.get("step") or 0) < max_steps,
        "state": stopped.get("state"), "last_step": stopped.get("step"), "max_steps": max_steps,
        "complete_checkpoints": complete_at_stop}
    left = node.ranks_left(args.address, STOPPED)
    checks["no rank left"] = {"ok": not left, "found": left}
    checks["GPU memory free again"] = node.gpu_memory_freed(report["gpu_memory_before"])
    for name in ("stopped mid-way after a checkpoint", "no rank left", "GPU memory free again"):
        say(f"{name}: {json.dumps(checks[name])}")

    # the relaunch trims metrics.jsonl to the checkpoint: keep the steps the first attempt ran after it (in
    # summary.json's loss rows; a device call brings back 8 files)
    first_attempt = node.metrics(STOPPED)
    stages.run(f"playbooks/launch.yml --skip-tags preflight ({STOPPED} again)", run.call, "launch", "relaunch",
               skip_tags="preflight", deepspeed_job_run_name=STOPPED)
    resumed = stages.run(f"{STOPPED}: resumed, followed to its end", run.follow, STOPPED, lines) or {}
    summary = node.read_json(f"{node.output_dir(STOPPED)}/summary.json") or {}
    report["resumed_summary"], report["resume"] = summary, resumed.get("resume")
    resumed_from = summary.get("resumed_from_step")
    checks["resumed from the last complete checkpoint"] = {
        "ok": resumed.get("state") == "finished" and bool(complete_at_stop) and resumed_from == complete_at_stop[-1],
        "state": resumed.get("state"), "resumed_from_step": resumed_from, "resume": (resumed.get("resume") or {}).get("line")}
    if resumed.get("state") != "finished":
        raise StageFailed(f"{STOPPED} after the relaunch: {resumed.get('state')}")
    checks["losses continue from the checkpoint"] = node.compare_losses(
        node.metrics(REF), first_attempt, node.metrics(STOPPED), resumed_from or 0, profile["loss_rtol"])
    report["final_model"] = node.final_model_facts(STOPPED)
    report["generate"] = stages.run("from_pretrained + generate", generate, args, report["final_model"]["final_model"])
    checks["final model loads and generates"] = {"ok": report["generate"]["new_tokens"] > 0,
                                                 "dtype": report["generate"]["dtype"]}


def main_e2e(args):
    started = time.time()
    deadline = started + args.budget - args.setup_seconds
    profile = PROFILES["lab" if args.lab else "gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    report = {"mode": "lab" if args.lab else "gpu", "address": args.address, "python": args.python,
              "profile": profile, "setup_seconds": args.setup_seconds, "stages": stages.rows, "checks": {},
              "status_lines": [], "gpu_memory_before": node.gpu_memory()}
    run = Driver(args, deadline)
    try:
        stages_of_the_job(args, profile, run, stages, report)
    except Exception as exc:  # StageFailed, or an answer nobody expected: keep what was measured
        report["error"] = str(exc) if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"
        say(f"\nstopped early: {report['error']}")
    finally:
        for name in (REF, STOPPED):
            if Path(node.run_dir(name), "launches.json").exists() and not Path(node.run_dir(name), "exit_code").exists():
                say(f"{name} still running: stopping it")
                try:
                    run.api.stop(args.inventory, progress=None, timeout=120, deepspeed_job_run_name=name)
                except Exception as exc:  # the summary below must still be written
                    say(f"could not stop {name}: {exc}")
        for name in (REF, STOPPED):
            (out / f"metrics_{name}.jsonl").write_bytes(node.tail_of(f"{node.output_dir(name)}/metrics.jsonl"))
            (out / f"launch_{name}.log").write_bytes(node.launch_logs(name).encode()[-(4 << 20):])
        report["wall_seconds"] = round(time.time() - started + args.setup_seconds, 1)
        (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
        say("\n".join(node.summary_lines(report)))
    ok = "error" not in report and all(c.get("ok") is not False for c in report["checks"].values())
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the logs and JSON go")
    p.add_argument("--address", required=True, help="this node's cluster address")
    p.add_argument("--python", required=True, help="the training interpreter (the machine's python3)")
    p.add_argument("--controller-path", default="", help="the controller's package directory (kept from the ranks)")
    p.add_argument("--setup-seconds", type=float, default=0.0, help="seconds the setup took before this")
    p.add_argument("--budget", type=float, default=560.0,
                   help="seconds for the whole call, setup included (the device's 10-minute command limit)")
    p.add_argument("--inventory", default="/var/lib/dsmesh/e2e/inventory.yml", help="where to write the inventory")
    p.add_argument("--lab", action="store_true", help="CPU ranks and the lab's tiny model")
    return main_e2e(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
