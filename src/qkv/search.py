"""Greedy and beam search over batches of sentences with the KV cache.

Both searches encode each batch once, keep the decoder's self-attention K/V in a
`KVCache` (reordered with the beams) and compute the cross-attention K/V once per
source: the K beams of a sentence are K consecutive rows of the target batch, B*K rows
in all, attending to one memory row (`MultiHeadAttention` handles R = K queries per
key row). Finished sentences are dropped from the batch at once.

Outputs are at most `src_len + max_extra` tokens long (src_len counts the source's real
tokens, its eos included); a hypothesis reaching that length is ended with eos.
Text in and out, and the `qkv translate` command, are in qkv.translate.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernel
from .attention import KVCache
from .models import EncoderDecoder
from .tokenizer import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


class Hypothesis(NamedTuple):
    """One output sentence: tokens (no bos/eos), log-probs of each token then of eos, score.

    score is sum(logprobs) for greedy and sum(logprobs) / length_penalty(len + 1) for beam.
    """

    tokens: list[int]
    logprobs: Tensor
    score: float


def length_penalty(length: Tensor | int, alpha: float) -> Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14); |Y| counts eos."""
    return ((5.0 + torch.as_tensor(length, dtype=torch.float32)) / 6.0) ** alpha


def _lp(length: int, alpha: float) -> float:
    """length_penalty for one length, as a float (no tensor in the hot loop)."""
    return ((5.0 + length) / 6.0) ** alpha


# ------------------------------------------------------------------ shared helpers


def _check_args(src: Tensor, model, **ints: int) -> None:
    if not isinstance(model, EncoderDecoder):
        raise ValueError(f"decoding needs an EncoderDecoder, got {type(model).__name__}")
    if src.dim() != 2 or src.dtype != torch.long or src.shape[1] == 0:
        raise ValueError(f"src must be (B, S) token ids with S >= 1, got {src.dtype} "
                         f"{tuple(src.shape)}")
    for name, (value, low) in ints.items():
        if value < low:
            raise ValueError(f"{name}={value} must be >= {low}")


