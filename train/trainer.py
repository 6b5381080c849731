"""The Trainer subclass and callbacks: token counting, crash-safe checkpoint marking, progress."""

import collections
import os
import signal
import statistics
import time

from transformers import Trainer, TrainerCallback

from train import checkpoints, distributed
from train.data import GlobalBatchOrder
from train.metrics import MetricsWriter, compile_cache_use, console, format_line, progress_bar

# Test hooks: "kill_before_mark:N[:R]" SIGKILLs rank R (default 0) after checkpoint-N is written but
# before it is marked complete, i.e. a crash in the middle of a save (a rank other than 0 first waits a
# second, so that the other nodes' marks are written: a crash between two nodes' marks);
# "pause_before_save_barrier:N:S" makes rank 0 wait S seconds once its part of checkpoint-N is written,
# while the others wait for it (a save under way, to stop the job in).
FAULT_ENV = "TRAIN_FAULT_INJECT"


def injected_fault(step, rank):
    """(what, seconds) the test hook asks of this rank at checkpoint-`step`, or (None, 0)."""
    what, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    at, _, arg = rest.partition(":")
    if not at.isdigit() or int(at) != step:
        return None, 0
    if what == "kill_before_mark" and rank == int(arg or 0):
        return what, 1.0 if rank else 0.0
    if what == "pause_before_save_barrier" and rank == 0:
        return what, float(arg or 60)
    return None, 0


