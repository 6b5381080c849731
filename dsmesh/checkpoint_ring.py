"""The supervisor's copies of checkpoints between nodes without shared storage: every node's ranks of
each new checkpoint go to the next node of the ring, so that the state of every rank survives the
loss of any one node (a relaunch on the nodes left resumes from it; dsmesh.resume).

Once the master marks a new checkpoint, each node pulls its predecessor's ranks of it (dsmesh.resume
replicate, through pdsh), which waits for both marks and writes replica_complete.json last. Training
goes on meanwhile; a copy cut short is never counted.
"""
import subprocess
import threading
import time

from ansible_collections.dsmesh.cluster.plugins.module_utils import rundir
from ansible_collections.dsmesh.cluster.plugins.module_utils.pdsh import pdsh_argv
from dsmesh.resume import node_command


def newest_marked(output_dir):
    steps = [step for step, path in rundir.checkpoint_dirs(output_dir) if rundir.read_json(
        f"{path}/{rundir.CHECKPOINT_MARKER}")]
    return steps[-1] if steps else None


class CheckpointRing:
    def __init__(self, nodes, output_dir, log, poll=2.0):
        self.nodes, self.output_dir, self.log, self.poll = list(nodes), output_dir, log, poll
        self.done = newest_marked(output_dir) or 0  # those of earlier launches were copied then
        self.stopping = threading.Event()
        self.procs = []
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def start(self):
        if len(self.nodes) > 1:
            self.thread.start()
        return self

    def watch(self):
        while not self.stopping.is_set():
            self.copy_newest()
            self.stopping.wait(self.poll)
        self.copy_newest()  # the job's last checkpoint

    def copy_newest(self):
        step = newest_marked(self.output_dir)
        if step is None or step <= self.done:
            return
        self.done = step
        started = time.time()
        self.procs = [subprocess.Popen(
            pdsh_argv([node], node_command(["replicate", "--output-dir", self.output_dir, "--from",
                                            self.nodes[i - 1], "--step", step])),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i, node in enumerate(self.nodes)]
        failed = []
        for node, proc in zip(self.nodes, self.procs):
            out = proc.communicate()[0]
            if proc.returncode != 0 or '"replicated": true' not in out:
                failed.append(f"{node}: {' '.join(out.split())[-300:] or f'exit {proc.returncode}'}")
        if failed:
            self.log(f"checkpoint-{step}: not every node holds its predecessor's ranks: {'; '.join(failed)}")
        else:
            self.log(f"checkpoint-{step}: every node holds its predecessor's ranks too "
                     f"({time.time() - started:.1f}s)")

    def finish(self, wait):
        """Stop watching; the copy under way (and that of a checkpoint marked since) gets `wait` seconds."""
        if not self.thread.is_alive():
            return
        self.stopping.set()
        self.thread.join(wait)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        if self.thread.is_alive():
            self.log("checkpoint copies between nodes cut short at the end of the job")
