"""Translation as text: encode sources, batch them, decode, detokenise; `qkv translate`.

The searches themselves (greedy, beam) work on token tensors in qkv.search.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .models import EncoderDecoder
from .search import beam_search, greedy
from .tokenizer import EOS_ID, PAD_ID, decode, encode


def encode_source(tokenizer, text: str, max_seq_len: int) -> list[int]:
    """Source ids as training sees them: subwords then eos, cut to max_seq_len."""
    ids = encode(tokenizer, text, eos=True)
    if len(ids) > max_seq_len:
        warnings.warn(f"source of {len(ids)} tokens cut to max_seq_len={max_seq_len}",
                      stacklevel=2)
        ids = ids[: max_seq_len - 1] + [EOS_ID]
    return ids


def pad_batch(seqs: Sequence[list[int]], pad_id: int = PAD_ID) -> Tensor:
    """Right-pad lists of ids to a (B, S) tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def translate_lines(model: EncoderDecoder, tokenizer, lines: Sequence[str], *, beam: int = 4,
                    batch_size: int = 32, alpha: float = 0.6, max_extra: int = 50) -> list[str]:
    """Translate `lines`, in order; batches of similar length; empty lines give ''."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    src = [encode_source(tokenizer, line, model.cfg.max_seq_len) if line.strip() else None
           for line in lines]
    todo = sorted((i for i, s in enumerate(src) if s is not None), key=lambda i: len(src[i]))
    out = [""] * len(lines)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = pad_batch([src[i] for i in chunk], model.cfg.pad_id)
        if beam == 1:
            hyps = greedy(model, batch, max_extra=max_extra)
        else:
            hyps = beam_search(model, batch, beam=beam, alpha=alpha, max_extra=max_extra)
        for i, tokens in zip(chunk, hyps, strict=True):
            out[i] = " ".join(decode(tokenizer, tokens).split())  # one line, plain spaces
    return out


def load_translator(directory) -> tuple[EncoderDecoder, object]:
    """The EncoderDecoder and tokenizer saved in a checkpoint directory."""
    from .checkpoint import load
    from .tokenizer import load_tokenizer

    model = load(directory)
    if not isinstance(model, EncoderDecoder):
        raise ValueError(f"{directory} holds a {type(model).__name__}; translation needs an "
                         f"EncoderDecoder")
    return model, load_tokenizer(directory)


# --------------------------------------------------------------------------- CLI


def add_decoding_arguments(parser, *, model_required: bool = True) -> None:
    """--model, --beam, --batch-size, --alpha, --max-extra (shared with `qkv evaluate`)."""
    parser.add_argument("--model", required=model_required, help="checkpoint directory")
    parser.add_argument("--beam", type=int, default=4, help="beam size; 1 is greedy (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--alpha", type=float, default=0.6, help="length penalty (default 0.6)")
    parser.add_argument("--max-extra", type=int, default=50,
                        help="output may be this many tokens longer than the source")


def check_decoding_arguments(args) -> None:
    for name in ("beam", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.alpha < 0 or args.max_extra < 0:
        raise ValueError(f"--alpha={args.alpha} and --max-extra={args.max_extra} must be >= 0")


def add_translate_arguments(parser) -> None:
    add_decoding_arguments(parser)


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stdin_lines() -> Iterator[str]:
    """Lines of stdin, decoded one by one so that a bad byte is reported with its line."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (tests)
        yield from sys.stdin
        return
    for n, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"stdin line {n} is not valid UTF-8") from None


def run_translate(args) -> int:
    """stdin -> stdout, one line in, one line out, each batch written as soon as it is done."""
    check_decoding_arguments(args)
    model, tokenizer = load_translator(args.model)
    for lines in _batches(_stdin_lines(), args.batch_size):
        outputs = translate_lines(model, tokenizer, lines, beam=args.beam,
                                  batch_size=args.batch_size, alpha=args.alpha,
                                  max_extra=args.max_extra)
        sys.stdout.write("".join(line + "\n" for line in outputs))
        sys.stdout.flush()
    return 0
