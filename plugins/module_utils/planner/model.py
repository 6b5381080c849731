"""The shape of a decoder-only LM: the numbers its memory depends on, read from its config.json."""

import json
import os

from .errors import PlanError

ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Model types whose causal LM forward is decoder -> LM head -> the standard loss and nothing else (no
# router loss, no logit cap), so the training package's chunked loss (train/chunked_loss.py) can run it.
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ModelShape:
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
        self.name = name or f"{self.model_type}-h{self.hidden_size}-l{self.num_layers}"
        self.declared_parameters = num_parameters
        for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "vocab_size", "head_dim"):
            if getattr(self, field) <= 0:
                raise PlanError(f"model shape: {field} must be positive, got {getattr(self, field)!r}")

    @classmethod
    def from_config(cls, cfg, name=None):
        """Build from a Hugging Face config.json dict (or a dict with the same keys)."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise PlanError("config.json has a text_config (a multimodal model): the planner knows "
                            "decoder-only LMs; pass the text_config as model_shape")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise PlanError(f"model config lacks {', '.join(missing)} (needs a Llama/Qwen2 style decoder config)")
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

    def training_flops_per_token(self, seq_len, lora_rank=None, lora_targets=ADAPTER_TARGETS):
        """Model FLOPs per trained token (PaLM appendix B / nanoGPT): 6 per matmul weight (forward 2,
        backward 4), 4 per frozen one under LoRA (no weight gradients), plus attention's
        12 x layers x q_dim x seq_len. The input embedding is a lookup; the LM head is a matmul, tied
        or not. Recomputation (checkpointing) is not counted: it is hardware, not model, FLOPs."""
        dense = self.num_layers * sum(fin * fout for _, fin, fout, _ in self.linear_shapes())
        dense += self.vocab_size * self.hidden_size
        attention = 12 * self.num_layers * self.q_dim * seq_len
        if lora_rank:
            return 4 * dense + 6 * self.lora_parameters(lora_rank, lora_targets) + attention
        return 6 * dense + attention

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
        except OSError as exc:
            raise PlanError(f"cannot read {path}: {exc}") from None
        except ValueError as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from None
        name = name or os.path.basename(os.path.normpath(model_dir))
    if not config:
        raise PlanError("give the model as model_dir (with config.json) or as model_shape")
    return ModelShape.from_config(config, name=name)
