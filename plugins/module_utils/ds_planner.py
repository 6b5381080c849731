# -*- coding: utf-8 -*-
"""Memory planner and ZeRO config builder for DeepSpeed training of decoder-only LMs.

Pure Python (stdlib only) so that it runs inside an Ansible module on the controller or a node,
in pytest, and in bench/plan_vs_measured.py on a GPU machine without Ansible.

What it models: Llama / Qwen2 / Qwen3 / Mistral style decoders (RMSNorm, rotary embeddings,
grouped-query attention through PyTorch SDPA / flash attention, gated SiLU MLP), trained by
HF Trainer + DeepSpeed ZeRO with AdamW, as a full fine-tune or as LoRA (peft).

Every formula is explained in docs/planner.md. In short, the peak GPU memory of one rank is
    model states (params, gradients, optimizer states: DeepSpeed's own estimator formulas)
  + activations of one micro-batch (bytes per token per layer, measured against autograd)
  + communication buffers (ZeRO buckets)
  + allocator fragmentation, plus the CUDA context outside the allocator.
The planner enumerates (ZeRO stage, offload, gradient checkpointing, micro-batch) candidates,
ranks them with a stated speed model, and picks the fastest one that fits.
"""

from __future__ import absolute_import, division, print_function

import copy
import json
import math
import os

GIB = float(1024 ** 3)

ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Knobs of the memory and speed models. Every one can be overridden (planner_settings).
DEFAULT_SETTINGS = {
    # GPU memory outside PyTorch's allocator: CUDA context, NCCL buffers, cuBLAS workspaces.
    "gpu_reserved_gib": 1.5,
    # Caching-allocator fragmentation: reserved = allocated * (1 + fragmentation). The training
    # package runs with expandable segments (PYTORCH_CUDA_ALLOC_CONF), which keep it small: on the
    # H100, 0.2 GiB reserved beyond 77.6 GiB allocated. (Fixed blocks measured up to 5%.)
    "fragmentation": 0.02,
    # Never plan to the last byte: fraction of the GPU kept free.
    "gpu_headroom": 0.03,
    # Host: OS, page cache floor, daemons (per node; default min(16 GiB, 10% of RAM)) and each
    # rank's own process (torch, CUDA host side, dataloader; default 4 GiB, 1 GiB for CPU ranks).
    "host_reserved_gib": None,
    "host_per_rank_gib": None,
    # DeepSpeed's estimators multiply CPU-side offload memory by this (pinned buffers).
    "offload_buffer_factor": 1.5,
    # Size of one checkpoint shard file (HF writes ~5 GB shards); ZeRO-3 loads one at a time.
    "checkpoint_shard_gib": 5.0,
    # Speed model (relative time per optimizer step, lower is faster). See docs/planner.md.
    "checkpointing_cost": 4.0 / 3.0,
    "micro_tokens_half_efficiency": 1024,
    "zero_comm": {"0": 0.0, "1": 0.01, "2": 0.03, "3": 0.12},
    "zero_comm_reference_tokens": 4096,
    "multi_node_comm_factor": 2.0,
    "offload_optimizer_cost": 1.5,
    "offload_param_cost": 2.0,
    "max_micro_batch": 64,
    # micro_tokens_half_efficiency holds for this hidden size; wider matmuls reach the same
    # efficiency with proportionally fewer tokens.
    "micro_efficiency_hidden": 1536,
    # One GPU (world size 1) needs no partitioning, so the planner also weighs plain PyTorch (the
    # "torch" engine: 16-bit weights, fused AdamW, torch.compile). On an H100 (docs/gpu-benchmarks.md)
    # DeepSpeed ZeRO-0 took 1.24x the time of plain PyTorch, and torch.compile took 0.8x of that.
    "deepspeed_single_gpu_cost": 1.24,
    "compile_cost": 0.8,
}

ENGINES = ("deepspeed", "torch")

# Arguments of the training package (train/args.py) that trainer_args() may add besides HF's
# TrainingArguments.
PACKAGE_ARGS = ("checkpoint_layers", "compile_regions")


class PlanError(Exception):
    """The job cannot be planned; str() holds the numbers and what would make it fit."""


def _gib(nbytes):
    return round(nbytes / GIB, 2)


# --------------------------------------------------------------------------------------------
# Model shape


class ModelShape(object):
    """The numbers of a decoder-only LM that memory depends on, read from its config.json."""

    KNOWN_TYPES = ("llama", "qwen2", "qwen3", "mistral")

    def __init__(self, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 num_key_value_heads=None, vocab_size=32000, tie_word_embeddings=False, head_dim=None,
                 qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, model_type="llama",
                 max_position_embeddings=None, name=None, num_parameters=None):
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_layers = int(num_hidden_layers)
        self.num_heads = int(num_attention_heads)
        self.num_kv_heads = int(num_key_value_heads or num_attention_heads)
        self.vocab_size = int(vocab_size)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.head_dim = int(head_dim or self.hidden_size // self.num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.o_bias = bool(o_bias)
        self.mlp_bias = bool(mlp_bias)
        self.qk_norm = bool(qk_norm)
        self.model_type = model_type or "llama"
        self.max_position_embeddings = max_position_embeddings
        self.name = name or "%s-h%d-l%d" % (self.model_type, self.hidden_size, self.num_layers)
        self.declared_parameters = num_parameters
        for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "vocab_size", "head_dim"):
            if getattr(self, field) <= 0:
                raise PlanError("model shape: %s must be positive, got %r" % (field, getattr(self, field)))

    @classmethod
    def from_config(cls, cfg, name=None):
        """Build from a Hugging Face config.json dict (or a dict with the same keys)."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise PlanError("config.json has a text_config (a multimodal model): the planner knows "
                            "decoder-only LMs; pass the text_config as model_shape")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise PlanError("model config lacks %s (needs a Llama/Qwen2 style decoder config)"
                            % ", ".join(missing))
        model_type = cfg.get("model_type", "llama")
        # Qwen2 always has q/k/v biases; Llama/Mistral/Qwen3 follow attention_bias (default off),
        # which in Llama also covers o_proj.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            head_dim=cfg.get("head_dim"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=(model_type == "qwen3"),
            model_type=model_type,
            max_position_embeddings=cfg.get("max_position_embeddings"),
            name=name or cfg.get("_name_or_path") or None,
            num_parameters=cfg.get("num_parameters"),
        )

    @property
    def q_dim(self):
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self):
        """(name, in_features, out_features, has_bias) of the linears of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return [
            ("q_proj", h, self.q_dim, self.qkv_bias),
            ("k_proj", h, self.kv_dim, self.qkv_bias),
            ("v_proj", h, self.kv_dim, self.qkv_bias),
            ("o_proj", self.q_dim, h, self.o_bias),
            ("gate_proj", h, i, self.mlp_bias),
            ("up_proj", h, i, self.mlp_bias),
            ("down_proj", i, h, self.mlp_bias),
        ]

    @property
    def layer_parameters(self):
        n = sum(fin * fout + (fout if bias else 0) for _, fin, fout, bias in self.linear_shapes())
        n += 2 * self.hidden_size  # input and post-attention RMSNorm
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def num_parameters(self):
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_layers * self.layer_parameters + self.hidden_size

    @property
    def largest_layer_parameters(self):
        """Parameters of the largest single module, as DeepSpeed's ZeRO-3 estimator counts them."""
        candidates = [self.vocab_size * self.hidden_size]
        candidates += [fin * fout + (fout if bias else 0) for _, fin, fout, bias in self.linear_shapes()]
        return max(candidates)

    @property
    def largest_parameter(self):
        """Elements of the largest single tensor (the one gradient ZeRO-2 cannot bucket)."""
        return max([self.vocab_size * self.hidden_size]
                   + [fin * fout for _, fin, fout, _ in self.linear_shapes()])

    def lora_parameters(self, rank, targets=ADAPTER_TARGETS):
        per_layer = sum(rank * (fin + fout) for name, fin, fout, _ in self.linear_shapes() if name in targets)
        return self.num_layers * per_layer

    def describe(self):
        return {
            "name": self.name,
            "model_type": self.model_type,
            "parameters": self.num_parameters,
            "parameters_b": round(self.num_parameters / 1e9, 3),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "largest_layer_parameters": self.largest_layer_parameters,
        }


