"""`qkv classify --model DIR < sentences`: one `LABEL<TAB>PROBABILITY` line per input line."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from . import checkpoint
from .data import pad
from .models import EncoderClassifier
from .tokenizer import encode, load_tokenizer

TEXT_ENCODINGS = ("qkv", "hf")


def encode_text(tok, text: str, style: str) -> list[int]:
    """Token ids of a sentence: qkv BPE without specials, or a pretrained tokenizer's own
    template (e.g. BERT's [CLS] ... [SEP])."""
    if style == "qkv":
        return encode(tok, text)
    if style == "hf":
        return tok.encode(text).ids
    raise ValueError(f"text_encoding={style!r} is not one of {', '.join(TEXT_ENCODINGS)}")


@torch.no_grad()
def classify(model: EncoderClassifier, tok, lines: list[str], *, style: str = "qkv",
             batch_size: int = 64) -> list[tuple[int, float]]:
    """(label index, its probability) for each line; an empty line gives (-1, 0.0)."""
    out: list[tuple[int, float]] = [(-1, 0.0)] * len(lines)
    todo = [i for i, line in enumerate(lines) if line.strip()]
    limit = model.cfg.max_seq_len
    for s in range(0, len(todo), batch_size):
        idx = todo[s : s + batch_size]
        ids = [encode_text(tok, lines[i].strip(), style)[:limit] or [model.cfg.pad_id + 1]
               for i in idx]
        probs = model(pad(ids, model.cfg.pad_id)).float().softmax(-1)  # (B, n_classes)
        p, label = probs.max(-1)
        for i, lab, prob in zip(idx, label.tolist(), p.tolist(), strict=True):
            out[i] = (lab, prob)
    return out


def load_classifier(directory) -> tuple[EncoderClassifier, object, dict]:
    model = checkpoint.load(directory)
    if not isinstance(model, EncoderClassifier):
        raise ValueError(f"--model {directory}: holds a {type(model).__name__}, "
                         f"not an EncoderClassifier")
    return model, load_tokenizer(directory), checkpoint.read_metadata(directory)


def _lines(stream) -> Iterable[list[str]]:
    chunk = []
    for line in stream:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == 256:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def add_classify_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder of a classifier")
    parser.add_argument("--batch-size", type=int, default=64)


def run_classify(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    model, tok, meta = load_classifier(args.model)
    names = meta.get("labels") or []
    style = meta.get("text_encoding", "qkv")
    for chunk in _lines(sys.stdin):
        for label, prob in classify(model, tok, chunk, style=style, batch_size=args.batch_size):
            name = "" if label < 0 else (names[label] if label < len(names) else str(label))
            print(f"{name}\t{prob:.4f}" if name else "")
        sys.stdout.flush()
    return 0
