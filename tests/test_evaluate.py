"""sacreBLEU scores and the `qkv evaluate` command."""

from __future__ import annotations

import gzip
import json

import pytest
import sacrebleu
import torch
from torch import nn

import qkv
from qkv import EncoderDecoder, preset
from qkv.cli import main
from qkv.evaluate import bleu, bleu_difference, read_lines
from qkv.tokenizer import to_bytes, train_bpe
from qkv.translate import translate_lines

pytestmark = pytest.mark.usefixtures("one_thread")


REFS = ["a man rides a brown horse on the beach .", "two dogs play together in the snow .",
        "a woman is reading a book in the park ."]
HYPS = ["a man rides a horse on the beach .", "two dogs are playing in snow .",
        "A woman reads a book in a park ."]


def test_bleu_matches_sacrebleu():
    scores = bleu(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < scores["bleu"] < 100 and scores["sentences"] == 3
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|")
    assert "tok:13a" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1|case:mixed|")
    assert scores["bleu_line"].startswith("BLEU|nrefs:1|case:mixed")


def test_identical_is_100_and_lowercase_ignores_case():
    assert bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)
    assert bleu(REFS, REFS)["chrf"] == pytest.approx(100.0)
    upper = [r.upper() for r in REFS]
    assert bleu(upper, REFS)["bleu"] < 5
    lower = bleu(upper, REFS, lowercase=True)
    assert lower["bleu"] == pytest.approx(100.0)
    assert "case:lc" in lower["bleu_signature"] and "case:lc" in lower["chrf_signature"]


def test_bleu_rejects_misaligned():
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        bleu(HYPS[:2], REFS)


@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_difference_is_sacrebleu_on_every_draw(lowercase):
    """The paired bootstrap against a brute-force one: sacreBLEU's corpus BLEU of both
    systems on each draw of sentences (same generator), then the same quantiles."""
    refs, hyps, base = REFS * 3, HYPS * 2 + REFS, [h.upper() for h in HYPS] + HYPS * 2
    got = bleu_difference(hyps, base, refs, lowercase=lowercase, resamples=40, seed=3)
    draws = torch.randint(len(refs), (40, len(refs)), generator=torch.Generator().manual_seed(3))

    def score(sents, pick):
        return sacrebleu.corpus_bleu([sents[i] for i in pick], [[refs[i] for i in pick]],
                                     lowercase=lowercase).score

    deltas = torch.tensor([score(hyps, d.tolist()) - score(base, d.tolist()) for d in draws],
                          dtype=torch.float64)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert got["delta_95"] == pytest.approx((float(low), float(high)), abs=1e-9)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs],
                                                              lowercase=lowercase).score)
    assert got["delta"] == pytest.approx(got["bleu"] - got["baseline_bleu"])
    assert got["delta"] > 0 and got["resamples"] == 40


def test_bleu_difference_edges():
    same = bleu_difference(HYPS, HYPS, REFS, resamples=50)
    assert same["delta"] == 0 and same["delta_95"] == (0.0, 0.0)
    perfect = bleu_difference(REFS * 5, HYPS * 5, REFS * 5, resamples=50)  # wins every draw
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["delta_95"][0] > 0
    assert bleu_difference(HYPS, REFS, REFS, seed=1) == bleu_difference(HYPS, REFS, REFS, seed=1)
    with pytest.raises(ValueError, match="3 hypotheses, 2 baseline lines and 3 references"):
        bleu_difference(HYPS, HYPS[:2], REFS)
    with pytest.raises(ValueError, match="resamples=0 must be >= 1"):
        bleu_difference(HYPS, HYPS, REFS, resamples=0)
    with pytest.raises(ValueError, match="no sentences to compare"):
        bleu_difference([], [], [])