def load_model_shape(model_dir=None, config=None, name=None):
    """Shape from model_dir/config.json, or from a config/shape dict."""
    if model_dir:
        path = os.path.join(model_dir, "config.json")
        try:
            with open(path) as fd:
                config = json.load(fd)
        except (IOError, OSError) as exc:
            raise PlanError("cannot read %s: %s" % (path, exc))
        except ValueError as exc:
            raise PlanError("%s is not valid JSON: %s" % (path, exc))
        name = name or os.path.basename(os.path.normpath(model_dir))
    if not config:
        raise PlanError("give the model as model_dir (with config.json) or as model_shape")
    return ModelShape.from_config(config, name=name)


# --------------------------------------------------------------------------------------------
# Cluster and job


class Cluster(object):
    """What one rank and one node have. slots: ranks per node (one entry per node)."""

    def __init__(self, slots, gpu_memory_gib=None, host_memory_gib=None, bf16=True, device="gpu",
                 gpu_model=None):
        if not slots:
            raise PlanError("cluster has no nodes")
        self.slots = [int(s) for s in slots]
        if min(self.slots) <= 0:
            raise PlanError("every node needs at least one slot, got %s" % self.slots)
        self.device = device
        if device == "gpu" and not gpu_memory_gib:
            raise PlanError("gpu_memory_gb is unknown: set it in the inventory or gather GPU facts")
        if not host_memory_gib:
            raise PlanError("host_memory_gb is unknown: set it in the inventory or gather facts")
        self.gpu_memory_gib = float(gpu_memory_gib or 0)
        self.host_memory_gib = float(host_memory_gib)
        self.bf16 = bool(bf16) and device == "gpu"
        self.gpu_model = gpu_model

    @property
    def nodes(self):
        return len(self.slots)

    @property
    def world_size(self):
        return sum(self.slots)

    @property
    def ranks_per_node(self):
        return max(self.slots)

    @property
    def precision(self):
        if self.device != "gpu":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"

    def with_nodes(self, nodes):
        c = copy.copy(self)
        c.slots = [self.ranks_per_node] * nodes
        return c


class Job(object):
    def __init__(self, seq_len, global_batch_size, finetune="full", lora_rank=16, lora_alpha=32,
                 lora_dropout=0.05, lora_targets=ADAPTER_TARGETS, learning_rate=None, adam_beta1=0.9,
                 adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                 shared_storage=False):
        if finetune not in ("full", "lora"):
            raise PlanError("finetune must be full or lora, got %r" % finetune)
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        if self.seq_len <= 0 or self.global_batch_size <= 0:
            raise PlanError("seq_len and global_batch_size must be positive")
        self.finetune = finetune
        self.lora_rank = int(lora_rank)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.lora_targets = tuple(lora_targets)
        unknown = [t for t in self.lora_targets if t not in ADAPTER_TARGETS]
        if unknown:
            raise PlanError("unknown LoRA targets %s (known: %s)" % (unknown, ", ".join(ADAPTER_TARGETS)))
        if learning_rate is None:
            learning_rate = 1e-5 if finetune == "full" else 2e-4
        self.learning_rate = float(learning_rate)
        self.adam_beta1 = float(adam_beta1)
        self.adam_beta2 = float(adam_beta2)
        self.adam_epsilon = float(adam_epsilon)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.shared_storage = bool(shared_storage)

    def with_changes(self, **changes):
        j = copy.copy(self)
        for k, v in changes.items():
            setattr(j, k, v)
        return j


# --------------------------------------------------------------------------------------------
# Memory model


def _bytes_per_value(precision):
    return 4 if precision == "fp32" else 2


def trainable_parameters(model, job):
    if job.finetune == "lora":
        return model.lora_parameters(job.lora_rank, job.lora_targets)
    return model.num_parameters


def model_state_bytes(model, job, world_size, precision, stage, offload_optimizer=False, offload_param=False):
    """GPU bytes per rank for parameters, gradients and optimizer states.

    Mixed precision (bf16/fp16) with AdamW keeps 16 bytes per trainable parameter besides the
    16-bit copy: fp32 master weights (4), Adam moments (8), fp32 gradients (4). These are the
    terms of DeepSpeed's estimate_zero2/zero3_model_states_mem_needs:
      ZeRO-2: 2P + 18P/N   ZeRO-3: 4L + 18P/N   (+ offload variants)
    ZeRO-0/1 have no estimator; they follow the same terms (ZeRO paper, Rajbhandari et al. 2020).
    """
    P = model.num_parameters
    T = trainable_parameters(model, job)
    N = world_size
    L = model.largest_layer_parameters
    w = _bytes_per_value(precision)
    mixed = precision != "fp32"
    master_and_moments = (12 if mixed else 8) * T
    fp32_grads = (4 if mixed else 0) * T
    out = {}
    if stage == 0:
        out = {"parameters": w * P, "gradients": w * T, "optimizer_states": master_and_moments,
               "fp32_gradients": fp32_grads}
    elif stage == 1:
        out = {"parameters": w * P, "gradients": w * T, "optimizer_states": master_and_moments / N,
               "fp32_gradients": fp32_grads / N}
    elif stage == 2:
        if offload_optimizer:
            out = {"parameters": w * P, "gradients": 0, "optimizer_states": 0, "fp32_gradients": 0}
        else:
            out = {"parameters": w * P, "gradients": w * T / N, "optimizer_states": master_and_moments / N,
                   "fp32_gradients": fp32_grads / N}
    elif stage == 3:
        # The gathered largest layer (16-bit param + its gradient) is DeepSpeed's 4 * largest_layer.
        gathered = 2 * w * L
        if offload_param:
            out = {"parameters": 0, "gradients": 0, "optimizer_states": 0, "fp32_gradients": 0}
        elif offload_optimizer:
            out = {"parameters": w * P / N, "gradients": 0, "optimizer_states": 0, "fp32_gradients": 0}
        else:
            # DeepSpeed's estimator budgets 18 bytes/param/N: 2 (16-bit param shard) + 4 (fp32
            # master) + 8 (moments) + 4 (gradients: the 16-bit shard and the fp32 copy that ZeRO-3
            # builds one sub-group at a time).
            out = {"parameters": w * P / N, "gradients": (4 if mixed else w) * T / N,
                   "optimizer_states": master_and_moments / N, "fp32_gradients": 0}
        out["gathered_layer"] = gathered
    else:
        raise PlanError("ZeRO stage must be 0-3, got %r" % stage)
    return dict((k, int(v)) for k, v in out.items())


