"""`qkv train CONFIG.toml`: the paper's training recipe (section 5) on CPU, resumable, DDP.

Adam(0.9, 0.98, 1e-9), lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (eq. 3),
label smoothing 0.1, token-count batches of similar lengths; plus gradient clipping and
accumulation, bf16 autocast, periodic validation (loss, greedy BLEU), atomic checkpoints
that `--resume` continues exactly, and data-parallel training under torchrun (gloo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import checkpoint
from .checkpoint import CKPT_PREFIX, LAST_LINK
from .linear import warn_if_slow_bf16
from .tasks import ClassificationTask, LMTask, TranslationTask, require_examples
from .tokenizer import from_bytes, to_bytes, train_bpe
from .trainconfig import TrainConfig, load_config

METRICS = "metrics.jsonl"


def lr_at(step: int, cfg: TrainConfig, d_model: int) -> float:
    """Learning rate for 1-based `step` (eq. 3 for inverse_sqrt)."""
    t = cfg.training
    if t.schedule == "inverse_sqrt":
        return t.lr_scale * d_model**-0.5 * min(step**-0.5, step * t.warmup_steps**-1.5)
    if t.schedule == "constant":
        return t.lr * min(1.0, step / t.warmup_steps)
    if step <= t.warmup_steps:  # linear warmup then linear decay to 0 at max_steps
        return t.lr * step / t.warmup_steps
    return t.lr * max(0.0, (t.max_steps - step) / max(1, t.max_steps - t.warmup_steps))


# ------------------------------------------------------------------ distributed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------- optimizer state


def optimizer_to_bytes(opt: torch.optim.Optimizer) -> tuple[bytes, list[dict]]:
    """Adam state as safetensors bytes ("{param}.{name}") and param groups as JSON."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().clone().contiguous() if torch.is_tensor(v)
               else torch.tensor(v)
               for i, st in sd["state"].items() for k, v in st.items()}
    return st_save(tensors), sd["param_groups"]


