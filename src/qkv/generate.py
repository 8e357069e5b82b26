"""Language-model decoding with a preallocated KV cache, and sliding-window perplexity.

Commands: `qkv generate --model M "prompt"` and `qkv perplexity --model M FILE`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import warn_if_slow_bf16
from .models import DecoderLM

# --------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------- generation


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, P) left-padded tokens and (B,) pad counts."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    return tokens, torch.tensor([P - len(p) for p in prompts])


def _check_generate(model, prompts, max_new_tokens: int, min_new_tokens: int) -> None:
    if not isinstance(model, DecoderLM):
        raise ValueError(f"generate needs a DecoderLM, got {type(model).__name__}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens ({max_new_tokens}) and 0 <= min_new_tokens "
                         f"({min_new_tokens}) <= max_new_tokens")
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} tokens exceed the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")


def generate(
    model: DecoderLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    min_new_tokens: int = 0,
    stream: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; a batch decodes together.

    Prompts are left-padded (a mask and per-row positions keep padding invisible); the KV
    cache holds prompt + max_new_tokens. A row stops after `eos_id` (which it includes);
    all stop when every row has. `stream` gets each step's new token per row (None for
    rows already finished). Returns the new tokens of each row.
    """
    _check_generate(model, prompts, max_new_tokens, min_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    tokens, pads = _left_pad(prompts, model.cfg.pad_id)
    B, P = tokens.shape
    total = P + max_new_tokens
    mask = positions = None
    if pads.any():  # built once; each step reads a slice
        keys = torch.arange(total)
        mask = (keys[None, :] >= pads[:, None])[:, None, None, :]  # (B, 1, 1, total)
        positions = (keys[None, :] - pads[:, None]).clamp(min=0)  # (B, total)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.make_cache(B, total)
    out = torch.empty(B, max_new_tokens, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    n = 0
    with torch.inference_mode():
        h = model.decoder(tokens, mask=_cols(mask, 0, P), cache=cache,
                          positions=_cols(positions, 0, P))
        logits = model.logits(h[:, -1])  # (B, V): only the last position is needed
        for n in range(1, max_new_tokens + 1):
            if eos_id is not None and n <= min_new_tokens:
                logits[:, eos_id] = float("-inf")
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            out[:, n - 1] = nxt
            if stream is not None:
                stream([None if d else t for d, t in zip(done.tolist(), nxt.tolist(), strict=True)])
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            if n == max_new_tokens:
                break
            S = P + n
            h = model.decoder(nxt[:, None], mask=_cols(mask, 0, S), cache=cache,
                              positions=_cols(positions, S - 1, S))
            logits = model.logits(h[:, -1])
    return [_until_eos(row[:n], eos_id) for row in out.tolist()]


def _cols(x: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if x is None else x[..., start:end]


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row


class TextStream:
    """Incremental detokenisation: text appears once its bytes form whole characters.

    Decodes a short window of recent tokens (not the whole text at every step), the way
    vLLM and transformers' streamers do; a trailing U+FFFD means an unfinished character.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


# ------------------------------------------------------------------------- perplexity


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window of HF's strided method: each token scored once."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(model: DecoderLM, ids: list[int], *, window: int = 1024, stride: int = 512,
               progress: Callable[[int, int], None] | None = None) -> float:
    """exp(mean NLL) of the tokens of `ids`, each given at most `window` tokens before it.

    Windows advance by `stride` tokens and score only the tokens not scored before
    (Hugging Face's "strided" perplexity), so a token sees >= window - stride of context.
    A window's first token has no context and is not scored (with stride < window this is
    only ids[0]).
    """
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if not 1 <= stride <= window <= model.cfg.max_seq_len:
        raise ValueError(f"need 1 <= stride ({stride}) <= window ({window}) <= max_seq_len "
                         f"({model.cfg.max_seq_len})")
    x = torch.tensor(ids, dtype=torch.long)
    nll, spans = 0.0, _windows(len(ids), window, stride)
    with torch.inference_mode():
        for i, (begin, end, k) in enumerate(spans):
            h = model.decoder(x[None, begin:end])[:, -k - 1:-1]  # (1, k, C) predict the last k
            logits = model.logits(h)[0].float()  # (k, V)
            nll += F.cross_entropy(logits, x[end - k:end], reduction="sum").item()
            if progress is not None:
                progress(i + 1, len(spans))
    return math.exp(nll / sum(k for _, _, k in spans))


def read_fraction(path: str | Path, fraction: str = "0:1") -> str:
    """The part of a text file between two fractions of its characters ("0:0.9", "0.9:1"),
    cut at line starts so no line is split."""
    try:
        a, b = (float(v) for v in fraction.split(":"))
    except ValueError:
        raise ValueError(f"fraction {fraction!r} must look like 0:0.9") from None
    if not 0 <= a < b <= 1:
        raise ValueError(f"fraction {fraction!r} needs 0 <= start < end <= 1")
    text = Path(path).read_text(encoding="utf-8")
    return text[_line_start(text, a):_line_start(text, b)]


def _line_start(text: str, f: float) -> int:
    i = round(f * len(text))
    if i in (0, len(text)):
        return i
    j = text.find("\n", i - 1)
    return len(text) if j < 0 else j + 1


# ------------------------------------------------------------------------------ CLI


def load_lm(name_or_path: str):
    """A Pretrained whose model is a DecoderLM (clear error otherwise)."""
    from .pretrained import load_pretrained

    p = load_pretrained(name_or_path)
    if not isinstance(p.model, DecoderLM):
        raise ValueError(f"{name_or_path}: a {type(p.model).__name__}, not a language model "
                         "(DecoderLM)")
    return p


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype choices


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue (the user message with --chat)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, a .gguf file or a qkv checkpoint dir")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="weights and KV cache; bfloat16 halves the bytes read per token "
                             "and uses the CPU's bf16 matmul units (faster for batches; much "
                             "slower on CPUs without them, which get a warning)")


def run_generate(args: argparse.Namespace) -> int:
    _check_sampling(args.temperature, args.top_k, args.top_p)
    p = load_lm(args.model)
    if args.dtype == "bfloat16":
        warn_if_slow_bf16("qkv generate --dtype bfloat16")
    p.model.to(DTYPES[args.dtype])
    text = p.chat_prompt(args.prompt) if args.chat else args.prompt
    streamer = TextStream(p.tokenizer)

    def show(step: list[int | None]) -> None:
        if step[0] is not None:
            sys.stdout.write(streamer.push(step[0]))
            sys.stdout.flush()

    generate(p.model, [p.encode(text)], args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=p.eos_id, stream=show)
    sys.stdout.write(streamer.finish() + "\n")
    return 0


def add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=1024, help="tokens of context per window")
    parser.add_argument("--stride", type=int, default=512, help="tokens scored per window")
    parser.add_argument("--fraction", default="0:1",
                        help="part of the file, by characters (e.g. 0.9:1 = last 10%%)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="score only the first N tokens of that part")


def run_perplexity(args: argparse.Namespace) -> int:
    text = read_fraction(args.file, args.fraction)
    p = load_lm(args.model)
    ids = p.encode(text)[: args.max_tokens]

    def progress(i: int, n: int) -> None:
        print(f"\rwindow {i}/{n}", end="", file=sys.stderr, flush=True)

    ppl = perplexity(p.model, ids, window=args.window, stride=args.stride, progress=progress)
    print(file=sys.stderr)
    print(f"perplexity {ppl:.4f} over {len(ids) - 1} tokens "
          f"(window {args.window}, stride {args.stride})")
    return 0
