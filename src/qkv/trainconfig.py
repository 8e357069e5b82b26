"""The `qkv train` config file: TOML sections mapped onto frozen dataclasses.

Unknown keys and bad values raise ValueError naming the key (`training.lr_warmup: unknown
key`). Paths may use environment variables (`${QKV_DATA_DIR}/multi30k/train.en.gz`) and are
relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import PRESETS, ModelConfig

TASKS = ("translation", "classification", "lm")
SCHEDULES = ("inverse_sqrt", "linear", "constant")


def _fail(key: str, value, why: str) -> None:
    raise ValueError(f"{key}={value!r}: {why}")


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class ModelSection:
    """A preset plus ModelConfig fields; vocab_size comes from the tokenizer when unset."""

    preset: str = "small"
    init_from: str = ""  # a qkv checkpoint to start from; classification: or a pretrained encoder
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preset not in PRESETS:
            _fail("model.preset", self.preset, f"expected one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(ModelConfig)}
        for key in self.overrides:
            if key not in known:
                raise ValueError(f"model.{key}: unknown key")
        if not self.init_from:  # check the values now, not after the data is read
            self.build()

    def build(self, **defaults) -> ModelConfig:
        """The ModelConfig: preset < defaults (e.g. vocab_size) < the file's overrides."""
        try:
            return ModelConfig(**{**PRESETS[self.preset], **defaults, **self.overrides})
        except (TypeError, ValueError) as e:
            key = str(e).split("=", 1)[0]  # most ModelConfig errors start "name=value"
            sep = "." if key in {f.name for f in fields(ModelConfig)} else ": "
            raise ValueError(f"model{sep}{e}") from None


@dataclass(frozen=True)
class DataSection:
    task: str = "translation"
    train: list = field(default_factory=list)  # [src, tgt] files, [tsv], or [file]
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)
    vocab_size: int = 8000  # BPE size when the tokenizer is trained
    tokenizer: str = ""  # "" trains BPE on the training data; else a checkpoint dir
    skip_empty: bool = False
    max_chars: int = 0  # 0: no limit
    skip_long: bool = False
    labels: list = field(default_factory=list)  # class names (classification)

    def __post_init__(self):
        if self.task not in TASKS:
            _fail("data.task", self.task, f"expected one of {', '.join(TASKS)}")
        if not self.train:
            raise ValueError("data.train: missing (a list of 1 or 2 files)")
        for key in ("train", "valid", "test"):
            files = getattr(self, key)
            if len(files) > 2 or not all(isinstance(f, str) for f in files):
                _fail(f"data.{key}", files, "expected a list of 1 or 2 file names")
        if self.vocab_size < 5:
            _fail("data.vocab_size", self.vocab_size, "must be >= 5")
        if self.max_chars < 0:
            _fail("data.max_chars", self.max_chars, "must be >= 0")
        if not all(isinstance(x, str) for x in self.labels):
            _fail("data.labels", self.labels, "expected a list of class names (strings)")


