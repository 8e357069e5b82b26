"""Key/value head conversion (mean-pooling, Ainslie et al. 2023), uptraining, and their commands."""

from __future__ import annotations

import math

import pytest
import torch

from qkv import checkpoint
from qkv import pretrained as P
from qkv.cli import main
from qkv.config import ModelConfig
from qkv.convert import convert_kv_heads, kv_bytes_per_token, lr_at, pool_heads, uptrain
from qkv.models import DecoderLM, EncoderClassifier, EncoderDecoder
from tests.test_generate import byte_tokenizer, tiny_lm


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=48,
                                 max_seq_len=32, dropout=0.0), **kw})


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _outputs(model, x):
    with torch.no_grad():
        return model(x, x) if isinstance(model, EncoderDecoder) else model(x)


@pytest.mark.parametrize("cls", [DecoderLM, EncoderDecoder, EncoderClassifier])
def test_same_number_of_kv_heads_is_the_identity(cls):
    model = _randomised(cls(_cfg(n_kv_heads=2)))
    same = convert_kv_heads(model, 2)
    x = torch.randint(1, 50, (2, 7))
    torch.testing.assert_close(_outputs(same, x), _outputs(model, x), atol=0, rtol=0)
    assert same is not model


def test_pooled_shapes_and_values():
    model = _randomised(DecoderLM(_cfg(n_kv_heads=4, bias=True)))
    new = convert_kv_heads(model, 2)
    assert new.cfg.n_kv_heads == 2 and new.cfg.attention_kind == "GQA"
    D = model.cfg.head_dim
    for old, conv in zip(model.decoder.layers, new.decoder.layers, strict=True):
        for proj in ("k_proj", "v_proj"):
            w, b = getattr(old.self_attn, proj).weight, getattr(old.self_attn, proj).bias
            heads_w = [w[h * D:(h + 1) * D] for h in range(4)]  # (D, C) each
            heads_b = [b[h * D:(h + 1) * D] for h in range(4)]
            expect_w = torch.cat([(heads_w[0] + heads_w[1]) / 2, (heads_w[2] + heads_w[3]) / 2])
            expect_b = torch.cat([(heads_b[0] + heads_b[1]) / 2, (heads_b[2] + heads_b[3]) / 2])
            assert getattr(conv.self_attn, proj).weight.shape == (2 * D, 32)
            torch.testing.assert_close(getattr(conv.self_attn, proj).weight, expect_w)
            torch.testing.assert_close(getattr(conv.self_attn, proj).bias, expect_b)
        torch.testing.assert_close(conv.self_attn.q_proj.weight, old.self_attn.q_proj.weight)
        torch.testing.assert_close(conv.ff.fc1.weight, old.ff.fc1.weight)


