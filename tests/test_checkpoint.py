"""Checkpoints: round trips, atomic replacement, and a clear error for every broken file."""

from __future__ import annotations

import importlib
import json
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qkv import CheckpointError, DecoderLM, EncoderClassifier, EncoderDecoder, load, preset, save
from qkv.checkpoint import read_file, read_metadata

ckpt = importlib.import_module("qkv.checkpoint")
V = 19


def tiny(**kw):
    return preset("tiny", **{"vocab_size": V, **kw})


def model_inputs(model):
    x = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    return (x, x[:, :4]) if isinstance(model, EncoderDecoder) else (x,)


def weights_path(directory):
    return directory / json.loads((directory / "config.json").read_text())["files"]["weights"]


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    assert type(a) is type(b) and a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert_close(sa[name], sb[name], rtol=0, atol=0)
    a.eval()
    assert_close(a(*model_inputs(a)), b(*model_inputs(b)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (EncoderDecoder, tiny()),
        (EncoderDecoder, tiny(tie_embeddings=False, n_kv_heads=1)),
        (DecoderLM, tiny(positions="rope", n_kv_heads=2)),
        (DecoderLM, tiny(tie_embeddings=False)),
        (EncoderClassifier, tiny(n_classes=3, type_vocab_size=2, embed_norm=True)),
    ],
)
def test_round_trip(tmp_path, monkeypatch, cls, cfg):
    model = cls(cfg)
    save(model, tmp_path / "ck", files={"tokenizer": b'{"v": 1}'}, metadata={"step": 7})

    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded = load(tmp_path / "ck")
    assert not loaded.training
    assert_same_model(model, loaded)
    assert read_file(tmp_path / "ck", "tokenizer") == b'{"v": 1}'
    assert read_file(tmp_path / "ck", "vocab") is None
    assert read_metadata(tmp_path / "ck") == {"step": 7}


def test_tied_weights_stored_once_and_still_tied(tmp_path):
    model = EncoderDecoder(tiny())
    save(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(weights_path(tmp_path)), "pt") as f:
        names = set(f.keys())
    assert "encoder.embed.tok.weight" in names and "decoder.embed.tok.weight" not in names
    loaded = load(tmp_path)
    assert loaded.decoder.embed.tok.weight is loaded.encoder.embed.tok.weight


def test_load_dtype(tmp_path):
    save(DecoderLM(tiny()), tmp_path)
    assert next(load(tmp_path, dtype=torch.float64).parameters()).dtype == torch.float64


def test_saving_again_replaces_files(tmp_path):
    a, b = DecoderLM(tiny()), DecoderLM(tiny())
    save(a, tmp_path, files={"tokenizer": b"a"})
    save(b, tmp_path, files={"tokenizer": b"b"})
    assert_same_model(b, load(tmp_path))
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [
        "config.json", "model", "tokenizer"]


