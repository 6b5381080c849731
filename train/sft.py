"""Supervised fine-tuning entry point: `python -m train` (see docs/training.md).

    deepspeed --num_gpus 8 --module train --model_name_or_path /models/qwen --dataset data.jsonl \\
        --output_dir out --deepspeed ds_config.json --max_seq_length 4096 --save_steps 200
"""

import json
import logging
import os
import sys
import time
import traceback

from train import distributed


def _setup_logging(rank):
    import warnings

    import transformers

    # DeepSpeed still calls torch.distributed's renamed collectives: a warning on every step
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                            category=FutureWarning)
    # peft asks the model with the pre-5.2x name
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format="[%(asctime)s] [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", level=level, force=True)
    old_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old_factory(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars, per rank
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    logging.getLogger("huggingface_hub").setLevel(logging.WARNING)
    # DeepSpeed logs every engine detail at INFO; keep warnings.
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def run_identity(model_args, data_args, lora_args, training_args, fingerprints, ds_config, world_size):
    """What must stay the same for a checkpoint of this output_dir to be resumed."""
    from train.args import zero_stage

    identity = {
        "model": model_args.model_name_or_path,
        "random_init": model_args.random_init,
        "data": fingerprints,
        "eval_split_ratio": data_args.eval_split_ratio,
        "max_seq_length": data_args.max_seq_length,
        "packing": data_args.packing,
        "chat_template": model_args.chat_template,
        "seed": training_args.seed,
        "data_seed": training_args.data_seed,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": world_size,
        "zero_stage": zero_stage(ds_config),
        "lora": None,
    }
    if lora_args.lora:
        identity["lora"] = {"r": lora_args.lora_r, "alpha": lora_args.lora_alpha, "dropout": lora_args.lora_dropout,
                            "target_modules": lora_args.lora_target_modules, "rslora": lora_args.lora_use_rslora}
    return identity


def train(pre, rank, local_rank, world_size, say, state):
    import torch

    from ansible_collections.dsmesh.cluster.plugins.module_utils.trainer_fields import get_path
    from train import args as args_mod
    from train import checkpoints, chunked_loss, data, metrics, modeling
    from train.trainer import (
        CheckpointCallback,
        CheckpointLayersCallback,
        ProfileCallback,
        ProgressPrinter,
        SFTTrainer,
        ZeroGradNormCallback,
        choose_engine_compile,
        compile_callbacks,
        deepcompile_schedule,
    )

    use_deepspeed = pre["raw"].deepspeed is not None
    configured_state = not torch.cuda.is_available() and (use_deepspeed or world_size > 1)
    distributed.init_cpu_process_group(use_deepspeed, world_size)
    model_args, data_args, lora_args, run_args, training_args, info = args_mod.parse(
        pre, world_size, configured_state)
    output_dir = os.path.abspath(training_args.output_dir)
    final_dir = os.path.abspath(run_args.final_model_dir or os.path.join(output_dir, "final_model"))
    started = time.time()
    _, weights_line = modeling.weights_dtype(model_args, lora_args, training_args)  # (refuses bad choices early)
    use_cuda = torch.cuda.is_available()
    # what compiles: the layers (regions), the DeepSpeed engine (deepcompile, torch) or nothing
    zero = args_mod.zero_stage(info["ds_config"])
    engine_compile, compile_why = choose_engine_compile(model_args.compile, zero, use_cuda)
    schedule = None
    if engine_compile == "deepcompile":
        schedule, schedule_why = deepcompile_schedule(model_args.deepcompile_schedule, zero)
        compile_why += schedule_why
    compile_runs = "regions" if model_args.compile == "regions" else engine_compile
    compiles = compile_runs != "none"
    universal = bool(get_path(info["ds_config"] or {}, "checkpoint.load_universal"))
    if universal and "optimizer" not in info["ds_config"]:
        # measured: the Trainer's own optimizer came back from a universal copy inexactly (losses 0.75% off
        # 14 steps later), DeepSpeed's (an "optimizer" section, as the planner writes) exactly
        raise args_mod.ConfigError(f"{info['ds_source']}: checkpoint.load_universal needs an \"optimizer\" section "
                                   "(DeepSpeed's own optimizer, which a universal checkpoint restores exactly): add "
                                   "one, as the launch's planner writes it")

    modeling.check_model_dir(model_args.model_name_or_path, need_weights=not model_args.random_init)
    tokenizer = modeling.load_tokenizer(model_args.model_name_or_path, model_args.chat_template)
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_args.model_name_or_path, local_files_only=True).vocab_size
    datasets = data.build_datasets(data_args, tokenizer, model_args.model_name_or_path, training_args.seed,
                                   vocab_size)

    identity = run_identity(model_args, data_args, lora_args, training_args, datasets.fingerprints,
                            info["ds_config"], world_size)
    decision = None
    if rank == 0:
        try:
            resume_from, notes = checkpoints.prepare_output_dir(
                output_dir, identity, resume=run_args.resume, overwrite=run_args.overwrite_output_dir,
                resume_from=training_args.resume_from_checkpoint,
                universal=universal)
            decision = {"resume_from": resume_from, "notes": notes, "run": checkpoints.read_run(output_dir)}
        except checkpoints.RunMismatch as e:
            decision = {"error": str(e)}
    decision = distributed.broadcast_object(decision)
    if "error" in decision:
        raise checkpoints.RunMismatch(decision["error"])
    resume_from = decision["resume_from"]
    if rank != 0 and training_args.save_on_each_node and training_args.local_process_index == 0:
        checkpoints.remove_incomplete(output_dir)  # this node's own copies
        checkpoints.write_run(output_dir, decision["run"])  # so that this node can become the master
    for note in decision["notes"]:
        say(note)
    state["owns_output_dir"] = True
    phase = metrics.PhaseFile(output_dir, enabled=rank == 0)
    phase.set("loading")

    modeling.prefer_sdpa_backend(model_args.sdpa_backend)
    model = modeling.build_model(model_args, lora_args, training_args, tokenizer, datasets.one_sequence_per_row,
                                 whole_model_compiled=engine_compile != "none")
    total_params, trainable_params = modeling.count_parameters(model)
    loss_line = "loss: transformers' own (the whole logits, fp32 log-softmax)"
    if model_args.chunked_loss:
        # ZeRO-3's module hooks gather a weight only inside its module's forward (not under DeepCompile)
        loss_line = chunked_loss.enable_chunked_loss(model, zero3_hooks=zero == 3 and engine_compile != "deepcompile")
    if model_args.compile == "regions":
        modeling.compile_regions(model)
    seq_len = data_args.max_seq_length
    meter = metrics.Meter(modeling.flops_per_token(model, seq_len),
                          metrics.peak_flops_per_device(training_args, run_args.peak_tflops),
                          world_size, training_args.device)
    resume_step = None
    if resume_from:
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            resume_step = json.load(f)["global_step"]
    writer = metrics.MetricsWriter(output_dir, resume_step) if rank == 0 else None

    ts, es = datasets.train_stats, datasets.eval_stats
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
    say(f"model {model_args.model_name_or_path}{' (random init)' if model_args.random_init else ''}: "
        f"{total_params / 1e6:.1f}M parameters, {trainable_params / 1e6:.2f}M trainable"
        f"{f' (LoRA r={lora_args.lora_r})' if lora_args.lora else ''}; "
        f"{'bf16' if training_args.bf16 else 'fp16' if training_args.fp16 else 'fp32'}, "
        f"ZeRO-{args_mod.zero_stage(info['ds_config']) if info['ds_config'] else 'off'}, world size {world_size}"
        )
    say(weights_line)
    say(loss_line)
    say(f"compile: {compile_runs} ({compile_why})")
    if compiles and rank == 0:
        say(metrics.compile_cache_state()[1])
    say(f"data: {ts.examples} examples -> {ts.rows} sequences of <= {seq_len} tokens "
        f"({ts.tokens} tokens, {ts.trainable_tokens} with loss); {ts.truncated} truncated, {ts.dropped} dropped"
        + (f"; {ts.last_turn_only} chats trained on their last turn only" if ts.last_turn_only else "")
        + (f"; eval {es.examples} examples" if es else ""))
    say(f"batch: {training_args.per_device_train_batch_size} per device x {training_args.gradient_accumulation_steps} "
        f"accumulation x {world_size} ranks = {global_batch} sequences per step; output {output_dir}"
        + (f"; resuming from {os.path.basename(resume_from)}" if resume_from else ""))

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        data_collator=data.Collator(tokenizer.pad_token_id, max_length=seq_len),
        processing_class=tokenizer,
        meter=meter,
        phase=phase,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # ProgressPrinter replaces both (one line per log interval, own bar)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CheckpointCallback(meter, keep=info["save_total_limit"], fsync=run_args.fsync_checkpoints))
    if model_args.checkpoint_layers is not None:
        trainer.add_callback(CheckpointLayersCallback(model_args.checkpoint_layers))
    if run_args.profile_steps:
        trainer.add_callback(ProfileCallback(run_args.profile_steps, output_dir))
    if model_args.zero_grad_norm == "foreach" and zero == 3:
        trainer.add_callback(ZeroGradNormCallback(trainer))
    for callback in compile_callbacks(trainer, phase, compiles, engine_compile, schedule,
                                      model_args.deepcompile_profiles):
        trainer.add_callback(callback)
    if writer is not None:
        trainer.add_callback(ProgressPrinter(writer))

    trainer.train(resume_from_checkpoint=resume_from)
    eval_loss = None
    if datasets.eval is not None:
        done = [e for e in trainer.state.log_history
                if "eval_loss" in e and e.get("step") == trainer.state.global_step]
        eval_loss = done[-1]["eval_loss"] if done else trainer.evaluate().get("eval_loss")

    if run_args.save_final_model:
        phase.set("saving", trainer.state.global_step)
    written = modeling.save_final_model(trainer, tokenizer, final_dir, lora_args) if run_args.save_final_model else []
    distributed.barrier()
    if rank == 0:
        history = writer.history
        last = history[-1] if history else {}
        summary = {
            "status": "completed",
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "epochs": trainer.state.epoch,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": last.get("loss"),
            "eval_loss": eval_loss,
            "tokens": last.get("tokens", 0),
            "seconds": last.get("elapsed_s", 0.0),
            "tokens_per_s": last.get("tokens", 0) / last["elapsed_s"] if last.get("elapsed_s") else None,
            **steady_throughput(history, meter, resume_step),
            "wall_seconds": time.time() - started,
            "final_model": written[0] if written else None,
            "final_model_merged": written[1] if len(written) > 1 else None,
            "resumed_from_step": resume_step,
            "world_size": world_size,
            "data": {"train": ts.as_dict(), "eval": es.as_dict() if es else None},
            "output_dir": output_dir,
        }
        metrics.write_summary(os.path.join(output_dir, "summary.json"), summary)
        writer.close()
        phase.set("done", trainer.state.global_step)
        loss = (f", loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"
                if summary["loss_first"] is not None else "")
        say(f"done: {summary['steps']} steps{loss}"
            + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
            + f", {summary['tokens']} tokens in {summary['seconds']:.0f}s of training"
            f" ({summary['wall_seconds']:.0f}s wall)" + (f"; model in {', '.join(written)}" if written else ""))


