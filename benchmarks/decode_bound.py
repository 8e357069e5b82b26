"""Decoding against the memory-bandwidth bound: a SmolLM2-shaped DecoderLM, n_kv_heads 9/3/1.

One decode step reads every weight once and the whole KV cache once, so it cannot be
faster than (weight bytes + KV bytes) / bandwidth. With --compare-kernel each step also
runs without qkv's compiled decode attention (qkv/kernel.py), i.e. through PyTorch's SDPA
as before it existed, interleaved; with --compare-fused through the modules instead of
qkv/fused.py's one compiled call for all layers. Random weights; the cache is filled
with random keys and values up to the context length (a prefill of 2,048 tokens x 16
sequences would cost minutes and does not change the step being timed).
"""

from __future__ import annotations

import torch
from common import (
    DTYPES,
    command_line,
    context_line,
    figure,
    fmt,
    fmt_stats,
    machine_info,
    measure,
    parser,
    setup,
    table,
    write,
)

from qkv import DecoderLM, KVCache, ModelConfig, count_parameters, fused, kernel
from qkv.linear import packing_disabled

SMOLLM2 = dict(
    vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, n_layers=30, d_ff=1536,
    max_seq_len=2048 + 64, dropout=0.0, positions="rope", rope_base=100000.0, norm="rmsnorm",
    norm_place="pre", norm_eps=1e-5, activation="swiglu", bias=False, scale_embeddings=False,
    tie_embeddings=True,
)
QUICK = dict(SMOLLM2, vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
             d_ff=128, max_seq_len=128)


def filled_cache(model: DecoderLM, batch: int, context: int, steps: int) -> KVCache:
    cache = model.make_cache(batch, context + steps)
    cache.fill_random_(context)
    return cache


def step_fn(model: DecoderLM, cache: KVCache, context: int, steps: int):
    """`steps` greedy decode steps from `context` cached tokens, then rewind the cache."""
    token = torch.zeros(cache.batch_size, 1, dtype=torch.long)

    @torch.inference_mode()
    def run():
        nonlocal token
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        cache.lengths = [context] * len(cache.lengths)

    return run


