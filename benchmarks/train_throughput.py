"""Training throughput: qkv's EncoderDecoder vs torch.nn.Transformer, same shape and batch.

Both models: shared source/target embeddings scaled by sqrt(d_model), sinusoidal
positions, post-LN, ReLU, dropout 0.1, output layer tied to the embeddings; one step
is forward, label-smoothed cross-entropy, backward and an Adam update. nn.Transformer
also applies a final LayerNorm after each stack (its fixed design): a tiny extra cost.
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
from flops import training_step
from torch import nn

from qkv import EncoderDecoder, ModelConfig, count_parameters
from qkv.layers import sinusoidal_table


class TorchTransformer(nn.Module):
    """torch.nn.Transformer with embeddings, positions and a tied output layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pos", sinusoidal_table(cfg.max_seq_len, cfg.d_model), False)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_decoder_layers, cfg.d_ff,
            cfg.dropout, batch_first=True,
        )

    def _embed(self, tokens):
        return self.drop(self.embed(tokens) * math.sqrt(self.cfg.d_model)
                         + self.pos[: tokens.shape[1]])

    def forward(self, src, tgt):
        pad = src == self.cfg.pad_id  # (B, S) True = padding (torch's polarity)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.transformer(self._embed(src), self._embed(tgt), tgt_mask=causal,
                             src_key_padding_mask=pad, memory_key_padding_mask=pad,
                             tgt_is_causal=True)
        return F.linear(h, self.embed.weight)


def train_step_fn(model: nn.Module, src, tgt_in, tgt_out):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    model.train()

    def step():
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def config(quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=256, d_model=32, n_heads=4, n_layers=1, d_ff=64,
                           max_seq_len=32)
    return ModelConfig(vocab_size=8000, d_model=256, n_heads=8, n_layers=3, d_ff=1024,
                       max_seq_len=128, dropout=0.1)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    cfg = config(args.quick)
    B, S, T = (4, 8, 8) if args.quick else (64, 32, 32)
    repeats = args.repeats or (2 if args.quick else 5)
    src = torch.randint(4, cfg.vocab_size, (B, S))
    tgt = torch.randint(4, cfg.vocab_size, (B, T + 1))
    models = {}
    for p in (cfg.dropout, 0.0):
        c = cfg.replace(dropout=p)
        models[f"qkv EncoderDecoder, dropout {p}"] = EncoderDecoder(c)
        models[f"torch.nn.Transformer, dropout {p}"] = TorchTransformer(c)
    fns = {k: train_step_fn(m, src, tgt[:, :-1], tgt[:, 1:]) for k, m in models.items()}
    n = 256 if args.quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    stats = measure({**fns, "peak": lambda: a @ b}, repeats=repeats, warmup=2)
    peak = 2 * n**3 / stats.pop("peak").median / 1e9
    flops = training_step(cfg, B, S, T)
    rows, data = [], {}
    for name, s in stats.items():
        tps = (B * T / s.median, B * T / s.max, B * T / s.min)
        achieved = flops / s.median / 1e9
        rows.append([name, f"{count_parameters(models[name]):,}", fmt_stats(*s.scaled(1e3)),
                     fmt_stats(*tps), fmt(achieved), f"{achieved / peak:.0%}"])
        data[name] = {"step_s": s.to_dict(), "target_tokens_per_s": tps,
                      "gflops": achieved}
    ratios = {p: stats[f"torch.nn.Transformer, dropout {p}"].median
              / stats[f"qkv EncoderDecoder, dropout {p}"].median for p in (cfg.dropout, 0.0)}
    ratio = ratios[cfg.dropout]
    md = "\n\n".join([
        "### Training throughput vs torch.nn.Transformer",
        context_line(info, command_line()),
        f"Shape: d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_layers}+"
        f"{cfg.n_decoder_layers} layers, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}; batch {B} "
        f"pairs of {S} source and {T} target tokens, float32. Median (min-max) of {repeats} "
        f"steps after 2 warm-up steps, the four runs interleaved. Matmul FLOPs per step "
        f"{flops / 1e9:.1f} G (3x forward); peak = a float32 {n}^3 matmul interleaved with "
        f"the steps, median {fmt(peak)} GFLOP/s. nn.Transformer's `dropout` also drops "
        "attention weights and the feed-forward's hidden units (qkv, as the paper, drops "
        "only sublayer outputs and embeddings), so the dropout-0 rows compare identical "
        "computations.",
        table(["model", "parameters", "ms/step", "target tokens/s", "GFLOP/s", "of peak"],
              rows),
        "qkv / nn.Transformer tokens/s: " + ", ".join(
            f"**{r:.2f}x** at dropout {p}" for p, r in ratios.items()) + ".",
    ])
    data.update(machine=info, peak_gflops=peak, flops_per_step=flops, ratio=ratio,
                ratio_dropout0=ratios[0.0],
                batch=B, S=S, T=T, config=cfg.to_dict())
    write(out, "train_throughput", md, data)


if __name__ == "__main__":
    main()
