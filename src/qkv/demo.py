"""`qkv demo`: SmolLM2-135M, offline, as GQA (3 kv heads) and converted to MQA (1 kv head).

Loads the model, streams a short completion, converts it, and prints a side-by-side table:
KV-cache bytes per token, decoding tokens/s at a long context, and perplexity on a
paragraph of this project's own writing.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from .convert import convert_kv_heads, kv_bytes_per_token
from .generate import TextStream, generate, perplexity, read_fraction
from .models import DecoderLM

PARAGRAPH = (
    "qkv is the Transformer of \"Attention Is All You Need\" (Vaswani et al., 2017), end to "
    "end, with multi-head, grouped-query and multi-query attention as one mechanism: every "
    "model switches between MHA, GQA and MQA with one config field, n_kv_heads. Query head h "
    "reads key/value head h // (H / G), so a model with fewer key/value heads keeps a smaller "
    "cache while decoding. Two packages on the package registry ship real Transformer "
    "weights. With them qkv can show the seeds' claim on a real model instead of a toy: what "
    "sharing key/value heads does to memory, speed and quality. A checkpoint with G "
    "key/value heads becomes one with fewer by mean-pooling the key and value projection "
    "heads of each group; a short uptraining with the original objective then recovers most "
    "of the quality. The demo loads SmolLM2, generates a short completion, converts the "
    "model to multi-query attention, and prints a side-by-side table: the bytes the "
    "key/value cache needs per token, the decoding speed at a long context, and the "
    "perplexity on a paragraph of the project's own writing."
)
PROMPT = "The three kinds of attention in a Transformer are"


@dataclass
class Row:
    name: str
    n_kv_heads: int
    kv_bytes_per_token: int
    tokens_per_s: float
    perplexity: float | None


def decode_speed(model: DecoderLM, context: int, steps: int = 16, batch: int = 1,
                 warmup: int = 2) -> float:
    """Decoding tokens/s (all rows) with `context` tokens already in the KV cache.

    The cache is filled with random keys/values: the cost of a step depends only on how
    many are stored. Each step is `generate`'s: one token per row, then next-token logits.
    """
    cfg = model.cfg
    if context + warmup + steps > cfg.max_seq_len:
        raise ValueError(f"context {context} + {warmup + steps} timed steps exceed "
                         f"max_seq_len={cfg.max_seq_len}")
    cache = model.make_cache(batch, context + warmup + steps)
    cache.fill_random_(context)
    x = torch.randint(0, cfg.vocab_size, (batch, 1))
    with torch.inference_mode():
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            x = model.logits(model.decoder(x, cache=cache)[:, -1]).argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - start)


def _perplexity(model: DecoderLM, ids: list[int] | None, window: int) -> float | None:
    if not ids:
        return None
    window = min(window, len(ids))
    return perplexity(model, ids, window=window, stride=max(1, window // 2))


def measure(models: list[tuple[str, DecoderLM]], ids: list[int] | None, *, context: int,
            steps: int, batch: int, window: int, repeats: int = 1) -> list[Row]:
    """One row per model: cache bytes, best decoding speed of `repeats` rounds (models take
    turns, so a busy machine slows all alike), perplexity of `ids` (None: skipped)."""
    speeds = [0.0] * len(models)
    for _ in range(repeats):
        for i, (_, model) in enumerate(models):
            speeds[i] = max(speeds[i], decode_speed(model, context, steps, batch))
    return [Row(name, m.cfg.n_kv_heads, kv_bytes_per_token(m), speed, _perplexity(m, ids, window))
            for (name, m), speed in zip(models, speeds, strict=True)]


def format_table(rows: list[Row], context: int, batch: int) -> str:
    """A Markdown table, one row per model; the cache column is for the whole batch."""
    head = (f"| model | kv heads | KV cache bytes/token | KV cache at {context} tokens x "
            f"{batch} | decode tokens/s (context {context}, batch {batch}) | perplexity |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mib = r.kv_bytes_per_token * context * batch / 2**20
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.2f}"
        lines.append(f"| {r.name} | {r.n_kv_heads} | {r.kv_bytes_per_token:,} | {mib:,.1f} MiB"
                     f" | {r.tokens_per_s:.1f} | {ppl} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="a pretrained name or path")
    parser.add_argument("--kv-heads", type=int, default=1, help="convert to this many (1: MQA)")
    parser.add_argument("--also", nargs="*", default=[],
                        help="more LM checkpoints to add to the table (e.g. an uptrained one)")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens when timing")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--text", default=None,
                        help="perplexity on this file (default: a paragraph about qkv)")
    parser.add_argument("--fraction", default="0:1", help="part of --text, by characters")
    parser.add_argument("--max-tokens", type=int, default=None, help="first N tokens of it")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    parser.add_argument("--repeats", type=int, default=1, help="timing rounds (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loading(i: int, n: int) -> None:
    print(f"\r  dequantising tensor {i + 1}/{n}", end="", file=sys.stderr, flush=True)


def _stream_completion(p, prompt: str, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        return
    streamer = TextStream(p.tokenizer)
    print(prompt, end="", flush=True)

    def show(step: list[int | None]) -> None:
        if step[0] is not None:
            print(streamer.push(step[0]), end="", flush=True)

    generate(p.model, [p.encode(prompt)], max_new_tokens, eos_id=p.eos_id, stream=show)
    print(streamer.finish(), flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from .generate import load_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.context, args.steps, args.batch, args.repeats) < 1:
        raise ValueError(f"--context ({args.context}), --steps ({args.steps}), --batch "
                         f"({args.batch}) and --repeats ({args.repeats}) must be >= 1")
    text = PARAGRAPH if args.text is None else read_fraction(args.text, args.fraction)
    t0 = time.perf_counter()
    _say(f"[1/4] loading {args.model} (offline)")
    from .pretrained import load_pretrained

    p = load_pretrained(args.model, progress=_loading)
    if not isinstance(p.model, DecoderLM):
        raise ValueError(f"{args.model}: the demo needs a language model, got "
                         f"{type(p.model).__name__}")
    cfg = p.model.cfg
    _say(f"\n  {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads, "
         f"{cfg.n_kv_heads} kv heads ({cfg.attention_kind}) in {time.perf_counter() - t0:.1f}s")
    converted = convert_kv_heads(p.model, args.kv_heads)  # fast; fails early on a bad N
    _say(f"[2/4] greedy completion, {args.max_new_tokens} new tokens, streamed")
    _stream_completion(p, args.prompt, args.max_new_tokens)
    _say(f"[3/4] converting to {args.kv_heads} kv heads (mean-pooling each group)")
    models = [(f"original ({cfg.attention_kind})", p.model)]
    models.append((f"converted ({converted.cfg.attention_kind}, no uptraining)", converted))
    models += [(path, load_lm(path).model) for path in args.also]
    ids = None if args.no_perplexity else p.encode(text)[: args.max_tokens]
    what = "" if ids is None else f"perplexity on {len(ids)} tokens, "
    _say(f"[4/4] measuring: {what}{args.steps} decoding steps at context {args.context}, "
         f"batch {args.batch}, best of {args.repeats}")
    rows = measure(models, ids, context=args.context, steps=args.steps, batch=args.batch,
                   window=args.window, repeats=args.repeats)
    print()
    print(format_table(rows, args.context, args.batch))
    _say(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0
