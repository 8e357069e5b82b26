"""Checkpoints: weights in safetensors, config as JSON, written atomically, never unpickled.

A checkpoint directory holds `config.json` (the manifest: model class, config, the names
of the other files) and the files it names. Each save writes new uniquely named files,
then atomically replaces `config.json`, the commit point; only then are the previous
files removed. A crash at any moment leaves a complete checkpoint, old or new.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .models import MODELS

FORMAT = "qkv-checkpoint"
VERSION = 1
MANIFEST = "config.json"
# The names `qkv train` gives in a run folder: ckpt-<step> checkpoints and a `last` link.
CKPT_PREFIX = "ckpt-"
LAST_LINK = "last"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or does not match the model."""


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor once, under its first name."""
    seen: set = set()
    out = {}
    for name, t in model.state_dict().items():
        # the same view of the same storage; distinct slices of one buffer are kept apart
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        key = key if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model: nn.Module, directory: str | os.PathLike, *, files: dict[str, bytes] | None = None,
         metadata: dict | None = None) -> Path:
    """Save `model` (one of MODELS) to `directory`, atomically.

    files: extra named blobs kept with the model (e.g. {"tokenizer": tokenizer json bytes}).
    metadata: JSON-serialisable facts to keep (training step, data, ...).
    """
    cls = type(model).__name__
    if cls not in MODELS:
        raise ValueError(f"cannot save a {cls}; qkv checkpoints hold {', '.join(MODELS)}")
    _check_file_keys(files or {})
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a folder; a checkpoint is a folder")
    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    names = {"weights": f"model-{tag}.safetensors"}
    tensors = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    save_file(tensors, str(directory / names["weights"]), metadata={"format": FORMAT})
    with open(directory / names["weights"], "rb+") as f:
        os.fsync(f.fileno())
    for key, blob in (files or {}).items():
        names[key] = f"{key}-{tag}"
        _fsync_write(directory / names[key], blob)
    manifest = {"format": FORMAT, "version": VERSION, "model": cls,
                "config": model.cfg.to_dict(), "files": names, "metadata": metadata or {}}
    try:
        old = _read_manifest(directory)
    except CheckpointError:  # no previous checkpoint, or an unreadable one: nothing to clean
        old = None
    tmp = directory / f".{MANIFEST}.{tag}.tmp"
    _fsync_write(tmp, json.dumps(manifest, indent=2).encode())
    os.replace(tmp, directory / MANIFEST)  # the commit point
    _fsync_dir(directory)
    if old is not None:
        for name in set(old["files"].values()) - set(names.values()):
            (directory / name).unlink(missing_ok=True)
    return directory


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a checkpoint whose save finished (the manifest is written
    last, so a crash mid-save leaves none). Says nothing of whether it loads."""
    return (Path(directory) / MANIFEST).is_file()


def _check_file_keys(files: dict[str, bytes]) -> None:
    for key in files:
        if key == "weights":
            raise ValueError("extra file key 'weights' is reserved for the model weights")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"extra file key {key!r} must be a plain name (letters, digits, _ -)")


def _is_run_folder(directory: Path) -> bool:
    """Whether `directory` looks like a `qkv train --out` folder."""
    return (directory / LAST_LINK).exists() or any(directory.glob(f"{CKPT_PREFIX}*"))


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file() and _is_run_folder(directory):
        raise CheckpointError(f"{path}: no such file; is {directory} a run folder? use "
                              f"{directory}/{LAST_LINK} or {directory}/{CKPT_PREFIX}NNNNNNNN")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (is {directory} a qkv checkpoint?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qkv checkpoint manifest (format != {FORMAT!r})")
    for key in ("model", "config", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path}: missing key {key!r}")
    if not isinstance(manifest["files"], dict) or "weights" not in manifest["files"]:
        raise CheckpointError(f"{path}: 'files' names no weights file")
    return manifest


def read_file(directory: str | os.PathLike, key: str) -> bytes | None:
    """An extra file saved with the model (see `save(files=...)`), or None if there is none."""
    directory = Path(directory)
    name = _read_manifest(directory)["files"].get(key)
    if name is None:
        return None
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path}: file named in {directory / MANIFEST} is missing")
    return path.read_bytes()


def read_metadata(directory: str | os.PathLike) -> dict:
    return _read_manifest(Path(directory)).get("metadata", {})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read weights, truncated or corrupt ({e})") from None


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = unique_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the config needs {tuple(t.shape)}"
            )
    with torch.no_grad():
        for name, t in expected.items():
            t.copy_(tensors[name])


def load(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The model saved in `directory`, in eval mode."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest["model"] not in MODELS:
        raise CheckpointError(
            f"{directory / MANIFEST}: unknown model {manifest['model']!r}; "
            f"expected one of {', '.join(MODELS)}"
        )
    try:
        cfg = ModelConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / MANIFEST}: bad config: {e}") from None
    weights = directory / manifest["files"]["weights"]
    tensors = _load_tensors(weights)
    model = MODELS[manifest["model"]](cfg)
    _copy_into(model, tensors, weights)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
