"""sacreBLEU BLEU and chrF with their signatures, and the `qkv evaluate` command."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import read_lines  # also part of this module's API
from .translate import (
    add_decoding_arguments,
    load_translator,
    resolve_decoding_arguments,
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
    if not refs:
        raise ValueError("no sentences to score")
    bleu_metric, chrf_metric = BLEU(lowercase=lowercase), CHRF(lowercase=lowercase)
    b = bleu_metric.corpus_score(list(hyps), [list(refs)])
    c = chrf_metric.corpus_score(list(hyps), [list(refs)])
    b_sig, c_sig = str(bleu_metric.get_signature()), str(chrf_metric.get_signature())
    return {
        "bleu": b.score, "bleu_signature": b_sig, "bleu_line": b.format(signature=b_sig),
        "chrf": c.score, "chrf_signature": c_sig, "chrf_line": c.format(signature=c_sig),
        "sentences": len(hyps),
    }


def bleu_difference(hyps: Sequence[str], base: Sequence[str], refs: Sequence[str], *,
                    lowercase: bool = False, resamples: int = 2000, seed: int = 0) -> dict:
    """BLEU(hyps) - BLEU(base) on the same references, with a paired bootstrap interval.

    Koehn (2004): draw the test sentences with replacement `resamples` times and score both
    systems on each draw, so the spread is what another test set of this size might show.
    It says nothing about training noise (other seeds), which can be larger.
    Returns {"bleu", "baseline_bleu", "delta", "delta_95": (low, high), "resamples",
    "seed"}.
    """
    from sacrebleu.metrics import BLEU

    if not len(hyps) == len(base) == len(refs):
        raise ValueError(f"{len(hyps)} hypotheses, {len(base)} baseline lines and "
                         f"{len(refs)} references: they must be aligned")
    if not refs:
        raise ValueError("no sentences to compare")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    metric = BLEU(lowercase=lowercase)
    a, b = _sentence_stats(metric, hyps, refs), _sentence_stats(metric, base, refs)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(refs), (resamples, len(refs)), generator=gen)
    times = torch.zeros(resamples, len(refs), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(draws.shape, dtype=torch.float64))  # (R, N) picks per sentence
    deltas = torch.tensor([_score(metric, x) - _score(metric, y)
                           for x, y in zip(times @ a, times @ b, strict=True)],
                          dtype=torch.float64)
    full_a, full_b = _score(metric, a.sum(0)), _score(metric, b.sum(0))
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {"bleu": full_a, "baseline_bleu": full_b, "delta": full_a - full_b,
            "delta_95": (float(low), float(high)), "resamples": resamples, "seed": seed}


def _sentence_stats(metric, hyps: Sequence[str], refs: Sequence[str]) -> torch.Tensor:
    """(N, 10) float64: matches and totals of 1- to 4-grams, hypothesis and reference
    length of each sentence, as sacreBLEU counts them for the corpus score."""
    rows = []
    for h, r in zip(hyps, refs, strict=True):
        s = metric.corpus_score([h], [[r]])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return torch.tensor(rows, dtype=torch.float64)


def _score(metric, stats: torch.Tensor) -> float:
    """Corpus BLEU from summed sentence statistics (the metric's smoothing)."""
    v = [round(x) for x in stats.tolist()]
    return metric.compute_bleu(v[0:4], v[4:8], v[8], v[9], smooth_method=metric.smooth_method,
                               smooth_value=metric.smooth_value).score


# --------------------------------------------------------------------------- CLI


def add_evaluate_arguments(parser) -> None:
    add_decoding_arguments(parser, model_required=False)  # --hyp scores a file instead
    parser.add_argument("--src", help="source file (.gz allowed), translated with --model")
    parser.add_argument("--hyp", help="score this translation file instead of --model/--src")
    parser.add_argument("--ref", required=True, help="reference file, one line per source line")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU, chrF")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", help="also write the translations to this file")
    parser.add_argument("--baseline", help="another system's translations of the same "
                        "sources: report BLEU minus its BLEU with a 95%% paired bootstrap "
                        "interval over the sentences")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap draws for --baseline (default 2000)")


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
    resolve_decoding_arguments(args)
    src = read_lines(args.src)
    _same_count(args.src, len(src), args.ref, n_refs)
    model, tokenizer = load_translator(args.model)
    start = time.perf_counter()
    hyps = translate_lines(model, tokenizer, src, beam=args.beam, batch_size=args.batch_size,
                           alpha=args.alpha, max_extra=args.max_extra, origin=args.src)
    return hyps, time.perf_counter() - start


def _check_output(path: str) -> None:
    """Reject an --output that cannot be written, before any time is spent translating."""
    if Path(path).is_dir():
        raise ValueError(f"--output={path} is a folder; expected a file to write")
    if not Path(path).parent.is_dir():
        raise ValueError(f"--output={path}: folder {Path(path).parent} does not exist")


def _write_output(path: str, hyps: list[str]) -> None:
    try:
        Path(path).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--output={path}: cannot write ({e.strerror})") from None


def _same_count(a: str, n_a: int, b: str, n_b: int) -> None:
    if n_a != n_b:
        raise ValueError(f"{a} has {n_a} lines but {b} has {n_b}; they must be aligned")


def run_evaluate(args) -> int:
    """Print BLEU and chrF (with signatures) of --model on --src, or of --hyp, against --ref."""
    if args.output:
        _check_output(args.output)
    refs = read_lines(args.ref)
    if not refs:
        raise ValueError(f"{args.ref} is empty; expected one reference line per sentence")
    base = None
    if args.baseline is not None:  # checked before a model spends time translating
        if args.resamples < 1:
            raise ValueError(f"--resamples={args.resamples} must be >= 1")
        base = read_lines(args.baseline)
        _same_count(args.baseline, len(base), args.ref, len(refs))
    hyps, seconds = _hypotheses(args, len(refs))
    if args.output:
        _write_output(args.output, hyps)
    scores = bleu(hyps, refs, lowercase=args.lowercase)
    if base is not None:
        diff = bleu_difference(hyps, base, refs, lowercase=args.lowercase,
                               resamples=args.resamples)
        scores.update(baseline_bleu=diff["baseline_bleu"], bleu_delta=diff["delta"],
                      bleu_delta_95=diff["delta_95"], resamples=diff["resamples"])
    if seconds is not None:
        scores.update(beam=args.beam, alpha=args.alpha, decode_seconds=seconds,
                      sentences_per_second=len(hyps) / max(seconds, 1e-9))
    if args.json:
        print(json.dumps(scores))
        return 0
    print(scores["bleu_line"])
    print(scores["chrf_line"])
    if base is not None:
        low, high = scores["bleu_delta_95"]
        print(f"BLEU - baseline BLEU ({scores['baseline_bleu']:.2f}) = "
              f"{scores['bleu_delta']:+.2f}, 95% paired bootstrap interval [{low:+.2f}, "
              f"{high:+.2f}] over {scores['sentences']} sentences ({scores['resamples']} draws)")
    if seconds is not None:
        print(f"decoding: {len(hyps)} sentences in {seconds:.1f} s, "
              f"{scores['sentences_per_second']:.1f} sentences/s (beam {args.beam}, alpha "
              f"{args.alpha}, {torch.get_num_threads()} threads)")
    return 0
