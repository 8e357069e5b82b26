"""Attention maps: shapes and labels, rows sum to 1, known weights give known maps, PNGs."""

from __future__ import annotations

import struct

import pytest
import torch

from qkv import DecoderLM, EncoderClassifier, EncoderDecoder, preset
from qkv.cli import main
from qkv.pretrained import Pretrained
from qkv.tokenizer import BOS_ID, EOS_ID, train_bpe
from qkv.visualize import attention_maps, maps_from_ids, plot_attention

LINES = ["a man rides a horse", "ein mann reitet ein pferd", "two dogs play in the snow",
         "zwei hunde spielen im schnee", "a woman reads a book", "eine frau liest ein buch"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(LINES * 3, vocab_size=80, min_frequency=1)


def _cfg(tok, **kw):
    return preset("tiny", vocab_size=tok.get_vocab_size(), **kw)


def _zero_queries(model):
    """q = 0 makes every score 0: attention is uniform over the keys a query may see."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name:
                p.zero_()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_translation_maps_shapes_labels_and_rows_sum_to_one(tok):
    model = EncoderDecoder(_cfg(tok))
    maps = attention_maps(model, tok, "a man rides a horse", target="ein mann reitet",
                          layer=-1)
    assert [m.kind for m in maps] == ["encoder self-attention", "decoder self-attention",
                                      "cross-attention"]
    by_kind = {m.kind: m for m in maps}
    src_n = len(tok.encode("a man rides a horse").ids) + 1  # + eos
    tgt_n = len(tok.encode("ein mann reitet").ids) + 1
    H = model.cfg.n_heads
    assert by_kind["encoder self-attention"].probs.shape == (H, src_n, src_n)
    assert by_kind["decoder self-attention"].probs.shape == (H, tgt_n, tgt_n)
    cross = by_kind["cross-attention"]
    assert cross.probs.shape == (H, tgt_n, src_n)
    assert cross.queries[-1] == "<eos>" and cross.keys[-1] == "<eos>"
    assert by_kind["decoder self-attention"].keys[0] == "<bos>"
    assert {m.layer for m in maps} == {model.cfg.n_layers - 1}
    for m in maps:
        torch.testing.assert_close(m.probs.sum(-1), torch.ones(m.probs.shape[:2]))


def test_zero_queries_give_uniform_attention_over_allowed_keys(tok):
    model = EncoderDecoder(_cfg(tok))
    _zero_queries(model)
    S, T = 5, 4
    src = torch.randint(4, model.cfg.vocab_size, (S,)).tolist()
    tgt = [BOS_ID] + torch.randint(4, model.cfg.vocab_size, (T - 1,)).tolist()
    maps = maps_from_ids(model, src, tgt, layer=None)
    assert len(maps) == 3 * model.cfg.n_layers
    H = model.cfg.n_heads
    causal = torch.tril(torch.ones(T, T))
    expected = {"encoder self-attention": torch.full((H, S, S), 1 / S),
                "cross-attention": torch.full((H, T, S), 1 / S),
                "decoder self-attention": (causal / causal.sum(1, keepdim=True)).expand(H, T, T)}
    for _, kind, _, probs in maps:
        torch.testing.assert_close(probs, expected[kind])


def test_language_model_and_classifier_maps(tok):
    lm = DecoderLM(_cfg(tok, positions="rope", norm_place="pre", norm="rmsnorm"))
    _zero_queries(lm)  # RoPE rotates a zero query to zero: still uniform
    (m,) = attention_maps(lm, tok, "two dogs play", layer=0)
    T = len(tok.encode("two dogs play").ids)
    causal = torch.tril(torch.ones(T, T))
    torch.testing.assert_close(m.probs, (causal / causal.sum(1, keepdim=True)).expand_as(m.probs))
    assert m.kind == "self-attention" and m.queries == m.keys
    clf = EncoderClassifier(_cfg(tok))
    (c,) = attention_maps(clf, tok, "two dogs play")
    torch.testing.assert_close(c.probs.sum(-1), torch.ones(c.probs.shape[:2]))


def test_plot_writes_png_grid_and_single_head(tok, tmp_path):
    model = EncoderDecoder(_cfg(tok))
    maps = attention_maps(model, tok, "a man rides", target="ein mann", layer=0)
    grid = plot_attention(maps, tmp_path / "grid.png")
    one = plot_attention(maps, tmp_path / "one.png", head=1)
    (gw, gh), (ow, oh) = _png_size(grid), _png_size(one)
    assert 300 <= gw <= 4000 and 200 <= gh <= 4000
    assert gw > 2 * ow and gh == oh  # every head in a row vs one head


def _save(model, tok, directory):
    Pretrained(model, tok, EOS_ID, BOS_ID).save(directory)
    return str(directory)


def test_cli_translation_map(tok, tmp_path, capsys):
    d = _save(EncoderDecoder(_cfg(tok, max_seq_len=16)), tok, tmp_path / "mt")
    out = tmp_path / "map.png"
    assert main(["attention-map", "--model", d, "a man rides a horse", "--head", "0",
                 "-o", str(out)]) == 0
    assert "target (greedy)" in capsys.readouterr().out
    _png_size(out)


def test_cli_errors(tok, tmp_path, capsys):
    d = _save(DecoderLM(_cfg(tok)), tok, tmp_path / "lm")
    png = str(tmp_path / "x.png")
    cases = [(["--layer", "7"], "layer 7 is out of range: the model has 2 layers"),
             (["--head", "4"], "head 4 is out of range: the model has 4 heads"),
             (["--target", "ein mann"], "only applies to translation models"),
             (["-o", str(tmp_path / "x.jpg")], "must end in .png")]
    for extra, message in cases:
        argv = ["attention-map", "--model", d, "a man", "-o", png, *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["attention-map", "--model", d, "  ", "-o", png]) == 2
    assert "empty" in capsys.readouterr().err
