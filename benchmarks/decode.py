"""Decoding speed: greedy and beam-4 sentences/s of a random-weight "small" EncoderDecoder.

Sources are the first 100 Multi30k validation sentences (English), tokenised with a BPE
vocabulary of 8,000 trained on the training set. Random weights never choose eos on
their own, so every output is forced (min_len = max_len) to the mean length of its
batch's German references: the work done is that of a real translation of this set.
Sentences are sorted by length and batched as `translate_lines` does.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from common import command_line, context_line, machine_info, measure, parser, setup, write

from qkv import EncoderDecoder, count_parameters, preset
from qkv.search import decode_beam, decode_greedy
from qkv.tokenizer import encode, train_bpe
from qkv.translate import encode_source, pad_batch


def read(path: Path, n: int | None = None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[:n] if n else lines


def batches(src: list[list[int]], tgt_len: list[int], size: int):
    """(src (B, S), forced output length) per batch, sentences sorted by source length."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        n = round(sum(tgt_len[i] for i in chunk) / len(chunk))
        yield pad_batch([src[i] for i in chunk]), n


def run(model, data, beam: int, use_cache: bool = True) -> int:
    """Decode every batch; return the output tokens produced."""
    total = 0
    for src, n in data:
        if beam == 1:
            hyps = decode_greedy(model, src, min_len=n, max_len=n, use_cache=use_cache)
        else:
            hyps = decode_beam(model, src, beam=beam, min_len=n, max_len=n, use_cache=use_cache)
        total += sum(len(h.tokens) for h in hyps)
    return total


def profile(model, data) -> None:
    """Top operators by self CPU time, one beam-4 pass after a warm-up pass."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run(model, data, 4)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, data, 4)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("QKV_DATA_DIR", "../shared/data")) / "multi30k")
    p.add_argument("--sentences", type=int, default=100)
    p.add_argument("--no-uncached", action="store_true", help="skip the no-cache baseline")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top operators for beam 4, batch 32, and stop")
    args = p.parse_args()
    out = setup(args)
    n = 8 if args.quick else args.sentences
    train = read(args.data / "train.en.gz") + read(args.data / "train.de.gz")
    tok = train_bpe(train[:2000] if args.quick else train, vocab_size=8000)
    model = EncoderDecoder(preset("small", vocab_size=8000)).eval()
    cfg = model.cfg
    src = [encode_source(tok, line, cfg.max_seq_len) for line in read(args.data / "val.en.gz", n)]
    tgt_len = [len(encode(tok, line)) for line in read(args.data / "val.de.gz", n)]
    if args.profile:
        return profile(model, list(batches(src, tgt_len, 32)))
    runs = {}
    for bs in (32, 1):
        data = list(batches(src, tgt_len, bs))
        runs[f"greedy, batch {bs}"] = (lambda d=data: run(model, d, 1))
        runs[f"beam 4, batch {bs}"] = (lambda d=data: run(model, d, 4))
    if not args.no_uncached:
        data = list(batches(src, tgt_len, 32))
        runs["greedy, batch 32, no cache"] = lambda d=data: run(model, d, 1, False)
        runs["beam 4, batch 32, no cache"] = lambda d=data: run(model, d, 4, False)
    info = machine_info()
    stats = measure(runs, repeats=args.repeats or (1 if args.quick else 3), warmup=1)
    tokens = run(model, list(batches(src, tgt_len, 32)), 1)
    rows = [f"| {name} | {n / s.median:.1f} | {n / s.max:.1f}-{n / s.min:.1f} "
            f"| {tokens / s.median:.0f} |" for name, s in stats.items()]
    md = "\n".join([
        f"Random-weight `small` EncoderDecoder ({count_parameters(model) / 1e6:.1f}M parameters,"
        f" vocab 8000, d_model {cfg.d_model}, {cfg.n_layers}+{cfg.n_decoder_layers} layers, "
        f"{cfg.attention_kind}), {n} Multi30k val sentences, mean source "
        f"{sum(map(len, src)) / n:.1f} tokens, {tokens} output tokens (forced lengths).",
        "",
        "| decoding | sentences/s (median) | range | output tokens/s |",
        "|---|---|---|---|",
        *rows,
        "",
        context_line(info, command_line()),
    ])
    write(out, "decode", md, {"machine": info, "tokens": tokens, "sentences": n,
                              "stats": {k: v.to_dict() for k, v in stats.items()}})


if __name__ == "__main__":
    main()