class SFTTrainer(Trainer):
    def __init__(self, *args, meter, phase=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.phase = phase

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        num_tokens = inputs.pop("num_tokens", None)
        if num_tokens is not None and model.training:
            self.meter.tokens += int(num_tokens)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "random" or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        # the same rows for each optimizer step at any world size (a resume on other nodes relies on it)
        args = self.args
        return GlobalBatchOrder(len(dataset), args.per_device_train_batch_size * args.gradient_accumulation_steps
                                * args.world_size, args.seed if args.data_seed is None else args.data_seed)

    def _run_epoch(self, *args, **kwargs):
        # A relaunch of a run that reached max_steps (its last checkpoint at max_steps) trains nothing:
        # Trainer would run one step past max_steps before its first stop check.
        if 0 < self.state.max_steps <= self.state.global_step:
            if self.args.process_index == 0:
                console()(f"step {self.state.global_step} of max_steps {self.state.max_steps} reached: "
                          "nothing left to train")
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("num_tokens", None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log line; Trainer.log runs on every rank
            logs.update(self.meter.interval())
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call and self.phase is not None:
            self.phase.set("saving", self.state.global_step)  # (the Trainer saves the model first)
        if _internal_call and self.is_deepspeed_enabled and not self.args.save_only_model:
            # Resuming needs only DeepSpeed's checkpoint (written next, with the optimizer state).
            # Gathering 16-bit weights into every checkpoint would add a full model write per save;
            # the final model is written once at the end (modeling.save_final_model).
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                self.processing_class.save_pretrained(output_dir)
            return
        super().save_model(output_dir, _internal_call)


def choose_engine_compile(requested, zero_stage, cuda):
    """What `--compile deepcompile|torch` runs on the DeepSpeed path: (deepcompile|torch|none, why).

    DeepCompile where DeepSpeed supports it (its own test: CUDA and torch >= 2.6; ZeRO 1-3, on
    ZeRO-0 DeepSpeed itself compiles without it); engine.compile() without DeepCompile where only
    that works; eager on the CPU, where compiling the engine only adds start-up."""
    import torch

    if requested == "regions":
        return "none", "each decoder layer and the loss, torch.compile"
    if requested == "none":
        return "none", "eager, as asked"
    if not cuda:
        return "none", f"--compile {requested} asked, but this is a CPU run: the engine compiles on CUDA only"
    from deepspeed.compile.util import is_deepcompile_supported
    from deepspeed.runtime.compiler import is_compile_supported

    if not is_compile_supported():
        return "none", f"--compile {requested} asked, but torch {torch.__version__} has no torch.compile for DeepSpeed"
    if requested == "torch":
        return "torch", "engine.compile() without DeepCompile, as asked"
    if not is_deepcompile_supported():
        return "torch", f"DeepCompile needs torch >= 2.6 on CUDA, this is torch {torch.__version__}"
    if zero_stage not in (1, 2, 3):
        return "torch", f"DeepCompile supports ZeRO 1-3, this plan is ZeRO-{zero_stage}"
    return "deepcompile", f"ZeRO-{zero_stage} on CUDA, torch {torch.__version__}"


def deepcompile_schedule(name, zero_stage):
    """(the pass schedule handed to engine.compile(), what the compile line adds about it). None keeps
    DeepSpeed's own (ZeRO-1/2 always: one pass at step 0). first_step runs ZeRO-3's gather/release,
    prefetch and selective unsharding in one compile at the first step instead of recompiling the whole
    graph at step 5 for the last two: by then ZeRO-3 has allocated every partition and the Adam states
    (initialize_optimizer_states), so the first step's memory profile is the steady one the unsharding
    budget is planned against."""
    if zero_stage != 3:
        return None, ""
    if name == "warmup":
        return None, "; DeepSpeed's schedule, prefetch and unsharding recompiled at step 5"
    from deepspeed.compile.passes import prefetch, selective_gather, zero3_compile

    passes = [zero3_compile.add_z3_gather_release, prefetch.schedule_prefetch, selective_gather.selective_gather]
    return [(0, passes)], "; its passes in one compile at the first step"


class EngineCompileCallback(TrainerCallback):
    """Compiles the DeepSpeed engine (`trainer.model_wrapped`) when training starts: after
    deepspeed.initialize and after a checkpoint is loaded, so DeepCompile registers the parameter
    and gradient partitions the run will really use. (accelerate would call engine.compile() right
    after initialize, before the checkpoint is loaded, when TrainingArguments.torch_compile is set.)

    DeepCompile's pass schedule counts the engine's global steps from 0 (graph passes at step 0,
    prefetch and selective unsharding at step 5, or all at step 0 with deepcompile_schedule); a
    resumed engine starts at the checkpoint's step, where no scheduled step would ever come, so the
    schedule is shifted to start there. `schedule`: deepcompile_schedule's, for mode deepcompile."""

    def __init__(self, trainer, mode, schedule=None, profile_replay="reuse"):
        self.trainer = trainer
        self.mode = mode
        self.schedule = schedule
        self.profile_replay = profile_replay  # --deepcompile_profiles
        self.recompile_steps = ()
        self.profiles = None  # the DeepCompile profiles recorded or replayed (train.deepcompile_cache)

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        if self.mode == "torch" and engine.is_deepcompile_enabled():
            engine._config.compile_config.deepcompile = False  # the fallback when DeepCompile cannot run
        if self.mode == "deepcompile":
            if self.profile_replay != "fresh":
                from train.deepcompile_cache import stable_deepcompile_graphs

                self.profiles = stable_deepcompile_graphs(rerun=self.profile_replay == "rerun")
                if self.profiles is None and args.process_index == 0:
                    console()("DeepSpeed's DeepCompile is not the one this package knows: its graphs stay keyed by "
                              "address and a relaunch compiles them again")
            took, where = load_deepcompile_op()
            if args.process_index == 0:
                console()(f"DeepSpeed's DeepCompile op loaded in {took:.0f}s (JIT-built at a node's first DeepCompile "
                          f"start, then kept under {where})")
        engine.compile(schedule=self.schedule)
        if self.mode == "deepcompile":
            from collections import deque

            from deepspeed.compile import backend

            start = engine.global_steps
            backend.remaining_schedule = deque((step + start, passes) for step, passes in backend.remaining_schedule)
            self.recompile_steps = tuple(step for step, _ in backend.remaining_schedule if step > start)


class ZeroGradNormCallback(TrainerCallback):
    """--zero_grad_norm foreach: ZeRO-3's gradient norm with torch's foreach kernels (train.zero_grad_norm),
    installed on the engine's optimizer once DeepSpeed has built it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from train.zero_grad_norm import use_foreach_grad_norm

        optimizer = getattr(self.trainer.model_wrapped, "optimizer", None)
        if not use_foreach_grad_norm(optimizer) and args.process_index == 0:
            console()(f"--zero_grad_norm foreach: {type(optimizer).__name__} is not DeepSpeed's ZeRO-3 optimizer "
                      "this package knows; its own gradient norm stays")


def load_deepcompile_op():
    """(seconds, build directory) of loading DeepSpeed's DeepCompile op (engine.compile() would load it
    silently: on the H200 a first start spent 45-60 s there, before its compile began). DeepSpeed builds
    its ops under torch's extension root (TORCH_EXTENSIONS_DIR, else torch's default)."""
    from deepspeed.compile.util import get_deepcompile_handle
    from torch.utils.cpp_extension import get_default_build_root

    t0 = time.time()
    get_deepcompile_handle()
    return time.time() - t0, get_default_build_root()


def compile_callbacks(trainer, phase, compiles, engine_compile, schedule=None, profile_replay="reuse"):
    """The callbacks that compile and say so, in the order they must run: the phase turns to compiling
    first, so the DeepSpeed engine's compile (its op's build included) counts as compiling."""
    engine_compiler = None
    if engine_compile != "none":
        engine_compiler = EngineCompileCallback(trainer, engine_compile, schedule, profile_replay)
    phase_callback = PhaseCallback(phase, compiles,
                                   lambda: engine_compiler.recompile_steps if engine_compiler else (),
                                   lambda: engine_compiler.profiles if engine_compiler else None)
    return [phase_callback] + ([engine_compiler] if engine_compiler else [])


class PhaseCallback(TrainerCallback):
    """phase.json through training: compiling until the first step ends (and again at DeepCompile's
    scheduled recompiles), training, saving while a checkpoint is written."""

    def __init__(self, phase, compiles, recompile_steps=lambda: (), profiles=lambda: None):
        self.phase = phase
        self.compiles = compiles
        self.recompile_steps = recompile_steps
        self.profiles = profiles  # the ProfileRecord of DeepCompile's profiles, once compiling started
        self.first_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        self.phase.set("compiling" if self.compiles else "training", state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.recompile_steps():
            self.phase.set("compiling", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.phase.phase == "compiling":
            took = self.phase.elapsed()
            what = "first step" if state.global_step == self.first_step + 1 else f"step {state.global_step}"
            self.phase.set("training", state.global_step)
            record = self.profiles()
            use = "; ".join(u for u in (compile_cache_use(), record.summary() if record else "") if u)
            console()(f"compiled and ran the {what} in {took:.0f}s" + (f" ({use})" if use else ""))

    def on_save(self, args, state, control, **kwargs):
        self.phase.set("training", state.global_step)


class CheckpointLayersCallback(TrainerCallback):
    """--checkpoint_layers N: the Trainer turns checkpointing on for every layer when training
    starts; this turns it off again past the first N (their activations stay in memory)."""

    def __init__(self, n):
        self.n = n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from train.modeling import limit_checkpointed_layers

        kept = limit_checkpointed_layers(model, self.n)
        if args.process_index == 0:
            console()(f"gradient checkpointing on {kept} decoder layer(s), the others keep their activations")


class ProfileCallback(TrainerCallback):
    """--profile_steps A-B: torch.profiler over optimizer steps A..B on rank 0; the kernels that
    took the most device time go to the log and <output_dir>/profile.txt."""

    def __init__(self, spec, output_dir):
        first, _, last = spec.partition("-")
        self.first, self.last = int(first), int(last or first)
        self.output_dir = output_dir
        self.prof = None

    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == 0 and state.global_step + 1 == self.first and self.prof is None:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step >= self.last:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
            with open(os.path.join(self.output_dir, "profile.txt"), "w") as f:
                f.write(table)
            console()(f"profile of steps {self.first}-{self.last}:\n{table}")
            self.prof = None


class CheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once every rank has written it; rotates old ones after that."""

    def __init__(self, meter, keep=None, fsync=True):
        self.meter = meter
        self.keep = keep
        self.fsync = fsync

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.restart()  # engine set-up and checkpoint loading are not training time

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.mark = time.perf_counter()
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last loss always reaches the log
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self.meter.exclude_since_mark()

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        started = self.meter.mark
        fault, seconds = injected_fault(step, args.process_index)
        if fault == "pause_before_save_barrier":
            time.sleep(seconds)
        distributed.barrier()  # every rank has written its part
        if self.fsync and args.local_process_index == 0:
            checkpoints.flush_to_disk()
        distributed.barrier()
        if fault == "kill_before_mark":
            time.sleep(seconds)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.should_save:
            checkpoints.ensure_latest_tag(path, step)
            checkpoints.mark_complete(path, step, **checkpoints.marker_fields(args))
            removed = checkpoints.rotate(args.output_dir, self.keep)
            if args.process_index == 0:
                took = time.perf_counter() - started
                note = f" (removed {', '.join(os.path.basename(p) for p in removed)})" if removed else ""
                console()(f"saved checkpoint-{step} in {took:.1f}s{note}")
        self.meter.exclude_since_mark()