def torch_state_bytes(model, job, precision):
    """GPU bytes for parameters, gradients and optimizer states without DeepSpeed (one GPU).

    The weights train in their 16-bit dtype with torch's fused AdamW, whose moments take the
    parameters' dtype: 2 + 2 + 4 bytes per trainable parameter in bf16, no fp32 master copy (as
    plain HF Trainer on bf16 weights). LoRA adapters are fp32 (peft upcasts them): 4 + 4 + 8.
    """
    P = model.num_parameters
    T = trainable_parameters(model, job)
    w = _bytes_per_value(precision)
    if job.finetune == "lora":
        out = {"parameters": w * P + 4 * T, "gradients": 4 * T, "optimizer_states": 8 * T}
    else:
        out = {"parameters": w * P, "gradients": w * T, "optimizer_states": 2 * w * T}
    out["fp32_gradients"] = 0
    return dict((k, int(v)) for k, v in out.items())


def activation_bytes_per_layer_token(model, job, precision, compiled=False):
    """Bytes autograd keeps per token for one decoder layer (no checkpointing).

    Counted tensor by tensor for HF's Qwen2/Llama decoder with SDPA (flash / memory-efficient
    kernels, native GQA) and checked against torch.autograd saved-tensor hooks in the unit tests.
    compiled: the layer runs under torch.compile, whose partitioner keeps the matmuls' outputs and
    recomputes the element-wise work (norms, rotary, SiLU, products) in the backward pass.
    """
    h, i, qd, kd = model.hidden_size, model.intermediate_size, model.q_dim, model.kv_dim
    w = _bytes_per_value(precision)
    if compiled:
        return _compiled_layer_bytes_per_token(model, job, w)
    # RMSNorm upcasts its input to fp32 (4h kept by pow/mul) and keeps the rsqrt (4 bytes); with a
    # trainable weight it also keeps the normalised 16-bit tensor for the weight's gradient.
    norm = 4 * h + 4 + (w * h if job.finetune == "full" else 0)
    # Attention: rotated q and k, v and the SDPA output (the o_proj input is the same storage,
    # flash kernels return it contiguous in (b, s, heads, dim)), fp32 log-sum-exp per head.
    attn = w * (2 * qd + 2 * kd) + 4 * model.num_heads
    # MLP: gate output (SiLU input), SiLU output, up output (both kept by the product).
    mlp = 3 * w * i
    inputs = dict((name, fin) for name, fin, _, _ in model.linear_shapes())
    groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))
    if job.finetune == "full":
        # Trainable linears keep their inputs: the norm output (shared by q/k/v, and by gate/up)
        # and the product that feeds down_proj. The o_proj input is the SDPA output, counted above.
        linear_inputs = sum(w * inputs[g[0]] for g in groups)
        adapters = 0
    else:
        # Frozen base linears keep nothing; each adapter's lora_A keeps its input and lora_B the
        # rank-r output. DeepSpeed casts every parameter, the adapters included, to bf16/fp16,
        # so the input is the 16-bit tensor itself, shared by the modules reading it. With
        # dropout each adapted module keeps its own dropped-out copy plus a 1-byte mask instead.
        targets = set(job.lora_targets)
        adapters = len(targets) * w * job.lora_rank
        if job.lora_dropout > 0:
            linear_inputs = 0
            adapters += sum((w + 1) * inputs[t] for t in targets)
        else:
            linear_inputs = sum(w * inputs[g[0]] for g in groups if targets.intersection(g))
    return {"norms": 2 * norm, "attention": attn, "mlp": mlp, "linear_inputs": linear_inputs,
            "adapters": adapters}


def _compiled_layer_bytes_per_token(model, job, w):
    """Per-token bytes of one compiled decoder layer, checked against the H100 runs in
    docs/gpu-benchmarks.md (Qwen2.5-1.5B full at micro-batch 8: 5% over the measured peak;
    the 32B LoRA shape: 1.29 GiB predicted per layer left unchecked at micro-batch 2, 1.22 measured)."""
    h, i, qd, kd = model.hidden_size, model.intermediate_size, model.q_dim, model.kv_dim
    # Each norm's input (the residual stream) and its rsqrt; the normalised tensor is recomputed.
    norms = 2 * (w * h + 4)
    # q, k, v before rotary (rotary is recomputed), the SDPA output and its fp32 log-sum-exp.
    attn = w * (2 * qd + 2 * kd) + 4 * model.num_heads
    # gate and up outputs; SiLU and the product feeding down_proj are recomputed.
    mlp = 2 * w * i
    adapters = linear_inputs = 0
    if job.finetune == "full":
        # trainable linears' inputs for their weight gradients: the two normalised tensors and the
        # product feeding down_proj are kept rather than recomputed
        linear_inputs = w * (2 * h + i)
    else:
        targets = set(job.lora_targets)
        adapters = len(targets) * w * job.lora_rank
        if job.lora_dropout > 0:
            # one dropout mask per adapted module (1 byte per input element) and, to be safe, its
            # dropped-out input
            inputs = dict((name, fin) for name, fin, _, _ in model.linear_shapes())
            adapters += sum((w + 1) * inputs[t] for t in targets)
    return {"norms": norms, "attention": attn, "mlp": mlp, "linear_inputs": linear_inputs, "adapters": adapters}


def backward_transient_per_token(model, job, precision):
    """Gradient buffers alive while one layer runs backward: w * (2i + 2h) per token.

    Fitted to PyTorch's CPU memory profiler on full and LoRA models (tests/unit/test_planner.py).
    """
    h, i = model.hidden_size, model.intermediate_size
    return _bytes_per_value(precision) * (2 * i + 2 * h)


