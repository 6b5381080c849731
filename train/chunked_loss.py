"""The LM head and its cross-entropy chunk by chunk (--chunked_loss): the whole logits never exist.

A stock causal LM keeps the logits of the whole micro-batch (16-bit, plus their fp32 upcast while
the loss runs): 6-12 bytes per vocabulary entry per token, 13.9 GiB for Qwen's 152k vocabulary at
16k tokens. Here the forward runs the head on a chunk of tokens at a time: the chunk's logits, their
fp32 log-softmax, the loss and the 16-bit gradient of the logits, the one tensor that outlives the
chunk (2 bytes per entry). The backward pass is the head's own: one matmul each for the gradients of
the hidden states and of the head weight, from that gradient of the logits.

The same math as transformers' ForCausalLMLoss: logits from a 16-bit matmul, fp32 log-softmax,
labels shifted by one with -100 ignored, sum / num_items_in_batch (mean without it), the logits'
gradient in fp32 cast to 16 bits, then the same two matmuls. Nothing is recomputed. (Working the
weight's gradient out chunk by chunk in the forward, as Liger-Kernel does, needs its 16 partial
products summed: an fp32 accumulator read and written per chunk, which on W4 cost about what the
larger micro-batch gains.)
"""

import types

import torch

from ansible_collections.dsmesh.cluster.plugins.module_utils.planner.memory import chunk_tokens
from ansible_collections.dsmesh.cluster.plugins.module_utils.planner.model import CHUNKED_LOSS_MODEL_TYPES
from train.args import ConfigError

IGNORE_INDEX = -100


class ChunkedLossError(ConfigError):
    """The model's forward is not the plain decoder -> LM head -> cross-entropy this replaces."""


@torch.library.custom_op("dsmesh::after", mutates_args=())
def after(x: torch.Tensor, dep: torch.Tensor) -> torch.Tensor:
    """A copy of x made once dep exists: an op a compiler cannot see through, so it keeps the chunks
    in order (Inductor otherwise runs every chunk's matmul first and holds all the logits at once)."""
    return x.clone()


@after.register_fake
def _(x, dep):
    return torch.empty_like(x)


class ChunkedCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(hidden @ weight.T, labels, reduction sum) / divisor, the logits chunked
    over tokens; forward keeps only their 16-bit gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk, want_grad):
        w = weight.to(hidden.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads, last = [], None
        for start in range(0, hidden.shape[0], chunk):
            y = labels[start:start + chunk]
            h = hidden[start:start + chunk]
            if last is not None:
                h = after(h, last)  # this chunk's logits only once the last one is done with
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0).unsqueeze(1)
            loss = loss + torch.where(valid, lse - logits.gather(1, target).squeeze(1), 0.0).sum()
            if want_grad:
                # d(loss)/d(logits) = (softmax - one_hot(label)) / divisor on the tokens with a label
                grad = torch.exp(logits - lse.unsqueeze(1))
                grad = grad.scatter_add(1, target, -valid.to(grad.dtype).unsqueeze(1))
                grads.append((grad * (valid.to(grad.dtype) / divisor).unsqueeze(1)).to(hidden.dtype))
            last = grads[-1] if want_grad else loss
        # one cat: a compiler writes each chunk's gradient straight into its rows
        ctx.save_for_backward(torch.cat(grads) if want_grad else None, hidden, weight)
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_logits, hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = None
        scale = grad_output.to(hidden.dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight.to(hidden.dtype)) * scale
        if ctx.needs_input_grad[1]:
            grad_weight = ((grad_logits.t() @ hidden) * scale).to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, shift_labels=None, chunk=None):
    """ForCausalLMLoss(hidden @ weight.T, labels, ...) without the whole logits. hidden: (batch, seq,
    hidden); labels: (batch, seq), unshifted (or shift_labels already shifted)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_autocast_enabled(hidden.device.type):
        # the matmul autocast would run (the torch engine's fp32 weights under bf16 autocast)
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    if num_items_in_batch is None:
        divisor = (shift_labels != IGNORE_INDEX).sum().float()
    elif torch.is_tensor(num_items_in_batch):
        divisor = num_items_in_batch.to(device=hidden.device, dtype=torch.float32)
    else:
        divisor = torch.tensor(float(num_items_in_batch), device=hidden.device)
    chunk = chunk or chunk_tokens(hidden.shape[0], weight.shape[1], weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(hidden, weight, shift_labels, divisor, chunk,
                                         hidden.requires_grad or weight.requires_grad)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model):
    """Raise ChunkedLossError unless the model's forward is decoder -> LM head (no bias) -> the
    standard causal LM loss, which chunked_forward reproduces."""
    base = _unwrap(model)
    config = base.config
    kind = getattr(config, "model_type", None)
    if kind not in CHUNKED_LOSS_MODEL_TYPES:
        raise ChunkedLossError(f"--chunked_loss supports model types {', '.join(CHUNKED_LOSS_MODEL_TYPES)}, not "
                               f"{kind!r} (its forward may do more than head + cross-entropy); drop the flag")
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ChunkedLossError(f"--chunked_loss needs an LM head without bias; {type(base).__name__} has "
                               f"{type(head).__name__}; drop the flag")
    if getattr(config, "final_logit_softcapping", None) or not hasattr(base, "model"):
        raise ChunkedLossError(f"--chunked_loss: {type(base).__name__} caps its logits or has no decoder "
                               "attribute `model`; drop the flag")
    return base


def chunked_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The causal LM's forward for training with labels: decoder, then the chunked head and loss;
    logits are not returned. Anything else (eval, generation) runs the model's own forward."""
    if labels is None or not self.training:
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    loss = linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, labels,
                                num_items_in_batch=kwargs.get("num_items_in_batch"),
                                shift_labels=kwargs.get("shift_labels"))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def enable_chunked_loss(model, zero3_hooks=False):
    """Replace the causal LM's forward (in place, this instance only); returns the line to log.
    zero3_hooks: ZeRO-3's module hooks gather a weight only inside its module's forward, and the head's
    weight is now used outside lm_head, so it is registered with the causal LM's own forward."""
    base = check_supported(model)
    base._stock_forward = base.forward
    base.forward = types.MethodType(chunked_forward, base)
    if zero3_hooks:
        import deepspeed

        deepspeed.zero.register_external_parameter(base, base.lm_head.weight)
    return ("loss: LM head and cross-entropy in chunks of tokens, the logits' 16-bit gradient kept "
            "(--chunked_loss: the whole logits never exist)")
