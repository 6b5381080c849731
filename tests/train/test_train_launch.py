"""Real training runs on the CPU: 2 ranks over gloo, through the `deepspeed` launcher (and torchrun).

Each launch costs ~15-30 s of start-up on 2 cores, so every scenario is one module-scoped launch
that several tests read: ZeRO-2 full, ZeRO-3 full, ZeRO-3 LoRA (+ merge), ZeRO-2 LoRA via torchrun,
and a ZeRO-3 run killed in the middle of a save and then started again.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_testlib import run_launch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 30


def ds_config(tmp, stage, deepcompile=False):
    path = tmp / f"ds_zero{stage}{'_deepcompile' if deepcompile else ''}.json"
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}, "gradient_clipping": 1.0}
    if deepcompile:
        config["compile"] = {"deepcompile": True}  # what the planner writes for --compile deepcompile
    path.write_text(json.dumps(config))
    return str(path)


def launch(tiny_dir, out, config, extra=(), launcher="deepspeed", fault=None):
    args = ["--model_name_or_path", str(tiny_dir), "--dataset", str(tiny_dir / "data" / "train.jsonl"),
            "--eval_dataset", str(tiny_dir / "data" / "eval.jsonl"), "--output_dir", str(out),
            "--deepspeed", config, "--max_seq_length", "256", "--max_steps", str(STEPS),
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "10", "--seed", "1", *extra]
    if launcher == "deepspeed":
        head, module = [str(BIN / "deepspeed"), "--num_gpus", "2"], ["--module", "train"]
    else:
        head, module = [str(BIN / "torchrun"), "--nproc_per_node", "2"], ["-m", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    env.pop("TRAIN_FAULT_INJECT", None)
    if fault:
        env["TRAIN_FAULT_INJECT"] = fault
    proc = run_launch(lambda port: [*head, "--master_port", str(port), *module, *args], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=400)
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)  # kept for debugging a failure
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {m["step"]: m["loss"] for m in metrics(out)}


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def zero2(work, tiny_dir):
    out = work / "zero2"
    return out, ok(launch(tiny_dir, out, ds_config(work, 2)))


@pytest.fixture(scope="module")
def zero3(work, tiny_dir):
    out = work / "zero3"
    return out, ok(launch(tiny_dir, out, ds_config(work, 3)))


@pytest.fixture(scope="module")
def zero3_chunked(work, tiny_dir):
    """With the chunked loss: the head's weight, used outside lm_head, gathered by ZeRO-3's hooks."""
    out = work / "zero3_chunked"
    return out, ok(launch(tiny_dir, out, ds_config(work, 3), ["--chunked_loss"]))


@pytest.fixture(scope="module")
def lora3(work, tiny_dir):
    out = work / "lora3"
    return out, ok(launch(tiny_dir, out, ds_config(work, 3), ["--lora"]))


@pytest.fixture(scope="module")
def lora2_torchrun(work, tiny_dir):
    out = work / "lora2"
    return out, ok(launch(tiny_dir, out, ds_config(work, 2), ["--lora", "--merge_lora"], launcher="torchrun"))


@pytest.fixture(scope="module")
def crashed_and_resumed(work, tiny_dir):
    """Same run as `zero3`, rank 0 SIGKILLed after checkpoint-20 is written but before it is marked.
    It asks for DeepCompile (config and flag, as a GPU plan would), which runs eager on the CPU."""
    out = work / "crash"
    config, flag = ds_config(work, 3, deepcompile=True), ["--compile", "deepcompile"]
    crashed = launch(tiny_dir, out, config, flag, fault="kill_before_mark:20")
    state = {name: (out / name / "checkpoint_complete.json").exists() for name in ("checkpoint-10", "checkpoint-20")}
    resumed = ok(launch(tiny_dir, out, config, flag))
    return out, crashed, state, resumed


def model_loss(model, tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    with torch.no_grad():
        return model(**enc, labels=labels).loss.item()


def test_zero2_full_fine_tune_learns_and_reports(zero2, tiny_dir):
    out, proc = zero2
    m = metrics(out)
    assert [e["step"] for e in m] == list(range(1, STEPS + 1))
    for key in ("loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "mfu", "memory_gib", "elapsed_s"):
        assert key in m[-1]
    assert m[-1]["mfu"] is None and m[-1]["memory_gib"] > 0.1 and m[-1]["tokens_per_s"] > 0
    first, last = m[0]["loss"], sum(e["loss"] for e in m[-5:]) / 5
    assert first > 6.0 and last < first - 3.0, (first, last)  # random init: ~7.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["loss_first"] == first and summary["loss_last"] == m[-1]["loss"]
    assert summary["eval_loss"] < first - 2.0
    assert summary["tokens"] == m[-1]["tokens"] > 0 and summary["final_model"] == str(out / "final_model")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert all((out / f"checkpoint-{s}" / "checkpoint_complete.json").exists() for s in (10, 20, 30))
    assert f"step {STEPS}/{STEPS} | loss" in proc.stdout and "done: 30 steps" in proc.stdout
    assert "compile: none (eager, as asked)" in proc.stdout and "weights: fp32 (fp32 precision" in proc.stdout
    phase = json.loads((out / "phase.json").read_text())
    assert phase["phase"] == "done" and phase["step"] == STEPS


def test_zero3_gives_the_same_losses_as_zero2(zero2, zero3):
    a, b = losses(zero2[0]), losses(zero3[0])
    assert a.keys() == b.keys()
    steps = sorted(a)
    # Same data, same math; only the order of fp32 reductions differs (gradient norms agree to
    # ~1e-8 at step 1). At lr 1e-2 such rounding differences grow over 30 steps: mostly ~1e-5, once
    # 1.04e-4 (step 24, in a CI run).
    assert [b[s] for s in steps[:10]] == pytest.approx([a[s] for s in steps[:10]], rel=1e-6)
    assert [b[s] for s in steps] == pytest.approx([a[s] for s in steps], rel=5e-4)


def test_zero3_with_the_chunked_loss_gives_the_same_losses(zero2, zero3_chunked):
    assert "loss: LM head and cross-entropy in chunks" in zero3_chunked[1].stdout
    assert "loss: transformers' own" in zero2[1].stdout
    a, b = losses(zero2[0]), losses(zero3_chunked[0])
    assert a.keys() == b.keys()
    steps = sorted(a)
    # The same math on chunks of 64 tokens (within 6.8e-7 over the first 10 steps); at lr 1e-2 the fp32
    # rounding differences grow to 1.9e-3 by step 24 (ZeRO-3 with the stock loss: 1e-4).
    assert [b[s] for s in steps[:10]] == pytest.approx([a[s] for s in steps[:10]], rel=1e-6)
    assert [b[s] for s in steps] == pytest.approx([a[s] for s in steps], rel=5e-3)


def test_saved_models_load_generate_and_are_the_trained_ones(zero2, zero3, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zero3[0] / "final_model")
    texts = [json.loads(line) for line in (tiny_dir / "data" / "eval.jsonl").read_text().splitlines()]
    texts = [t["prompt"] + t["completion"] for t in texts if "prompt" in t][:16]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    m2 = AutoModelForCausalLM.from_pretrained(zero2[0] / "final_model")
    m3 = AutoModelForCausalLM.from_pretrained(zero3[0] / "final_model")  # 16-bit gathered from ZeRO-3 shards
    for name, p in m2.state_dict().items():
        close = torch.isclose(m3.state_dict()[name], p, atol=1e-4, rtol=1e-3)
        # Adam turns the fp32 reduction order's noise in a near-zero gradient into a full step: a few
        # elements of 40k (2 here, 1e-3 apart) go their own way, the rest agree
        assert close.float().mean() > 0.999 and (m3.state_dict()[name] - p).abs().max() < 1e-2, name
    assert model_loss(m3, tok, texts) < model_loss(base, tok, texts) - 1.0
    ids = tok("count from 3:", return_tensors="pt").input_ids
    generated = m3.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def lora_learned(out):
    m = metrics(out)
    return m[-1]["step"] == STEPS and sum(e["loss"] for e in m[-5:]) / 5 < m[0]["loss"] - 1.0


def test_zero3_lora_saves_an_adapter_that_loads_and_generates(lora3, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora3
    assert lora_learned(out)
    adapter_dir = out / "final_model"
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["final_model_merged"] is None
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    with_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir)  # base from adapter_config, + adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = tok("5 plus 3 is 8", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (with_adapter(ids).logits - base(ids).logits).abs().max() > 0.1  # the adapter is the trained one
    assert with_adapter.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_zero2_lora_under_torchrun_with_merged_model(lora2_torchrun):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora2_torchrun
    assert lora_learned(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_model_merged"] == str(out / "final_model_merged")
    tok = AutoTokenizer.from_pretrained(out / "final_model_merged")
    with_adapter = AutoModelForCausalLM.from_pretrained(out / "final_model")
    merged = AutoModelForCausalLM.from_pretrained(out / "final_model_merged")  # a plain model
    ids = tok("count from 7:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
    assert merged.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_killed_mid_save_then_restarted_matches_the_uninterrupted_run(crashed_and_resumed, zero3):
    out, crashed, state, resumed = crashed_and_resumed
    assert crashed.returncode != 0
    assert state == {"checkpoint-10": True, "checkpoint-20": False}  # the half-saved one was never marked
    assert "removed checkpoint-20: incomplete" in resumed.stdout
    assert "resuming from checkpoint-10" in resumed.stdout
    got, want = losses(out), losses(zero3[0])
    assert sorted(got) == list(range(1, STEPS + 1))
    # same data order and state from step 11 on: the same losses as the run that never stopped
    assert [got[s] for s in range(11, STEPS + 1)] == pytest.approx([want[s] for s in range(11, STEPS + 1)], rel=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert [s["resumed_from"] for s in run["starts"]] == [None, "checkpoint-10"]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 10
    # DeepCompile was asked for: on the CPU the engine runs eager, and one line says so
    assert "compile: none (--compile deepcompile asked, but this is a CPU run" in resumed.stdout
    phase = json.loads((out / "phase.json").read_text())
    assert phase["phase"] == "done" and phase["step"] == STEPS


def test_a_finished_run_launched_again_trains_nothing(crashed_and_resumed, tiny_dir):
    """Trainer, resumed from the checkpoint at max_steps, trained a step past it (step 41/40 when
    `make demo` ran again on its lab)."""
    out = crashed_and_resumed[0]
    again = ok(launch(tiny_dir, out, ds_config(out.parent, 3, deepcompile=True), ["--compile", "deepcompile"]))
    assert "resuming from checkpoint-30" in again.stdout
    assert f"step {STEPS} of max_steps {STEPS} reached: nothing left to train" in again.stdout
    assert not (out / f"checkpoint-{STEPS + 1}").exists()
    assert max(losses(out)) == STEPS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == STEPS
    assert (out / "final_model" / "config.json").exists()


def run_cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_restart_with_other_settings_is_refused(zero2, tiny_dir):
    out, _ = zero2
    proc = run_cli(["--model_name_or_path", str(tiny_dir), "--dataset", str(tiny_dir / "data" / "train.jsonl"),
                    "--output_dir", str(out), "--max_seq_length", "512"])
    assert proc.returncode == 2
    assert "holds checkpoints of another run" in proc.stderr and "max_seq_length: 256 -> 512" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"  # left alone


def test_malformed_data_stops_with_file_and_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    proc = run_cli(["--model_name_or_path", str(tiny_dir), "--dataset", str(bad), "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert f"error: {bad}:2: 'completion' must be a string, got int" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_gpu_plan_path_compiled_layers_and_partial_checkpointing(tiny_dir, tmp_path):
    """What the planner's torch engine runs (no DeepSpeed, fused AdamW, compiled layers, some layers
    checkpointed), on the CPU: the same losses as the plain eager run."""
    common = ["--model_name_or_path", str(tiny_dir), "--dataset", str(tiny_dir / "data" / "train.jsonl"),
              "--max_seq_length", "128", "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "no",
              "--save_final_model", "false", "--seed", "1", "--lora", "--lora_dropout", "0",
              "--per_device_train_batch_size", "4", "--optim", "adamw_torch_fused"]
    ok(run_cli(common + ["--output_dir", str(tmp_path / "eager")]))
    compiled = ok(run_cli(common + ["--output_dir", str(tmp_path / "compiled"), "--compile", "regions",
                                    "--gradient_checkpointing", "true", "--checkpoint_layers", "1"]))
    log = compiled.stdout + compiled.stderr
    assert "compile: regions (each decoder layer and the loss" in log and "compile caches " in log
    assert "compiling (0s)" in log and "compiled and ran the first step in" in log
    assert "(Inductor graph cache: " in log  # how the compile used the cache (a relaunch's should hit)
    assert "gradient checkpointing on 1 decoder layer(s)" in compiled.stdout + compiled.stderr
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-3 * abs(a[step]), (a, b)