def optimizer_from_bytes(opt: torch.optim.Optimizer, blob: bytes, groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in st_load(blob).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# -------------------------------------------------------------------- tokenizer


def _task_texts(cfg: TrainConfig):
    from . import data as qdata

    d = cfg.data
    if d.task == "translation":
        corpus = qdata.read_parallel(*d.train, skip_empty=True)
        return corpus.src + corpus.tgt
    if d.task == "classification":
        return qdata.read_sst2(d.train[0])[1]
    return qdata.read_lines(d.train[0])


def build_tokenizer(cfg: TrainConfig):
    """(tokenizer, text_encoding): a checkpoint's, a pretrained model's, or BPE trained now."""
    if cfg.data.tokenizer:
        return from_bytes(_read_tokenizer(cfg.data.tokenizer)), "qkv"
    texts = _task_texts(cfg)
    # before BPE, which would train on nothing
    require_examples(sum(bool(t.strip()) for t in texts), "data.train", cfg.data.train, "text")
    return train_bpe(texts, cfg.data.vocab_size), "qkv"


def _shared_tokenizer(cfg: TrainConfig, world: int):
    """Process 0's tokenizer, sent to the others so that every process has the same one."""
    if world == 1:
        return build_tokenizer(cfg)
    blob = to_bytes(build_tokenizer(cfg)[0]) if dist.get_rank() == 0 else b""
    size = torch.tensor([len(blob)])
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if blob:
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    dist.broadcast(buf, src=0)  # a tensor, not a pickled object
    return from_bytes(buf.numpy().tobytes()), "qkv"


def _read_tokenizer(path: str) -> bytes:
    p = Path(path)
    if p.is_dir():
        blob = checkpoint.read_file(p, "tokenizer")
        if blob is None:
            raise ValueError(f"data.tokenizer={path!r}: that checkpoint holds no tokenizer")
        return blob
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer={path!r}: no such file or checkpoint")
    return p.read_bytes()


# [model] settings that may differ from an init_from checkpoint's: they change no weight
TUNABLE = ("dropout", "attn_dropout")
# metadata a run started with init_from keeps from where its weights came
LINEAGE = ("init_from", "converted_from", "kv_heads_conversion")


def _init_from(cfg: TrainConfig):
    """(model, tokenizer, text_encoding, lineage) to start from, given model.init_from.

    A qkv checkpoint of a run of the same task (written by qkv train, average or convert)
    is kept whole, e.g. an MHA translation model converted to MQA, to uptrain (Ainslie et
    al. 2023). Classification also takes a pretrained encoder (a name, a file or a
    converted folder), or a qkv classifier with other labels, and gives it a new head.
    The optimizer, schedule and step count start afresh.
    """
    src, task = cfg.model.init_from, cfg.data.task
    if cfg.data.tokenizer:
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} and model.init_from={src!r} "
                         "are both set: init_from brings its own tokenizer; remove one")
    meta = _checkpoint_metadata(src)
    lineage = _lineage(meta or {}) | {"init_from": src}
    n_classes = max(2, len(cfg.data.labels))
    if meta is not None and meta.get("task") == task:
        from .pretrained import load_checkpoint

        loaded = load_checkpoint(src)
        if task != "classification" or loaded.model.cfg.n_classes == n_classes:
            model = _with_overrides(loaded.model, _changed_settings(loaded.model.cfg, cfg))
            return model, loaded.tokenizer, meta.get("text_encoding", "qkv"), lineage
        model = _new_head(loaded, cfg, n_classes)  # a classifier with other labels
        return model, loaded.tokenizer, meta.get("text_encoding", "hf"), lineage
    if task != "classification":
        found = ("no such folder" if not Path(src).exists() else
                 "a folder that is not a qkv checkpoint" if meta is None else
                 f"a checkpoint of task {meta.get('task')!r}")
        raise ValueError(f"model.init_from={src!r}: expected a qkv checkpoint of a {task!r} run "
                         f"(written by qkv train, average or convert), found {found}")
    model, tok = _pretrained(cfg, n_classes)
    return model, tok, (meta or {}).get("text_encoding", "hf"), lineage


def _lineage(meta: dict) -> dict:
    """The LINEAGE entries of a checkpoint's metadata."""
    return {k: meta[k] for k in LINEAGE if k in meta}


def _checkpoint_metadata(path: str) -> dict | None:
    """A qkv checkpoint folder's metadata, or None if `path` is not one."""
    if not checkpoint.is_complete(path):
        return None
    return checkpoint.read_metadata(path)


def _changed_settings(current, cfg: TrainConfig) -> dict:
    """The [model] settings that differ from the checkpoint's ModelConfig `current`.

    Only TUNABLE ones may: the rest would change what the weights mean or their shapes.
    """
    changed = {k: v for k, v in cfg.model.overrides.items() if getattr(current, k) != v}
    fixed = sorted(k for k in changed if k not in TUNABLE)
    if fixed:
        ours = ", ".join(f"{k}={changed[k]!r}" for k in fixed)
        theirs = ", ".join(f"{k}={getattr(current, k)!r}" for k in fixed)
        raise ValueError(f"model.init_from={cfg.model.init_from!r}: [model] {ours} differs from "
                         f"the checkpoint's {theirs}; beside init_from only "
                         f"{', '.join(TUNABLE)} may be set")
    return changed


def _with_overrides(model: torch.nn.Module, changed: dict) -> torch.nn.Module:
    """The model with `changed` (TUNABLE) settings, its weights kept."""
    if not changed:
        return model
    new = type(model)(model.cfg.replace(**changed))
    new.load_state_dict(model.state_dict())
    return new


def _pretrained(cfg: TrainConfig, n_classes: int):
    """(classifier, tokenizer): a pretrained encoder (qkv.pretrained) with a new head."""
    from .pretrained import load_pretrained

    src = cfg.model.init_from
    try:
        loaded = load_pretrained(src, n_classes=n_classes)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise ValueError(f"model.init_from={src!r}: {e}") from None
    return _new_head(loaded, cfg, n_classes), loaded.tokenizer


