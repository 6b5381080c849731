"""Model side of the training: check the local model directory, load tokenizer and model (or build
it from its config with random weights), add LoRA, count FLOPs, save the final model."""

import json
import logging
import os
import re
import shutil
import struct

import torch

logger = logging.getLogger(__name__)


class ModelDirError(ValueError):
    """The model directory is missing or incomplete."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _safetensors_complete(path):
    """None if the file holds all the bytes its header promises, else a reason."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return "header larger than the file"
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, OSError) as e:
        return f"unreadable header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"truncated: {size} bytes, needs {8 + header_len + end}"
    return None


def check_model_dir(path, need_weights=True):
    """Raise ModelDirError naming what is missing; nothing is ever fetched from a hub."""
    if not os.path.isdir(path):
        hint = " (a hub name? models must be local directories here)" if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else ""
        raise ModelDirError(f"model directory {path} does not exist{hint}")
    have = set(os.listdir(path))
    if "config.json" not in have:
        raise ModelDirError(f"model directory {path} has no config.json")
    if not have & set(TOKENIZER_FILES):
        raise ModelDirError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if not need_weights:
        return
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in have:
            with open(os.path.join(path, index_name)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if s not in have]
            if missing:
                raise ModelDirError(f"model directory {path} is incomplete: {len(missing)} of {len(shards)} weight "
                                    f"shards missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            for s in shards:
                if s.endswith(".safetensors"):
                    bad = _safetensors_complete(os.path.join(path, s))
                    if bad:
                        raise ModelDirError(f"model directory {path} is incomplete: {s} is {bad}")
            return
    if "model.safetensors" in have:
        bad = _safetensors_complete(os.path.join(path, "model.safetensors"))
        if bad:
            raise ModelDirError(f"model directory {path} is incomplete: model.safetensors is {bad}")
        return
    if "pytorch_model.bin" in have:
        return
    raise ModelDirError(f"model directory {path} has no weights (model.safetensors, model.safetensors.index.json "
                        "+ shards, or pytorch_model.bin); pass --random_init to train from random weights")


def load_tokenizer(path, chat_template=None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelDirError(f"cannot load the tokenizer from {path}: {e}") from e
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelDirError(f"tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


CAUSAL_SDPA = "sdpa_causal"


def resolve_attn_implementation(requested, one_sequence_per_row=False, config=None, cuda=None, whole_model_compiled=False):
    """'auto': FlashAttention-2 on CUDA when installed (varlen kernels for packed rows); else, on CUDA,
    FlexAttention for rows that pack several examples (its document mask skips the blocks across
    examples: 1.17x the tokens/s of SDPA's dense block-diagonal mask, W1 on the H200), unless the whole
    model is compiled as one graph (DeepCompile, engine.compile()), where it has not been measured;
    else SDPA. SDPA becomes CAUSAL_SDPA where every row holds one sequence and every layer attends to
    all earlier tokens (no sliding window)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    causal_text = config is not None and full_attention_only(config)
    attn = requested
    if requested == "auto":
        attn = "sdpa"
        if cuda:
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                if not one_sequence_per_row and causal_text and not whole_model_compiled:
                    attn = "flex_attention"
    if attn == "sdpa" and one_sequence_per_row and causal_text:
        register_causal_sdpa()
        return CAUSAL_SDPA
    return attn


# decoder-only text models whose mask is causal (+ padding/packing) and nothing else: no image-token
# or other overlay that transformers ors into it
CAUSAL_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def full_attention_only(config):
    """A causal text model none of whose layers attends through a sliding window (or another local pattern)."""
    if getattr(config, "model_type", None) not in CAUSAL_TEXT_MODELS:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    return not (getattr(config, "use_sliding_window", False) or getattr(config, "attention_chunk_size", None))


def causal_sdpa_mask(q_length, kv_length, q_offset=0, **kwargs):
    """No mask for a training forward (queries = keys, no cache): SDPA then runs with is_causal, which
    skips the masked half of the work. Exact for one right-padded sequence per row: a real token
    sees only earlier (real) tokens, and the padding's outputs carry no loss. transformers' own
    sdpa_mask builds a dense mask whenever the forward is traced by torch.compile (its skip tests
    read tensor values), and SDPA with a dense mask ran 3x slower on the H200 (DeepCompile's
    whole-model graph, Qwen2.5-1.5B, seq 2048)."""
    from transformers.masking_utils import sdpa_mask

    # a sliding window comes as local_size (transformers 5.17) or local_attention_size (later)
    local = kwargs.get("local_size") or kwargs.get("local_attention_size")
    if local is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, **kwargs)


def register_causal_sdpa():
    """CAUSAL_SDPA: transformers' SDPA attention with causal_sdpa_mask as its mask builder."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, causal_sdpa_mask)


def prefer_sdpa_backend(choice):
    """Put one SDPA kernel first in PyTorch's priority order (process-wide). Returns its name, or
    None when PyTorch's own order stays."""
    if choice == "default" or not torch.cuda.is_available():
        return None
    if choice == "auto":
        if torch.cuda.get_device_capability() != (9, 0):
            return None
        choice = "cudnn"  # Hopper: cuDNN's fused attention beat flash 0.93 vs 1.50 ms (fwd+bwd, H100)
    from torch.nn.attention import SDPBackend

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[choice]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    order = [first] + [b for b in rest if b != first]
    current = list(torch._C._get_sdp_priority_order())
    wanted = [int(b) for b in order]
    torch._C._set_sdp_priority_order(wanted + [b for b in current if b not in wanted])
    logger.info("SDPA attention tries %s first", choice)
    return choice


def training_dtype(args):
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def weights_dtype(model_args, lora_args, training_args):
    """The dtype the weights are built in, and one line saying where the fp32 master weights are.

    Without DeepSpeed a full fine-tune keeps fp32 weights, gradients and AdamW states and runs under
    16-bit autocast (the Trainer's mixed precision): AdamW's step at lr 1e-5 is smaller than half a
    bf16 ulp of most weights, so 16-bit weights would mostly not move. DeepSpeed's 16-bit modes keep
    their own fp32 copy in the optimizer, so the module it gets is 16-bit."""
    from train.args import ConfigError

    compute = training_dtype(training_args)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute]
    if compute == torch.float32:
        return compute, "weights: fp32 (fp32 precision, no autocast)"
    if lora_args.lora:
        if model_args.master_weights == "none":
            raise ConfigError("--master_weights none does not apply to LoRA: the adapters train in fp32 (peft) "
                              f"over the frozen {name} base; drop the flag")
        return compute, f"weights: LoRA adapters in fp32 (peft), frozen base in {name}"
    if training_args.deepspeed:
        return compute, (f"weights: fp32 master weights in DeepSpeed's {name} optimizer (ZeRO keeps an fp32 copy "
                         f"and fp32 Adam states), {name} in the model")
    if model_args.master_weights == "none":
        return compute, (f"weights: {name} only, updated in {name} (--master_weights none: no fp32 master copy, "
                         "small updates round away)")
    return torch.float32, f"weights: fp32 master weights, gradients and AdamW states; {name} autocast (mixed precision)"


def build_model(model_args, lora_args, training_args, tokenizer, one_sequence_per_row=False,
                whole_model_compiled=False):
    """The model to train. Must run after TrainingArguments exist: under ZeRO-3 the weights are
    then partitioned while loading (deepspeed.zero.Init) instead of materialised on every rank.
    one_sequence_per_row: no row of the data packs several examples (causal SDPA needs no mask)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_args.model_name_or_path
    dtype, _ = weights_dtype(model_args, lora_args, training_args)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    attn = resolve_attn_implementation(model_args.attn_implementation, one_sequence_per_row, config,
                                       whole_model_compiled=whole_model_compiled)
    if len(tokenizer) > config.vocab_size:
        raise ModelDirError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model only "
                            f"{config.vocab_size} embeddings")
    if model_args.random_init:
        from transformers.integrations import is_deepspeed_zero3_enabled

        torch.manual_seed(training_args.seed)
        if training_args.device.type == "cuda" and not is_deepspeed_zero3_enabled():
            # initialise straight on the GPU (the Trainer would move it there anyway): random init
            # of 32B weights on the CPU takes minutes. (ZeRO-3 partitions it while building.)
            with torch.device(training_args.device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     local_files_only=True)
    model.config.use_cache = False
    why = " (SDPA with is_causal and no mask: one sequence per row)" if attn == CAUSAL_SDPA else ""
    if attn == "flex_attention" and model_args.attn_implementation == "auto":
        why = " (FlexAttention's document mask: rows pack several examples)"
    logger.info("model %s: %s, dtype %s, attention %s%s", path, type(model).__name__, dtype, attn, why)

    if lora_args.lora:
        from peft import LoraConfig, get_peft_model

        if training_args.gradient_checkpointing:
            # checkpointed blocks need an input that requires grad when the embeddings are frozen
            model.enable_input_require_grads()
        targets = lora_args.lora_target_modules
        targets = targets[0] if len(targets) == 1 and targets[0] == "all-linear" else targets
        peft_config = LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules=targets,
            use_rslora=lora_args.lora_use_rslora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        if (training_args.bf16 or training_args.fp16) and not training_args.deepspeed:
            skip_adapter_input_upcast(model)
    return model


def skip_adapter_input_upcast(model):
    """peft keeps the adapters in fp32 and casts each adapted module's input to fp32 before its
    dropout; under mixed precision autocast casts it straight back to 16 bits for the matmul. The
    fp32 round trip copies every adapted input twice (the 27k-wide down_proj input included) and
    keeps the fp32 copy for the backward pass: skip it, the matmul is the same 16-bit one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def decoder_layers(model):
    """The model's repeated decoder layers (an nn.ModuleList of one class), or []."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    best = []
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 \
                and len({type(m) for m in module}) == 1 and len(module) > len(best):
            best = list(module)
    return best


def compile_regions(model):
    """torch.compile each decoder layer and the loss function, in place.

    The layers are instances of one class, so dynamo compiles the first and reuses its graph for the
    rest (regional compilation): a 64-layer model compiles in about the time of one layer. Gradient
    checkpointing wraps the compiled layer from outside (transformers' checkpointing layer calls the
    module), so it keeps working. The loss is compiled so the fp32 upcast of the logits is fused
    instead of materialised."""
    layers = decoder_layers(model)
    if not layers:
        raise ModelDirError(f"{type(model).__name__}: no repeated decoder layers found to compile; "
                            "use --torch_compile instead of --compile regions")
    import torch._inductor.config as inductor_config

    # Measured on the H100 with the 32B LoRA shape (docs/gpu-benchmarks.md): dropout through eager's
    # RNG kernels instead of Triton's in-kernel Philox +3% tokens/s; coordinate-descent tuning of
    # the fused kernels' block sizes +2%.
    inductor_config.fallback_random = True
    inductor_config.coordinate_descent_tuning = True
    for layer in layers:
        layer.compile()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.loss_function = torch.compile(base.loss_function)
    logger.info("compiled %d %s layers and the loss (regional compilation)", len(layers), type(layers[0]).__name__)


def limit_checkpointed_layers(model, n):
    """Keep gradient checkpointing on the first n decoder layers only; returns how many have it."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if i >= n and hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
    return sum(1 for layer in layers if getattr(layer, "gradient_checkpointing", False))


def _numel(p):
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions leave p.numel() == 0


def count_parameters(model):
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def flops_per_token(model, seq_len):
    """Training FLOPs per token, the usual way (PaLM appendix B / nanoGPT estimate_mfu):
    6 x matmul parameters (forward 2 + backward 4) plus attention 12 x layers x q_dim x seq_len.
    Frozen weights (LoRA) cost 4 per parameter: no weight gradients. The input embedding is a
    lookup, not a matmul; the LM head is a matmul even when tied to it. Recomputation for
    gradient checkpointing is not counted (that would be hardware FLOPs, not model FLOPs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    embed = base.get_input_embeddings().weight
    embed_ids = {id(embed)}
    frozen = trainable = 0
    for p in model.parameters():
        if id(p) in embed_ids:
            continue
        if p.requires_grad:
            trainable += _numel(p)
        else:
            frozen += _numel(p)
    head = base.get_output_embeddings()
    if head is not None and head.weight is embed:  # tied: the head matmul still happens
        if embed.requires_grad:
            trainable += _numel(embed)
        else:
            frozen += _numel(embed)
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    return 6 * trainable + 4 * frozen + 12 * layers * q_dim * seq_len


# ---------------------------------------------------------------------------------------------
# Final save


def _full_state_dict(trainer, trainable_only=False):
    """The whole model's weights on rank 0 (None elsewhere); a collective under ZeRO-3."""
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    if engine is not None and engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
    if trainer.args.process_index != 0:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if not trainable_only or k in {n for n, p in model.named_parameters() if p.requires_grad}}


def merge_lora_state_dict(state_dict, peft_config, adapter_name="default"):
    """Fold LoRA weights into the base weights: W += B @ A * scaling; keys as in the base model."""
    prefix = "base_model.model."
    scaling = peft_config.lora_alpha / (peft_config.r ** 0.5 if peft_config.use_rslora else peft_config.r)
    out = {}
    for key, value in state_dict.items():
        if f".lora_A.{adapter_name}." in key or f".lora_B.{adapter_name}." in key:
            continue
        if ".original_module." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        name = name.replace(f".modules_to_save.{adapter_name}.", ".")
        if ".base_layer." in name:
            module = key[: key.index(".base_layer.")]
            if name.endswith(".weight"):
                a = state_dict.get(f"{module}.lora_A.{adapter_name}.weight")
                b = state_dict.get(f"{module}.lora_B.{adapter_name}.weight")
                if a is not None and b is not None:
                    delta = (b.float() @ a.float()) * scaling
                    value = (value.float() + delta.reshape(value.shape)).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        out[name] = value
    return out


def _replace_dir(tmp, final):
    """Put a fully written directory in place; a crash leaves either the old or the new one."""
    old = final + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_final_model(trainer, tokenizer, out_dir, lora_args):
    """Write the trained model in Hugging Face format (loadable with from_pretrained) with the
    tokenizer. Full fine-tune: the weights (16-bit gathered from ZeRO-3). LoRA: the adapter, and
    with --merge_lora also the merged model in <out_dir>_merged. Call on every rank. Returns the
    paths written."""
    from huggingface_hub import save_torch_state_dict

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = lora_args.lora
    main = args.process_index == 0
    written = []

    state_dict = _full_state_dict(trainer, trainable_only=is_peft and not lora_args.merge_lora)
    config = (model.get_base_model() if is_peft else model).config
    config.use_cache = True  # off for training (packing needs it off); inference wants the KV cache
    dtype = training_dtype(args)
    if state_dict is not None and not is_peft and dtype != torch.float32:
        # fp32 master weights are the optimizer's; the model is written in the precision it trained in
        state_dict = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state_dict.items()}
        config.dtype = dtype
    if main:
        tmp = out_dir + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        if is_peft:
            # PeftModel.save_pretrained picks the adapter weights out of the given state dict
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
        written.append(out_dir)

        if is_peft and lora_args.merge_lora:
            merged_dir = out_dir + "_merged"
            tmp = merged_dir + ".tmp"
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            base = model.get_base_model()
            merged = merge_lora_state_dict(state_dict, model.peft_config["default"])
            if base.config.tie_word_embeddings:
                merged.pop("lm_head.weight", None)
            merged = {k: v.contiguous() for k, v in merged.items()}
            os.makedirs(tmp)
            save_torch_state_dict(merged, tmp, max_shard_size="5GB")
            base.config.save_pretrained(tmp)
            if base.generation_config is not None:
                base.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _replace_dir(tmp, merged_dir)
            written.append(merged_dir)
    del state_dict
    return written
