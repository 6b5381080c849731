"""`make bench-launch`: time from `ansible-playbook site.yml` to the first training step on a fresh
2-node lab, with the share of each phase. Target: the preflight on 2 nodes under 30 s.

Each play's start is stamped as its banner appears; the first step's time comes from the first line
of metrics.jsonl (the lab's containers share this machine's clock). The lab (LAB_PREFIX=dsbench-launch)
is removed at the end.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from lab import Lab  # noqa: E402

PHASES = {  # play name (prefix) -> phase
    "Check the inventory": "inventory check + login",
    "Passwordless SSH mesh": "ssh mesh",
    "Pdsh on every node": "pdsh",
    "The training environment": "environment + data",
    "Preflight from the master": "preflight",
    "Launch the job": "render + launch",
}


def main():
    nodes = int(os.environ.get("BENCH_NODES", "2"))
    lab = Lab("dsbench-launch", nodes).up(fresh=True)
    try:
        cmd = [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", str(lab.inventory), "site.yml",
               "-e", "deepspeed_job_run_name=bench"]
        stamps = []
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("PLAY [") and not line.startswith("PLAY RECAP"):
                name = line[len("PLAY ["):line.index("]")]
                phase = next((p for k, p in PHASES.items() if name.startswith(k)), name)
                stamps.append((phase, time.time()))
        rc = proc.wait()
        ended = time.time()
        if rc != 0:
            print("".join(output[-60:]))
            raise SystemExit(f"site.yml failed ({rc})")
        master = lab.names()[0]
        first_step = None
        deadline = time.time() + 300
        while first_step is None and time.time() < deadline:
            out = lab.exec(master, "head -1 /var/lib/dsmesh/runs/bench/output/metrics.jsonl 2>/dev/null || true").stdout
            if out.strip():
                first_step = json.loads(out)["time"]
            else:
                time.sleep(0.5)
        if first_step is None:
            raise SystemExit("no training step within 5 minutes of the launch")
        stamps.append(("launcher start-up to first step", ended))
        marks = stamps + [("end", first_step)]
        total = first_step - start
        print(f"\nsite.yml start -> first training step on a {nodes}-node lab: {total:.1f} s\n")
        print(f"{'phase':<34} {'seconds':>8} {'share':>7}")
        durations = {}
        for (phase, t0), (_, t1) in zip(marks, marks[1:]):
            durations[phase] = durations.get(phase, 0) + (t1 - t0)
        for phase, d in durations.items():
            print(f"{phase:<34} {d:8.1f} {100 * d / total:6.1f}%")
        preflight = durations.get("preflight", float("nan"))
        ok = preflight < 30
        print(f"\ntarget: preflight on {nodes} nodes under 30 s: {preflight:.1f} s -> {'PASS' if ok else 'FAIL'}")
        print(json.dumps({"bench": "launch", "nodes": nodes, "total_s": round(total, 1),
                          "phases_s": {k: round(v, 1) for k, v in durations.items()}, "preflight_pass": ok}))
        lab.playbook("playbooks/stop.yml", "-e", "deepspeed_job_run_name=bench")
        return 0 if ok else 1
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
