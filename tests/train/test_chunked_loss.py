"""The chunked LM head + cross-entropy against transformers' own loss: values and gradients, alone and
inside a real causal LM, eager and under torch.compile (seconds, CPU)."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from train.chunked_loss import (
    ChunkedLossError,
    check_supported,
    chunk_tokens,
    enable_chunked_loss,
    linear_cross_entropy,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def inputs(dtype, batch=2, seq=37, hidden=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :5] = -100  # a prompt without loss
    labels[1, -3:] = -100  # padding
    return h, w, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("num_items", [None, 50])
def test_fp32_loss_and_gradients_are_transformers_own(num_items):
    h, w, labels = inputs(torch.float32)
    n = None if num_items is None else torch.tensor(num_items)
    ref = ForCausalLMLoss(h @ w.t(), labels, w.shape[0], num_items_in_batch=n)
    out = linear_cross_entropy(h, w, labels, num_items_in_batch=n, chunk=8)  # 10 chunks, the last short
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads(out * 3.0, h, w), grads(ref * 3.0, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_gradients_are_bit_identical():
    """The same math as the stock loss: the 16-bit gradient of the logits, then the same two matmuls."""
    h, w, labels = inputs(torch.bfloat16)
    ref = ForCausalLMLoss(h @ w.t(), labels, w.shape[0])
    out = linear_cross_entropy(h, w, labels, chunk=8)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-6)
    (gh, gw), (rh, rw) = grads(out, h, w), grads(ref, h, w)
    assert gw.dtype == torch.bfloat16 and torch.equal(gh, rh) and torch.equal(gw, rw)


def test_frozen_head_gets_no_gradient_and_shift_labels_are_taken_as_given():
    h, w, labels = inputs(torch.float32)
    w.requires_grad_(False)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    out = linear_cross_entropy(h, w, torch.zeros_like(labels), shift_labels=shifted, chunk=16)
    ref = ForCausalLMLoss(h @ w.t(), labels, w.shape[0])
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grads(out, h)[0], grads(ref, h)[0])


def test_it_traces_as_one_graph_and_compiles():
    h, w, labels = inputs(torch.float32)
    ref = ForCausalLMLoss(h @ w.t(), labels, w.shape[0])
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=16), backend="aot_eager",
                       fullgraph=True)
    out = fn(h, w, labels)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads(out, h, w), grads(ref, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunks_hold_about_as_many_logits_as_there_are_hidden_values():
    assert chunk_tokens(16384, 5120, 152064) == 1024  # W4 micro-batch 4: 16 chunks of 0.6 GiB fp32 logits
    assert chunk_tokens(512, 64, 640) == 64
    assert chunk_tokens(1, 64, 640) == 1


def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).train()


def test_a_real_model_trains_with_the_same_loss_and_gradients_and_evaluates_as_before(tiny_dir, tokenizer):
    stock, chunked = tiny_model(tiny_dir), tiny_model(tiny_dir)
    line = enable_chunked_loss(chunked)
    assert "chunks" in line
    enc = tokenizer(["the quick brown fox jumps over", "a b"], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    n = (labels[:, 1:] != -100).sum()
    outs = [m(**enc, labels=labels, num_items_in_batch=n) for m in (stock, chunked)]
    assert outs[1].logits is None and outs[1].loss.item() == pytest.approx(outs[0].loss.item(), rel=1e-6)
    for o in outs:
        o.loss.backward()
    for (name, a), b in zip(stock.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    chunked.eval()
    with torch.no_grad():
        evaluated = chunked(**enc, labels=labels)
    assert evaluated.logits is not None and evaluated.loss.item() == pytest.approx(outs[0].loss.item(), rel=1e-5)


def test_models_it_cannot_reproduce_are_refused_by_name(tiny_dir):
    model = tiny_model(tiny_dir)
    model.config.model_type = "gemma2"
    with pytest.raises(ChunkedLossError, match="not 'gemma2'.*drop the flag"):
        check_supported(model)
    model.config.model_type = "qwen2"
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with pytest.raises(ChunkedLossError, match="without bias"):
        check_supported(model)