def activation_bytes(model, job, precision, micro_batch, checkpointing, compiled=False, checkpoint_layers=None):
    """Peak activation bytes of one micro-batch on one rank, with its breakdown.

    checkpoint_layers: with checkpointing, how many decoder layers are checkpointed (default all);
    the others keep their activations. compiled: torch.compile (layers and loss)."""
    tokens = micro_batch * job.seq_len
    w = _bytes_per_value(precision)
    h, V = model.hidden_size, model.vocab_size
    per_layer = sum(activation_bytes_per_layer_token(model, job, precision, compiled).values())
    # Final norm (its output feeds lm_head, kept when lm_head trains) and the loss: HF upcasts
    # the logits to fp32; at the start of backward the fp32 log-softmax output, its gradient and
    # the gradient of the upcast are alive together: 12 bytes per vocabulary entry per token.
    final_norm = 4 * h + 4 + (2 * w * h if job.finetune == "full" else 0)
    # Compiled, the loss fuses the upcast: the 16-bit logits, their gradient and an fp32 chunk,
    # 6 bytes per entry (the 32B LoRA shape at micro-batch 2: 69.1 GiB predicted, 69.2 measured).
    logits = (6 if compiled else 12) * V
    labels = 16
    transient = backward_transient_per_token(model, job, precision)
    # cos/sin of the rotary embedding: per position, shared by the batch and all layers.
    rope = 2 * w * model.head_dim * job.seq_len
    if checkpointing:
        k = model.num_layers if checkpoint_layers is None else max(1, min(int(checkpoint_layers), model.num_layers))
        # each checkpointed layer keeps its input; the others all their activations
        kept = k * w * h + (model.num_layers - k) * per_layer
        peak_token = kept + labels + max(final_norm + logits, per_layer + transient)
        layers = kept * tokens
        working = (peak_token - kept) * tokens
    else:
        kept = model.num_layers * per_layer
        peak_token = kept + final_norm + labels + max(logits, transient)
        layers = kept * tokens
        working = (peak_token - kept) * tokens
    return {
        "tokens": tokens,
        "layers": int(layers),
        "loss_and_working": int(working),
        "rope": int(rope),
        "total": int(layers + working + rope),
        "per_token_per_layer": int(per_layer),
    }


def bucket_sizes(model, stage):
    """ZeRO bucket sizes (elements) written to ds_config.json."""
    h = model.hidden_size
    if stage == 3:
        # The values HF's integration derives from hidden_size for "auto".
        return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                "stage3_param_persistence_threshold": 10 * h}
    # DeepSpeed/HF recommend 2e8; smaller models get P/10 so buffers stay small next to them.
    size = int(min(2e8, max(1e6, math.ceil(model.num_parameters / 10.0 / 1e6) * 1e6)))
    return {"reduce_bucket_size": size, "allgather_bucket_size": size}


def buffer_bytes(model, job, precision, stage, offload_optimizer, overlap_comm=True):
    w = _bytes_per_value(precision)
    buckets = bucket_sizes(model, stage)
    T = trainable_parameters(model, job)
    if stage == 0:
        # The engine all-reduces gradients flattened into buckets of up to 5e8 elements.
        return {"comm_buckets": int(w * min(5e8, T))}
    if stage in (1, 2):
        # ZeRO-1/2 allocate one gradient staging buffer of reduce_bucket_size, two with
        # overlap_comm (stage_1_and_2.py setup_buckets). Parameters are all-gathered in place.
        comm = (2 if overlap_comm else 1) * w * buckets["reduce_bucket_size"]
        out = {"comm_buckets": int(comm)}
        if stage == 2 and job.finetune == "full":
            # A parameter larger than the bucket is reduced from its own gradient tensor.
            out["largest_gradient"] = int(w * model.largest_parameter)
        return out
    rb = buckets["reduce_bucket_size"]
    return {"comm_buckets": int(w * (2 * rb + buckets["stage3_prefetch_bucket_size"]))}


def host_bytes(model, job, cluster, stage, offload_optimizer, offload_param, settings):
    """Host RAM per node (the busiest node: the master, with the most ranks)."""
    P = model.num_parameters
    T = trainable_parameters(model, job)
    w = _bytes_per_value(cluster.precision)
    r = cluster.ranks_per_node
    N = cluster.world_size
    reserved = settings["host_reserved_gib"]
    if reserved is None:
        reserved = min(16.0, 0.1 * cluster.host_memory_gib)
    per_rank = settings["host_per_rank_gib"]
    if per_rank is None:
        per_rank = 4.0 if cluster.device == "gpu" else 1.0
    base = reserved * GIB + r * per_rank * GIB
    if stage == 3:
        # zero.Init: each rank reads one checkpoint shard at a time and keeps its partition.
        load = r * min(w * P, settings["checkpoint_shard_gib"] * GIB)
    else:
        # Each rank materialises the whole model on the CPU before DeepSpeed moves it to the GPU.
        load = r * w * P
    offload = 0.0
    if offload_optimizer:
        offload += 16 * T * r / N * settings["offload_buffer_factor"]
    if offload_param:
        offload += w * P * r / N * settings["offload_buffer_factor"]
    # ZeRO-3 with stage3_gather_16bit_weights_on_model_save: rank 0 gathers a 16-bit state dict.
    save = w * P if stage == 3 else 0
    if cluster.device != "gpu":
        # CPU ranks keep everything in host memory; counted in the rank budget, not here.
        offload = 0.0
    peak = base + max(load, offload + save)
    return {"reserved_and_processes": int(base), "model_loading": int(load), "offload": int(offload),
            "final_save": int(save), "peak": int(peak)}


class Candidate(object):
    """One way to run the job. engine "torch" (one GPU only) is plain PyTorch: no DeepSpeed, no
    partitioning (stage 0), torch.compile. checkpoint_layers: how many decoder layers are
    checkpointed when checkpointing (None: all)."""
    __slots__ = ("stage", "offload_optimizer", "offload_param", "checkpointing", "micro_batch", "engine",
                 "checkpoint_layers", "num_layers")

    def __init__(self, stage, offload_optimizer, offload_param, checkpointing, micro_batch, engine="deepspeed",
                 checkpoint_layers=None, num_layers=None):
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_param = offload_param
        self.checkpointing = checkpointing
        self.micro_batch = micro_batch
        self.engine = engine
        self.checkpoint_layers = checkpoint_layers
        self.num_layers = num_layers

    @property
    def compiled(self):
        return self.engine == "torch"

    def with_checkpoint_layers(self, k):
        c = copy.copy(self)
        c.checkpoint_layers = k
        return c

    def checkpoint_fraction(self):
        if not self.checkpointing:
            return 0.0
        if self.checkpoint_layers is None or not self.num_layers:
            return 1.0
        return min(1.0, float(self.checkpoint_layers) / self.num_layers)

    def label(self):
        off = "no offload"
        if self.offload_param:
            off = "optimizer+params offloaded to CPU"
        elif self.offload_optimizer:
            off = "optimizer offloaded to CPU"
        ckpt = "no checkpointing"
        if self.checkpointing:
            ckpt = "gradient checkpointing"
            if self.checkpoint_layers is not None and self.num_layers and self.checkpoint_layers < self.num_layers:
                ckpt = "gradient checkpointing of %d of %d layers" % (self.checkpoint_layers, self.num_layers)
        if self.engine == "torch":
            return "no DeepSpeed (one GPU: PyTorch, fused AdamW, torch.compile), %s, micro-batch %d" % (
                ckpt, self.micro_batch)
        return "ZeRO-%d, %s, %s, micro-batch %d" % (self.stage, off, ckpt, self.micro_batch)