def test_mha_to_mqa_matches_explicit_reference():
    """Every query head attends to the mean of all key heads' keys and values."""
    model = _randomised(DecoderLM(_cfg(n_layers=1, bias=True, positions="none",
                                       norm_place="pre", d_model=16, n_heads=4)))
    attn = convert_kv_heads(model, 1).decoder.layers[0].self_attn
    old = model.decoder.layers[0].self_attn
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    H, D = 4, 4
    q = (x @ old.q_proj.weight.double().T + old.q_proj.bias.double()).view(2, 5, H, D)
    k = (x @ old.k_proj.weight.double().T + old.k_proj.bias.double()).view(2, 5, H, D).mean(2)
    v = (x @ old.v_proj.weight.double().T + old.v_proj.bias.double()).view(2, 5, H, D).mean(2)
    scores = torch.einsum("bthd,bsd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    heads = torch.einsum("bhts,bsd->bthd", scores.softmax(-1), v).reshape(2, 5, 16)
    ref = heads @ old.out_proj.weight.double().T + old.out_proj.bias.double()
    with torch.no_grad():
        ours = attn.double()(x, causal=True)
    assert attn.n_kv_heads == 1 and attn.k_proj.weight.shape == (4, 16)
    torch.testing.assert_close(ours, ref)


def test_encoder_decoder_converts_cross_attention_too():
    model = _randomised(EncoderDecoder(_cfg()))
    new = convert_kv_heads(model, 1)
    layer = new.decoder.layers[0]
    assert layer.cross_attn.k_proj.weight.shape == (8, 32)
    assert new.encoder.layers[1].self_attn.v_proj.weight.shape == (8, 32)
    assert kv_bytes_per_token(new) * 4 == kv_bytes_per_token(model)


@pytest.mark.parametrize("n, match", [(3, "n_kv_heads=3 must divide the model's current "
                                          "n_kv_heads=4"),
                                      (0, "n_kv_heads=0 must divide"),
                                      (8, "n_kv_heads=8 must divide")])
def test_bad_number_of_kv_heads(n, match):
    with pytest.raises(ValueError, match=match):
        convert_kv_heads(DecoderLM(_cfg()), n)


def test_not_a_qkv_model():
    with pytest.raises(ValueError, match="cannot convert a Linear"):
        convert_kv_heads(torch.nn.Linear(2, 2), 1)


# ----------------------------------------------------------------------- uptraining


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_uptrain_lowers_the_loss_and_trains_only_what_it_is_told():
    model = tiny_lm()
    ids = torch.tensor([5, 9, 13, 17, 21, 25, 29, 33] * 20)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = uptrain(model, ids, 30, lr=3e-3, batch_size=4, seq_len=16, warmup=3, params="kv")
    assert losses[-1] < losses[0] - 1.0
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".k_proj." in n or ".v_proj." in n), n


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=100), "seq_len=100 exceeds max_seq_len=64"),
    (dict(params="mlp"), "params='mlp' is not one of all, attention, kv"),
    (dict(steps=0), r"need steps \(0\)"),
])
def test_uptrain_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        uptrain(tiny_lm(), torch.arange(200), **{"steps": 1, "seq_len": 16, **kw})


def test_uptrain_text_too_short():
    with pytest.raises(ValueError, match="the text has 10 tokens, fewer than seq_len"):
        uptrain(tiny_lm(), torch.arange(10), 1, seq_len=16)


# ------------------------------------------------------------------------- commands


@pytest.fixture
def lm_dir(tmp_path):
    return P.Pretrained(tiny_lm(), byte_tokenizer(), eos_id=0).save(tmp_path / "lm")


def test_convert_command_keeps_the_tokenizer(lm_dir, tmp_path, capsys):
    out = tmp_path / "mqa"
    assert main(["convert", "--kv-heads", "1", str(lm_dir), str(out)]) == 0
    assert "1 key/value heads (MQA)" in capsys.readouterr().out
    new, old = checkpoint.load(out), checkpoint.load(lm_dir)
    assert new.cfg == old.cfg.replace(n_kv_heads=1)
    torch.testing.assert_close(new.decoder.layers[0].self_attn.k_proj.weight,
                               pool_heads(old.decoder.layers[0].self_attn.k_proj.weight, 2, 1))
    assert checkpoint.read_file(out, "tokenizer") == checkpoint.read_file(lm_dir, "tokenizer")
    assert checkpoint.read_metadata(out)["converted_from"] == str(lm_dir)


def test_convert_command_errors(lm_dir, tmp_path, capsys):
    assert main(["convert", "--kv-heads", "3", str(lm_dir), str(tmp_path / "o")]) == 2
    assert "n_kv_heads=3 must divide the model's current n_kv_heads=2" in capsys.readouterr().err
    assert main(["convert", "--kv-heads", "1", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "not a known model name" in capsys.readouterr().err


def test_uptrain_command_saves_a_checkpoint(lm_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 40)
    out = tmp_path / "up"
    argv = ["uptrain", str(lm_dir), str(text), "--steps", "3", "--out", str(out),
            "--seq-len", "16", "--batch-size", "2", "--checkpoint-every", "2"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "step 3/3 loss" in log and "saved" in log and log.count("saved") == 2
    assert checkpoint.read_metadata(out)["step"] == 3
    assert P.load_pretrained(out).encode("hello") == P.load_pretrained(lm_dir).encode("hello")


def test_uptrain_command_errors(lm_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hi\n")
    base = ["uptrain", str(lm_dir), str(text), "--steps", "2", "--out", str(tmp_path / "o")]
    assert main(base + ["--seq-len", "16"]) == 2
    assert "fewer than seq_len + 2 = 18" in capsys.readouterr().err
    assert main(base + ["--fraction", "1:0"]) == 2
    assert "'1:0' needs 0 <= start < end <= 1" in capsys.readouterr().err