def _limits(model: EncoderDecoder, src: Tensor, max_len: int | None, max_extra: int) -> Tensor:
    """(B,) most output tokens (eos excluded) per sentence: src_len + max_extra, capped."""
    limit = (src != model.cfg.pad_id).sum(1) + max_extra
    if max_len is not None:
        limit = limit.clamp(max=max_len)
    return limit.clamp(max=model.cfg.max_seq_len - 1)  # bos + limit tokens fit the decoder


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Dropout off while decoding (training calls us for validation BLEU), mode restored."""
    was_training = model.training
    if was_training:  # each switch walks every module: skip it when already in eval mode
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _next_logits(model: EncoderDecoder, seqs: Tensor, step: int, memory: Tensor,
                 src_mask: Tensor, cache: KVCache | None, min_len: int,
                 row_limit: Tensor) -> tuple[Tensor, Tensor]:
    """Constrained logits (N, V) of the token after seqs[:, :step + 1] (bos at column 0)
    and their log-normaliser (N,): log-prob = logit - lse, the model's own distribution.

    Skipping log_softmax saves a pass over (N, V): only chosen tokens need log-probs.
    """
    tgt = seqs[:, step : step + 1] if cache is not None else seqs[:, : step + 1]
    h = model.decoder(tgt, memory, src_mask, cache=cache)  # (N, T, C)
    logits = model.logits(h[:, -1]).float()  # (N, V)
    lse = kernel.logsumexp_rows(logits)
    return _constrain(logits, step, min_len, row_limit), lse


def _constrain(logits: Tensor, step: int, min_len: int, row_limit: Tensor) -> Tensor:
    """Never pad or bos; no eos before min_len tokens; only eos once a row has `row_limit`
    tokens. In place."""
    logits[:, PAD_ID] = NEG_INF
    logits[:, BOS_ID] = NEG_INF
    at_limit = row_limit <= step  # (N,)
    forced = bool(at_limit.any())
    eos = logits[at_limit, EOS_ID] if forced else None
    if step < min_len:
        logits[:, EOS_ID] = NEG_INF
    if forced:
        logits[at_limit] = NEG_INF
        logits[at_limit, EOS_ID] = eos
    return logits


def _select(cache: KVCache | None, rows: Tensor, sources: Tensor | None = None) -> None:
    """Keep cache rows `rows` in this order; `sources`: the sentences left, if fewer."""
    if cache is not None:
        cache.reorder(rows, sources)


# -------------------------------------------------------------------------- greedy


def decode_greedy(
    model: EncoderDecoder, src: Tensor, *, max_len: int | None = None, max_extra: int = 50,
    min_len: int = 0, use_cache: bool = True,
) -> list[Hypothesis]:
    """Greedy decoding of src (B, S) (pad-padded): one Hypothesis per sentence.

    max_len caps the output length below src_len + max_extra; min_len suppresses eos
    until that many tokens are out (benchmarks use min_len == max_len for fixed lengths).
    """
    _check_args(src, model, max_extra=(max_extra, 0), min_len=(min_len, 0),
                max_len=(1 if max_len is None else max_len, 1))
    with _eval_mode(model):
        limit = _limits(model, src, max_len, max_extra)  # (B,)
        steps = int(limit.max()) + 1
        memory, src_mask = model.encode(src)
        seqs = src.new_full((src.shape[0], steps + 1), PAD_ID)  # bos, tokens, eos
        seqs[:, 0] = BOS_ID
        lps = torch.zeros(src.shape[0], steps)
        ids = torch.arange(src.shape[0])  # original sentence of each row
        cache = model.make_cache(src.shape[0], steps) if use_cache else None
        out: list[Hypothesis | None] = [None] * src.shape[0]
        for step in range(steps):
            logits, lse = _next_logits(model, seqs, step, memory, src_mask, cache, min_len,
                                       limit)
            best, seqs[:, step + 1] = logits.max(-1)
            lps[:, step] = best - lse
            done = seqs[:, step + 1] == EOS_ID
            if bool(done.any()):
                for row in done.nonzero()[:, 0].tolist():
                    out[int(ids[row])] = _greedy_hypothesis(seqs[row], lps[row], step)
                keep = (~done).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                ids, limit, memory, src_mask = ids[keep], limit[keep], memory[keep], src_mask[keep]
                seqs, lps = seqs[keep], lps[keep]
                _select(cache, keep, keep)
        return out


def _greedy_hypothesis(seq: Tensor, lps: Tensor, step: int) -> Hypothesis:
    """The row that emitted eos at `step`: tokens seq[1 : step + 1]."""
    logprobs = lps[: step + 1].clone()
    return Hypothesis(seq[1 : step + 1].tolist(), logprobs, float(logprobs.sum()))


def greedy(model: EncoderDecoder, src: Tensor, *, max_len: int | None = None,
           max_extra: int = 50, min_len: int = 0) -> list[list[int]]:
    """Greedy decoding of src (B, S): the output tokens of each sentence, no bos/eos."""
    hyps = decode_greedy(model, src, max_len=max_len, max_extra=max_extra, min_len=min_len)
    return [h.tokens for h in hyps]


# --------------------------------------------------------------------- beam search


class _Finished:
    """The best finished hypothesis of each sentence and how many have finished.

    A hypothesis finishes when its eos is among the K best candidates of its sentence
    (as fairseq), so beam 1 finishes exactly where greedy does.
    """

    def __init__(self, B: int, steps: int, alpha: float):
        self.score = torch.full((B,), NEG_INF)
        self.count = torch.zeros(B, dtype=torch.long)
        self.seqs = torch.full((B, steps + 1), PAD_ID, dtype=torch.long)
        self.lps = torch.zeros(B, steps)
        self.length = torch.zeros(B, dtype=torch.long)
        self.alpha = alpha

    def add(self, ids: Tensor, step: int, top: Tensor, rows: Tensor, is_eos: Tensor,
            seqs: Tensor, lps: Tensor, eos_lp: Tensor) -> None:
        """Candidates top (b, K) ending in eos (is_eos) from beam rows `rows` (b, K)."""
        fin = is_eos & top.isfinite()  # (b, K)
        if not bool(fin.any()):
            return
        self.count[ids] += fin.sum(1)
        score = torch.where(fin, top, NEG_INF) / _lp(step + 1, self.alpha)
        best, j = score.max(1)  # (b,): same length, so the best raw score is the best
        better = best > self.score[ids]
        if not bool(better.any()):
            return
        row = rows.gather(1, j[:, None])[:, 0][better]  # beam rows that produced them
        target = ids[better]
        self.score[target] = best[better]
        self.length[target] = step
        self.seqs[target] = seqs[row]
        self.lps[target] = lps[row]
        self.lps[target, step] = eos_lp[row]

    def hypothesis(self, i: int) -> Hypothesis:
        n = int(self.length[i])
        return Hypothesis(self.seqs[i, 1 : n + 1].tolist(), self.lps[i, : n + 1].clone(),
                          float(self.score[i]))


def _row_topk(x: Tensor, k: int, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=1) for wide rows, about twice as fast on CPU for small k.

    The k best of a row lie in at most k chunks, which are among the k chunks with the
    largest maxima: one cheap max pass, then top-k over k * chunk values.
    """
    N, V = x.shape
    if V <= 4 * k * chunk:
        return x.topk(k, dim=1)
    if V % chunk:
        x = F.pad(x, (0, chunk - V % chunk), value=NEG_INF)
    chunks = x.view(N, -1, chunk)  # (N, V/chunk, chunk)
    best = chunks.amax(-1).topk(k, dim=1).indices  # (N, k)
    cand = chunks.gather(1, best[:, :, None].expand(N, k, chunk)).view(N, k * chunk)
    top, i = cand.topk(k, dim=1)
    return top, best.gather(1, i // chunk) * chunk + i % chunk


def _beam_candidates(logits: Tensor, lse: Tensor, scores: Tensor,
                     K: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 2K best (beam, token) continuations of each sentence, best first.

    logits (b*W, V), lse (b*W,), scores (b, W) for W current beams (1 at the first step)
    -> scores (b, 2K), beam index (b, 2K), token (b, 2K). 2K guarantees K of them do not
    end in eos (one eos per beam). The sentence's best 2K are among each beam's best 2K,
    so take those first: a top-k over rows of V, then over b rows of W*2K, instead of
    one over b rows of W*V plus an add.
    """
    b, W = scores.shape
    n = min(2 * K, logits.shape[1])
    row_top, row_tok = _row_topk(logits, n)  # (b*W, n)
    total = (row_top + (scores.reshape(-1) - lse)[:, None]).view(b, W * n)  # (b, W*n)
    top, idx = total.topk(min(2 * K, W * n), dim=1)  # (b, 2K)
    return top, idx // n, row_tok.view(b, W * n).gather(1, idx)


def _live(top: Tensor, beam: Tensor, tok: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K best candidates that do not end in eos: scores (b, K), beam, token."""
    is_eos = tok == EOS_ID
    order = torch.arange(top.shape[1]) + is_eos * top.shape[1]  # eos ones last
    pick = order.topk(K, dim=1, largest=False).indices  # (b, K), best first
    return top.gather(1, pick), beam.gather(1, pick), tok.gather(1, pick)


def _done(finished: _Finished, ids: Tensor, best_live: Tensor, step: int, limit: Tensor,
          max_lp: Tensor, K: int) -> Tensor:
    """(b,) sentences whose best finished hypothesis no live beam is expected to beat.

    Certain when it beats the best live score divided by the largest length penalty
    max_lp = lp(limit + 1) (scores only fall, the penalty only grows up to the limit).
    Once K hypotheses have finished, also when it beats the best live beam ended at the
    next step, as HF's default (so beam 1 stops where greedy does).
    """
    best = finished.score[ids]
    certain = best >= best_live / max_lp
    likely = (finished.count[ids] >= K) & (best >= best_live / _lp(step + 2, finished.alpha))
    return certain | likely | (limit <= step)


def decode_beam(
    model: EncoderDecoder, src: Tensor, *, beam: int = 4, alpha: float = 0.6,
    max_len: int | None = None, max_extra: int = 50, min_len: int = 0, use_cache: bool = True,
) -> list[Hypothesis]:
    """Beam search over src (B, S): the best hypothesis of each sentence by GNMT score.

    score = sum of log-probs / ((5 + len) / 6) ** alpha, len counting eos. A hypothesis
    finishes when its eos is among the `beam` best candidates (as fairseq); a sentence
    stops when no live beam can beat its best finished hypothesis even at the maximum
    length, or, once `beam` hypotheses have finished, even if it ended at the next step
    (HF's default `early_stopping=False` test). See docs/decoding.md.
    """
    _check_args(src, model, beam=(beam, 1), max_extra=(max_extra, 0), min_len=(min_len, 0),
                max_len=(1 if max_len is None else max_len, 1))
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be a finite number >= 0")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0 (the stopping bound assumes it)")
    if beam >= model.cfg.vocab_size:
        raise ValueError(f"beam={beam} must be below vocab_size={model.cfg.vocab_size}")
    with _eval_mode(model):
        return _beam(model, src, beam, alpha, _limits(model, src, max_len, max_extra),
                     min_len, use_cache)


class _Beams:
    """The live beams of the sentences still running, rows [sentence 0 beams, ...].

    Each sentence starts with one beam (bos) and fans out to K at the first step, so
    that step runs B rows, not B*K identical ones.
    """

    def __init__(self, src: Tensor, limit: Tensor, steps: int, alpha: float):
        B = src.shape[0]
        self.ids = torch.arange(B)  # original sentence of each sentence still running
        self.limit, self.row_limit = limit, limit
        self.max_lp = length_penalty(limit + 1, alpha)  # the largest penalty a beam can get
        self.seqs = src.new_full((B, steps + 1), PAD_ID)  # (rows, 1 + steps)
        self.seqs[:, 0] = BOS_ID
        self.lps = torch.zeros(B, steps)  # (rows, steps) log-prob of each token
        self.scores = torch.zeros(B, 1)  # (b, beams per sentence) sums of log-probs

    @property
    def base(self) -> Tensor:
        """(b, 1) first row of each sentence."""
        b, width = self.scores.shape
        return torch.arange(b)[:, None] * width

    def advance(self, step: int, scores: Tensor, rows: Tensor, tok: Tensor) -> None:
        """New beams: scores (b, K), old rows (b*K,), tokens (b*K,)."""
        K = scores.shape[1]
        if self.scores.shape[1] != K:
            self.row_limit = self.limit.repeat_interleave(K)
        old = self.scores.view(-1)[rows].view_as(scores)
        self.seqs, self.lps = self.seqs[rows], self.lps[rows]
        self.seqs[:, step + 1] = tok
        self.lps[:, step] = (scores - old).view(-1)  # the new token's log-prob
        self.scores = scores

    def keep(self, keep: Tensor) -> Tensor:
        """Keep sentences `keep` (b',) only; returns their rows (b'*K,)."""
        K = self.scores.shape[1]
        rows = (keep[:, None] * K + torch.arange(K)).view(-1)  # (b'*K,)
        self.ids, self.limit, self.max_lp = self.ids[keep], self.limit[keep], self.max_lp[keep]
        self.scores, self.row_limit = self.scores[keep], self.row_limit[rows]
        self.seqs, self.lps = self.seqs[rows], self.lps[rows]
        return rows


def _beam(model, src: Tensor, K: int, alpha: float, limit: Tensor, min_len: int,
          use_cache: bool) -> list[Hypothesis]:
    steps = int(limit.max()) + 1
    memory, src_mask = model.encode(src)  # memory (B, S, C), one row per sentence
    beams, finished = _Beams(src, limit, steps, alpha), _Finished(src.shape[0], steps, alpha)
    cache = model.make_cache(src.shape[0], steps) if use_cache else None  # grows to B*K
    for step in range(steps):
        logits, lse = _next_logits(model, beams.seqs, step, memory, src_mask, cache, min_len,
                                   beams.row_limit)
        top, beam, tok = _beam_candidates(logits, lse, beams.scores, K)
        base = beams.base
        finished.add(beams.ids, step, top[:, :K], beam[:, :K] + base, tok[:, :K] == EOS_ID,
                     beams.seqs, beams.lps, logits[:, EOS_ID] - lse)
        scores, beam, tok = _live(top, beam, tok, K)
        rows = (beam + base).view(-1)  # (b*K,) old row of each new beam
        beams.advance(step, scores, rows, tok.view(-1))
        done = _done(finished, beams.ids, scores[:, 0], step, beams.limit, beams.max_lp, K)
        n_done = int(done.sum())
        if n_done == len(done):
            break
        keep = (~done).nonzero()[:, 0] if n_done else None
        if keep is not None:
            memory, src_mask = memory[keep], src_mask[keep]
            rows = rows[beams.keep(keep)]
        _select(cache, rows, keep)
    return [finished.hypothesis(i) for i in range(src.shape[0])]


def beam_search(model: EncoderDecoder, src: Tensor, *, beam: int = 4, alpha: float = 0.6,
                max_len: int | None = None, max_extra: int = 50,
                min_len: int = 0) -> list[list[int]]:
    """Beam search over src (B, S): the output tokens of each sentence, no bos/eos."""
    hyps = decode_beam(model, src, beam=beam, alpha=alpha, max_len=max_len,
                       max_extra=max_extra, min_len=min_len)
    return [h.tokens for h in hyps]
