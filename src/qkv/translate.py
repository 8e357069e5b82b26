"""Translation as text: encode sources, batch them, decode, detokenise; `qkv translate`.

The searches themselves (greedy, beam) work on token tensors in qkv.search.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .data import BOM
from .models import EncoderDecoder
from .search import beam_search, greedy
from .tokenizer import EOS_ID, PAD_ID, decode, encode

_RUNS_OF_SPACES = re.compile(" {2,}")


def encode_source(tokenizer, text: str, max_seq_len: int, *, where: str = "source") -> list[int]:
    """Source ids as training sees them: subwords then eos, cut to max_seq_len.

    Runs of spaces (U+0020) become one, and spaces at either end go: each extra space
    would be a token of its own, which training text has on few lines (44 of Multi30k's
    29,000 German ones). Tabs and no-break spaces are kept, as training keeps them (French
    puts U+00A0 before ':'). `where` names the input (e.g. "stdin line 3") in the warning
    about a cut line.
    """
    ids = encode(tokenizer, _RUNS_OF_SPACES.sub(" ", text).strip(" "), eos=True)
    if len(ids) > max_seq_len:
        warnings.warn(f"{where}: source of {len(ids)} tokens cut to max_seq_len={max_seq_len}",
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
                    batch_size: int = 32, alpha: float = 0.6, max_extra: int = 50,
                    origin: str = "input", first_line: int = 1) -> list[str]:
    """Translate `lines`, in order; batches of similar length; empty lines give ''.

    origin and first_line name the lines in warnings: `lines[0]` is `origin line first_line`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    src = [encode_source(tokenizer, line, model.cfg.max_seq_len,
                         where=f"{origin} line {n}") if line.strip() else None
           for n, line in enumerate(lines, first_line)]
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


# Used when neither a flag nor the checkpoint's [decoding] section (metadata "decoding",
# written by qkv train) gives a value.
DECODING_DEFAULTS = {"beam": 4, "alpha": 0.6, "batch_size": 32, "max_extra": 50}
_LOWEST = {"beam": 1, "alpha": 0, "batch_size": 1, "max_extra": 0}


def add_decoding_arguments(parser, *, model_required: bool = True) -> None:
    """--model, --beam, --batch-size, --alpha, --max-extra (shared with `qkv evaluate`).

    The decoding flags default to None: `resolve_decoding_arguments` fills them in.
    """
    def saved(key: str) -> str:
        return f"default: the checkpoint's [decoding] {key}, else {DECODING_DEFAULTS[key]}"

    parser.add_argument("--model", required=model_required, help="checkpoint directory")
    parser.add_argument("--beam", type=int, help=f"beam size; 1 is greedy ({saved('beam')})")
    parser.add_argument("--batch-size", type=int,
                        help=f"sentences per batch ({saved('batch_size')})")
    parser.add_argument("--alpha", type=float, help=f"length penalty ({saved('alpha')})")
    parser.add_argument("--max-extra", type=int, help="output may be this many tokens longer "
                        "than the source (default 50)")


def resolve_decoding_arguments(args) -> None:
    """Check the decoding flags given, then fill in those left out (None): from the
    checkpoint's [decoding] section, as trained, else from DECODING_DEFAULTS."""
    given = {k: getattr(args, k) for k in DECODING_DEFAULTS if getattr(args, k) is not None}
    for key, value in given.items():
        _check_decoding_value(_flag(key), key, value)
    saved = _saved_decoding(args.model)
    for key, default in DECODING_DEFAULTS.items():
        if key in given:
            continue
        if key in saved:
            try:
                _check_decoding_value(f"decoding.{key}", key, saved[key])
            except ValueError as e:
                raise ValueError(f"{args.model}: {e} (saved with the checkpoint; give "
                                 f"{_flag(key)} to override it)") from None
        setattr(args, key, saved.get(key, default))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _saved_decoding(directory) -> dict:
    """The [decoding] section saved with a checkpoint, {} if it has none."""
    from .checkpoint import read_metadata

    saved = read_metadata(directory).get("decoding")
    return saved if isinstance(saved, dict) else {}


def _check_decoding_value(name: str, key: str, value) -> None:
    low = _LOWEST[key]
    if key == "alpha":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} must be a number >= {low}")
        if not math.isfinite(value):
            raise ValueError(f"{name}={value} must be a finite number >= {low}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


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
    """Lines of stdin, the first without a byte order mark."""
    for n, line in enumerate(_stdin_decoded(), 1):
        yield line.removeprefix(BOM) if n == 1 else line


def _stdin_decoded() -> Iterator[str]:
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
    resolve_decoding_arguments(args)
    model, tokenizer = load_translator(args.model)
    first_line = 1
    for lines in _batches(_stdin_lines(), args.batch_size):
        outputs = translate_lines(model, tokenizer, lines, beam=args.beam,
                                  batch_size=args.batch_size, alpha=args.alpha,
                                  max_extra=args.max_extra, origin="stdin",
                                  first_line=first_line)
        first_line += len(lines)
        sys.stdout.write("".join(line + "\n" for line in outputs))
        sys.stdout.flush()
    return 0