def weight_bytes(model: DecoderLM) -> int:
    """Bytes read per step: every parameter once (the tied embedding is the output layer)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_read(model: DecoderLM, batch: int, context: int, steps: int,
               dtype: torch.dtype) -> float:
    """Bytes a step reads, on average over `steps` steps from `context` cached tokens:
    every weight and the KV cache (of `dtype`) of `batch` sequences, once."""
    cfg = model.cfg
    kv = KVCache.bytes_per_token(cfg.n_decoder_layers, cfg.n_kv_heads, cfg.head_dim, dtype)
    return weight_bytes(model) + batch * (context + steps / 2) * kv


# The comparison runs (--compare-kernel, --compare-packed, --compare-blocked,
# --compare-fused): each step
# again with one of qkv's paths switched off. name -> (the switch, the JSON key of qkv's
# speed-up over that run, the table's column for that run, its column for the speed-up,
# the table's introduction).
VARIANTS = {
    "sdpa": (kernel.disabled, "kernel_speedup", "SDPA", "kernel speed-up",
             "The same steps without the compiled decode attention (`kernel.disabled()`: "
             "PyTorch's SDPA, qkv's path before it)"),
    "unpacked": (packing_disabled, "packed_speedup", "unpacked", "packed speed-up",
                 "The same steps without packed weights (`linear.packing_disabled()`: qkv's "
                 "linear layers as before session 11)"),
    "onednn": (lambda: packing_disabled("blocked"), "blocked_speedup", "oneDNN",
               "skinny kernel speed-up",
               "The same steps with oneDNN's packed product instead of the compiled skinny "
               "one for 2-64 rows (`linear.packing_disabled(\"blocked\")`: qkv's linear "
               "layers as in session 11)"),
    "modules": (fused.disabled, "fused_speedup", "modules", "fused speed-up",
                "The same steps through the modules, one operator call at a time "
                "(`fused.disabled()`: qkv's decode steps as in session 13)"),
}


def bench_point(models: dict[int, DecoderLM], batch: int, context: int, steps: int,
                repeats: int, probe: torch.Tensor, compare_kernel: bool = False,
                compare_packed: bool = False, compare_blocked: bool = False,
                compare_fused: bool = False) -> list[dict]:
    """All kv-head variants and a bandwidth probe (sum of `probe`), interleaved; with
    compare_kernel also each variant without the compiled decode attention, with
    compare_packed each without packed weights, with compare_blocked each with oneDNN's
    packed product instead of the compiled skinny one, with compare_fused each through the
    modules instead of fused.py's one call."""
    caches = {g: filled_cache(m, batch, context, steps) for g, m in models.items()}
    fns = {g: step_fn(m, caches[g], context, steps) for g, m in models.items()}
    switches = (compare_kernel, compare_packed, compare_blocked, compare_fused)
    for on, name in zip(switches, VARIANTS, strict=True):
        if on:
            off = VARIANTS[name][0]
            fns |= {(name, g): off()(step_fn(m, caches[g], context, steps))
                    for g, m in models.items()}
    stats = measure({**fns, "probe": probe.sum}, repeats, 1)
    p = stats.pop("probe")
    others = {name: {g: stats.pop((name, g)) for g in models if (name, g) in stats}
              for name in VARIANTS}
    bw = tuple(probe.numel() * 4 / t / 1e9 for t in (p.median, p.max, p.min))  # GB/s
    rows = []
    for g, s in stats.items():
        cfg = models[g].cfg
        kv_tok = KVCache.bytes_per_token(cfg.n_decoder_layers, g, cfg.head_dim,
                                         caches[g].dtype)
        moved = bytes_read(models[g], batch, context, steps, caches[g].dtype)
        rows.append(dict(n_kv_heads=g, batch=batch, context=context,
                         step_ms=s.scaled(1e3 / steps), bandwidth_gbs=bw,
                         bound_ms=moved / bw[0] / 1e6, weight_bytes=weight_bytes(models[g]),
                         kv_bytes_per_token=kv_tok, params=count_parameters(models[g]),
                         vs_mha=stats[cfg.n_heads].median / s.median))
        for name, times in others.items():
            if g in times:
                rows[-1] |= {f"{name}_step_ms": times[g].scaled(1e3 / steps),
                             VARIANTS[name][1]: times[g].median / s.median,
                             f"{name}_vs_mha": times[cfg.n_heads].median / times[g].median}
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.ticker
    batches = sorted({r["batch"] for r in rows})
    fig, axes = figure(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for g in sorted({r["n_kv_heads"] for r in rows}, reverse=True):
            rs = [r for r in rows if r["batch"] == batch and r["n_kv_heads"] == g]
            x = [r["context"] for r in rs]
            line = ax.plot(x, [r["step_ms"][0] for r in rs], "o-", label=f"{g} kv heads")[0]
            ax.plot(x, [r["bound_ms"] for r in rs], "--", color=line.get_color(),
                    label=f"{g} kv heads: bandwidth bound")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per step",
               title=f"batch {batch}")
        ax.set_xticks(x, [str(c) for c in x], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(rows, info, steps, repeats, layers, head_dim, dtype: str,
             probe_mib: int) -> str:
    body = [[r["n_kv_heads"], r["batch"], r["context"], fmt_stats(*r["step_ms"]),
             fmt(r["bandwidth_gbs"][0]), fmt(r["bound_ms"]), fmt(r["step_ms"][0] / r["bound_ms"]),
             fmt(r["batch"] / r["step_ms"][0] * 1e3), fmt(r["vs_mha"])] for r in rows]
    kv = sorted({(r["n_kv_heads"], r["kv_bytes_per_token"]) for r in rows}, reverse=True)
    compared = ""
    for name, (_, speedup, column, title, intro) in VARIANTS.items():
        if f"{name}_step_ms" in rows[0]:
            compared += "\n\n" + "\n\n".join([
                intro + ", interleaved with the rows above:",
                table(["kv heads", "batch", "context", f"{column} ms/step", "step/bound",
                       title, "speed-up vs MHA"],
                      [[r["n_kv_heads"], r["batch"], r["context"],
                        fmt_stats(*r[f"{name}_step_ms"]),
                        fmt(r[f"{name}_step_ms"][0] / r["bound_ms"]), fmt(r[speedup]),
                        fmt(r[f"{name}_vs_mha"])] for r in rows])])
    kv_rows = [[g, f"{b:,}", fmt(b / kv[0][1])] for g, b in kv]
    return "\n\n".join([
        "### Decoding against the memory-bandwidth bound",
        context_line(info, command_line()),
        "For each batch and context the three kv-head variants and a bandwidth probe (sum "
        f"of a {probe_mib} MiB float32 tensor, read once) run interleaved; bound = (weight bytes + "
        "KV bytes read per step) / the probe's median GB/s from the same interleaved run. "
        f"Each figure: {steps} decode steps per call, median (min-max) of {repeats} after "
        f"one warm-up; {dtype} weights and KV cache; {rows[0]['params']:,} parameters "
        f"({rows[0]['weight_bytes'] / 1e6:,.0f} MB of weights with {rows[0]['n_kv_heads']} kv "
        f"heads).",
        table(["kv heads", "batch", "context", "ms/step", "probe GB/s", "bound ms",
               "step/bound", "tokens/s", "speed-up vs MHA"], body),
        f"KV-cache bytes per token per sequence ({dtype}, {layers} layers, "
        f"head_dim {head_dim}):",
        table(["kv heads", "bytes/token", "vs MHA"], kv_rows),
    ]) + compared


def main() -> None:
    p = parser(__doc__.splitlines()[0], dtype=True)
    p.add_argument("--compare-kernel", action="store_true",
                   help="also time every step without the compiled decode attention")
    p.add_argument("--compare-packed", action="store_true",
                   help="also time every step without packed weights")
    p.add_argument("--compare-blocked", action="store_true",
                   help="also time every step with oneDNN's packed product instead of the "
                        "compiled skinny one")
    p.add_argument("--compare-fused", action="store_true",
                   help="also time every step through the modules instead of the one "
                        "compiled call for all layers (qkv/fused.py)")
    args = p.parse_args()
    out = setup(args)
    info = machine_info()
    base = QUICK if args.quick else SMOLLM2
    batches, contexts = ([1, 2], [8, 16]) if args.quick else ([1, 16], [128, 512, 2048])
    steps, repeats = (2, 2) if args.quick else (2, args.repeats or 3)
    probe = torch.rand((8 if args.quick else 512) * 2**20 // 4)
    heads = [base["n_heads"], base["n_kv_heads"], 1]
    dtype = DTYPES[args.dtype]
    models = {g: DecoderLM(ModelConfig(**{**base, "n_kv_heads": g})).eval().to(dtype)
              for g in heads}
    rows = []
    for batch in batches:
        for context in contexts:
            rows += bench_point(models, batch, context, steps, repeats, probe,
                                args.compare_kernel, args.compare_packed, args.compare_blocked,
                                args.compare_fused)
    name = "decode_bound" if args.dtype == "float32" else f"decode_bound_{args.dtype}"
    plot(rows, out / f"{name}.png")
    cfg = models[heads[0]].cfg
    md = markdown(rows, info, steps, repeats, base["n_layers"], cfg.head_dim, args.dtype,
                  probe.numel() * 4 // 2**20)
    md += f"\n\n![decode step time vs the bandwidth bound]({name}.png)"
    write(out, name, md, {"machine": info, "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
