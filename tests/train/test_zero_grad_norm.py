"""train.zero_grad_norm: ZeRO-3's clipping norm with foreach kernels gives DeepSpeed's answer."""

import math

import torch

from train import zero_grad_norm as zgn


class Stage3:
    """The parts of DeepSpeed's ZeRO-3 optimizer the foreach norm uses; get_grad_norm_direct is
    DeepSpeed's arithmetic (each gradient to fp64, 2-norms squared and summed, one process: no
    all-reduce), so the tests can tell when it ran."""

    model_parallel_group = None

    def __init__(self):
        self.original_calls = 0

    def _get_param_partition_group(self, param):
        return None

    def _assert_same_partition_group(self, params):
        pass

    def _autoep_expert_parallel_group(self, params):
        return None

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        self.original_calls += 1
        if float(norm_type) == math.inf:
            return max(g.abs().max() for g in gradients).double()
        return torch.stack([g.double().norm(2) for g in gradients]).pow(2).sum().sqrt()


def grads(*shapes, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(*s, dtype=dtype) * 1e-3 for s in shapes]


def test_the_foreach_norm_is_deepspeeds(monkeypatch):
    import deepspeed.comm as dist

    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: t)  # one process: the sum is itself
    opt = Stage3()
    gs = grads((4096, 257), (257,), (3, 1000, 7))
    want = opt.get_grad_norm_direct(gs, gs)
    assert zgn.use_foreach_grad_norm(opt) and zgn.use_foreach_grad_norm(opt)  # (a second call keeps one)
    got = opt.get_grad_norm_direct(gs, gs)
    assert opt.original_calls == 1 and got.dtype == torch.float64
    assert abs(got.item() - want.item()) <= 1e-12 * want.item()  # fp64 both (torch's fp32 clip norm: 1e-5 off)
    bf16 = [g.bfloat16() for g in gs]  # bf16 gradients: accumulated in fp64 too, nothing rounded to bf16
    ref = torch.stack([g.double().norm(2) for g in bf16]).pow(2).sum().sqrt()
    assert abs(opt.get_grad_norm_direct(bf16, bf16).item() - ref.item()) <= 1e-12 * ref.item()


def test_an_inf_or_nan_norm_is_minus_one_as_in_deepspeed(monkeypatch):
    import deepspeed.comm as dist

    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: t)
    opt = Stage3()
    zgn.use_foreach_grad_norm(opt)
    for bad in (math.inf, math.nan):
        gs = grads((10,), (3, 3))
        gs[1][0, 0] = bad
        assert opt.get_grad_norm_direct(gs, gs).item() == -1.0


def test_layouts_it_does_not_cover_keep_deepspeeds_code():
    opt = Stage3()
    zgn.use_foreach_grad_norm(opt)
    gs = grads((5,), (6,))
    opt.get_grad_norm_direct(gs, gs, norm_type=math.inf)
    opt.model_parallel_group = object()  # tensor parallel
    opt.get_grad_norm_direct(gs, gs)
    assert opt.original_calls == 2
    assert not zgn.use_foreach_grad_norm(object()) and not zgn.use_foreach_grad_norm(None)


def test_deepspeeds_zero3_optimizer_has_what_it_needs():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    for name in ("get_grad_norm_direct", "_get_param_partition_group", "_assert_same_partition_group",
                 "_autoep_expert_parallel_group"):
        assert callable(getattr(DeepSpeedZeroOptimizer_Stage3, name)), name


REAL_ZERO3_SCRIPT = """
import json, os, socket, torch, deepspeed
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from transformers import Qwen2Config, Qwen2ForCausalLM
from train.zero_grad_norm import use_foreach_grad_norm
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256))
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
ids = torch.randint(0, 256, (2, 32))
engine.backward(engine(input_ids=ids, labels=ids).loss)
zero = engine.optimizer
grads, params = zero.averaged_gradients[0], zero.fp16_groups[0]
theirs = zero.get_grad_norm_direct(grads, params).item()
installed = use_foreach_grad_norm(zero)
ours = zero.get_grad_norm_direct(grads, params).item()
engine.step()
print(json.dumps({"optimizer": type(zero).__name__, "installed": installed, "theirs": theirs, "ours": ours,
                  "step_norm": float(engine.get_global_grad_norm())}))
"""


def test_on_deepspeeds_own_zero3_optimizer_the_norm_is_the_same():
    """deepspeed.initialize with ZeRO-3 on the CPU (one rank, gloo): after a backward, DeepSpeed's
    get_grad_norm_direct and the foreach one give the same number, and the step uses it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(root),
               TORCH_EXTENSIONS_DIR=str(root / ".cache" / "torch_extensions"))
    out = subprocess.run([sys.executable, "-c", REAL_ZERO3_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and got["installed"]
    assert got["theirs"] > 0 and abs(got["ours"] - got["theirs"]) <= 1e-12 * got["theirs"]
    assert abs(got["step_norm"] - got["ours"]) <= 1e-12 * got["ours"]