def estimate(model, job, cluster, cand, settings):
    """Memory of one candidate plan (bytes), broken down."""
    precision = cluster.precision
    if cand.engine == "torch":
        states = torch_state_bytes(model, job, precision)
        bufs = {}
    else:
        states = model_state_bytes(model, job, cluster.world_size, precision, cand.stage,
                                   cand.offload_optimizer, cand.offload_param)
        bufs = buffer_bytes(model, job, precision, cand.stage, cand.offload_optimizer)
    acts = activation_bytes(model, job, precision, cand.micro_batch, cand.checkpointing, cand.compiled,
                            cand.checkpoint_layers)
    allocated = sum(states.values()) + acts["total"] + sum(bufs.values())
    reserved = allocated * (1.0 + settings["fragmentation"])
    host = host_bytes(model, job, cluster, cand.stage, cand.offload_optimizer, cand.offload_param, settings)
    if cluster.device == "gpu":
        total = cluster.gpu_memory_gib * GIB
        usable = total * (1.0 - settings["gpu_headroom"]) - settings["gpu_reserved_gib"] * GIB
        host_usable = cluster.host_memory_gib * GIB
    else:
        # CPU ranks share the node's RAM: each gets an equal share after the node's reserve.
        r = cluster.ranks_per_node
        host_usable = cluster.host_memory_gib * GIB
        usable = (host_usable - host["reserved_and_processes"]) / r * (1.0 - settings["gpu_headroom"])
        total = cluster.host_memory_gib * GIB / r
    return {
        "model_states": states,
        "model_states_total": int(sum(states.values())),
        "activations": acts,
        "buffers": bufs,
        "peak_allocated": int(allocated),
        "peak_reserved": int(reserved),
        "usable": int(usable),
        "device_total": int(total),
        "host": host,
        "host_usable": int(host_usable),
        "fits_gpu": reserved <= usable,
        "unit": "GPU" if cluster.device == "gpu" else "CPU rank",
        "fits_host": host["peak"] <= host_usable,
    }


def relative_step_time(cand, job, cluster, settings, model=None):
    """Speed model: relative time of one optimizer step (same tokens for every candidate)."""
    tokens = cand.micro_batch * job.seq_len
    half = settings["micro_tokens_half_efficiency"]
    if model is not None:
        half = half * settings["micro_efficiency_hidden"] / float(model.hidden_size)
    efficiency = tokens / float(tokens + half)
    # Checkpointing recomputes the forward of the checkpointed layers only.
    t = (1.0 + (settings["checkpointing_cost"] - 1.0) * cand.checkpoint_fraction()) / efficiency
    if cand.engine == "torch":
        return round(t * settings["compile_cost"], 4)
    if cluster.world_size == 1:
        t *= settings["deepspeed_single_gpu_cost"]
    comm = settings["zero_comm"][str(cand.stage)]
    if cand.stage >= 2:
        # Reduce-scatter (ZeRO-2) and parameter gathers (ZeRO-3) happen every micro-step: the
        # bigger the micro-batch, the more compute hides them.
        comm *= settings["zero_comm_reference_tokens"] / float(tokens)
    if cluster.nodes > 1:
        comm *= settings["multi_node_comm_factor"]
    t *= 1.0 + comm
    if cand.offload_optimizer:
        t *= settings["offload_optimizer_cost"]
    if cand.offload_param:
        t *= settings["offload_param_cost"]
    return round(t, 4)


# --------------------------------------------------------------------------------------------
# Planning


PLAN_OVERRIDE_KEYS = ("engine", "zero_stage", "offload_optimizer", "offload_param", "gradient_checkpointing",
                      "checkpoint_layers", "micro_batch_size")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "true", "yes", "on", "1"):
            return True
        if v in ("none", "false", "no", "off", "0", ""):
            return False
    if isinstance(value, int):
        return bool(value)
    raise PlanError("cannot read %r as a yes/no (or cpu/none) value" % (value,))


def candidates(job, cluster, overrides, settings, num_layers=None):
    per_rank = job.global_batch_size // cluster.world_size
    micro_options = [m for m in _divisors(per_rank) if m <= settings["max_micro_batch"]]
    offloads = [(False, False)]
    if cluster.device == "gpu":
        offloads += [(True, False), (True, True)]
    out = []
    if cluster.device == "gpu" and cluster.world_size == 1:
        for ckpt in (False, True):
            for m in micro_options:
                out.append(Candidate(0, False, False, ckpt, m, engine="torch", num_layers=num_layers))
    for stage in (0, 1, 2, 3):
        for off_opt, off_param in offloads:
            if off_param and stage != 3:
                continue
            if off_opt and stage < 2:
                continue  # ZeRO-2 offload keeps the same GPU states as ZeRO-1 offload, and is faster
            for ckpt in (False, True):
                for m in micro_options:
                    out.append(Candidate(stage, off_opt, off_param, ckpt, m, num_layers=num_layers))
    o = overrides or {}
    if "engine" in o:
        if o["engine"] not in ENGINES:
            raise PlanError("plan override engine must be one of %s, got %r" % (", ".join(ENGINES), o["engine"]))
        out = [c for c in out if c.engine == o["engine"]]
    if "zero_stage" in o:
        # a ZeRO stage means DeepSpeed
        out = [c for c in out if c.engine == "deepspeed"]
    if "checkpoint_layers" in o:
        k = int(o["checkpoint_layers"])
        out = [c.with_checkpoint_layers(k) for c in out if c.checkpointing == (k > 0)]
    if "zero_stage" in o:
        out = [c for c in out if c.stage == int(o["zero_stage"])]
    if "offload_optimizer" in o:
        out = [c for c in out if c.offload_optimizer == _as_bool(o["offload_optimizer"])]
    if "offload_param" in o:
        out = [c for c in out if c.offload_param == _as_bool(o["offload_param"])]
    if "gradient_checkpointing" in o:
        out = [c for c in out if c.checkpointing == _as_bool(o["gradient_checkpointing"])]
    if "micro_batch_size" in o:
        out = [c for c in out if c.micro_batch == int(o["micro_batch_size"])]
    return out