def test_read_lines(tmp_path):
    plain, packed, bad = tmp_path / "a.txt", tmp_path / "a.txt.gz", tmp_path / "bad.txt"
    plain.write_text("one\ntwo\n\nfour\n", encoding="utf-8")
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_lines(plain) == read_lines(packed) == ["one", "two", "", "four"]
    odd = tmp_path / "odd.txt"  # only "\n" ends a line: U+2028, U+0085, \x1c stay inside it
    odd.write_text("a\u2028b\n\u0085c\x1cd\n", encoding="utf-8")
    assert read_lines(odd) == ["a\u2028b", "\u0085c\x1cd"]
    bad.write_bytes(b"fine\nalso fine\n\xff broken\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: invalid UTF-8"):
        read_lines(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        read_lines(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random translation model and aligned src/ref files (ref = its own output)."""
    root = tmp_path_factory.mktemp("eval")
    tok = train_bpe(REFS * 4, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = EncoderDecoder(preset("tiny", vocab_size=tok.get_vocab_size(),
                                  tie_embeddings=False))
    nn.init.normal_(model.lm_head.weight, std=0.5)
    qkv.save(model, root / "model", files={"tokenizer": to_bytes(tok)})
    (root / "src.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    own = translate_lines(model.eval(), tok, REFS, beam=2)
    (root / "own.txt").write_text("\n".join(own) + "\n", encoding="utf-8")
    (root / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    (root / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    (root / "short.txt").write_text("\n".join(REFS[:2]) + "\n", encoding="utf-8")
    return root


def test_evaluate_cli_model_against_its_own_output(files, capsys):
    status = main(["evaluate", "--model", str(files / "model"), "--src", str(files / "src.txt"),
                   "--ref", str(files / "own.txt"), "--beam", "2", "--json",
                   "--output", str(files / "out.txt")])
    out = capsys.readouterr().out
    assert status == 0
    scores = json.loads(out)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["beam"] == 2 and scores["sentences_per_second"] > 0
    assert (files / "out.txt").read_text(encoding="utf-8") == (files / "own.txt").read_text(
        encoding="utf-8")


def test_evaluate_cli_prints_signatures_and_speed(files, capsys):
    status = main(["evaluate", "--model", str(files / "model"), "--src", str(files / "src.txt"),
                   "--ref", str(files / "ref.txt"), "--beam", "1", "--lowercase"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and len(lines) == 3
    assert lines[0].startswith("BLEU|nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:")
    assert lines[1].startswith("chrF2|nrefs:1|case:lc|")
    assert lines[2].startswith("decoding: 3 sentences in ") and "(beam 1," in lines[2]


def test_evaluate_cli_scores_a_hypothesis_file(files, capsys):
    status = main(["evaluate", "--hyp", str(files / "hyp.txt"), "--ref", str(files / "ref.txt")])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    expected = bleu(HYPS, REFS)
    assert lines == [expected["bleu_line"], expected["chrf_line"]]
    status = main(["evaluate", "--hyp", str(files / "ref.txt"), "--ref", str(files / "ref.txt"),
                   "--lowercase"])
    out = capsys.readouterr().out
    assert status == 0 and "BLEU|nrefs:1|case:lc" in out and "= 100.00" in out


def test_evaluate_cli_compares_with_a_baseline(files, capsys):
    args = ["evaluate", "--hyp", str(files / "ref.txt"), "--ref", str(files / "ref.txt"),
            "--baseline", str(files / "hyp.txt"), "--resamples", "30"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    diff = bleu_difference(REFS, HYPS, REFS, resamples=30)
    low, high = diff["delta_95"]
    assert lines[2] == (f"BLEU - baseline BLEU ({diff['baseline_bleu']:.2f}) = "
                        f"{diff['delta']:+.2f}, 95% paired bootstrap interval [{low:+.2f}, "
                        f"{high:+.2f}] over 3 sentences (30 draws)")
    assert main([*args, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["bleu_delta"] == pytest.approx(diff["delta"]) and scores["resamples"] == 30
    assert scores["bleu_delta_95"] == pytest.approx(list(diff["delta_95"]))


@pytest.mark.parametrize("args, match", [
    (["--hyp", "short.txt", "--ref", "ref.txt"], "short.txt has 2 lines but"),
    (["--hyp", "hyp.txt", "--ref", "ref.txt", "--baseline", "short.txt"],
     "short.txt has 2 lines but"),
    (["--model", "model", "--src", "src.txt", "--ref", "ref.txt", "--baseline", "hyp.txt",
      "--resamples", "0"], "--resamples=0 must be >= 1"),
    (["--hyp", "hyp.txt", "--ref", "ref.txt", "--baseline", "missing.txt"],
     "missing.txt: no such file"),
    (["--model", "model", "--src", "short.txt", "--ref", "ref.txt"], "short.txt has 2 lines"),
    (["--hyp", "missing.txt", "--ref", "ref.txt"], "missing.txt: no such file"),
    (["--hyp", "hyp.txt", "--ref", "missing.txt"], "missing.txt: no such file"),
    (["--model", "model", "--src", "missing.txt", "--ref", "ref.txt"], "missing.txt: no such"),
    (["--ref", "ref.txt"], "give either --model DIR with --src FILE, or --hyp FILE"),
    (["--model", "model", "--hyp", "hyp.txt", "--ref", "ref.txt"], "give either --model"),
    (["--model", "model", "--ref", "ref.txt"], "--model needs --src FILE"),
    (["--model", "model", "--src", "src.txt", "--ref", "ref.txt", "--beam", "0"],
     "--beam=0 must be >= 1"),
    (["--model", "nope", "--src", "src.txt", "--ref", "ref.txt"], "no such file"),
])
def test_evaluate_cli_errors(files, capsys, args, match):
    args = [a if a.startswith("--") or a.isdigit() else str(files / a) for a in args]
    status = main(["evaluate", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("qkv: error:") and match in err, err


# ------------------------------------------- review s9: defaults, input text, errors


def test_evaluate_cli_defaults_to_the_saved_decoding_section(files, tmp_path, capsys):
    model, tok = qkv.load(files / "model"), qkv.tokenizer.load_tokenizer(files / "model")
    qkv.save(model, tmp_path / "saved", files={"tokenizer": to_bytes(tok)},
             metadata={"decoding": {"beam": 2, "alpha": 1.5, "batch_size": 64}})
    args = ["evaluate", "--src", str(files / "src.txt"), "--ref", str(files / "ref.txt"),
            "--json"]
    assert main([*args, "--model", str(tmp_path / "saved")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert (scores["beam"], scores["alpha"]) == (2, 1.5)
    assert main([*args, "--model", str(tmp_path / "saved"), "--beam", "1", "--alpha", "0"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert (scores["beam"], scores["alpha"]) == (1, 0.0)
    assert main([*args, "--model", str(files / "model"), "--max-extra", "3"]) == 0
    scores = json.loads(capsys.readouterr().out)  # nothing saved: the documented defaults
    assert (scores["beam"], scores["alpha"]) == (4, 0.6)


def test_evaluate_cli_drops_a_byte_order_mark(files, tmp_path, capsys, monkeypatch):
    bom = tmp_path / "bom.txt"
    bom.write_text("\ufeff" + "\n".join(REFS) + "\n", encoding="utf-8")
    for hyp, ref in ((files / "ref.txt", bom), (bom, files / "ref.txt")):
        assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    seen = []
    monkeypatch.setattr("qkv.evaluate.translate_lines",
                        lambda model, tok, lines, **kw: seen.extend(lines) or list(lines))
    assert main(["evaluate", "--model", str(files / "model"), "--src", str(bom), "--ref",
                 str(files / "ref.txt")]) == 0
    assert seen == REFS


def test_bleu_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no sentences to score"):
        bleu([], [])


def test_evaluate_cli_rejects_empty_files(files, tmp_path, capsys):
    (tmp_path / "e.en").write_text("", encoding="utf-8")
    (tmp_path / "e.de").write_text("", encoding="utf-8")
    status = main(["evaluate", "--hyp", str(tmp_path / "e.en"), "--ref", str(tmp_path / "e.de")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == (f"qkv: error: {tmp_path / 'e.de'} is empty; expected one reference line "
                   f"per sentence\n")


@pytest.mark.parametrize("output, match", [
    (".", "is a folder; expected a file to write"),
    ("missing/hyps.txt", "does not exist"),
])
def test_evaluate_cli_checks_output_before_translating(files, tmp_path, capsys, monkeypatch,
                                                       output, match):
    def fail(*args, **kwargs):
        raise AssertionError("translated although --output cannot be written")

    monkeypatch.setattr("qkv.evaluate.translate_lines", fail)
    output = str(tmp_path / output)
    status = main(["evaluate", "--model", str(files / "model"), "--src", str(files / "src.txt"),
                   "--ref", str(files / "ref.txt"), "--output", output])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"qkv: error: --output={output}") and match in err, err
