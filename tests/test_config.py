"""ModelConfig validation, presets, dict round trip."""

from __future__ import annotations

import dataclasses

import pytest

from qkv import PRESETS, ModelConfig, preset


def test_defaults_are_the_paper_base_model():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff) == (512, 8, 6, 2048)
    assert cfg.n_kv_heads == 8 and cfg.n_decoder_layers == 6 and cfg.head_dim == 64
    assert (cfg.positions, cfg.norm_place, cfg.activation) == ("sinusoidal", "post", "relu")


@pytest.mark.parametrize("n_kv_heads,kind", [(8, "MHA"), (4, "GQA"), (2, "GQA"), (1, "MQA")])
def test_attention_kind(n_kv_heads, kind):
    assert ModelConfig(n_kv_heads=n_kv_heads).attention_kind == kind


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
        (dict(d_model=100), "d_model=100 is not divisible by n_heads=8"),
        (dict(vocab_size=0), "vocab_size=0 must be >= 1"),
        (dict(n_heads=0), "n_heads=0 must be >= 1"),
        (dict(n_kv_heads=0), "n_kv_heads=0 must be >= 1"),
        (dict(n_layers=-1), "n_layers=-1 must be >= 1"),
        (dict(n_decoder_layers=0), "n_decoder_layers=0 must be >= 1"),
        (dict(d_ff=0), "d_ff=0 must be >= 1"),
        (dict(max_seq_len=0), "max_seq_len=0 must be >= 1"),
        (dict(n_classes=0), "n_classes=0 must be >= 1"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(attn_dropout=-0.1), r"attn_dropout=-0.1 must be in \[0, 1\)"),
        (dict(positions="rope", d_model=24, n_heads=8),
         "RoPE needs an even head_dim, got head_dim=3"),
        (dict(pad_id=37000), r"pad_id=37000 is outside \[0, vocab_size=37000\)"),
        (dict(pad_id=-1), r"pad_id=-1 is outside"),
        (dict(norm_eps=0.0), "norm_eps=0.0 and rope_base=10000.0 must be > 0"),
        (dict(rope_base=-1.0), "norm_eps=1e-05 and rope_base=-1.0 must be > 0"),
        (dict(positions="alibi"),
         "positions='alibi' is not one of sinusoidal, learned, rope, none"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not one of layernorm, rmsnorm"),
        (dict(norm_place="sandwich"), "norm_place='sandwich' is not one of post, pre"),
        (dict(activation="tanh"), "activation='tanh' is not one of relu, gelu, gelu_tanh, swiglu"),
        (dict(pooling="max"), "pooling='max' is not one of mean, cls"),
        (dict(type_vocab_size=-1), "type_vocab_size=-1 must be >= 0"),
    ],
)
def test_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**changes)


def test_frozen_and_replace_validates_again():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 256
    assert cfg.replace(n_kv_heads=2).n_kv_heads == 2
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by n_kv_heads=3"):
        cfg.replace(n_kv_heads=3)


def test_dict_round_trip_and_unknown_keys():
    cfg = preset("tiny", vocab_size=50, n_kv_heads=1, positions="rope")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys: d_modle, heads"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 4, "d_modle": 3})


def test_presets():
    assert set(PRESETS) >= {"base", "big", "small", "tiny"}
    base, big = preset("base"), preset("big")
    assert (base.d_model, base.n_heads, base.d_ff, base.dropout) == (512, 8, 2048, 0.1)
    assert (big.d_model, big.n_heads, big.d_ff, big.dropout) == (1024, 16, 4096, 0.3)
    assert big.n_kv_heads == 16  # n_kv_heads follows the preset's n_heads
    assert preset("big", n_kv_heads=4).attention_kind == "GQA"
    for name in PRESETS:
        assert isinstance(preset(name), ModelConfig)
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of base, big"):
        preset("huge")
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        preset("tiny", n_kv_heads=3)


def test_replace_keeps_mha_mha_and_mqa_mqa():
    """Derived defaults follow their source field in replace() only when they matched it."""
    mha = ModelConfig(n_heads=8, n_layers=6)
    assert mha.replace(n_heads=16).n_kv_heads == 16  # was MHA: stays MHA
    assert mha.replace(n_heads=16, n_kv_heads=4).n_kv_heads == 4  # given: used
    assert mha.replace(n_layers=3).n_decoder_layers == 3
    assert mha.replace(n_layers=3, n_decoder_layers=2).n_decoder_layers == 2
    mqa = ModelConfig(n_heads=8, n_kv_heads=1)
    assert mqa.replace(n_heads=16).n_kv_heads == 1  # MQA stays MQA
    gqa = ModelConfig(n_heads=8, n_kv_heads=2, n_layers=6, n_decoder_layers=4)
    assert gqa.replace(n_heads=4).n_kv_heads == 2
    assert gqa.replace(n_layers=2).n_decoder_layers == 4
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig(n_heads=8, n_kv_heads=4, d_model=48).replace(n_heads=6)


def test_every_shipped_config_parses(monkeypatch):
    """configs/*.toml stay valid as the config schema changes (paths need not exist)."""
    from pathlib import Path

    from qkv.trainconfig import load_config

    monkeypatch.setenv("QKV_DATA_DIR", "/nonexistent/data")
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 7
    for path in configs:
        cfg = load_config(path)
        assert cfg.data.train, path
    root = configs[0].parents[1]
    up = load_config(root / "configs" / "multi30k-mqa-uptrain.toml")
    assert Path(up.model.init_from).resolve() == root / "runs" / "multi30k-mha-to-mqa"