def steady_throughput(history, meter, resume_step=None):
    """Tokens/s and MFU over the run without the first logged interval of each start (start-up, loading,
    the first compile): a resumed run's steps after the checkpoint start again."""
    from train.metrics import interval_tokens_per_s

    firsts = [h["step"] for h in history[1:] if resume_step is not None and h["step"] > resume_step][:1]
    tps = interval_tokens_per_s(history, firsts)
    if tps is None:
        return {"tokens_per_s_steady": None, "mfu": None}
    mfu = tps * meter.flops_per_token / (meter.peak_flops * meter.world_size) if meter.peak_flops else None
    return {"tokens_per_s_steady": tps, "mfu": mfu}


def main(argv=None):
    from train.args import ConfigError, preparse

    rank = int(os.environ.get("RANK", "0"))
    try:
        pre = preparse(argv)
    except ConfigError as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    rank, local_rank, world_size = distributed.prepare_environment(pre["raw"].deepspeed is not None)
    _setup_logging(rank)

    def say(msg):
        if rank == 0:
            from train.metrics import console

            console()(msg)

    from train.checkpoints import RunMismatch
    from train.data import DataError
    from train.modeling import ModelDirError

    output_dir = os.path.abspath(pre["raw"].output_dir)
    state = {"owns_output_dir": False}
    try:
        train(pre, rank, local_rank, world_size, say, state)
    except (ConfigError, DataError, ModelDirError, RunMismatch) as e:
        # a problem with the inputs: say what it is, no traceback (every rank sees the same)
        if local_rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(2)  # other ranks may be waiting in a collective; don't hang on teardown
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        traceback.print_exc()
        full = disk_full(output_dir, e)
        if full:
            print(f"error: {full}", file=sys.stderr, flush=True)
        if state["owns_output_dir"]:
            _record_failure(rank, output_dir, full or f"{type(e).__name__}: {e}")
        sys.stderr.flush()
        os._exit(1)
    distributed.shutdown()
    # Everything is written: skip the interpreter's teardown, where a comm backend's C++ thread
    # sometimes aborts ("terminate called without an active exception", launch exit 250, about 1
    # run in 25 on the CPU lab) and turns a finished run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def disk_full(output_dir, exc):
    """What to say when `exc` came from a full disk under output_dir (torch.save's own error does not
    say so), else None: the node, the path, the checkpoint that was being written and the one kept."""
    import errno
    import shutil
    import socket

    from train import checkpoints

    seen, cause = [], exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    try:
        usage = shutil.disk_usage(output_dir)
    except OSError:
        return None
    no_space = any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in seen)
    if not no_space and usage.free >= min(64 * 2 ** 20, usage.total // 50):
        return None
    writing = [os.path.basename(p) for _, p in checkpoints.checkpoint_dirs(output_dir) if not checkpoints.is_complete(p)]
    kept = checkpoints.latest_complete(output_dir)
    return (f"{socket.gethostname()}: no space left on the device of {output_dir} ({usage.free / 2 ** 20:.1f} MiB free)"
            + (f" while writing {writing[-1]}" if writing else "")
            + "; free space there and launch again: it resumes from "
            + (os.path.basename(kept) if kept else "the start") + " (complete, untouched)")


def _record_failure(rank, output_dir, message):
    """summary.json says the run failed (the launch play reads it)."""
    if rank != 0:
        return
    try:
        from train.checkpoints import write_json_atomic

        write_json_atomic(os.path.join(output_dir, "summary.json"), {"status": "failed", "error": message,
                                                                     "time": time.time()})
    except OSError:
        pass