def _settings(settings):
    s = copy.deepcopy(DEFAULT_SETTINGS)
    for k, v in (settings or {}).items():
        if k not in s:
            raise PlanError("unknown planner setting %r (known: %s)" % (k, ", ".join(sorted(s))))
        if isinstance(s[k], dict):
            s[k].update(dict((str(kk), vv) for kk, vv in v.items()))
        else:
            s[k] = v
    return s


def _gpu_line(est):
    fmt = ("%.1f GiB per " + est["unit"] + " (model states %.1f, activations %.1f, buffers %.1f, "
           "+%d%% fragmentation) vs %.1f usable")
    return fmt % (_gib(est["peak_reserved"]), _gib(est["model_states_total"]), _gib(est["activations"]["total"]),
                  _gib(sum(est["buffers"].values())),
                  round((est["peak_reserved"] / max(est["peak_allocated"], 1) - 1) * 100), _gib(est["usable"]))


def _reason(est):
    reasons = []
    if not est["fits_gpu"]:
        reasons.append("needs " + _gpu_line(est))
    if not est["fits_host"]:
        reasons.append("needs %.1f GiB host RAM per node vs %.1f" % (_gib(est["host"]["peak"]),
                                                                    _gib(est["host_usable"])))
    return "; ".join(reasons)


def _fewest_checkpointed_layers(model, job, cluster, cand, settings):
    """The candidate with as few checkpointed layers as fit (all of them if even that does not)."""
    def fits(k):
        est = estimate(model, job, cluster, cand.with_checkpoint_layers(k), settings)
        return est["fits_gpu"] and est["fits_host"]

    L = model.num_layers
    if L <= 1 or not fits(L):
        return cand.with_checkpoint_layers(L)
    lo, hi = 1, L  # memory falls as k grows: find the smallest k that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return cand.with_checkpoint_layers(lo)


def _search(model, job, cluster, overrides, settings):
    cands = candidates(job, cluster, overrides, settings, model.num_layers)
    scored = []
    for c in cands:
        if c.checkpointing and c.checkpoint_layers is None:
            c = _fewest_checkpointed_layers(model, job, cluster, c, settings)
        est = estimate(model, job, cluster, c, settings)
        scored.append((relative_step_time(c, job, cluster, settings, model), c, est))
    # Fastest first; ties go to less partitioning, no offload, no checkpointing, bigger micro-batch.
    scored.sort(key=lambda x: (x[0], x[1].engine != "torch", x[1].stage, x[1].offload_optimizer,
                               x[1].offload_param, x[1].checkpointing, -x[1].micro_batch))
    return scored


def _fits(scored):
    return [s for s in scored if s[2]["fits_gpu"] and s[2]["fits_host"]]


