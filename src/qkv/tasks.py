"""What `qkv train` learns: translation, classification or language modelling.

A task holds its encoded examples and knows how to batch them, compute a summed loss over
a batch (with the number of units it summed over: target tokens or sentences) and
evaluate a model on the validation set.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as qdata
from .models import DecoderLM, EncoderClassifier, EncoderDecoder
from .tokenizer import BOS_ID, PAD_ID, encode
from .trainconfig import TrainConfig


def _smoothed_sum(logits: Tensor, target: Tensor, smoothing: float, ignore: int | None):
    """Summed cross-entropy with label smoothing (section 5.4) over non-ignored targets."""
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="sum",
                           label_smoothing=smoothing,
                           ignore_index=-100 if ignore is None else ignore)


class Task:
    model_class: type[nn.Module]
    lengths: list[int]

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, model, batch, smoothing: float) -> tuple[Tensor, int]:
        raise NotImplementedError

    def units(self, batch) -> int:
        """What the loss is summed over: target tokens (or sentences), known before forward."""
        key = "labels" if "labels" in batch else ("tgt" if "tgt" in batch else "tokens")
        if key == "labels":
            return len(batch["labels"])
        return int((batch[key][:, 1:] != PAD_ID).sum())

    @torch.no_grad()
    def evaluate(self, model, cfg: TrainConfig) -> dict:
        raise NotImplementedError

    def _valid_batches(self, max_tokens: int, lengths: list[int]) -> list[list[int]]:
        """Validation batches in a fixed order (no shuffling)."""
        batcher = qdata.TokenBatcher(lengths, max(max_tokens, max(lengths)), shuffle=False)
        return batcher.batches(0)


def _note(message: str) -> None:
    """A line on stderr, from process 0 only under torchrun (every process reads the data)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"qkv: {message}", file=sys.stderr)


def _check_lengths(lengths, limit: int, what: str, skip: bool, where) -> list[int]:
    """Indices of examples within `limit` tokens; an error counting the others unless skip,
    or if none is left. where(i) is example i's `file:line`."""
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    dropped = len(lengths) - len(keep)
    if not dropped:
        return keep
    first = where(next(i for i, n in enumerate(lengths) if n > limit))
    too_long = f"longer than max_seq_len={limit} tokens, first at {first}"
    if not skip:
        raise qdata.DataError(f"{what}: {dropped} example(s) {too_long} "
                              "(set data.skip_long to drop)")
    if not keep:
        raise qdata.DataError(f"{what}: all {dropped} example(s) are {too_long}")
    _note(f"{what}: dropped {dropped} example(s) {too_long}")
    return keep


def require_examples(n: int, what: str, files, unit: str = "sentence pairs") -> None:
    """An empty set fails when it is read, not at the first batch or evaluation."""
    if not n:
        raise qdata.DataError(f"{what}: no {unit} in {' / '.join(map(str, files))}")


def _skipped_note(corpus: qdata.ParallelCorpus, max_chars: int) -> str:
    """What read_parallel skipped: '1 empty pair(s) (first at a.en:4) and ...'; '' if none."""
    n, first = corpus.skipped, corpus.first_skipped
    reasons = {"empty": "empty pair(s)", "too_long": f"pair(s) longer than max_chars={max_chars}"}
    return " and ".join(f"{n[k]} {reasons[k]} (first at {first[k]})" for k in reasons if n[k])


def _read_pairs(files, what: str, **options) -> qdata.ParallelCorpus:
    """read_parallel, saying on stderr how many pairs it skipped, and failing if none is left."""
    corpus = qdata.read_parallel(*files, **options)
    note = _skipped_note(corpus, options.get("max_chars", 0))
    if note:
        _note(f"{what}: skipped {note}")
    require_examples(len(corpus), what, files)
    return corpus


class TranslationTask(Task):
    """Source + eos -> bos + target + eos, shared joint BPE vocabulary."""

    model_class = EncoderDecoder

    def __init__(self, cfg: TrainConfig, tok, max_seq_len: int):
        d = cfg.data
        self.tok = tok
        self.train = _read_pairs(d.train, "data.train", skip_empty=d.skip_empty,
                                 max_chars=d.max_chars, skip_long=d.skip_long)
        self.valid = _read_pairs(d.valid, "data.valid", skip_empty=True) if d.valid else None
        self.src, self.tgt = self._encode(self.train, max_seq_len, d.skip_long, "data.train")
        self.lengths = [max(len(s), len(t)) for s, t in zip(self.src, self.tgt, strict=True)]
        if self.valid is not None:
            self.vsrc, self.vtgt = self._encode(self.valid, max_seq_len, True, "data.valid")

    def _encode(self, corpus, limit, skip, what):
        src = [encode(self.tok, s, eos=True) for s in corpus.src]
        tgt = [encode(self.tok, t, bos=True, eos=True) for t in corpus.tgt]
        lengths = [max(len(s), len(t) - 1) for s, t in zip(src, tgt, strict=True)]
        keep = _check_lengths(lengths, limit, what, skip,
                              lambda i: corpus.where(i, 0 if len(src[i]) > limit else 1))
        return [src[i] for i in keep], [tgt[i] for i in keep]

    def collate(self, indices, src=None, tgt=None):
        src, tgt = src or self.src, tgt or self.tgt
        return {"src": qdata.pad([src[i] for i in indices]),
                "tgt": qdata.pad([tgt[i] for i in indices])}

    def loss(self, model, batch, smoothing):
        tgt = batch["tgt"]
        logits = model(batch["src"], tgt[:, :-1])  # (B, T-1, V)
        target = tgt[:, 1:]
        return _smoothed_sum(logits, target, smoothing, PAD_ID), int((target != PAD_ID).sum())

    @torch.no_grad()
    def evaluate(self, model, cfg):
        if self.valid is None:
            return {}
        total, n = 0.0, 0
        lengths = [max(len(s), len(t)) for s, t in zip(self.vsrc, self.vtgt, strict=True)]
        for idx in self._valid_batches(cfg.training.batch_tokens, lengths):
            loss, units = self.loss(model, self.collate(idx, self.vsrc, self.vtgt), 0.0)
            total, n = total + float(loss), n + units
        out = {"valid_loss": total / n, "valid_ppl": math.exp(min(total / n, 50))}
        k = cfg.training.eval_bleu_sentences
        if k:
            out.update(_greedy_bleu(model, self.tok, self.valid.src[:k], self.valid.tgt[:k], cfg))
        return out


