"""Decode attention alone: how fast one query step reads the KV cache, per n_kv_heads.

A SmolLM2-shaped cache (30 layers, 9 query heads, head_dim 64, float32), batch 16, one
new query token per sequence. For each n_kv_heads (9 MHA, 3 GQA, 1 MQA) and context, these
run interleaved over all 30 layers:

- qkv: `qkv.attention.attention`, what a decode step calls: the compiled decode attention
  (qkv/kernel.py) where it can be built;
- sdpa: the same call with the kernel disabled: PyTorch's fused SDPA (for G < H the query
  heads of a group folded into the query axis, so K/V are read once, not copied), qkv's
  path before the kernel existed;
- matmul: softmax(q K^T / sqrt(D)) V as two batched matmuls and a softmax;
- enable_gqa: PyTorch's own route, SDPA(q, k, v, enable_gqa=True) on (B, H, 1, D) queries;
- read: the same K/V slices summed, i.e. what reading them once costs here.

GB/s = K/V bytes of all layers / time, so the five rows of one configuration compare
directly. The question it answers: is a step's attention limited by the bytes it reads
(then MQA's 9x fewer bytes make it 9x faster) or by the kernels (then it is not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import (
    command_line,
    context_line,
    fmt,
    fmt_stats,
    machine_info,
    measure,
    parser,
    setup,
    table,
    write,
)

from qkv import kernel
from qkv.attention import attention

LAYERS, H, D, BATCH = 30, 9, 64, 16
QUICK = dict(layers=2, batch=2, contexts=[16])


def matmul_attention(q, k, v):
    """q (B, G, R, D), k, v (B, G, S, D) -> (B, G, R, D)."""
    scores = torch.matmul(q * (1 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))  # (B, G, R, S)
    return torch.matmul(scores.softmax(-1), v)


def gqa_attention(q, k, v):
    """PyTorch's own grouped-query route: q (B, H, 1, D), k, v (B, G, S, D)."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])


def cases(layers: int, batch: int, context: int, G: int):
    """The five ways, each a closure over `layers` caches with `context` tokens stored."""
    shape = (batch, G, context + 64, D)  # preallocated like KVCache, one step's worth spare
    ks = [torch.rand(shape)[:, :, :context] for _ in range(layers)]
    vs = [torch.rand(shape)[:, :, :context] for _ in range(layers)]
    q = torch.rand(batch, H, 1, D)
    qf = q.reshape(batch, G, H // G, D)  # folded: the R heads of a group as R query rows

    def run(fn, query):
        def go():
            for k, v in zip(ks, vs, strict=True):
                fn(query, k, v)
        return go

    sdpa = kernel.disabled()(attention)  # the context manager as a decorator
    # before timing: the SDPA ways agree with the plain matmul form (on the first layer)
    check = matmul_attention(qf, ks[0], vs[0]).reshape(batch, H, 1, D)
    for name, out in [("qkv", attention(q, ks[0], vs[0])), ("sdpa", sdpa(q, ks[0], vs[0])),
                      ("enable_gqa", gqa_attention(q, ks[0], vs[0]))]:
        torch.testing.assert_close(out, check, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    fns = {
        "qkv": run(attention, q),
        "sdpa": run(sdpa, q),
        "matmul": run(matmul_attention, qf),
        "enable_gqa": run(gqa_attention, q),
        "read": run(lambda _, k, v: (k.sum(), v.sum()), q),
    }
    kv_bytes = 2 * layers * batch * G * context * D * 4
    return fns, kv_bytes


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    args = p.parse_args()
    out = setup(args)
    info = machine_info()
    layers, batch, contexts = LAYERS, BATCH, args.contexts
    if args.quick:
        layers, batch, contexts = QUICK["layers"], QUICK["batch"], QUICK["contexts"]
    repeats = 2 if args.quick else args.repeats or 5
    rows = []
    with torch.inference_mode():
        for context in contexts:
            for G in (H, 3, 1):
                fns, kv_bytes = cases(layers, batch, context, G)
                stats = measure(fns, repeats, 1)
                for name, s in stats.items():
                    rows.append(dict(context=context, n_kv_heads=G, way=name, kv_bytes=kv_bytes,
                                     ms=s.scaled(1e3), gbs=kv_bytes / s.median / 1e9,
                                     vs_read=s.median / stats["read"].median))
    body = [[r["context"], r["n_kv_heads"], r["way"], fmt(r["kv_bytes"] / 1e6),
             fmt_stats(*r["ms"]), fmt(r["gbs"]), fmt(r["vs_read"])] for r in rows]
    md = "\n\n".join([
        "### Decode attention alone: KV-cache read speed per n_kv_heads",
        context_line(info, command_line()),
        f"Batch {batch}, {layers} layers, {H} query heads, head_dim {D}, float32, one query "
        f"token per sequence; ms for all layers, median (min-max) of {repeats} after a "
        "warm-up, the five ways interleaved; GB/s = K/V MB / time; 'x read' = time / the "
        "time to sum the same K/V once.",
        table(["context", "kv heads", "way", "K/V MB", "ms", "GB/s", "x read"], body),
    ])
    write(out, "decode_attention", md, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
