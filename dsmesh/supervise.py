"""Runs the deepspeed launcher for a run on the master and ends the whole job as soon as one node
is lost, instead of letting the other ranks wait in a collective for DeepSpeed's timeout.

    python -m dsmesh.supervise --run-dir DIR --output-dir OUT --nodes a,b

The launcher's argv is read from DIR/launch_command.json, so that this process's own command line
never matches the marker that finds the run's ranks (--output_dir=OUT, rundir.rank_marker).

- passes the launcher's output through (the caller sends it to the run's log);
- when pdsh reports a node's session ended badly (`pdsh@m: node2: ssh exited with exit code 255`,
  which a frozen node produces once ssh's keepalives give up), it interrupts the launcher after a short
  grace, escalating to SIGTERM and SIGKILL, then ends any rank of this run still alive on any node;
- on SIGTERM or SIGINT (playbooks/stop.yml) it does the same;
- writes DIR/exit_code ("0", the launcher's code, or "stopped") and DIR/failure.json (node, reason);
- with --checkpoint-ring, copies every node's ranks of each new checkpoint to the next node while the
  job runs (dsmesh.checkpoint_ring), and lets the last copy finish before it writes exit_code.
"""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh import node_exit, pdsh_argv
from dsmesh.checkpoint_ring import CheckpointRing


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.failure = None
        self.stop_requested = False
        self.shutdown_started = threading.Event()
        self.proc = None

    def log(self, message):
        print(f"[dsmesh.supervise {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def watch_output(self):
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            ended = node_exit(line)
            if ended and ended[1] != "0" and self.failure is None:
                node, code = ended
                self.failure = {"node": node, "reason": line.strip(), "time": time.time()}
                self.log(f"lost {node} (ssh exit {code}): ending the job on every node")
                threading.Thread(target=self.shutdown, args=(self.args.grace,), daemon=True).start()

    def shutdown(self, grace):
        """Interrupt the launcher (it ends the ranks through pdsh), then escalate."""
        if self.shutdown_started.is_set():
            return
        self.shutdown_started.set()
        if self.proc.poll() is None and grace:
            time.sleep(grace)  # the launcher may end by itself first
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                return
            self.log(f"sending {signal.Signals(sig).name} to the launcher")
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue

    def kill_leftover_ranks(self):
        """Ranks stuck in a collective with a lost peer outlive the launcher: end them everywhere."""
        if not self.args.nodes or not self.args.output_dir:
            return
        cmd = pdsh_argv(self.args.nodes.split(","), rundir.kill_ranks_command(self.args.output_dir), command_timeout=30)
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def on_signal(self, signum, frame):
        self.stop_requested = True
        self.log(f"{signal.Signals(signum).name} received: stopping the job")
        threading.Thread(target=self.shutdown, args=(0,), daemon=True).start()

    def run(self):
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        # Its own session: DeepSpeed's runner signals its whole process group when interrupted.
        self.proc = subprocess.Popen(self.args.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        reader = threading.Thread(target=self.watch_output, daemon=True)
        reader.start()
        ring = CheckpointRing(self.args.checkpoint_ring.split(","), self.args.output_dir, self.log).start() \
            if self.args.checkpoint_ring and self.args.output_dir else None
        rc = self.proc.wait()
        reader.join(timeout=5)
        if self.failure or self.stop_requested or rc != 0:
            self.log("ending any rank of this run left on any node")
            self.kill_leftover_ranks()
            # whatever the launcher's group left behind on this node (pdsh, ssh)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if ring:
            ring.finish(10 if self.stop_requested else 300 if rc == 0 and not self.failure else 30)
        if self.failure:
            self.failure["launcher_exit_code"] = rc
            rundir.write_json_atomic(os.path.join(self.args.run_dir, rundir.FAILURE), self.failure)
        code = rundir.STOPPED if self.stop_requested else str(rc if not self.failure or rc else 1)
        rundir.write_atomic(os.path.join(self.args.run_dir, rundir.EXIT_CODE), code + "\n")
        self.log(f"launcher ended with exit code {rc}; job {'stopped' if self.stop_requested else 'exit ' + code}")
        return 0 if code == "0" else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--output-dir", help="the run's output directory: its ranks carry --output_dir=OUTPUT_DIR")
    p.add_argument("--nodes", help="comma-separated addresses of every node, for the final clean-up")
    p.add_argument("--checkpoint-ring", help="comma-separated addresses of every node when they do not share the "
                                             "output directory: each copies its predecessor's ranks of every new "
                                             "checkpoint (dsmesh.checkpoint_ring)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds the launcher gets to end by itself after a node is lost")
    args = p.parse_args(argv)
    args.command = rundir.read_json(os.path.join(args.run_dir, rundir.LAUNCH_COMMAND))
    if not isinstance(args.command, list):
        p.error(f"{args.run_dir}/{rundir.LAUNCH_COMMAND}: no launch command")
    for stale in (rundir.EXIT_CODE, rundir.FAILURE):
        path = os.path.join(args.run_dir, stale)
        if os.path.exists(path):
            os.remove(path)
    sys.exit(Supervisor(args).run())


if __name__ == "__main__":
    main()
