"""F.linear vs qkv.linear.linear on a decode step's skinny inputs (few rows), float32.

`--weights smollm2` (default): all 211 weight matrices of SmolLM2-135M (30 layers x q, k,
v, o, gate, up, down, plus the 49152 x 576 output layer; 540 MB, far more than the L3
cache). `--weights table2`: the matrices one decoding step of hf.py's beam-search model
multiplies (3 decoder layers of d_model 256 x self-attention q, k, v, o, cross-attention
q, o, fc1, fc2, plus the 8000 x 256 output layer; 19 MB). Each is multiplied by an input
of M rows, for the M a decode step sees (the batch, or sentences x beams). qkv.linear
uses its compiled skinny product for 2-64 rows (kernel.skinny_max_rows()), oneDNN with a
packed weight above (from 4 rows without the compiled kernels) for big enough products, computes
(W @ x^T)^T for the other M in SKINNY_ROWS, splits a single row's product into one block
of W's rows per thread (one bmm), and falls back to F.linear elsewhere; this benchmark is
where that comes from: it also times the reversed and the packed product at every M.
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

from qkv import kernel
from qkv.linear import (
    BLOCKED_MIN_ROWS,
    BLOCKED_MIN_WEIGHT,
    PACKED_MIN_MACS,
    PACKED_MIN_ROWS,
    SKINNY_ROWS,
    linear,
    packed_weight,
    packing_disabled,
)

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                (576, 1536)] * 30 + [(49152, 576)],
    "table2": [(256, 256)] * 6 * 3 + [(1024, 256), (256, 1024)] * 3 + [(8000, 256)],
}
ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--weights", choices=list(SHAPES), default="smollm2",
                   help="which model's weight matrices (default smollm2)")
    args = p.parse_args()
    out = setup(args)
    info = machine_info()
    shapes = SHAPES[args.weights]
    shapes = [(n // 16, k // 16) for n, k in shapes[:7]] if args.quick else shapes
    rows_list = (1, 16) if args.quick else ROWS
    repeats = args.repeats or (2 if args.quick else 5)
    ws = [torch.randn(*s) for s in shapes]
    nbytes = sum(w.numel() * 4 for w in ws)
    rows, data = [], {}
    with torch.inference_mode():
        for M in rows_list:
            xs = {k: torch.randn(M, k) for k in {s[1] for s in shapes}}
            fns = {
                "F.linear": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in ws],
                "(W @ x^T)^T": lambda xs=xs: [torch.mm(w, xs[w.shape[1]].T).T for w in ws],
                "qkv.linear unpacked": packing_disabled()(
                    lambda xs=xs: [linear(xs[w.shape[1]], w) for w in ws]),
                "qkv.linear, oneDNN only": packing_disabled("blocked")(
                    lambda xs=xs: [linear(xs[w.shape[1]], w) for w in ws]),
                "oneDNN packed": lambda xs=xs: [torch.ops.mkldnn._linear_pointwise(
                    xs[w.shape[1]], packed_weight(w), None, "none", [], "") for w in ws],
                "qkv.linear": lambda xs=xs: [linear(xs[w.shape[1]], w) for w in ws],
            }
            stats = measure(fns, repeats, 1, settle=True)
            base = stats["F.linear"].median
            for name, s in stats.items():
                rows.append([M, name, fmt_stats(*s.scaled(1e3)), fmt(nbytes / s.median / 1e9),
                             fmt(base / s.median)])
            data[M] = {k: s.to_dict() for k, s in stats.items()}
    md = "\n\n".join([
        f"### Skinny linears ({args.weights}): F.linear vs (W @ x^T)^T vs oneDNN packed vs "
        "qkv.linear (float32)",
        context_line(info, command_line()),
        f"{len(ws)} weight matrices ({nbytes / 1e6:,.0f} MB), each multiplied by an M-row "
        f"input; ms per pass over all of them, median (min-max) of {repeats} after a "
        "warm-up, all interleaved, each timed pass right after an untimed one of the same "
        "product (so that weights which fit in the caches are warm for every product); "
        "GB/s = weight bytes / time; speed-up = F.linear time / this time. 'oneDNN packed': "
        "torch.ops.mkldnn._linear_pointwise with the "
        "weight packed once beforehand (not timed). qkv.linear uses it for a matrix when "
        f"M >= {PACKED_MIN_ROWS} and M x N x C >= {PACKED_MIN_MACS:,}; otherwise it "
        f"reverses the product for M in {SKINNY_ROWS.start}-{SKINNY_ROWS.stop - 1}; for "
        "M = 1, with 2 or more threads, it multiplies one block of W's rows per thread in one "
        "bmm (when the thread count divides W's rows), and with 1 thread it calls F.linear. "
        "'qkv.linear unpacked': qkv.linear with `packing_disabled()`, its path before "
        "session 11. 'qkv.linear, oneDNN only': with `packing_disabled(\"blocked\")`, its "
        f"path in session 11. 'qkv.linear' itself: for {BLOCKED_MIN_ROWS} to "
        f"kernel.skinny_max_rows() = {kernel.skinny_max_rows()} rows and weights of at least "
        f"{BLOCKED_MIN_WEIGHT:,} elements, the compiled skinny product with its own packed "
        "copy, before all of the above.",
        table(["rows M", "product", "ms", "weight GB/s", "speed-up vs F.linear"], rows),
    ])
    name = "skinny_linear" + ("" if args.weights == "smollm2" else f"_{args.weights}")
    write(out, name, md, {"machine": info, "weights": args.weights, "weight_bytes": nbytes,
                          "stats": data})


if __name__ == "__main__":
    main()
