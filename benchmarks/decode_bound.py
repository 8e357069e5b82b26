"""Decoding against the memory-bandwidth bound: a SmolLM2-shaped DecoderLM, n_kv_heads 9/3/1.

One decode step reads every weight once and the whole KV cache once, so it cannot be
faster than (weight bytes + KV bytes) / bandwidth. Random weights; the cache is filled
with random keys and values up to the context length (a prefill of 2,048 tokens x 16
sequences would cost minutes and does not change the step being timed).
"""

from __future__ import annotations

import torch
from common import (
    Stats,
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

from qkv import DecoderLM, KVCache, ModelConfig, count_parameters

SMOLLM2 = dict(
    vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, n_layers=30, d_ff=1536,
    max_seq_len=2048 + 64, dropout=0.0, positions="rope", rope_base=100000.0, norm="rmsnorm",
    norm_place="pre", norm_eps=1e-5, activation="swiglu", bias=False, scale_embeddings=False,
    tie_embeddings=True,
)
QUICK = dict(SMOLLM2, vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
             d_ff=128, max_seq_len=128)


def read_bandwidth(repeats: int, n_bytes: int) -> Stats:
    """Seconds to sum a float32 tensor of n_bytes (read once)."""
    x = torch.randn(n_bytes // 4)
    return measure({"sum": x.sum}, repeats=repeats, warmup=1)["sum"]


def filled_cache(model: DecoderLM, batch: int, context: int, steps: int) -> KVCache:
    cache = model.make_cache(batch, context + steps)
    cache.k[:, :, :, :context].normal_()
    cache.v[:, :, :, :context].normal_()
    cache.lengths = [context] * len(cache.lengths)
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


def bench_config(cfg: ModelConfig, batches, contexts, steps, repeats, bw_gbs) -> list[dict]:
    model = DecoderLM(cfg).eval()
    wbytes = weight_bytes(model)
    kv_tok = KVCache.bytes_per_token(cfg.n_decoder_layers, cfg.n_kv_heads, cfg.head_dim)
    rows = []
    for batch in batches:
        for context in contexts:
            cache = filled_cache(model, batch, context, steps)
            s = measure({"step": step_fn(model, cache, context, steps)}, repeats, 1)["step"]
            moved = wbytes + batch * (context + steps / 2) * kv_tok
            rows.append(dict(n_kv_heads=cfg.n_kv_heads, batch=batch, context=context,
                             step_ms=s.scaled(1e3 / steps), bound_ms=moved / bw_gbs / 1e6,
                             weight_bytes=wbytes, kv_bytes_per_token=kv_tok,
                             params=count_parameters(model)))
            del cache
    return rows


def plot(rows: list[dict], path) -> None:
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
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(rows, info, bw, steps, repeats, layers, head_dim) -> str:
    body = [[r["n_kv_heads"], r["batch"], r["context"], fmt_stats(*r["step_ms"]),
             fmt(r["bound_ms"]), fmt(r["step_ms"][0] / r["bound_ms"]),
             fmt(r["batch"] / r["step_ms"][0] * 1e3)] for r in rows]
    kv = sorted({(r["n_kv_heads"], r["kv_bytes_per_token"]) for r in rows}, reverse=True)
    kv_rows = [[g, f"{b:,}", fmt(b / kv[0][1])] for g, b in kv]
    return "\n\n".join([
        "### Decoding against the memory-bandwidth bound",
        context_line(info, command_line()),
        f"Read bandwidth measured in this run: {fmt_stats(*bw)} GB/s (sum of a 1 GiB tensor). "
        f"Each figure: {steps} decode steps per call, median (min-max) of {repeats} after "
        f"one warm-up; float32; {rows[0]['params']:,} parameters "
        f"({rows[0]['weight_bytes'] / 1e6:,.0f} MB of weights with {rows[0]['n_kv_heads']} kv "
        f"heads).",
        table(["kv heads", "batch", "context", "ms/step", "bound ms", "step/bound",
               "tokens/s"], body),
        f"KV-cache bytes per token per sequence (float32, {layers} layers, head_dim {head_dim}):",
        table(["kv heads", "bytes/token", "vs MHA"], kv_rows),
    ])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    base = QUICK if args.quick else SMOLLM2
    batches, contexts = ([1, 2], [8, 16]) if args.quick else ([1, 16], [128, 512, 2048])
    steps, repeats = (2, 2) if args.quick else (4, args.repeats or 3)
    bw_s = read_bandwidth(repeats, (8 if args.quick else 1024) * 2**20)
    n_bytes = (8 if args.quick else 1024) * 2**20
    bw = (n_bytes / bw_s.median / 1e9, n_bytes / bw_s.max / 1e9, n_bytes / bw_s.min / 1e9)
    heads = [base["n_heads"], base["n_kv_heads"], 1]
    rows = []
    for g in heads:
        cfg = ModelConfig(**{**base, "n_kv_heads": g})
        rows += bench_config(cfg, batches, contexts, steps, repeats, bw[0])
    plot(rows, out / "decode_bound.png")
    md = markdown(rows, info, bw, steps, repeats, base["n_layers"], cfg.head_dim)
    md += "\n\n![decode step time vs the bandwidth bound](decode_bound.png)"
    write(out, "decode_bound", md, {"machine": info, "bandwidth_gbs": bw, "rows": rows})


if __name__ == "__main__":
    main()
