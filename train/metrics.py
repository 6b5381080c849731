"""What a person (and the launch play) can follow: throughput, MFU and memory per logging interval,
written by rank 0 to the console, <output_dir>/metrics.jsonl and TensorBoard, plus summary.json.

Nothing here forces a device sync per step: tokens are counted from the collator's plain ints and
summed across ranks only when a log line is due (when the Trainer already syncs for the loss)."""

import json
import logging
import math
import os
import sys
import time

import torch

from ansible_collections.dsmesh.cluster.plugins.module_utils.gpus import gpu_spec
from train import distributed

logger = logging.getLogger(__name__)


def peak_flops_per_device(args, override_tflops=None):
    """FLOP/s one device can do at best in the training precision; None where unknown (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available() or not (args.bf16 or args.fp16):
        return None
    spec = gpu_spec(torch.cuda.get_device_name())  # the one GPU table, the planner's too
    return spec["peak_tflops"] * 1e12 if spec else None


def memory_reserved_gib():
    """Peak CUDA memory reserved by the caching allocator since the last memory_gib() call."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def memory_gib():
    """Rank 0's memory: peak CUDA memory allocated since the last call, or the process RSS on CPU."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return None


class Meter:
    """Counts tokens and time between log lines (time spent saving/evaluating is left out)."""

    def __init__(self, flops_per_token, peak_flops, world_size, device):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.device = device
        self.tokens = 0  # this rank, since the last log line
        self.excluded = 0.0
        self.last = self.mark = time.perf_counter()

    def restart(self):
        self.tokens, self.excluded = 0, 0.0
        self.last = self.mark = time.perf_counter()

    def exclude_since_mark(self):
        now = time.perf_counter()
        self.excluded += now - self.mark
        self.mark = now

    def interval(self):
        """Called on every rank when a log line is due (it sums tokens across ranks)."""
        tokens = distributed.all_reduce_sum(self.tokens, self.device)
        now = time.perf_counter()
        seconds = max(now - self.last - self.excluded, 1e-9)
        self.tokens, self.excluded, self.last = 0, 0.0, now
        self.mark = now
        tokens_per_s = tokens / seconds
        mfu = None
        if self.peak_flops:
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)
        reserved = memory_reserved_gib()  # (read first: memory_gib() resets the peaks)
        return {"interval_tokens": int(tokens), "interval_s": seconds, "tokens_per_s": tokens_per_s,
                "mfu": mfu, "memory_gib": memory_gib(), "memory_reserved_gib": reserved}


def interval_tokens_per_s(history, skip=()):
    """Tokens over seconds of the logged intervals (one metrics.jsonl row to the next) that end at a
    step not in `skip`; None when no time is left."""
    pairs = [(a, b) for a, b in zip(history, history[1:]) if b["step"] not in skip]
    seconds = sum(b["elapsed_s"] - a["elapsed_s"] for a, b in pairs)
    return sum(b["tokens"] - a["tokens"] for a, b in pairs) / seconds if seconds > 0 else None


def _fmt_time(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_count(x):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_line(entry, max_steps):
    parts = [f"step {entry['step']}/{max_steps}"]
    if entry.get("loss") is not None:
        parts.append(f"loss {entry['loss']:.4f}")
    if entry.get("learning_rate") is not None:
        parts.append(f"lr {entry['learning_rate']:.2e}")
    if entry.get("grad_norm") is not None:
        parts.append(f"grad {entry['grad_norm']:.3g}")
    parts.append(f"{_fmt_count(entry['tokens_per_s'])} tok/s")
    if entry.get("mfu") is not None:
        parts.append(f"MFU {100 * entry['mfu']:.1f}%")
    if entry.get("memory_gib") is not None:
        parts.append(f"mem {entry['memory_gib']:.2f} GB")
    eta = entry.get("eta_s")
    parts.append(f"{_fmt_time(entry['elapsed_s'])} elapsed" + (f", ~{_fmt_time(eta)} left" if eta is not None else ""))
    return " | ".join(parts)


class MetricsWriter:
    """Rank 0: metrics.jsonl (one object per logged step), eval.jsonl, TensorBoard, console."""

    def __init__(self, output_dir, resume_step=None, tensorboard=True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.eval_path = os.path.join(output_dir, "eval.jsonl")
        self.history = []
        if resume_step is not None:
            # the steps after the checkpoint will be trained (and logged) again
            self.history = self._keep_until(self.path, resume_step)
            self._keep_until(self.eval_path, resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
            if os.path.exists(self.eval_path):
                os.remove(self.eval_path)
        last = self.history[-1] if self.history else {}
        self.tokens_before = last.get("tokens", 0)
        self.elapsed_before = last.get("elapsed_s", 0.0)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    @staticmethod
    def _keep_until(path, step):
        if not os.path.exists(path):
            return []
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by the crash
                if entry.get("step", 0) <= step:
                    kept.append(entry)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for entry in kept:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, path)
        return kept

    def write(self, entry):
        self.history.append(entry)
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.tb:
            for key, value in entry.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, entry["step"])
            self.tb.flush()

    def write_eval(self, entry):
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tb:
            for key, value in entry.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"eval/{key.removeprefix('eval_')}", value, entry["step"])
            self.tb.flush()

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()


def console():
    """Print a line without breaking a progress bar."""
    try:
        from tqdm import tqdm

        return tqdm.write
    except ImportError:
        return print


def write_summary(path, summary):
    from train.checkpoints import write_json_atomic

    write_json_atomic(path, summary)


def progress_bar(total, initial):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


PHASES = ("loading", "compiling", "training", "saving", "done")


class PhaseFile:
    """Rank 0: <output_dir>/phase.json, what the run is doing since when, for the launcher's status
    ({"phase": ..., "since": unix time, "step": N}). While compiling, a line "compiling (Ns)" every
    `tick_s` seconds, so a long first compile is not taken for a hang."""

    def __init__(self, output_dir, enabled=True, tick_s=30.0):
        self.path = os.path.join(output_dir, "phase.json")
        self.enabled = enabled
        self.tick_s = tick_s
        self.phase = None
        self.since = None
        self._stop = None

    def set(self, phase, step=0):
        if not self.enabled or phase == self.phase:
            return
        from train.checkpoints import write_json_atomic

        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self._stop_ticker()
        self.phase, self.since = phase, time.time()
        write_json_atomic(self.path, {"phase": phase, "since": self.since, "step": int(step)})
        if phase == "compiling":
            self._start_ticker()

    def elapsed(self):
        return time.time() - self.since if self.since is not None else 0.0

    def _start_ticker(self):
        import threading

        stop = self._stop = threading.Event()
        since = self.since
        console()("compiling (0s)")

        def tick():
            while not stop.wait(self.tick_s):
                console()(f"compiling ({time.time() - since:.0f}s)")

        threading.Thread(target=tick, name="compile-progress", daemon=True).start()

    def _stop_ticker(self):
        if self._stop is not None:
            self._stop.set()
            self._stop = None


def compile_cache_use():
    """How this process's compiles used Inductor's FX-graph cache so far ("" before any compile): a
    relaunch whose graphs all miss a warm cache compiles as long as the first start did."""
    from torch._dynamo.utils import counters

    fx = counters["inductor"]
    hit, missed, bypassed = fx["fxgraph_cache_hit"], fx["fxgraph_cache_miss"], fx["fxgraph_cache_bypass"]
    if not hit + missed + bypassed:
        return ""
    return f"Inductor graph cache: {hit} hit, {missed} missed" + (f", {bypassed} bypassed" if bypassed else "")


def compile_cache_state():
    """Where torch.compile's caches are and whether they hold anything yet (a relaunch of the same
    plan on the same node finds them warm). Inductor's FX-graph and AOTAutograd caches live under
    TORCHINDUCTOR_CACHE_DIR, Triton's kernels under TRITON_CACHE_DIR."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    inductor = cache_dir()
    triton = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")

    def entries(path):
        try:
            return len(os.listdir(path))
        except OSError:
            return 0

    graphs = entries(os.path.join(inductor, "fxgraph")) + entries(os.path.join(inductor, "aotautograd"))
    kernels = entries(triton)
    state = "warm" if graphs else "cold"
    bytecode = f", Python's bytecode under {sys.pycache_prefix}" if sys.pycache_prefix else ""
    return state, (f"compile caches {state}: TORCHINDUCTOR_CACHE_DIR={inductor} ({graphs} cached graphs), "
                   f"TRITON_CACHE_DIR={triton} ({kernels} kernels){bytecode}")