@dataclass(frozen=True)
class TrainingSection:
    seed: int = 1
    max_steps: int = 1000
    batch_tokens: int = 4096  # per step, over all processes and accumulation steps
    accum_steps: int = 1
    schedule: str = "inverse_sqrt"  # the paper's; "linear" warmup/decay and "constant" use lr
    lr_scale: float = 1.0  # multiplies the paper's d_model^-0.5 * min(...) schedule
    warmup_steps: int = 4000
    lr: float = 1e-3
    label_smoothing: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0: no clipping
    bf16: bool = False
    fused: bool = True
    threads: int = 0  # 0: torch's default
    eval_every: int = 500
    eval_bleu_sentences: int = 200  # 0: no BLEU during training
    save_every_steps: int = 1000
    save_every_minutes: float = 0.0  # 0: only by steps
    keep_last: int = 5
    log_every: int = 10

    def __post_init__(self):
        for key in ("max_steps", "batch_tokens", "accum_steps", "warmup_steps", "eval_every",
                    "save_every_steps", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                _fail(f"training.{key}", getattr(self, key), "must be >= 1")
        for key in ("threads", "eval_bleu_sentences", "clip_norm", "weight_decay",
                    "save_every_minutes"):
            if getattr(self, key) < 0:
                _fail(f"training.{key}", getattr(self, key), "must be >= 0")
        for key in ("lr_scale", "lr", "eps"):
            if getattr(self, key) <= 0:
                _fail(f"training.{key}", getattr(self, key), "must be > 0")
        if self.schedule not in SCHEDULES:
            _fail("training.schedule", self.schedule, f"expected one of {', '.join(SCHEDULES)}")
        if not 0 <= self.label_smoothing < 1:
            _fail("training.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            _fail("training.betas", self.betas, "expected two numbers in [0, 1)")


@dataclass(frozen=True)
class DecodingSection:
    beam: int = 4
    alpha: float = 0.6  # length penalty ((5 + len) / 6) ** alpha
    batch_size: int = 64

    def __post_init__(self):
        for key in ("beam", "batch_size"):
            if getattr(self, key) < 1:
                _fail(f"decoding.{key}", getattr(self, key), "must be >= 1")
        if not 0 <= self.alpha < math.inf:  # also rejects nan
            _fail("decoding.alpha", self.alpha, "must be a finite number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    training: TrainingSection
    decoding: DecodingSection

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, "init_from": self.model.init_from,
                      **self.model.overrides}
        return d


SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection,
            "decoding": DecodingSection}


def _check_type(key: str, value, default) -> object:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        _fail(key, value, f"expected {type(default).__name__}")
    return value


def _section(name: str, table: dict, base: Path):
    cls = SECTIONS[name]
    if not isinstance(table, dict):
        _fail(name, table, "expected a [section] table")
    if cls is ModelSection:
        rest = {k: v for k, v in table.items() if k not in ("preset", "init_from")}
        table = {k: v for k, v in table.items() if k in ("preset", "init_from")}
        table["overrides"] = rest
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in fields(cls)}
    kw = {}
    for key, value in table.items():
        if key not in defaults:
            raise ValueError(f"{name}.{key}: unknown key")
        kw[key] = value if key == "overrides" else _check_type(f"{name}.{key}", value,
                                                                defaults[key])
    if cls is ModelSection and kw.get("init_from"):
        if "preset" in kw:
            _fail("model.preset", kw["preset"], "not used with model.init_from, whose "
                  "architecture is kept; remove it")
        from .pretrained import PRETRAINED  # a known name stays a name; else a path

        if kw["init_from"] not in PRETRAINED:
            kw["init_from"] = resolve_path(kw["init_from"], base, "model.init_from")
    if cls is DataSection:
        for key in ("train", "valid", "test"):
            kw[key] = [resolve_path(p, base, f"data.{key}") for p in kw.get(key, [])]
        if kw.get("tokenizer"):
            kw["tokenizer"] = resolve_path(kw["tokenizer"], base, "data.tokenizer")
    return cls(**kw)


def resolve_path(p, base: Path, key: str) -> str:
    if not isinstance(p, str):
        _fail(key, p, "expected a file name")
    expanded = os.path.expandvars(p)
    if "$" in expanded:
        _fail(key, p, "uses an environment variable that is not set")
    path = Path(expanded)
    return str(path if path.is_absolute() else base / path)


def parse_config(text: str, base: str | os.PathLike = ".") -> TrainConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config is not valid TOML: {e}") from None
    for key in raw:
        if key not in SECTIONS:
            raise ValueError(f"{key}: unknown section; expected {', '.join(SECTIONS)}")
    if "data" not in raw:
        raise ValueError("data: missing section")
    return TrainConfig(**{name: _section(name, raw.get(name, {}), Path(base))
                          for name in SECTIONS})


def load_config(path: str | os.PathLike) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        return parse_config(path.read_text(), path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
