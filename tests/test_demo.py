"""`qkv demo`'s measurements and table, end to end on a tiny checkpoint (the real one takes
minutes)."""

from __future__ import annotations

import pytest

from qkv import pretrained as P
from qkv.attention import KVCache
from qkv.cli import main
from qkv.convert import convert_kv_heads
from qkv.demo import Row, decode_speed, format_table, measure
from qkv.generate import perplexity
from tests.test_generate import byte_tokenizer, tiny_lm


def test_measure_reports_cache_bytes_and_perplexity():
    model = tiny_lm()
    ids = list(range(5, 45))
    models = [("a", model), ("b", convert_kv_heads(model, 1))]
    rows = measure(models, ids, context=8, steps=2, batch=2, window=16, repeats=2)
    for row, (name, m) in zip(rows, models, strict=True):
        cfg = m.cfg
        assert row.name == name and row.n_kv_heads == cfg.n_kv_heads
        assert row.kv_bytes_per_token == KVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads,
                                                                 cfg.head_dim)
        assert row.perplexity == pytest.approx(perplexity(m, ids, window=16, stride=8))
        assert row.tokens_per_s > 0
    assert measure(models, None, context=8, steps=1, batch=1, window=16)[0].perplexity is None


def test_decode_speed_leaves_room_in_the_cache():
    assert decode_speed(tiny_lm(), context=60, steps=2, warmup=2) > 0
    with pytest.raises(ValueError, match="context 62 . 4 timed steps exceed max_seq_len=64"):
        decode_speed(tiny_lm(), context=62, steps=2, warmup=2)


def test_format_table():
    rows = [Row("original (GQA)", 3, 46080, 12.345, 20.5), Row("mqa", 1, 15360, 30.0, None)]
    table = format_table(rows, context=2048, batch=16).splitlines()
    assert table[0].startswith("| model | kv heads | KV cache bytes/token | KV cache at 2048")
    assert table[2] == "| original (GQA) | 3 | 46,080 | 1,440.0 MiB | 12.3 | 20.50 |"
    assert table[3] == "| mqa | 1 | 15,360 | 480.0 MiB | 30.0 | - |"


def test_demo_command_on_a_tiny_checkpoint(tmp_path, capsys):
    lm = P.Pretrained(tiny_lm(), byte_tokenizer(), eos_id=None).save(tmp_path / "lm")
    argv = ["demo", "--model", str(lm), "--context", "16", "--steps", "2", "--max-new-tokens",
            "3", "--prompt", "hello", "--also", str(lm), "--window", "32"]
    assert main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("hello")
    assert "[3/4] converting to 1 kv heads" in out.err
    assert [line.split(" | ")[1] for line in lines[-3:]] == ["2", "1", "2"]
    mqa_bytes = KVCache.bytes_per_token(2, 1, 8)
    assert lines[-2].startswith(f"| converted (MQA, no uptraining) | 1 | {mqa_bytes:,} |")
    quiet = ["demo", "--model", str(lm), "--context", "8", "--steps", "1", "--max-new-tokens",
             "0", "--no-perplexity"]
    assert main(quiet) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "" and lines[1].startswith("| model |") and lines[-1].endswith("| - |")


def test_demo_command_errors(tmp_path, capsys):
    lm = P.Pretrained(tiny_lm(), byte_tokenizer()).save(tmp_path / "lm")
    assert main(["demo", "--model", str(lm), "--context", "0"]) == 2
    assert "--context (0)" in capsys.readouterr().err
    assert main(["demo", "--model", str(lm), "--kv-heads", "3", "--context", "8"]) == 2
    assert "n_kv_heads=3 must divide" in capsys.readouterr().err
