"""Runs the preflight's probes from the master: BatchMode ssh to every node, dsmesh.probe on every
node through pdsh, and a short all-reduce through `deepspeed --hostfile` (the launch path itself).
Nothing is written on any node except a temporary hostfile and env file on the master, removed after."""
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .hostfile import render_hostfile
from .launch import launcher_argv
from .pdsh import pdsh_argv
from .rank_env import render_env


def check_mesh(addresses, timeout=10):
    """{address: (ok, detail)} for BatchMode ssh with strict host key checking."""
    def one(address):
        proc = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                               "-o", f"ConnectTimeout={timeout}", address, "true"],
                              capture_output=True, text=True, timeout=timeout + 20)
        return address, (proc.returncode == 0, None if proc.returncode == 0 else
                         f"ssh {address} failed: {proc.stderr.strip() or proc.returncode}")
    with ThreadPoolExecutor(max_workers=min(32, len(addresses) or 1)) as pool:
        return dict(pool.map(one, addresses))


def run_probes(addresses, python, code_dir, paths, disk, checksum=True, timeout=10, markers=()):
    """pdsh stdout, stderr, and the master's clock before and after."""
    args = [python, "-m", "dsmesh.probe"] + [f"--path={k}={v}" for k, v in paths.items()]
    if disk:
        args.append(f"--disk={disk}")
    if not checksum:
        args.append("--no-checksum")
    args += [f"--marker={m}" for m in markers]
    remote = f"cd {shlex.quote(code_dir)} && " + " ".join(shlex.quote(a) for a in args)
    cmd = pdsh_argv(addresses, remote, connect_timeout=timeout)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout, proc.stderr, started, time.time()


class Collective:
    """dsmesh.allreduce launched with `deepspeed --hostfile` from code_dir, in the background, so the
    other checks run meanwhile; cancel() ends it (a node found down would make it hang)."""

    def __init__(self, entries, launcher, master_addr, master_port, code_dir, env, timeout_s=180,
                 size_mb=64.0, extra_launcher_args=()):
        self.tmp = tempfile.TemporaryDirectory(prefix="dsmesh-preflight-")
        hostfile = os.path.join(self.tmp.name, "hostfile")
        with open(hostfile, "w") as f:
            f.write(render_hostfile(entries))
        env_file = os.path.join(self.tmp.name, "deepspeed_env")
        with open(env_file, "w") as f:
            f.write(render_env(env))
        self.cmd = launcher_argv(launcher, hostfile, master_addr, master_port, extra_launcher_args) + [
            "--module", "dsmesh.allreduce", "--size_mb", str(size_mb)]
        self.timeout_s = timeout_s
        self.started = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=code_dir, env=dict(os.environ, DS_ENV_FILE=env_file, **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def _kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cancel(self):
        self._kill()
        self.proc.communicate()
        self.tmp.cleanup()

    def result(self):
        """(result dict or None, the command, its output)."""
        try:
            out, _ = self.proc.communicate(timeout=max(1, self.timeout_s - (time.time() - self.started)))
        except subprocess.TimeoutExpired:
            self._kill()
            out, _ = self.proc.communicate()
            out += f"\n[preflight] the all-reduce did not finish in {self.timeout_s} s and was stopped"
        self.tmp.cleanup()
        result = None
        for line in out.splitlines():
            if "DSMESH_ALLREDUCE " in line:
                result = json.loads(line.split("DSMESH_ALLREDUCE ", 1)[1])
        return result, " ".join(shlex.quote(c) for c in self.cmd), out