@pytest.mark.parametrize("crash_in", ["save_file", "os.replace"])
def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    old, new = DecoderLM(tiny()), DecoderLM(tiny())
    save(old, tmp_path, files={"tokenizer": b"old"})

    def crash(*args, **kw):
        if crash_in == "save_file":  # half a file on disk, then the process dies
            args[1] and open(args[1], "wb").write(b"\x00" * 10)
        raise OSError("simulated crash")

    target = (ckpt, "save_file") if crash_in == "save_file" else (ckpt.os, "replace")
    monkeypatch.setattr(*target, crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(new, tmp_path, files={"tokenizer": b"new"})
    monkeypatch.undo()
    assert_same_model(old, load(tmp_path))
    assert read_file(tmp_path, "tokenizer") == b"old"


def test_save_over_a_corrupt_manifest(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    model = DecoderLM(tiny())
    save(model, tmp_path)
    assert_same_model(model, load(tmp_path))


def test_save_rejects_bad_file_keys(tmp_path):
    with pytest.raises(ValueError, match="extra file key 'weights' is reserved"):
        save(DecoderLM(tiny()), tmp_path, files={"weights": b"x"})
    with pytest.raises(ValueError, match="extra file key '../x' must be a plain name"):
        save(DecoderLM(tiny()), tmp_path, files={"../x": b"x"})


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(ValueError, match="cannot save a Linear; qkv checkpoints hold"):
        save(nn.Linear(2, 2), tmp_path)


# ---------------------------------------------------------------- broken files


@pytest.fixture
def saved(tmp_path):
    save(EncoderDecoder(tiny()), tmp_path)
    return tmp_path


def edit_manifest(directory, fn):
    path = directory / "config.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def test_missing_manifest(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: no such file \(is .* a qkv checkp"):
        load(tmp_path)


def test_bad_json(saved):
    (saved / "config.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load(saved)


def test_not_a_qkv_manifest(saved):
    (saved / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match=r"config.json: not a qkv checkpoint manifest"):
        load(saved)


def test_manifest_missing_key(saved):
    edit_manifest(saved, lambda m: m.pop("config"))
    with pytest.raises(CheckpointError, match=r"config.json: missing key 'config'"):
        load(saved)


def test_manifest_without_weights_entry(saved):
    edit_manifest(saved, lambda m: m["files"].pop("weights"))
    with pytest.raises(CheckpointError, match=r"config.json: 'files' names no weights file"):
        load(saved)


def test_unknown_model_class(saved):
    edit_manifest(saved, lambda m: m.update(model="GPT5"))
    with pytest.raises(CheckpointError, match=r"config.json: unknown model 'GPT5'; expected one"):
        load(saved)


def test_bad_config(saved):
    edit_manifest(saved, lambda m: m["config"].update(n_kv_heads=3))
    with pytest.raises(CheckpointError, match=r"bad config: n_heads=4 is not divisible by n_kv"):
        load(saved)
    edit_manifest(saved, lambda m: m["config"].update(n_kv_heads=4, heads=2))
    with pytest.raises(CheckpointError, match=r"bad config: unknown ModelConfig keys: heads"):
        load(saved)


def test_missing_weights_file(saved):
    path = weights_path(saved)
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name}: weights file is missing"):
        load(saved)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_weights_file(saved, keep):
    path = weights_path(saved)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match=rf"{path.name}: cannot read weights, truncated"):
        load(saved)


def test_shape_mismatch(saved):
    edit_manifest(saved, lambda m: m["config"].update(vocab_size=V + 1))
    with pytest.raises(
        CheckpointError,
        match=r"model-.*safetensors: encoder.embed.tok.weight has shape \(19, 64\), "
        r"the config needs \(20, 64\)",
    ):
        load(saved)


def test_key_mismatch(saved):
    edit_manifest(saved, lambda m: m["config"].update(n_layers=3))
    with pytest.raises(CheckpointError, match=r"weights do not match the config: missing "
                       r"\['encoder.layers.2.*unexpected \[\]"):
        load(saved)
    edit_manifest(saved, lambda m: m["config"].update(n_layers=1))
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['encoder.layers.1"):
        load(saved)


def test_missing_extra_file(tmp_path):
    save(DecoderLM(tiny()), tmp_path, files={"tokenizer": b"t"})
    path = tmp_path / json.loads((tmp_path / "config.json").read_text())["files"]["tokenizer"]
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name}: file named in .*config.json is mis"):
        read_file(tmp_path, "tokenizer")


def test_unique_state_dict_keeps_slices_of_one_storage_apart():
    """Only the same tensor (tied weights) is deduplicated, not views of one buffer."""
    from qkv.checkpoint import unique_state_dict

    m = nn.Module()
    packed = torch.arange(6.0)
    m.a, m.b = nn.Parameter(packed[:3]), nn.Parameter(packed[3:])
    m.tied = nn.Linear(2, 2)
    m.again = m.tied
    assert list(unique_state_dict(m)) == ["a", "b", "tied.weight", "tied.bias"]
