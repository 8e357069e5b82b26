"""Why batch-16 decoding is not bandwidth-bound here: skinny matmuls, float32 vs bfloat16.

A decode step multiplies M = batch rows by every weight matrix. At M = 1 that is a
matrix-vector product, limited by reading the weights; at M = 16 float32 it becomes
compute-limited on one core. Thirty distinct SmolLM2 feed-forward matrices (576 x 1536,
3.5 MB each, 106 MB together: more than the L3 share of one core) per call.
"""

from __future__ import annotations

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


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    n, K, N = (3, 64, 128) if args.quick else (30, 576, 1536)
    repeats = args.repeats or (2 if args.quick else 7)
    fns, sizes = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(N, K).to(dtype) for _ in range(n)]
        name = str(dtype).split(".")[1]
        sizes[name] = sum(w.numel() * w.element_size() for w in ws)
        for M in (1, 16):
            x = torch.randn(M, K).to(dtype)
            fns[f"{name}, M={M}"] = lambda x=x, ws=ws: [F.linear(x, w) for w in ws]
    stats = measure(fns, repeats, 2)
    rows = []
    for key, s in stats.items():
        name, M = key.split(", M=")
        flops = 2 * int(M) * K * N * n
        rows.append([key, fmt_stats(*s.scaled(1e3)), fmt(sizes[name] / s.median / 1e9),
                     fmt(flops / s.median / 1e9)])
    md = "\n\n".join([
        "### Skinny matmuls: batch 1 vs 16, float32 vs bfloat16",
        context_line(info, command_line()),
        f"{n} weight matrices {N} x {K}, y = x W^T for x of M rows; ms per pass over all "
        f"{n}, median (min-max) of {repeats}, interleaved; GB/s = weight bytes / time.",
        table(["dtype, rows", "ms", "weight GB/s", "GFLOP/s"], rows),
    ])
    write(out, "small_gemm", md, {"machine": info,
                                  "stats": {k: s.to_dict() for k, s in stats.items()}})


if __name__ == "__main__":
    main()