def _check_batch(job, cluster):
    n = cluster.world_size
    if job.global_batch_size % n:
        lower = (job.global_batch_size // n) * n
        upper = lower + n
        options = [str(x) for x in (lower, upper) if x > 0]
        raise PlanError("global_batch_size %d is not a multiple of the %d ranks (%s): use %s"
                        % (job.global_batch_size, n, " + ".join(str(s) for s in cluster.slots),
                           " or ".join(options)))


def _smallest_plan(model, job, cluster, settings, overrides=None):
    """The least memory-hungry candidate (for error messages), ignoring the batch layout."""
    j = job.with_changes(global_batch_size=cluster.world_size)
    scored = _search(model, j, cluster, overrides, settings)
    if not scored:
        return None
    return min(scored, key=lambda s: (s[2]["peak_reserved"] - s[2]["usable"], s[2]["host"]["peak"]))


def _what_would_fit(model, job, cluster, overrides, settings):
    """Suggestions for an impossible job, each one checked by planning it.

    Tries more nodes, LoRA and shorter sequences, alone and combined, and reports the smallest
    change of each kind that fits (one rank's micro-batch of 1, batch layout ignored).
    """
    def fits(j, c, o):
        j = j.with_changes(global_batch_size=c.world_size)
        return bool(_fits(_search(model, j, c, o, settings)))

    tips = []
    if overrides and fits(job, cluster, None):
        tips.append("drop the plan overrides %s: another plan fits" % json.dumps(overrides, sort_keys=True))
    node_options = sorted(set([cluster.nodes + 1] + [cluster.nodes * k for k in (2, 3, 4, 6, 8, 16)]))
    seq_options = []
    seq = job.seq_len
    while seq > 256:
        seq //= 2
        seq_options.append(seq)
    finetunes = [job.finetune] + (["lora"] if job.finetune == "full" else [])
    found = []
    for ft in finetunes:
        for seq in [job.seq_len] + seq_options:
            for nodes in [cluster.nodes] + node_options:
                changes = (ft != job.finetune) + (seq != job.seq_len) + (nodes != cluster.nodes)
                if changes == 0:
                    continue
                if fits(job.with_changes(finetune=ft, seq_len=seq), cluster.with_nodes(nodes), overrides):
                    found.append((changes, ft, seq, nodes))
                    break
    # Smallest change of each kind: per set of changed dimensions, the first found.
    kinds = {}
    for changes, ft, seq, nodes in found:
        kind = (ft != job.finetune, seq != job.seq_len, nodes != cluster.nodes)
        if kind not in kinds:
            kinds[kind] = (changes, ft, seq, nodes)
    for changes, ft, seq, nodes in sorted(kinds.values())[:4]:
        parts = []
        if nodes != cluster.nodes:
            parts.append("%d nodes of %d GPUs (instead of %d)" % (nodes, cluster.ranks_per_node, cluster.nodes))
        if ft != job.finetune:
            parts.append("LoRA rank %d instead of a full fine-tune" % job.lora_rank)
        if seq != job.seq_len:
            parts.append("sequence length %d (instead of %d)" % (seq, job.seq_len))
        tips.append(" + ".join(parts))
    if overrides and ("offload_optimizer" in overrides or "offload_param" in overrides):
        o = dict((k, v) for k, v in overrides.items() if k not in ("offload_optimizer", "offload_param"))
        if fits(job, cluster, o):
            tips.append("allow offload to CPU (remove offload_* from the plan overrides)")
    return tips


def plan(model, cluster, job, overrides=None, settings=None):
    """Pick the fastest plan that fits. Returns a dict; raises PlanError with numbers otherwise."""
    settings = _settings(settings)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in PLAN_OVERRIDE_KEYS]
    if unknown:
        raise PlanError("unknown plan override(s) %s (known: %s)" % (unknown, ", ".join(PLAN_OVERRIDE_KEYS)))
    _check_batch(job, cluster)
    per_rank = job.global_batch_size // cluster.world_size
    if "micro_batch_size" in overrides and per_rank % int(overrides["micro_batch_size"]):
        raise PlanError("micro_batch_size %s does not divide the %d samples per rank per step "
                        "(global_batch_size %d / %d ranks)" % (overrides["micro_batch_size"], per_rank,
                                                                job.global_batch_size, cluster.world_size))
    scored = _search(model, job, cluster, overrides, settings)
    if not scored:
        raise PlanError("the plan overrides %s leave no candidate plan" % json.dumps(overrides, sort_keys=True))
    fitting = _fits(scored)
    if not fitting:
        smallest = _smallest_plan(model, job, cluster, settings, overrides) or (None, scored[-1][1], scored[-1][2])
        _, cand, est = smallest
        lines = [
            "%s (%.2fB parameters, %s, seq %d, global batch %d) does not fit on %d node(s) x %d %s"
            % (model.name, model.num_parameters / 1e9, "full fine-tune" if job.finetune == "full" else "LoRA",
               job.seq_len, job.global_batch_size, cluster.nodes, cluster.ranks_per_node,
               "GPUs" if cluster.device == "gpu" else "CPU ranks"),
            "least memory-hungry plan: %s" % cand.label(),
            "  it needs %s" % _gpu_line(est),
            "  and %.1f GiB host RAM per node of %.1f" % (_gib(est["host"]["peak"]), _gib(est["host_usable"])),
        ]
        if overrides:
            lines.append("plan overrides in force: %s" % json.dumps(overrides, sort_keys=True))
        tips = _what_would_fit(model, job, cluster, overrides, settings)
        lines.append("what would make it fit: " + ("; ".join(tips) if tips else
                                                   "nothing the planner tried (more nodes, LoRA, shorter "
                                                   "sequences)"))
        raise PlanError("\n".join(lines))
    best_time, best, best_est = fitting[0]
    # Faster plans (ranked before the chosen one) do not fit, or they would have been chosen. One
    # line per (stage, offload, checkpointing): its smallest micro-batch that is still faster, the
    # strongest statement ("even micro-batch 1 needs ...").
    by_key, order = {}, []
    for t, c, est in scored:
        if c is best:
            break
        key = (c.engine, c.stage, c.offload_optimizer, c.offload_param, c.checkpointing)
        if key not in by_key:
            order.append(key)
        if key not in by_key or c.micro_batch < by_key[key][1].micro_batch:
            by_key[key] = (t, c, est)
    rejected = [{"plan": by_key[k][1].label(), "relative_step_time": by_key[k][0], "why_not": _reason(by_key[k][2])}
                for k in order]
    rejected.sort(key=lambda r: r["relative_step_time"])
    accum = per_rank // best.micro_batch
    warnings = []
    if model.max_position_embeddings and job.seq_len > model.max_position_embeddings:
        warnings.append("seq_len %d exceeds the model's max_position_embeddings %d"
                        % (job.seq_len, model.max_position_embeddings))
    if model.declared_parameters and abs(model.declared_parameters - model.num_parameters) > 0.1 * model.num_parameters:
        warnings.append("declared num_parameters %d differs from the shape's %d by more than 10%%"
                        % (model.declared_parameters, model.num_parameters))
    if model.model_type not in ModelShape.KNOWN_TYPES:
        warnings.append("model_type %r is treated as a Llama-style decoder" % model.model_type)
    result = {
        "model": model.describe(),
        "trainable_parameters": trainable_parameters(model, job),
        "finetune": job.finetune,
        "nodes": cluster.nodes,
        "slots": cluster.slots,
        "world_size": cluster.world_size,
        "device": cluster.device,
        "gpu_model": cluster.gpu_model,
        "precision": cluster.precision,
        "seq_len": job.seq_len,
        "global_batch_size": job.global_batch_size,
        "engine": best.engine,
        "torch_compile": best.compiled,
        "zero_stage": best.stage,
        "offload_optimizer": best.offload_optimizer,
        "offload_param": best.offload_param,
        "gradient_checkpointing": best.checkpointing,
        "checkpoint_layers": (best.checkpoint_layers if best.checkpoint_layers is not None else model.num_layers)
        if best.checkpointing else 0,
        "micro_batch_size": best.micro_batch,
        "gradient_accumulation_steps": accum,
        "label": best.label(),
        "relative_step_time": best_time,
        "rejected_faster_plans": rejected,
        "candidates_considered": len(scored),
        "candidates_fitting": len(fitting),
        "gpu_memory_gib": _breakdown_gib(best_est),
        "host_memory_gib": dict((k, _gib(v)) for k, v in best_est["host"].items()),
        "host_memory_usable_gib": _gib(best_est["host_usable"]),
        "predicted_peak_allocated_gib": _gib(best_est["peak_allocated"]),
        "predicted_peak_reserved_gib": _gib(best_est["peak_reserved"]),
        "overrides": overrides,
        "settings": settings,
        "warnings": warnings,
    }
    if job.finetune == "lora":
        result["lora"] = {"rank": job.lora_rank, "alpha": job.lora_alpha, "dropout": job.lora_dropout,
                          "target_modules": list(job.lora_targets)}
    result["why"] = _why(result)
    return result


def _breakdown_gib(est):
    out = dict(("model_states." + k, _gib(v)) for k, v in est["model_states"].items())
    out["model_states"] = _gib(est["model_states_total"])
    acts = est["activations"]
    out["activations"] = _gib(acts["total"])
    out["activations.layers"] = _gib(acts["layers"])
    out["activations.loss_and_working"] = _gib(acts["loss_and_working"])
    for k, v in est["buffers"].items():
        out["buffers." + k] = _gib(v)
    out["buffers"] = _gib(sum(est["buffers"].values()))
    out["peak_allocated"] = _gib(est["peak_allocated"])
    out["fragmentation"] = _gib(est["peak_reserved"] - est["peak_allocated"])
    out["peak_reserved"] = _gib(est["peak_reserved"])
    out["usable"] = _gib(est["usable"])
    out["device_total"] = _gib(est["device_total"])
    return out


def _why(p):
    g = p["gpu_memory_gib"]
    lines = ["%s: %s x %d accumulation step(s) = global batch %d on %d rank(s)"
             % (p["label"], p["micro_batch_size"], p["gradient_accumulation_steps"], p["global_batch_size"],
                p["world_size"])]
    lines.append("GPU per rank: %.1f GiB reserved of %.1f usable (model states %.1f, activations %.1f, "
                 "buffers %.1f)" % (g["peak_reserved"], g["usable"], g["model_states"], g["activations"],
                                    g["buffers"]))
    if p["rejected_faster_plans"]:
        lines.append("faster plans that do not fit:")
        for r in p["rejected_faster_plans"][:6]:
            lines.append("  %s (relative time %.2f): %s" % (r["plan"], r["relative_step_time"], r["why_not"]))
    else:
        lines.append("no faster plan exists under the speed model")
    return lines


def _count(n):
    return "%.2fB" % (n / 1e9) if n >= 1e9 else "%.1fM" % (n / 1e6)