def _new_head(loaded, cfg: TrainConfig, n_classes: int):
    """A classifier with `loaded`'s encoder and a fresh head for n_classes labels."""
    from .models import EncoderClassifier

    if not isinstance(loaded.model, EncoderClassifier):
        raise ValueError(f"model.init_from={cfg.model.init_from!r}: holds a "
                         f"{type(loaded.model).__name__}, not an encoder")
    changed = _changed_settings(loaded.model.cfg, cfg)
    torch.manual_seed(cfg.training.seed)  # the fresh classification head
    model = EncoderClassifier(loaded.model.cfg.replace(n_classes=n_classes, **changed))
    model.encoder.load_state_dict(loaded.model.encoder.state_dict())
    return model


# -------------------------------------------------------------------- checkpoints


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a crash mid-save leaves no manifest)."""
    run_dir = Path(run_dir)
    found = sorted(p for p in run_dir.glob(f"{CKPT_PREFIX}*")
                   if p.is_dir() and checkpoint.is_complete(p))
    return found


def _check_data_files(cfg: TrainConfig) -> None:
    """Every file the config names exists, before any data is read or BPE trained; data.test
    is only recorded with the run (score it with `qkv evaluate`), so a typo shows here."""
    for key in ("train", "valid", "test"):
        for f in getattr(cfg.data, key):
            if not Path(f).is_file():
                raise FileNotFoundError(f"data.{key}: {f}: no such file")


# Settings a resumed run may change: they decide when it stops, saves, logs and evaluates
# (and how many threads share the work), not what its training steps compute.
RESUMABLE = {
    "training": ("max_steps", "threads", "eval_every", "eval_bleu_sentences",
                 "save_every_steps", "save_every_minutes", "keep_last", "log_every"),
    "data": ("valid", "test"),
    "decoding": ("beam", "alpha", "batch_size"),
}


# Settings that hold paths, saved as the config's folder joined with what it says: the
# same file can be spelled `cfg/../data/a.en` or `/abs/cfg/../data/a.en`.
PATHS = {("data", "train"), ("data", "tokenizer"), ("model", "init_from")}


def _real_paths(value):
    """Paths (a str or a list of them) made absolute with links resolved; a pretrained
    model's name (no slash) stays as it is."""
    if isinstance(value, list):
        return [_real_paths(v) for v in value]
    return os.path.realpath(value) if isinstance(value, str) and "/" in value else value


def _config_changes(saved: dict, now: dict) -> list[str]:
    """`section.key=old (now new)` for each setting outside RESUMABLE that differs.

    [model] is compared key by key over both files' keys (unset differs from set); the
    other sections skip keys one side lacks (a checkpoint of an older qkv)."""
    changes = []
    for section, values in now.items():
        old = saved.get(section, {})
        keys = sorted(set(old) | set(values)) if section == "model" else sorted(
            set(old) & set(values))
        for key in keys:
            if key in RESUMABLE.get(section, ()):
                continue
            before, after = old.get(key, "unset"), values.get(key, "unset")
            if (section, key) in PATHS:  # the same files, however the config was reached
                same = _real_paths(before) == _real_paths(after)
            else:
                same = before == after
            if not same:
                changes.append(f"{section}.{key}={before!r} (now {after!r})")
    return changes


