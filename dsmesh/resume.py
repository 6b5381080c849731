"""The launch's resume step, run on the master before the job starts, and the copies between nodes
that it and the supervisor make (standard library only; the plan is module_utils/resume.py).

    python -m dsmesh.resume plan  --run-dir D --output-dir O --nodes-json N --master M --job-json J
    python -m dsmesh.resume apply --run-dir D --output-dir O --nodes-json N --master M --job-json J \\
        --rendered-plan-json P
    python -m dsmesh.resume survey --output-dir O          (on a node: what it holds, one JSON line)
    python -m dsmesh.resume pull --output-dir O --from ADDR --step N [--ranks R ...] [--base] [--universal]
    python -m dsmesh.resume replicate --output-dir O --from ADDR --step N    (the supervisor's ring copy)
    python -m dsmesh.resume remove --output-dir O --steps N ...

plan surveys every node of the launch (pdsh), decides (plan_resume) and prints the plan as JSON: the
plan overrides and DeepSpeed config the render must use, or the reason the checkpoints cannot be
carried. apply surveys and decides again, checks the render kept the plan, then gathers the ranks'
files on the master, converts the checkpoint to DeepSpeed's universal format (ds_to_universal) when
the world size changed, has every node pull what it lacks, removes later checkpoints that are not
complete everywhere, and writes RUN_DIR/resume.json for the start to file with the launch. Its
progress goes to RUN_DIR/logs/resume-<time>.log. Copies are pulled by the node that gets them
(rsync over the mesh), data first and its marker last, so a copy cut short is never counted.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.hostfile import HostfileError
from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh import node_errors, node_lines, pdsh_argv
from ansible_collections.dsmesh.cluster.plugins.module_utils.resume import (
    RANK_FILE,
    UNIVERSAL_SUFFIX,
    ResumeError,
    check_rendered,
    check_rsync,
    check_space,
    launch_hosts,
    plan_resume,
    rank_of,
)

MARKERS = (rundir.CHECKPOINT_MARKER, rundir.REPLICA_MARKER, rundir.UNIVERSAL_MARKER)


def survey(output_dir):
    """What this node holds of the run (module_utils/resume.py describes the dict)."""
    probe = output_dir
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    found = {"run": rundir.read_json(os.path.join(output_dir, rundir.RUN_RECORD)),
             "free_bytes": shutil.disk_usage(probe).free, "rsync": shutil.which("rsync") is not None,
             "checkpoints": {}}
    for step, path in rundir.checkpoint_dirs(output_dir):
        tag = rundir.read_text(os.path.join(path, "latest")) or f"global_step{step}"
        tag_dir = os.path.join(path, tag)
        entry = {"marker": rundir.read_json(os.path.join(path, rundir.CHECKPOINT_MARKER)),
                 "replica": rundir.read_json(os.path.join(path, rundir.REPLICA_MARKER)),
                 "universal": rundir.universal_tag(path), "tag": tag if os.path.isdir(tag_dir) else None,
                 "rank_bytes": {}}
        names = [(tag_dir, n) for n in _listdir(tag_dir)] + [(path, n) for n in _listdir(path)]
        for directory, name in names:
            rank = rank_of(name)
            if rank is not None:
                size = os.path.getsize(os.path.join(directory, name))
                entry["rank_bytes"][str(rank)] = entry["rank_bytes"].get(str(rank), 0) + size
        found["checkpoints"][str(step)] = entry
    return found


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _rsync(source, dest, filters=(), delete=False):
    """rsync -a from `source` (ADDR:path/) into `dest`, then flushed to disk (rsync's own --fsync
    needs 3.2.4, newer than Ubuntu 22.04's); raises with rsync's words."""
    argv = ["rsync", "-a", "--mkpath", *filters] + (["--delete"] if delete else []) + [source, dest]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        words = " ".join(proc.stderr.strip().splitlines()[-2:])
        raise OSError(f"rsync {source} {dest} failed ({proc.returncode}): {words}")
    os.sync()


def _rank_filters(tag, ranks):
    rules = [f"--include=/{tag}/"]
    for rank in ranks:
        rules += [f"--include=/{tag}/*zero_pp_rank_{rank}_mp_rank_*_states.pt", f"--include=/rng_state_{rank}.pth"]
    return rules + ["--exclude=*"]


def _base_filters(tag):
    """The checkpoint's files common to all ranks: the Trainer's, DeepSpeed's `latest` and the
    non-partitioned model states, without any rank's files, copies or marks."""
    rules = [f"--exclude=/{name}" for name in MARKERS] + ["--exclude=/rng_state_*", "--exclude=/latest_universal",
                                                          f"--exclude=/*{UNIVERSAL_SUFFIX}/", "--exclude=/.*"]
    return rules + [f"--include=/{tag}/", f"--exclude=/{tag}/*zero_pp_rank_*", "--include=/*", f"--include=/{tag}/*",
                    "--exclude=*"]


def pull(output_dir, source, step, ranks=(), base=False, universal=False, replica=False):
    """Copy what this node lacks of checkpoint-`step` from the node at `source`, then mark it here."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    remote = f"{source}:{path}/"
    os.makedirs(path, exist_ok=True)
    staging = os.path.join(path, ".incoming-marks")
    _rsync(remote, staging + "/", [f"--include=/{n}" for n in MARKERS + ("latest", "latest_universal")]
           + ["--exclude=*"], delete=True)
    theirs = rundir.read_json(os.path.join(staging, rundir.CHECKPOINT_MARKER))
    tag = rundir.read_text(os.path.join(staging, "latest")) or f"global_step{step}"
    if replica:
        if not theirs:
            raise OSError(f"{source}: checkpoint-{step} is not marked complete there")
        ranks = theirs.get("ranks", [])
    if ranks:
        _rsync(remote, path + "/", _rank_filters(tag, ranks))
    if universal:
        utag = rundir.read_text(os.path.join(staging, "latest_universal"))
        umarker = rundir.read_json(os.path.join(staging, rundir.UNIVERSAL_MARKER))
        if not utag or not umarker or umarker.get("tag") != utag:
            raise OSError(f"{source}: checkpoint-{step} has no complete universal copy")
        _rsync(f"{remote}{utag}/", os.path.join(path, utag) + "/", delete=True)
    if base:
        if not theirs:
            raise OSError(f"{source}: checkpoint-{step} is not marked complete there")
        _rsync(remote, path + "/", _base_filters(tag))
    if universal:
        rundir.write_atomic(os.path.join(path, "latest_universal"), utag)
        rundir.write_json_atomic(os.path.join(path, rundir.UNIVERSAL_MARKER), dict(umarker, copied_from=source))
    if replica:
        mine = rundir.read_json(os.path.join(path, rundir.REPLICA_MARKER)) or {}
        rundir.write_json_atomic(os.path.join(path, rundir.REPLICA_MARKER), {
            "ranks": sorted(set(mine.get("ranks", [])) | set(ranks)), "from": source, "step": step,
            "time": time.time()})
    elif ranks or base:
        mine = rundir.read_json(os.path.join(path, rundir.CHECKPOINT_MARKER)) or dict(theirs or {})
        mine.update(ranks=sorted(set(mine.get("ranks", []) if not base else []) | set(ranks)), copied_from=source,
                    time=time.time())
        rundir.write_json_atomic(os.path.join(path, rundir.CHECKPOINT_MARKER), mine)
    shutil.rmtree(staging, ignore_errors=True)


def replicate(output_dir, source, step, wait=15.0):
    """The supervisor's ring copy: once checkpoint-`step` is marked here and on `source`, take
    `source`'s own ranks of it. False if the step is gone or never got both marks in time."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    deadline = time.time() + wait
    while True:
        if not os.path.isdir(path):
            return False
        if os.path.isfile(os.path.join(path, rundir.CHECKPOINT_MARKER)):
            try:
                pull(output_dir, source, step, replica=True)
                return True
            except OSError:
                if time.time() > deadline:
                    raise
        elif time.time() > deadline:
            return False
        time.sleep(1.0)


def remove(output_dir, steps):
    """Delete checkpoints, their marker first (a deletion cut short never leaves a marked part)."""
    for step in steps:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        for name in MARKERS:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        rundir.fsync_dir(path)
        shutil.rmtree(path, ignore_errors=True)


def node_command(argv):
    """The shell command that runs this program with `argv` on another node (same interpreter and
    code directory on every node, as DeepSpeed's runner requires)."""
    return (f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m dsmesh.resume "
            + " ".join(shlex.quote(str(a)) for a in argv))


class Log:
    """Progress lines to the resume log and stderr."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def __call__(self, message):
        line = f"[dsmesh.resume {time.strftime('%H:%M:%S')}] {message}"
        with self.lock:
            print(line, file=sys.stderr, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line + "\n")


def survey_nodes(hosts, master, output_dir):
    """{node name: survey or {"error"}} of every host: the master's own disk, the others through pdsh."""
    found = {master: survey(output_dir)}
    others = [h for h in hosts if h["name"] != master]
    if not others:
        return found
    addresses = [h["address"] for h in others]
    proc = subprocess.run(pdsh_argv(addresses, node_command(["survey", "--output-dir", output_dir]),
                                    command_timeout=120), capture_output=True, text=True)
    lines, errors = node_lines(proc.stdout), node_errors(proc.stderr, addresses)
    for host in others:
        text = "\n".join(lines.get(host["address"], []))
        try:
            found[host["name"]] = json.loads(text)
        except ValueError:
            why = errors.get(host["address"]) or (text[-300:] if text else "no answer")
            found[host["name"]] = {"error": f"{host['address']}: {why}"}
    return found


def decide(args):
    hosts = launch_hosts(json.loads(args.nodes_json), args.master)
    job = json.loads(args.job_json)
    surveys = survey_nodes(hosts, args.master, args.output_dir)
    plan = plan_resume(surveys, hosts, job, args.master)
    errors = check_space(plan, surveys) + check_rsync(plan, surveys) if plan["state"] == "resume" else []
    if errors:
        raise ResumeError("\n".join(errors))
    return hosts, surveys, plan


def _run_copy(copy, hosts, output_dir, step, log):
    address = {h["name"]: h["address"] for h in hosts}
    argv = ["pull", "--output-dir", output_dir, "--from", address[copy["from"]], "--step", step]
    argv += ["--ranks", *copy["ranks"]] if copy["ranks"] else []
    argv += ["--base"] if copy["base"] else []
    argv += ["--universal"] if copy["universal"] else []
    started = time.time()
    if copy["to"] == hosts[0]["name"]:
        pull(output_dir, address[copy["from"]], step, copy["ranks"], copy["base"], copy["universal"])
    else:
        proc = subprocess.run(pdsh_argv([address[copy["to"]]], node_command(argv)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{copy['to']}: copying checkpoint-{step} from {copy['from']} failed: "
                          + (proc.stderr.strip() or proc.stdout.strip())[-600:])
    log(f"{copy['to']}: got {' '.join(map(str, argv[7:])) or 'nothing'} from {copy['from']} in {time.time() - started:.1f}s")


def _parallel(copies, hosts, output_dir, step, log):
    """Each node's copies in turn, the nodes at once; the first failure is raised."""
    failures = []

    def work(node_copies):
        try:
            for copy in node_copies:
                _run_copy(copy, hosts, output_dir, step, log)
        except OSError as exc:
            failures.append(str(exc))

    by_node = {}
    for copy in copies:
        by_node.setdefault(copy["to"], []).append(copy)
    threads = [threading.Thread(target=work, args=(c,)) for c in by_node.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise OSError("; ".join(failures))


def convert_workers(checkpoint_dir):
    """ds_to_universal's workers: each extract worker holds one rank's optimizer file in memory."""
    sizes = [os.path.getsize(os.path.join(checkpoint_dir, n)) for n in _listdir(checkpoint_dir)
             if RANK_FILE.match(n) and n.endswith("optim_states.pt")] or [1]
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    by_memory = max(1, int(available // (3 * max(sizes))))
    cores = os.cpu_count() or 1
    return max(1, min(8, cores, by_memory)), max(1, min(4, cores, by_memory))


def convert(output_dir, step, tag, from_world, log):
    """checkpoint-N/TAG (every rank's files on this node) to checkpoint-N/TAG_universal, marked."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    staging = os.path.join(path, ".universal-staging")
    shutil.rmtree(staging, ignore_errors=True)
    utag = tag + UNIVERSAL_SUFFIX
    extract, merge = convert_workers(os.path.join(path, tag))
    argv = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(path, tag),
            "--output_folder", os.path.join(staging, utag), "--num_extract_workers", str(extract),
            "--num_merge_workers", str(merge)]
    log(f"converting checkpoint-{step} ({from_world} ranks) to the universal format: {' '.join(argv[1:])}")
    started = time.time()
    # on the CPU, before any GPU is held
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith("***") or "Error" in line:
            log(f"ds_to_universal: {line}")
    if proc.wait() != 0:
        raise OSError(f"ds_to_universal failed ({proc.returncode}) on checkpoint-{step}:\n  " + "\n  ".join(tail))
    final = os.path.join(path, utag)
    if os.path.exists(final):
        shutil.rmtree(final)  # an earlier conversion cut short (it was never marked)
    os.rename(os.path.join(staging, utag), final)
    rundir.write_atomic(os.path.join(path, "latest_universal"), utag)
    took = time.time() - started
    rundir.write_json_atomic(os.path.join(path, rundir.UNIVERSAL_MARKER), {
        "tag": utag, "from_world_size": from_world, "seconds": round(took, 1), "time": time.time()})
    shutil.rmtree(staging, ignore_errors=True)
    log(f"converted checkpoint-{step} in {took:.1f}s")
    return took


def remove_everywhere(removals, hosts, output_dir, log):
    address = {h["name"]: h["address"] for h in hosts}
    for node, steps in sorted(removals.items()):
        if node == hosts[0]["name"]:
            remove(output_dir, steps)
        else:
            argv = pdsh_argv([address[node]], node_command(["remove", "--output-dir", output_dir, "--steps", *steps]),
                             command_timeout=300)
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(f"{node}: removing {steps} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        log(f"{node}: removed {', '.join(f'checkpoint-{s}' for s in steps)}")


def apply(args, log):
    hosts, surveys, plan = decide(args)
    report = {"time": time.time(), "state": plan["state"], "notes": plan["notes"], "log": log.path}
    for note in plan["notes"]:
        log(note)
    if plan["state"] != "resume":
        return report
    rendered = json.loads(args.rendered_plan_json or "{}")
    errors = check_rendered(plan, rendered)
    if errors:
        raise ResumeError("the render did not keep what the resume needs: " + "; ".join(errors)
                          + ". Nothing was changed; launch again")
    step, started = plan["step"], time.time()
    _parallel(plan["gather"], hosts, args.output_dir, step, log)
    converted = convert(args.output_dir, step, plan["tag"], plan["written"]["world_size"], log) \
        if plan["convert"] else None
    _parallel(plan["copies"], hosts, args.output_dir, step, log)
    remove_everywhere(plan["remove"], hosts, args.output_dir, log)
    report.update({key: plan[key] for key in ("step", "checkpoint", "written", "world_size", "universal", "convert",
                                              "remove", "plan_overrides", "config_overrides")})
    report.update(layout={"world_size": plan["world_size"],
                          "per_device_train_batch_size": rendered.get("micro_batch_size"),
                          "gradient_accumulation_steps": rendered.get("gradient_accumulation_steps")},
                  convert_seconds=converted, copies=plan["gather"] + plan["copies"],
                  seconds=round(time.time() - started, 1))
    log(f"resume step done in {report['seconds']}s")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("plan", "apply", "survey", "pull", "replicate", "remove"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--output-dir", required=True)
        if name in ("plan", "apply"):
            cmd.add_argument("--run-dir", required=True)
            cmd.add_argument("--nodes-json", required=True, help="the launch's nodes: [{name, address, slots}, ...]")
            cmd.add_argument("--master", required=True)
            cmd.add_argument("--job-json", required=True, help="model_dir, max_seq_length, lora, global_batch_size, "
                                                               "plan_overrides")
        if name == "apply":
            cmd.add_argument("--rendered-plan-json", help="the render's plan (micro_batch_size, ...)")
        if name in ("pull", "replicate"):
            cmd.add_argument("--from", dest="source", required=True, help="address of the node to copy from")
            cmd.add_argument("--step", type=int, required=True)
        if name == "pull":
            cmd.add_argument("--ranks", type=int, nargs="+", default=[])
            cmd.add_argument("--base", action="store_true")
            cmd.add_argument("--universal", action="store_true")
        if name == "replicate":
            cmd.add_argument("--wait", type=float, default=15.0)
        if name == "remove":
            cmd.add_argument("--steps", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    output_dir = os.path.abspath(args.output_dir)
    args.output_dir = output_dir
    try:
        if args.command == "survey":
            print(json.dumps(survey(output_dir), sort_keys=True))
        elif args.command == "pull":
            pull(output_dir, args.source, args.step, args.ranks, args.base, args.universal)
        elif args.command == "replicate":
            print(json.dumps({"replicated": replicate(output_dir, args.source, args.step, args.wait)}))
        elif args.command == "remove":
            remove(output_dir, args.steps)
        elif args.command == "plan":
            _, _, plan = decide(args)
            print(json.dumps(plan, sort_keys=True))
        else:
            log = Log(os.path.join(args.run_dir, rundir.LOGS, f"resume-{time.strftime('%Y%m%d-%H%M%S')}.log"))
            report = apply(args, log)
            rundir.write_json_atomic(os.path.join(args.run_dir, rundir.RESUME), report)
            print(json.dumps(report, sort_keys=True))
    except (ResumeError, HostfileError) as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(2)
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)


if __name__ == "__main__":
    main()
