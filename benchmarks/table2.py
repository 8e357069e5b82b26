"""Shazeer (2019) Table 2 on this CPU: MHA vs GQA vs MQA encoder-decoders at equal size.

The paper's shape (d_ff = 4 d_model, 8 heads, head_dim = d_model / 8) at a CPU size;
fewer kv heads remove K/V projection weights, which d_ff gets back (as the paper
widens d_ff from 4096 to 5440 for MQA) so all variants have about the same parameters.
Random weights: only time is measured. Outputs are forced to a fixed length
(min_len = max_len), so every variant decodes the same number of tokens.
"""

from __future__ import annotations

import torch
from common import (
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
from train_throughput import train_step_fn

from qkv import EncoderDecoder, ModelConfig, count_parameters
from qkv.search import beam_search, greedy


def n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return count_parameters(EncoderDecoder(cfg))


def equal_size(base: ModelConfig, n_kv_heads: int) -> ModelConfig:
    """base with n_kv_heads, and the d_ff (multiple of 8) that brings it closest in size."""
    target = n_params(base)
    cfg = base.replace(n_kv_heads=n_kv_heads)
    per_unit = n_params(cfg.replace(d_ff=cfg.d_ff + 8)) - n_params(cfg)  # per 8 of d_ff
    extra = round((target - n_params(cfg)) / per_unit) * 8
    return cfg.replace(d_ff=cfg.d_ff + extra)


def base_config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=256, d_model=32, n_heads=4, n_layers=1, d_ff=128,
                           max_seq_len=32, dropout=0.0)
    return ModelConfig(vocab_size=8000, d_model=256, n_heads=8, n_layers=3, d_ff=1024,
                       max_seq_len=160, dropout=0.1)


def decode_fn(search, model, src, out_len, **kw):
    def run():
        outs = search(model, src, max_len=out_len, min_len=out_len, **kw)
        assert all(len(o) == out_len for o in outs), "forced length not reached"

    return run


def plot(results: dict, path) -> None:
    fig, ax = figure(figsize=(6, 3.5))
    metrics = ["train", "greedy", "beam-4"]
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [r[m][0] for m in metrics], width, label=name,
               yerr=[[r[m][0] - r[m][1] for m in metrics], [r[m][2] - r[m][0] for m in metrics]])
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set(ylabel="microseconds per token", title="Training and decoding time per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    base = base_config(args.quick)
    B, S, T = (2, 8, 8) if args.quick else (32, 48, 48)  # training batch
    Bd, Sd, L = (2, 8, 6) if args.quick else (16, 48, 48)  # decoding batch, output length
    repeats = args.repeats or (2 if args.quick else 3)
    variants = {f"{k} (kv heads {g})": equal_size(base, g) for k, g in
                [("MHA", base.n_heads), ("GQA", 2), ("MQA", 1)]}
    models = {k: EncoderDecoder(c) for k, c in variants.items()}
    src, tgt = torch.randint(4, base.vocab_size, (B, S)), torch.randint(4, base.vocab_size,
                                                                        (B, T + 1))
    src_d = torch.randint(4, base.vocab_size, (Bd, Sd))
    train = measure({k: train_step_fn(m, src, tgt[:, :-1], tgt[:, 1:]) for k, m in
                     models.items()}, repeats, 1)
    for m in models.values():
        m.eval()
    greedy_s = measure({k: decode_fn(greedy, m, src_d, L) for k, m in models.items()},
                       repeats, 1)
    beam_s = measure({k: decode_fn(beam_search, m, src_d, L, beam=4) for k, m in
                      models.items()}, repeats, 1)
    results, rows = {}, []
    for k, cfg in variants.items():
        r = {"train": train[k].scaled(1e6 / (B * T)), "greedy": greedy_s[k].scaled(1e6 / (Bd * L)),
             "beam-4": beam_s[k].scaled(1e6 / (Bd * L))}
        results[k] = r
        mha = next(iter(variants))
        rows.append([k, cfg.d_ff, f"{count_parameters(models[k]):,}",
                     fmt_stats(*r["train"]), fmt_stats(*r["greedy"]), fmt_stats(*r["beam-4"]),
                     fmt(greedy_s[mha].median / greedy_s[k].median),
                     fmt(beam_s[mha].median / beam_s[k].median)])
    plot(results, out / "table2.png")
    md = "\n\n".join([
        "### Shazeer's Table 2 on this CPU",
        context_line(info, command_line()),
        f"Encoder-decoder, d_model {base.d_model}, {base.n_heads} query heads of "
        f"{base.head_dim}, {base.n_layers}+{base.n_decoder_layers} layers, vocab "
        f"{base.vocab_size}, float32, random weights. Training: batch {B} pairs of {S}+{T} "
        f"tokens, microseconds per target token (forward, backward, Adam). Decoding: "
        f"{Bd} sources of {Sd} tokens, {L} output tokens each (forced), microseconds per "
        f"output token over the batch, KV cache on. Median (min-max) of {repeats} after one "
        f"warm-up, the three variants interleaved.",
        table(["variant", "d_ff", "parameters", "train us/token", "greedy us/token",
               "beam-4 us/token", "greedy speed-up vs MHA", "beam speed-up vs MHA"], rows),
        "![Table 2 on this CPU](table2.png)",
    ])
    write(out, "table2", md, {"machine": info, "results": results,
                              "configs": {k: c.to_dict() for k, c in variants.items()}})


if __name__ == "__main__":
    main()