def summary_lines(p):
    """Human-readable plan, printed by the render playbook."""
    m = p["model"]
    g = p["gpu_memory_gib"]
    hm = p["host_memory_gib"]
    out = [
        "model: %s, %.2fB parameters (%s, %s trainable), seq %d, global batch %d"
        % (m["name"], m["parameters_b"], "full fine-tune" if p["finetune"] == "full" else "LoRA",
           _count(p["trainable_parameters"]), p["seq_len"], p["global_batch_size"]),
        "cluster: %d node(s), slots %s, %s, %s, %.0f GiB per %s"
        % (p["nodes"], p["slots"], p["gpu_model"] or p["device"], p["precision"], g["device_total"],
           "GPU" if p["device"] == "gpu" else "rank"),
        "plan: " + p["label"] + ", %d accumulation step(s), relative step time %.2f"
        % (p["gradient_accumulation_steps"], p["relative_step_time"]),
        "GPU memory per rank (GiB): " + ", ".join(
            "%s %.2f" % (k, g[k]) for k in sorted(g) if k.startswith("model_states.") and g[k]),
        "  model states %.2f + activations %.2f (layers %.2f, loss/working %.2f) + buffers %.2f"
        % (g["model_states"], g["activations"], g["activations.layers"], g["activations.loss_and_working"],
           g["buffers"]),
        "  = %.2f allocated, %.2f reserved (incl. fragmentation) of %.2f usable (%.2f total)"
        % (g["peak_allocated"], g["peak_reserved"], g["usable"], g["device_total"]),
        "host memory per node (GiB): peak %.1f of %.1f (processes %.1f, model loading %.1f, offload %.1f, "
        "final save %.1f)" % (hm["peak"], p["host_memory_usable_gib"], hm["reserved_and_processes"],
                              hm["model_loading"], hm["offload"], hm["final_save"]),
    ]
    out.extend("why: " + line for line in p["why"][1:])
    out.extend("warning: " + w for w in p["warnings"])
    return out


# --------------------------------------------------------------------------------------------
# ds_config.json and Trainer arguments


def _deep_merge(base, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        elif v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def _find_auto(node, path=""):
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _find_auto(v, path + "." + k if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _find_auto(v, "%s[%d]" % (path, i))
    elif isinstance(node, str) and node.strip().lower() == "auto":
        found.append(path)
    return found


def build_ds_config(p, job, model, config_overrides=None):
    """ds_config.json for the plan: concrete values only, consistent with trainer_args()."""
    stage = p["zero_stage"]
    zero = {"stage": stage}
    if stage in (1, 2, 3):
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if stage in (1, 2):
        zero.update({"allgather_partitions": True, "reduce_scatter": True})
    if stage >= 1:
        zero.update(bucket_sizes(model, stage))
    if stage == 3:
        zero.update({
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            # fp32 gradients are built one sub-group at a time; 1e8 elements keeps that copy
            # under 0.4 GB (DeepSpeed's default 1e9 would allow 4 GB).
            "sub_group_size": int(1e8),
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if p["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p["offload_param"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_batch_size": p["global_batch_size"],
        "train_micro_batch_size_per_gpu": p["micro_batch_size"],
        "gradient_accumulation_steps": p["gradient_accumulation_steps"],
        "gradient_clipping": job.max_grad_norm,
        "zero_optimization": zero,
        # The optimizer is named so that ZeRO-Offload gets DeepSpeed's CPU Adam; on the GPU,
        # torch_adam selects torch.optim.AdamW (no JIT-built op). The LR schedule is Trainer's.
        "optimizer": {"type": "AdamW", "params": {
            "lr": job.learning_rate, "betas": [job.adam_beta1, job.adam_beta2], "eps": job.adam_epsilon,
            "weight_decay": job.weight_decay}},
        "checkpoint": {"use_node_local_storage": not job.shared_storage},
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
    }
    if not p["offload_optimizer"]:
        cfg["optimizer"]["params"]["torch_adam"] = True
    if p["precision"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif p["precision"] == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                       "hysteresis": 2, "min_loss_scale": 1}
    if config_overrides:
        _deep_merge(cfg, copy.deepcopy(config_overrides))
    validate_ds_config(cfg, p["world_size"])
    return cfg


def validate_ds_config(cfg, world_size):
    autos = _find_auto(cfg)
    if autos:
        raise PlanError("ds_config must not contain \"auto\" (HF Trainer would fill it from its own "
                        "arguments, which the plan cannot see): %s" % ", ".join(autos))
    try:
        micro = int(cfg["train_micro_batch_size_per_gpu"])
        accum = int(cfg["gradient_accumulation_steps"])
        total = int(cfg["train_batch_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError("ds_config needs integer train_batch_size, train_micro_batch_size_per_gpu and "
                        "gradient_accumulation_steps (%s)" % exc)
    if micro * accum * world_size != total:
        raise PlanError("ds_config batch sizes disagree: train_micro_batch_size_per_gpu %d x "
                        "gradient_accumulation_steps %d x %d ranks = %d, but train_batch_size is %d"
                        % (micro, accum, world_size, micro * accum * world_size, total))
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise PlanError("ds_config enables both bf16 and fp16")


def trainer_args(cfg, p):
    """HF TrainingArguments matching ds_config.json (HF rejects mismatches). For the "torch" engine
    the same values (the job runs without --deepspeed), plus fused AdamW and torch.compile."""
    opt = cfg.get("optimizer", {}).get("params", {})
    args = {
        "per_device_train_batch_size": int(cfg["train_micro_batch_size_per_gpu"]),
        "gradient_accumulation_steps": int(cfg["gradient_accumulation_steps"]),
        "gradient_checkpointing": bool(p["gradient_checkpointing"]),
        "bf16": bool(cfg.get("bf16", {}).get("enabled", False)),
        "fp16": bool(cfg.get("fp16", {}).get("enabled", False)),
        "max_grad_norm": cfg.get("gradient_clipping", 1.0),
        "save_on_each_node": bool(cfg.get("checkpoint", {}).get("use_node_local_storage", False)),
    }
    if "lr" in opt:
        args["learning_rate"] = opt["lr"]
    if "betas" in opt:
        args["adam_beta1"], args["adam_beta2"] = opt["betas"][0], opt["betas"][1]
    if "eps" in opt:
        args["adam_epsilon"] = opt["eps"]
    if "weight_decay" in opt:
        args["weight_decay"] = opt["weight_decay"]
    if p.get("gradient_checkpointing") and p.get("checkpoint_layers") and \
            p["checkpoint_layers"] < p["model"]["num_hidden_layers"]:
        args["checkpoint_layers"] = int(p["checkpoint_layers"])
    if p.get("engine") == "torch":
        # Launched without --deepspeed: the training package's own fused AdamW and compiled layers.
        args["optim"] = "adamw_torch_fused"
        args["compile_regions"] = True
    return args


def trainer_argv(args):
    """The same arguments as command-line flags (HfArgumentParser reads true/false)."""
    argv = []
    for k in sorted(args):
        v = args[k]
        argv.append("--" + k)
        argv.append(("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v))
    return argv
