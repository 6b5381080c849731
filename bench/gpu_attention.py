"""Attention over packed rows on one GPU: what a row of several examples costs in each kernel
transformers can use (forward + backward, bf16), against SDPA's causal kernel on the same tokens.

    python3 bench/gpu_attention.py [--seq 4096 --batch 2 --heads 40 --kv-heads 8 --head-dim 128 --docs 4]

Variants: sdpa_causal (one sequence per row: no cross-example masking, the lower bound), sdpa_dense
(the block-diagonal causal mask transformers builds for packed rows under SDPA), flex (FlexAttention
with a document block mask, compiled), and whether each variant's output equals the masked reference."""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def doc_ids(batch, seq, docs, device):
    """Example index of every token: `docs` examples of random lengths per row."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: docs - 1] + 1).values.tolist()
        bounds = [0] + cuts + [seq]
        rows.append(torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]))
    return torch.stack(rows).to(device)


def timed(fn, steps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    shape_q = (a.batch, a.heads, a.seq, a.head_dim)
    shape_kv = (a.batch, a.kv_heads, a.seq, a.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(shape_q, device=dev, dtype=torch.bfloat16)
    ids = doc_ids(a.batch, a.seq, a.docs, dev)
    pos = torch.arange(a.seq, device=dev)
    dense = (ids[:, None, :, None] == ids[:, None, None, :]) & (pos[None, None, :, None] >= pos[None, None, None, :])

    def run(attn):
        q.grad = k.grad = v.grad = None
        out = attn()
        out.backward(grad)
        return out

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def document_causal(b, h, qi, ki):
        return (ids[b, qi] == ids[b, ki]) & (qi >= ki)

    block = create_block_mask(document_causal, a.batch, None, a.seq, a.seq, device=dev)
    flex = torch.compile(flex_attention)
    variants = {
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
        "flex": lambda: flex(q, k, v, block_mask=block, enable_gqa=True),
    }
    ref = run(variants["sdpa_dense"]).detach().float()
    results = {"shape": vars(a), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, attn in variants.items():
        out = run(attn).detach().float()
        ms = timed(lambda attn=attn: run(attn), a.steps)
        results[name] = {"fwd_bwd_ms": round(ms, 3),
                         "max_abs_diff_vs_dense": round((out - ref).abs().max().item(), 4)}
        print(f"{name:12s} {ms:8.3f} ms fwd+bwd   max |out - dense| {results[name]['max_abs_diff_vs_dense']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
