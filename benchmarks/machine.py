"""The limits of this machine: matmul GFLOP/s (float32, bfloat16) and memory bandwidth GB/s.

Bandwidth tensors are far larger than the last-level cache, so they measure DRAM.
"""

from __future__ import annotations

import torch
from common import (
    command_line,
    context_line,
    fmt_stats,
    machine_info,
    measure,
    parser,
    setup,
    table,
    write,
)

from qkv.linear import bf16_is_native


def matmul_rates(n: int, dtypes: list[torch.dtype], repeats: int) -> dict[str, tuple]:
    """GFLOP/s of an (n, n) @ (n, n) product per dtype: (median, min, max)."""
    mats = {str(dt).split(".")[1]: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt))
            for dt in dtypes}
    fns = {name: (lambda a=a, b=b: a @ b) for name, (a, b) in mats.items()}
    stats = measure(fns, repeats=repeats, warmup=2)
    flops = 2 * n**3 / 1e9
    # A rate's median is flops / median time; its min comes from the slowest run.
    return {name: (flops / s.median, flops / s.max, flops / s.min) for name, s in stats.items()}


def bandwidth(n_bytes: int, repeats: int) -> dict[str, tuple]:
    """GB/s of: sum (reads n bytes), copy (reads and writes n), matvec (reads the matrix)."""
    n = n_bytes // 4
    x, y = torch.randn(n), torch.empty(n)
    side = int(n**0.5)
    w, v = x[: side * side].view(side, side), torch.randn(side)
    fns = {"sum (read)": x.sum, "copy (read + write)": lambda: y.copy_(x),
           "matvec fp32 (read W)": lambda: w @ v}
    moved = {"sum (read)": 4 * n, "copy (read + write)": 8 * n,
             "matvec fp32 (read W)": 4 * side * side}
    stats = measure(fns, repeats=repeats, warmup=2)
    return {k: (moved[k] / s.median / 1e9, moved[k] / s.max / 1e9, moved[k] / s.min / 1e9)
            for k, s in stats.items()}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    repeats = args.repeats or (2 if args.quick else 7)
    n = 256 if args.quick else 2048
    n_bytes = (8 if args.quick else 1024) * 2**20
    # Without bf16 units (AVX2-only CPUs) torch's fallback ran at ~1 GFLOP/s: a 2048 product
    # would take ~15 s per repeat, so measure it at 512 and say so in the row.
    native = bf16_is_native()
    sizes = {"float32": n, "bfloat16": n if native else min(n, 512)}
    mm = {**matmul_rates(sizes["float32"], [torch.float32], repeats),
          **matmul_rates(sizes["bfloat16"], [torch.bfloat16], repeats)}
    bw = bandwidth(n_bytes, repeats)
    rows = [[f"matmul {name} ({sizes[name]}x{sizes[name]} @ {sizes[name]}x{sizes[name]})"
             + ("" if sizes[name] == n else ", no bf16 units on this CPU"), "GFLOP/s",
             fmt_stats(*r)] for name, r in mm.items()]
    rows += [[f"{k}, {n_bytes // 2**20} MiB", "GB/s", fmt_stats(*r)] for k, r in bw.items()]
    md = "\n\n".join([
        "### Machine limits",
        context_line(info, command_line()),
        table(["measure", "unit", f"median (min-max) of {repeats}"], rows),
    ])
    data = {"machine": info, "n": n, "sizes": sizes, "bf16_native": native,
            "bytes": n_bytes, "matmul_gflops": mm,
            "bandwidth_gbs": bw, "peak_fp32_gflops": mm["float32"][0],
            "peak_bf16_gflops": mm["bfloat16"][0], "bandwidth_read_gbs": bw["sum (read)"][0]}
    write(out, "machine", md, data)


if __name__ == "__main__":
    main()