class ProgressPrinter(TrainerCallback):
    """Rank 0: progress bar on a terminal, a line per log interval, metrics files."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer
        self.bar = None
        self.step_seconds = collections.deque(maxlen=20)  # seconds per step of the recent log intervals

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_seconds.clear()
        if state.is_world_process_zero:
            self.bar = progress_bar(state.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        if "loss" in logs and "tokens_per_s" in logs:
            w = self.writer
            prev = w.history[-1] if w.history else {}
            tokens = prev.get("tokens", w.tokens_before) + logs["interval_tokens"]
            elapsed = prev.get("elapsed_s", w.elapsed_before) + logs["interval_s"]
            # the median step time of the recent intervals: a compile (the first step's, DeepCompile's
            # second at step 6) is one slow interval and would inflate a mean for the rest of the run
            steps = state.global_step - prev.get("step", 0)  # prev: the last row kept, of this start or the resumed one
            if steps > 0:
                self.step_seconds.append(logs["interval_s"] / steps)
            eta = statistics.median(self.step_seconds) * (state.max_steps - state.global_step) if self.step_seconds else None
            entry = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": logs.get("epoch"),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": tokens,
                "tokens_per_s": logs["tokens_per_s"],
                "mfu": logs["mfu"],
                "memory_gib": logs["memory_gib"],
                "memory_reserved_gib": logs.get("memory_reserved_gib"),
                "elapsed_s": elapsed,
                "eta_s": eta,
                "time": now,
            }
            w.write(entry)
            console()(format_line(entry, state.max_steps))
        elif any(k.startswith("eval_") for k in logs):
            entry = {"step": state.global_step, "time": now, **{k: v for k, v in logs.items() if k.startswith("eval_")}}
            self.writer.write_eval(entry)
            if "eval_loss" in entry:
                console()(f"eval at step {state.global_step}: loss {entry['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
