"""What the training tasks say about the data they read: skipped pairs, empty sets, and the
file and line of an example over the token limit."""

from __future__ import annotations

import pytest

from qkv.data import DataError
from qkv.tasks import ClassificationTask, LMTask, TranslationTask
from qkv.tokenizer import train_bpe
from qkv.trainconfig import parse_config

WORDS = "the cat sees a dog and the man likes red ball".split()


def _write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([" ".join(WORDS)] * 4, 40)


def _task(tmp_path, tok, data: str, max_seq_len: int = 64, task=TranslationTask):
    cfg = parse_config(f"[data]\n{data}\n", tmp_path)
    return task(cfg, tok, max_seq_len)


def _pairs(tmp_path, name: str, src: list[str], tgt: list[str]) -> str:
    """`train = [...]`-style value for two files tmp_path/name.en and .de."""
    return f'["{_write(tmp_path / f"{name}.en", src)}", "{_write(tmp_path / f"{name}.de", tgt)}"]'


def test_skipped_pairs_are_counted_on_stderr(tmp_path, tok, capsys):
    src = ["the cat"] * 6
    src[3], src[4] = "", "the cat sees a dog and the man"
    train = _pairs(tmp_path, "t", src, ["the dog"] * 6)
    valid = _pairs(tmp_path, "v", ["the cat", "a dog"], ["the dog", ""])
    task = _task(tmp_path, tok, f"train = {train}\nvalid = {valid}\n"
                 "skip_empty = true\nmax_chars = 20\nskip_long = true")
    assert len(task.src) == 4 and len(task.vsrc) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"qkv: data.train: skipped 1 empty pair(s) (first at {tmp_path}/t.en:4) and 1 pair(s) "
        f"longer than max_chars=20 (first at {tmp_path}/t.en:5)",
        f"qkv: data.valid: skipped 1 empty pair(s) (first at {tmp_path}/v.de:2)",
    ]


def test_nothing_skipped_says_nothing(tmp_path, tok, capsys):
    _task(tmp_path, tok, f"train = {_pairs(tmp_path, 't', ['the cat'], ['the dog'])}")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("lines", [[], ["", " "]], ids=["empty files", "blank lines"])
def test_empty_valid_set_fails_when_read(tmp_path, tok, lines):
    train = _pairs(tmp_path, "t", ["the cat"], ["the dog"])
    valid = _pairs(tmp_path, "v", lines, lines)
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f"train = {train}\nvalid = {valid}")
    assert str(e.value) == f"data.valid: no sentence pairs in {tmp_path}/v.en / {tmp_path}/v.de"


def test_empty_train_set_fails_when_read(tmp_path, tok):
    train = _pairs(tmp_path, "t", ["", "the cat"], ["the dog", ""])
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f"train = {train}\nskip_empty = true")
    assert str(e.value) == f"data.train: no sentence pairs in {tmp_path}/t.en / {tmp_path}/t.de"
    tsv = _write(tmp_path / "t.tsv", [])
    with pytest.raises(DataError, match=r"^data.train: no sentence pairs in .*t.tsv$"):
        _task(tmp_path, tok, f'train = ["{tsv}"]')


def test_empty_classification_and_lm_sets_fail_when_read(tmp_path, tok):
    sst = _write(tmp_path / "sst", ["1 the cat"])
    empty = _write(tmp_path / "empty", [])
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f'task = "classification"\ntrain = ["{sst}"]\nvalid = ["{empty}"]',
              task=lambda cfg, tok, n: ClassificationTask(cfg, tok, n, "qkv"))
    assert str(e.value) == f"data.valid: no labelled sentences in {empty}"
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f'task = "lm"\ntrain = ["{empty}"]', task=LMTask)
    assert str(e.value) == f"data.train: no text in {empty}"


def _long_at_line_10(tmp_path):
    """Ten pairs: an empty source at line 4 and a 48-word target at line 10."""
    src, tgt = ["the cat"] * 10, ["the dog"] * 10
    src[3], tgt[9] = "", " ".join(["cat"] * 48)
    return _pairs(tmp_path, "el", src, tgt)


def test_token_limit_error_names_file_and_line(tmp_path, tok):
    train = _long_at_line_10(tmp_path)
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f"train = {train}\nskip_empty = true", max_seq_len=40)
    assert str(e.value) == (f"data.train: 1 example(s) longer than max_seq_len=40 tokens, first "
                            f"at {tmp_path}/el.de:10 (set data.skip_long to drop)")


def test_token_limit_drop_names_file_and_line(tmp_path, tok, capsys):
    train = _long_at_line_10(tmp_path)
    task = _task(tmp_path, tok, f"train = {train}\nskip_empty = true\nskip_long = true",
                 max_seq_len=40)
    assert len(task.src) == 8
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"qkv: data.train: dropped 1 example(s) longer than max_seq_len=40 tokens, first at "
        f"{tmp_path}/el.de:10")
    one = _pairs(tmp_path, "one", [" ".join(["cat"] * 48)], ["the dog"])
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f"train = {one}\nskip_long = true", max_seq_len=40)
    assert str(e.value) == (f"data.train: all 1 example(s) are longer than max_seq_len=40 "
                            f"tokens, first at {tmp_path}/one.en:1")


def test_classification_token_limit_names_file_and_line(tmp_path, tok):
    sst = _write(tmp_path / "sst", ["1 the cat", "0 " + " ".join(["cat"] * 48)])
    with pytest.raises(DataError) as e:
        _task(tmp_path, tok, f'task = "classification"\ntrain = ["{sst}"]', max_seq_len=40,
              task=lambda cfg, tok, n: ClassificationTask(cfg, tok, n, "qkv"))
    assert str(e.value) == (f"data.train: 1 example(s) longer than max_seq_len=40 tokens, first "
                            f"at {sst}:2 (set data.skip_long to drop)")