def _check_resume_config(path: Path, saved: dict, cfg: TrainConfig) -> None:
    """A resumed run continues exactly only with the settings it was started with (`saved`,
    the config in `path`'s trainer state)."""
    changes = _config_changes(saved, cfg.to_dict())
    if changes:
        allowed = ", ".join(f"{s}.{k}" for s, keys in RESUMABLE.items() for k in keys)
        raise ValueError(
            f"--resume: {path} was trained with {'; '.join(changes)}. A resumed run must keep "
            f"its settings to continue exactly; only {allowed} may change. Restore them, or "
            "start a new run with another --out")


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | os.PathLike, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world = _world()
        t = cfg.training
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.bf16 and self.rank == 0:  # one warning per run, not one per process
            warn_if_slow_bf16("training.bf16 = true (autocast)")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder; expected a run "
                             "folder (new or to --resume)")
        _check_data_files(cfg)
        resume_from = self._resume_point(resume)
        if resume_from is not None:
            state = json.loads(checkpoint.read_file(resume_from, "trainer"))
            _check_resume_config(resume_from, state["config"], cfg)
        self._build(resume_from)
        self.step, self.epoch, self.batch_index, self.tokens_seen = 0, 0, 0, 0
        self.elapsed = 0.0
        self.batcher = self._batcher()
        self._epoch_batches: list[list[int]] | None = None
        if resume_from is not None:
            self._load_trainer_state(resume_from, state)
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / METRICS).write_text("")

    def _resume_point(self, resume: bool) -> Path | None:
        found = checkpoints(self.out) if self.out.is_dir() else []
        if resume:
            if not found:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.out}")
            return found[-1]
        if found:
            raise ValueError(f"{self.out} already holds checkpoints; use --resume to continue "
                             f"or --out for a new run")
        return None

    def _build(self, resume_from: Path | None) -> None:
        cfg = self.cfg
        self.lineage: dict = {}  # where init_from's weights came from, kept in every checkpoint
        if resume_from is not None:
            self.model = checkpoint.load(resume_from).train()
            self.tok = from_bytes(checkpoint.read_file(resume_from, "tokenizer"))
            meta = checkpoint.read_metadata(resume_from)
            self.text_encoding = meta["text_encoding"]
            self.lineage = _lineage(meta)
        elif cfg.model.init_from:
            self.model, self.tok, self.text_encoding, self.lineage = _init_from(cfg)
            if self.rank == 0:
                m = self.model.cfg
                print(f"qkv: starting from {cfg.model.init_from} ({type(self.model).__name__}, "
                      f"{m.n_heads} query heads, {m.n_kv_heads} key/value heads: "
                      f"{m.attention_kind}) at step 0", file=sys.stderr)
        else:
            self.tok, self.text_encoding = _shared_tokenizer(cfg, self.world)
            self.model = None
        mcfg = self.model.cfg if self.model is not None else cfg.model.build(
            vocab_size=self.tok.get_vocab_size(), n_classes=max(2, len(cfg.data.labels)))
        self.task = self._task(mcfg.max_seq_len)
        self.task.pad_id = mcfg.pad_id
        if self.model is None:
            torch.manual_seed(cfg.training.seed)
            self.model = self.task.model_class(mcfg)
        self.model.train()
        self.opt = self._optimizer()

    def _task(self, max_seq_len: int):
        task = self.cfg.data.task
        if task == "translation":
            return TranslationTask(self.cfg, self.tok, max_seq_len)
        if task == "classification":
            return ClassificationTask(self.cfg, self.tok, max_seq_len, self.text_encoding)
        return LMTask(self.cfg, self.tok, max_seq_len)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.training
        kw = dict(lr=0.0, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        try:  # fused Adam is ~3x faster on CPU
            return torch.optim.Adam(self.model.parameters(), fused=t.fused, **kw)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(self.model.parameters(), **kw)

    def _batcher(self):
        from .data import TokenBatcher

        t = self.cfg.training
        per_batch = max(1, t.batch_tokens // t.accum_steps)
        if max(self.task.lengths) > per_batch:
            raise ValueError(f"training.batch_tokens={t.batch_tokens} (/ accum_steps="
                             f"{t.accum_steps}) is smaller than the longest training example, "
                             f"{max(self.task.lengths)} tokens")
        return TokenBatcher(self.task.lengths, per_batch, seed=t.seed)

    # ------------------------------------------------------------------ the loop

    def _next_batch(self) -> list[int]:
        if self._epoch_batches is None:
            self._epoch_batches = self.batcher.batches(self.epoch)
        if self.batch_index >= len(self._epoch_batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._epoch_batches = self.batcher.batches(self.epoch)
        self.batch_index += 1
        return self._epoch_batches[self.batch_index - 1]

    def train_step(self) -> dict:
        """One optimizer step over accum_steps batches, split across processes."""
        t = self.cfg.training
        micro = [self._next_batch()[self.rank :: self.world] for _ in range(t.accum_steps)]
        batches = [self.task.collate(m) for m in micro if m]
        counts = torch.tensor([0.0, 0.0, 0.0])  # units, tokens, summed loss
        counts[1] = float(sum(_n_tokens(b) for b in batches))
        counts[0] = float(sum(self.task.units(b) for b in batches))
        _all_reduce(counts[:2])
        torch.manual_seed(t.seed * 1_000_003 + self.step * 1009 + self.rank)  # dropout
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.bf16):
                loss, _ = self.task.loss(self.model, b, t.label_smoothing)
            (loss / counts[0]).backward()
            counts[2] += float(loss.detach())
        _all_reduce(counts[2:])
        lr = self._update()
        self.tokens_seen += int(counts[1])
        return {"loss": float(counts[2] / counts[0]), "lr": lr, "tokens": int(counts[1])}

    def _update(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every process must all-reduce the same tensors
                p.grad = torch.zeros_like(p)
            _all_reduce(p.grad)
        if self.cfg.training.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.training.clip_norm)
        self.step += 1
        lr = lr_at(self.step, self.cfg, self.model.cfg.d_model)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return lr

    def fit(self) -> Path | None:
        t = self.cfg.training
        if self.step >= t.max_steps:
            if self.rank == 0:
                print(f"qkv: {self.out} is already at step {self.step}, training.max_steps="
                      f"{t.max_steps}: nothing to train (raise max_steps to continue)",
                      file=sys.stderr)
            return None
        bar = _progress(t.max_steps, self.step, self.rank)
        last_save, window_tokens, window_start = time.monotonic(), 0, time.monotonic()
        start_elapsed, t0 = self.elapsed, time.monotonic()
        saved = None
        while self.step < t.max_steps:
            stats = self.train_step()
            window_tokens += stats["tokens"]
            self.elapsed = start_elapsed + time.monotonic() - t0
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.monotonic() - window_start)
                self._log({"step": self.step, "epoch": self.epoch, "loss": stats["loss"],
                           "lr": stats["lr"], "tokens_per_s": rate,
                           "elapsed_s": self.elapsed})
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}",
                                tok_s=f"{rate:.0f}")
                window_tokens, window_start = 0, time.monotonic()
            bar.update(1)
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                self._evaluate()
            minutes = time.monotonic() - last_save >= 60 * t.save_every_minutes > 0
            if self.step % t.save_every_steps == 0 or minutes or self.step == t.max_steps:
                saved = self.save()
                last_save = time.monotonic()
        bar.close()
        return saved

    def _evaluate(self) -> None:
        if self.rank != 0:
            return
        self.model.eval()
        try:
            metrics = self.task.evaluate(self.model, self.cfg)
        finally:
            self.model.train()
        if metrics:
            self._log({"step": self.step, **metrics})
            print(f"step {self.step}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in metrics.items()), file=sys.stderr)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------- save / resume

    def save(self) -> Path | None:
        """Write ckpt-<step> atomically (process 0 only), prune old ones, point `last` to it."""
        if self.rank != 0:
            return None
        opt_blob, groups = optimizer_to_bytes(self.opt)
        state = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                 "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                 "param_groups": groups, "config": self.cfg.to_dict()}
        meta = {"step": self.step, "task": self.cfg.data.task,
                "text_encoding": self.text_encoding, "labels": list(self.cfg.data.labels),
                "decoding": self.cfg.to_dict()["decoding"], **self.lineage}
        path = self.out / f"{CKPT_PREFIX}{self.step:08d}"
        checkpoint.save(self.model, path, metadata=meta, files={
            "tokenizer": to_bytes(self.tok), "optimizer": opt_blob,
            "trainer": json.dumps(state).encode()})
        _point_last(self.out, path.name)
        for old in checkpoints(self.out)[: -self.cfg.training.keep_last]:
            _remove_checkpoint(old)
        return path

    def _load_trainer_state(self, path: Path, state: dict) -> None:
        optimizer_from_bytes(self.opt, checkpoint.read_file(path, "optimizer"),
                             state["param_groups"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_index, self.tokens_seen = state["batch_index"], state["tokens_seen"]
        self.elapsed = state["elapsed"]
        if self.rank == 0:
            _truncate_metrics(self.out / METRICS, self.step)
        print(f"qkv: resumed from {path} at step {self.step}", file=sys.stderr)


def _n_tokens(batch: dict) -> int:
    return sum(int((v != 0).sum()) for k, v in batch.items() if k != "labels")


def _progress(total: int, initial: int, rank: int):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=rank != 0, dynamic_ncols=True,
                mininterval=0.5 if tty else 60, desc="train")


def _point_last(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{LAST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, run_dir / LAST_LINK)


def _remove_checkpoint(path: Path) -> None:
    (path / checkpoint.MANIFEST).unlink(missing_ok=True)  # incomplete from here on
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------ average


def average_checkpoints(paths: list[Path], out: str | os.PathLike) -> Path:
    """Save the element-wise mean of the weights of `paths` (same model and config)."""
    models = [checkpoint.load(p) for p in paths]
    first = models[0]
    for p, m in zip(paths, models, strict=True):
        if type(m) is not type(first) or m.cfg != first.cfg:
            raise ValueError(f"{p}: model or config differs from {paths[0]}; cannot average")
    states = [checkpoint.unique_state_dict(m) for m in models]
    with torch.no_grad():
        for name, t in checkpoint.unique_state_dict(first).items():
            if t.is_floating_point():
                t.copy_(torch.stack([s[name] for s in states]).mean(0))
    meta = {**checkpoint.read_metadata(paths[-1]), "averaged": [str(p) for p in paths]}
    files = {"tokenizer": checkpoint.read_file(paths[-1], "tokenizer")}
    return checkpoint.save(first, out, metadata=meta,
                           files={k: v for k, v in files.items() if v is not None})


def _average_inputs(paths: list[str], last: int) -> list[Path]:
    if len(paths) == 1 and not checkpoint.is_complete(paths[0]):
        found = checkpoints(paths[0])
        if not found:
            raise FileNotFoundError(f"{paths[0]}: neither a checkpoint nor a run folder "
                                    f"holding {CKPT_PREFIX}* checkpoints")
        return found[-last:]
    return [Path(p) for p in paths]


# ---------------------------------------------------------------------------- CLI


def add_train_arguments(parser) -> None:
    parser.add_argument("config", help="TOML file with [model], [data], [training], [decoding]")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's latest checkpoint")


def run_train(args) -> int:
    cfg = load_config(args.config)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    _init_distributed()
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
        saved = trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if saved is not None:
        print(f"saved {saved} (also {out / LAST_LINK})")
    return 0


def add_average_arguments(parser) -> None:
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoint folders, or one run folder (its last k are used)")
    parser.add_argument("--out", required=True, help="where to write the averaged model")
    parser.add_argument("--last", type=int, default=5, help="k for a run folder (default 5)")


def run_average(args) -> int:
    if args.last < 1:
        raise ValueError(f"--last {args.last}: must be >= 1")
    paths = _average_inputs(args.checkpoints, args.last)
    out = average_checkpoints(paths, args.out)
    print(f"averaged {len(paths)} checkpoints into {out}")
    return 0
