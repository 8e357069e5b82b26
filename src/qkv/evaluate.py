"""sacreBLEU BLEU and chrF with their signatures, and the `qkv evaluate` command."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import read_lines  # noqa: F401  (also part of this module's API)
from .translate import (
    add_decoding_arguments,
    check_decoding_arguments,
    load_translator,
    translate_lines,
)


def bleu(hyps: Sequence[str], refs: Sequence[str], *, lowercase: bool = False) -> dict:
    """Corpus BLEU and chrF of detokenised `hyps` against one reference each (sacreBLEU).

    Returns {"bleu", "chrf": scores 0-100, "bleu_signature", "chrf_signature",
    "bleu_line", "chrf_line": sacreBLEU's summaries with signature, "sentences"}.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu_metric, chrf_metric = BLEU(lowercase=lowercase), CHRF(lowercase=lowercase)
    b = bleu_metric.corpus_score(list(hyps), [list(refs)])
    c = chrf_metric.corpus_score(list(hyps), [list(refs)])
    b_sig, c_sig = str(bleu_metric.get_signature()), str(chrf_metric.get_signature())
    return {
        "bleu": b.score, "bleu_signature": b_sig, "bleu_line": b.format(signature=b_sig),
        "chrf": c.score, "chrf_signature": c_sig, "chrf_line": c.format(signature=c_sig),
        "sentences": len(hyps),
    }


# --------------------------------------------------------------------------- CLI


def add_evaluate_arguments(parser) -> None:
    add_decoding_arguments(parser, model_required=False)  # --hyp scores a file instead
    parser.add_argument("--src", help="source file (.gz allowed), translated with --model")
    parser.add_argument("--hyp", help="score this translation file instead of --model/--src")
    parser.add_argument("--ref", required=True, help="reference file, one line per source line")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU, chrF")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", help="also write the translations to this file")


def _hypotheses(args, n_refs: int) -> tuple[list[str], float | None]:
    """The hypotheses, and the seconds spent translating them (None for --hyp)."""
    if (args.hyp is None) == (args.model is None):
        raise ValueError("give either --model DIR with --src FILE, or --hyp FILE")
    if args.hyp is not None:
        hyps = read_lines(args.hyp)
        _same_count(args.hyp, len(hyps), args.ref, n_refs)
        return hyps, None
    if args.src is None:
        raise ValueError("--model needs --src FILE (the sources to translate)")
    check_decoding_arguments(args)
    src = read_lines(args.src)
    _same_count(args.src, len(src), args.ref, n_refs)
    model, tokenizer = load_translator(args.model)
    start = time.perf_counter()
    hyps = translate_lines(model, tokenizer, src, beam=args.beam, batch_size=args.batch_size,
                           alpha=args.alpha, max_extra=args.max_extra)
    return hyps, time.perf_counter() - start


def _same_count(a: str, n_a: int, b: str, n_b: int) -> None:
    if n_a != n_b:
        raise ValueError(f"{a} has {n_a} lines but {b} has {n_b}; they must be aligned")


def run_evaluate(args) -> int:
    """Print BLEU and chrF (with signatures) of --model on --src, or of --hyp, against --ref."""
    refs = read_lines(args.ref)
    hyps, seconds = _hypotheses(args, len(refs))
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    scores = bleu(hyps, refs, lowercase=args.lowercase)
    if seconds is not None:
        scores.update(beam=args.beam, decode_seconds=seconds,
                      sentences_per_second=len(hyps) / max(seconds, 1e-9))
    if args.json:
        print(json.dumps(scores))
        return 0
    print(scores["bleu_line"])
    print(scores["chrf_line"])
    if seconds is not None:
        print(f"decoding: {len(hyps)} sentences in {seconds:.1f} s, "
              f"{scores['sentences_per_second']:.1f} sentences/s (beam {args.beam}, "
              f"{torch.get_num_threads()} threads)")
    return 0