def _greedy_bleu(model, tok, src, refs, cfg) -> dict:
    """Greedy BLEU via qkv.translate / qkv.evaluate, imported late (they may be absent)."""
    try:
        from .evaluate import bleu
        from .translate import translate_lines
    except ImportError as e:
        return {"valid_bleu_error": f"BLEU unavailable: {e}"}
    hyps = translate_lines(model, tok, src, beam=1, batch_size=cfg.decoding.batch_size)
    return {"valid_bleu_greedy": bleu(hyps, refs)["bleu"]}


class ClassificationTask(Task):
    """Sentence -> label (SST-2 format, `LABEL sentence`), mean or first-token pooling."""

    model_class = EncoderClassifier

    def __init__(self, cfg: TrainConfig, tok, max_seq_len: int, text_encoding: str):
        from .classify import encode_text

        self.tok, self.text_encoding = tok, text_encoding
        path = cfg.data.train[0]
        labels, texts = qdata.read_sst2(path)
        require_examples(len(texts), "data.train", [path], "labelled sentences")
        self.ids = [encode_text(tok, t, text_encoding) for t in texts]
        keep = _check_lengths([len(x) for x in self.ids], max_seq_len, "data.train",
                              cfg.data.skip_long, lambda i: f"{path}:{i + 1}")
        self.ids, self.labels = [self.ids[i] for i in keep], [labels[i] for i in keep]
        self.lengths = [len(x) for x in self.ids]
        self.vids = self.vlabels = None
        if cfg.data.valid:
            vlabels, vtexts = qdata.read_sst2(cfg.data.valid[0])
            require_examples(len(vtexts), "data.valid", cfg.data.valid, "labelled sentences")
            vids = [encode_text(tok, t, text_encoding)[:max_seq_len] for t in vtexts]
            self.vids, self.vlabels = vids, vlabels

    pad_id = PAD_ID  # the trainer sets the model's

    def collate(self, indices, ids=None, labels=None):
        ids, labels = ids or self.ids, labels or self.labels
        return {"tokens": qdata.pad([ids[i] for i in indices], self.pad_id),
                "labels": torch.tensor([labels[i] for i in indices])}

    def loss(self, model, batch, smoothing):
        logits = model(batch["tokens"])  # (B, n_classes)
        return _smoothed_sum(logits, batch["labels"], smoothing, None), len(batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, cfg):
        if self.vids is None:
            return {}
        total, correct = 0.0, 0
        lengths = [len(x) for x in self.vids]
        for idx in self._valid_batches(cfg.training.batch_tokens, lengths):
            batch = self.collate(idx, self.vids, self.vlabels)
            logits = model(batch["tokens"])
            total += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        n = len(self.vids)
        return {"valid_loss": total / n, "valid_accuracy": correct / n}


class LMTask(Task):
    """Next-token prediction over a text file cut into max_seq_len blocks."""

    model_class = DecoderLM

    def __init__(self, cfg: TrainConfig, tok, max_seq_len: int):
        self.tok = tok
        self.blocks = self._blocks(cfg.data.train[0], max_seq_len, "data.train")
        self.lengths = [len(b) for b in self.blocks]
        self.vblocks = (self._blocks(cfg.data.valid[0], max_seq_len, "data.valid")
                        if cfg.data.valid else None)

    def _blocks(self, path, T, what):
        ids = [BOS_ID]
        for line in qdata.read_lines(path):
            ids += encode(self.tok, line, eos=True)
        require_examples(len(ids) - 1, what, [path], "text")
        return [ids[i : i + T + 1] for i in range(0, max(1, len(ids) - 1), T)]

    def collate(self, indices, blocks=None):
        blocks = blocks or self.blocks
        return {"tokens": qdata.pad([blocks[i] for i in indices], PAD_ID)}

    def loss(self, model, batch, smoothing):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])  # (B, T, V)
        target = tokens[:, 1:]
        return _smoothed_sum(logits, target, smoothing, PAD_ID), int((target != PAD_ID).sum())

    @torch.no_grad()
    def evaluate(self, model, cfg):
        if self.vblocks is None:
            return {}
        total, n = 0.0, 0
        for i in range(len(self.vblocks)):
            loss, units = self.loss(model, self.collate([i], self.vblocks), 0.0)
            total, n = total + float(loss), n + units
        return {"valid_loss": total / n, "valid_ppl": math.exp(min(total / n, 50))}
