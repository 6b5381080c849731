"""The memory model: the peak GPU memory of one rank and the host memory of one node for a plan.

    model states (parameters, gradients, optimizer states: DeepSpeed's own estimator formulas)
  + activations of one micro-batch (bytes per token per layer, checked against autograd)
  + communication buffers (ZeRO buckets)
  + allocator fragmentation, plus the CUDA context outside the allocator.
Every formula is explained in docs/planner.md.
"""

import math

from .errors import PlanError
from .settings import GIB


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
        raise PlanError(f"ZeRO stage must be 0-3, got {stage!r}")
    return {k: int(v) for k, v in out.items()}


def torch_state_bytes(model, job, precision):
    """GPU bytes for parameters, gradients and optimizer states without DeepSpeed (one GPU).

    A full fine-tune in 16-bit precision keeps fp32 master weights, as DeepSpeed's bf16/fp16 modes
    do: the weights stay fp32 and the layers run under autocast, so the states are fp32 weights (4),
    gradients (4) and AdamW moments (8) per parameter, and autocast keeps a 16-bit copy of each
    weight from the forward pass for the backward (2). The activations stay those of 16-bit layers:
    Qwen2.5-1.5B at micro-batch 8 peaked at 67.0 GiB on an H200 with fp32 masters, 54.1 without. LoRA: the frozen base stays 16-bit and the
    adapters are fp32 (peft upcasts them): 4 + 4 + 8 per adapter parameter.
    """
    P = model.num_parameters
    T = trainable_parameters(model, job)
    w = _bytes_per_value(precision)
    if job.finetune == "lora":
        out = {"parameters": w * P + 4 * T, "gradients": 4 * T, "optimizer_states": 8 * T}
    else:
        out = {"parameters": 4 * P, "gradients": 4 * T, "optimizer_states": 8 * T}
        if precision != "fp32":
            out["autocast_weight_copies"] = w * P
    out["fp32_gradients"] = 0
    return {k: int(v) for k, v in out.items()}


def master_weights(engine, job, precision):
    """How the optimizer keeps its weights: "fp32" master copies of 16-bit weights (DeepSpeed's
    bf16/fp16 optimizer; the torch engine's fp32 weights under autocast), "fp32-weights" when the
    weights are fp32 anyway (CPU ranks), "adapters" under LoRA (fp32 adapters, frozen base)."""
    if job.finetune == "lora":
        return "adapters"
    return "fp32-weights" if precision == "fp32" else "fp32"


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
    inputs = {name: fin for name, fin, _, _ in model.linear_shapes()}
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
            inputs = {name: fin for name, fin, _, _ in model.linear_shapes()}
            adapters += sum((w + 1) * inputs[t] for t in targets)
    return {"norms": norms, "attention": attn, "mlp": mlp, "linear_inputs": linear_inputs, "adapters": adapters}


def backward_transient_per_token(model, job, precision):
    """Gradient buffers alive while one layer runs backward: w * (2i + 2h) per token.

    Fitted to PyTorch's CPU memory profiler on full and LoRA models (tests/unit/test_planner.py).
    """
    h, i = model.hidden_size, model.intermediate_size
    return _bytes_per_value(precision) * (2 * i + 2 * h)


def chunk_tokens(tokens, hidden_size, vocab_size):
    """Tokens per chunk of the training package's chunked loss: a chunk's logits about the size of all
    the hidden states (Liger-Kernel's rule), a power of two."""
    chunks = math.ceil(vocab_size / float(hidden_size))
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / float(chunks))))))


def chunked_loss_bytes(model, job, precision, tokens, compiled):
    """Working memory of the chunked loss: one chunk's logits and their fp32 softmax (12 bytes per
    entry compiled, 20 eager), the 16-bit gradient of all the logits (w per entry), and from it the
    hidden states' gradient and, with a trained head, the head weight's."""
    w = _bytes_per_value(precision)
    h, V = model.hidden_size, model.vocab_size
    chunk = min(tokens, chunk_tokens(tokens, h, V))
    head = w * V * h if job.finetune == "full" else 0
    return chunk * V * (12 if compiled else 20) + tokens * w * V + tokens * w * h + head


def activation_bytes(model, job, precision, micro_batch, checkpointing, compiled=False, checkpoint_layers=None,
                     chunked_loss=False):
    """Peak activation bytes of one micro-batch on one rank, with its breakdown.

    checkpoint_layers: with checkpointing, how many decoder layers are checkpointed (default all);
    the others keep their activations. compiled: torch.compile (layers and loss). chunked_loss: the
    package's chunked head and loss (--chunked_loss) instead of the whole logits."""
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
    loss = chunked_loss_bytes(model, job, precision, tokens, compiled) if chunked_loss else logits * tokens
    if checkpointing:
        k = model.num_layers if checkpoint_layers is None else max(1, min(int(checkpoint_layers), model.num_layers))
        # each checkpointed layer keeps its input; the others all their activations
        kept = k * w * h + (model.num_layers - k) * per_layer
        working = labels * tokens + max(final_norm * tokens + loss, (per_layer + transient) * tokens)
    else:
        kept = model.num_layers * per_layer
        working = (final_norm + labels) * tokens + max(loss, transient * tokens)
    layers = kept * tokens
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
                            cand.checkpoint_layers, cand.chunked_loss)
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
