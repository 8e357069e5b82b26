"""Corpus readers, Multi30k copy/download, and token-count batching."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from qkv import data
from qkv.cli import main


def _write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------ readers


def test_read_parallel_two_files_and_gzip(tmp_path):
    src = _write(tmp_path / "a.en", ["a cat", "a dog"])
    with gzip.open(tmp_path / "a.de.gz", "wt", encoding="utf-8") as f:
        f.write("eine Katze\nein Hund\n")
    corpus = data.read_parallel(src, tmp_path / "a.de.gz")
    assert (corpus.src, corpus.tgt) == (["a cat", "a dog"], ["eine Katze", "ein Hund"])


def test_read_parallel_tsv(tmp_path):
    tsv = _write(tmp_path / "c.tsv", ["a cat\teine Katze", "a dog\tein Hund"])
    corpus = data.read_parallel(tsv)
    assert corpus.tgt == ["eine Katze", "ein Hund"]
    bad = _write(tmp_path / "bad.tsv", ["a cat\teine Katze", "no tab here"])
    with pytest.raises(data.DataError, match=r"bad.tsv:2: expected 2 tab-separated columns"):
        data.read_parallel(bad)


def test_different_line_counts(tmp_path):
    src = _write(tmp_path / "a.en", ["one", "two", "three"])
    tgt = _write(tmp_path / "a.de", ["eins", "zwei"])
    with pytest.raises(data.DataError, match=r"a.en has 3 lines but .*a.de has 2"):
        data.read_parallel(src, tgt)


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "a.de").write_bytes(b"gut\nschl\xff\n")
    src = _write(tmp_path / "a.en", ["good", "bad"])
    with pytest.raises(data.DataError, match=r"a.de:2: invalid UTF-8"):
        data.read_parallel(src, tmp_path / "a.de")


def test_empty_lines_error_or_skip(tmp_path):
    src = _write(tmp_path / "a.en", ["one", "", "three"])
    tgt = _write(tmp_path / "a.de", ["eins", "zwei", "drei"])
    with pytest.raises(data.DataError, match=r"a.en:2: empty line"):
        data.read_parallel(src, tgt)
    corpus = data.read_parallel(src, tgt, skip_empty=True)
    assert corpus.src == ["one", "three"] and corpus.skipped["empty"] == 1


def test_long_lines_are_counted(tmp_path):
    src = _write(tmp_path / "a.en", ["short", "x" * 30, "y" * 40])
    tgt = _write(tmp_path / "a.de", ["kurz", "lang", "lang"])
    with pytest.raises(data.DataError, match=r"2 line\(s\) longer than max_chars=20, first at "
                                             r".*a.en:2"):
        data.read_parallel(src, tgt, max_chars=20)
    corpus = data.read_parallel(src, tgt, max_chars=20, skip_long=True)
    assert corpus.src == ["short"] and corpus.skipped["too_long"] == 2


def test_skipped_pairs_keep_line_numbers(tmp_path):
    src = _write(tmp_path / "a.en", ["one", "", "x" * 30, "four", "five"])
    tgt = _write(tmp_path / "a.de", ["eins", "zwei", "drei", "", "fuenf"])
    corpus = data.read_parallel(src, tgt, skip_empty=True, max_chars=20, skip_long=True)
    assert corpus.src == ["one", "five"] and corpus.lines == [1, 5]
    assert corpus.skipped == {"empty": 2, "too_long": 1}
    assert corpus.first_skipped == {"empty": f"{src}:2", "too_long": f"{src}:3"}
    assert corpus.where(1, 1) == f"{tmp_path / 'a.de'}:5"
    tsv = data.read_parallel(_write(tmp_path / "c.tsv", ["\tleer", "a\tb"]), skip_empty=True)
    assert tsv.where(0) == f"{tmp_path / 'c.tsv'} (column 1):2"
    assert tsv.first_skipped == {"empty": f"{tmp_path / 'c.tsv'} (column 1):1"}


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.en: no such file"):
        data.read_lines(tmp_path / "nope.en")


def test_read_sst2(tmp_path):
    ok = _write(tmp_path / "ok", ["1 a fine film", "0 a dull film ."])
    assert data.read_sst2(ok) == ([1, 0], ["a fine film", "a dull film ."])
    bad = _write(tmp_path / "bad", ["1 fine", "positive great"])
    with pytest.raises(data.DataError, match=r"bad:2: expected 'LABEL sentence' with LABEL 0 or 1"):
        data.read_sst2(bad)


# ------------------------------------------------------------------------ Multi30k


def test_data_get_multi30k_from_mirror(data_dir, tmp_path, capsys):
    dest = tmp_path / "m30k"
    assert main(["data", "get", "multi30k", "--dest", str(dest), "--from",
                 str(data_dir / "multi30k")]) == 0
    out = capsys.readouterr().out
    assert "train.en.gz\tverified" in out and "test_2016_flickr.de.gz\tverified" in out
    assert "train.fr.gz\tmissing in mirror" in out  # the shared mirror holds En/De only
    corpus = data.read_parallel(dest / "val.en.gz", dest / "val.de.gz")
    assert len(corpus) == 1014


def _fake_mirror(path, langs=("en",)):
    """A mirror holding every split of `langs`, none with the real content."""
    path.mkdir()
    for lang in langs:
        for split in data.MULTI30K_SPLITS:
            (path / f"{split}.{lang}.gz").write_bytes(gzip.compress(b"not the real file\n"))
    return path


def _sha256_mismatch(source, name="train.en.gz") -> str:
    got = hashlib.sha256(gzip.compress(b"not the real file\n")).hexdigest()
    return (f"qkv: error: {source}: sha256 {got} does not match the expected "
            f"{data.MULTI30K_SHA256[name]}\n")


def test_data_get_checksum_mismatch_names_the_mirror_file(tmp_path, capsys):
    mirror = _fake_mirror(tmp_path / "mirror")
    code = main(["data", "get", "multi30k", "--langs", "en", "--dest", str(tmp_path / "d"),
                 "--from", str(mirror)])
    assert code == 2
    assert capsys.readouterr().err == _sha256_mismatch(mirror / "train.en.gz")
    assert list((tmp_path / "d").iterdir()) == []


def test_data_get_checksum_mismatch_names_the_url(tmp_path, monkeypatch, capsys):
    mirror = _fake_mirror(tmp_path / "mirror")
    monkeypatch.setattr(data, "MULTI30K_URL", mirror.as_uri() + "/")
    code = main(["data", "get", "multi30k", "--langs", "en", "--dest", str(tmp_path / "d")])
    assert code == 2
    assert capsys.readouterr().err == _sha256_mismatch(mirror.as_uri() + "/train.en.gz")
    assert list((tmp_path / "d").iterdir()) == []


def test_data_get_requested_language_missing_in_mirror(tmp_path, capsys):
    mirror = _fake_mirror(tmp_path / "mirror")
    code = main(["data", "get", "multi30k", "--langs", "en,de", "--dest", str(tmp_path / "d"),
                 "--from", str(mirror)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"qkv: error: {mirror}: the mirror lacks train.de.gz, val.de.gz, "
        "test_2016_flickr.de.gz (asked for languages en,de)\n")
    assert not (tmp_path / "d").exists()  # nothing copied


def test_data_get_default_languages_take_what_the_mirror_has(tmp_path, capsys):
    mirror = _fake_mirror(tmp_path / "mirror", langs=("fr",))  # no Fr checksums: unverified
    dest = tmp_path / "d"
    assert main(["data", "get", "multi30k", "--dest", str(dest), "--from", str(mirror)]) == 0
    out = capsys.readouterr().out
    assert "train.en.gz\tmissing in mirror" in out and "val.fr.gz\tunverified" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"{split}.fr.gz" for split in data.MULTI30K_SPLITS)


@pytest.mark.parametrize("langs, message", [
    ("en,xx", "unknown Multi30k language 'xx'; choose from en, de, fr, cs"),
    (",", "no Multi30k language given; choose from en, de, fr, cs"),
])
def test_data_get_checks_languages_before_copying(tmp_path, capsys, langs, message):
    mirror = _fake_mirror(tmp_path / "mirror")
    code = main(["data", "get", "multi30k", "--langs", langs, "--dest", str(tmp_path / "d"),
                 "--from", str(mirror)])
    assert code == 2
    assert capsys.readouterr().err == f"qkv: error: {message}\n"
    assert not (tmp_path / "d").exists()


def test_data_get_download_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MULTI30K_URL", "http://127.0.0.1:9/multi30k/")
    code = main(["data", "get", "multi30k", "--langs", "en", "--dest", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot download http://127.0.0.1:9/multi30k/train.en.gz" in err
    assert "--from DIR" in err


def test_data_get_bad_mirror(tmp_path, capsys):
    assert main(["data", "get", "multi30k", "--from", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------------ batching


LENGTHS = [(i * 7) % 23 + 1 for i in range(200)]


def test_batches_cover_every_example_once_within_budget():
    b = data.TokenBatcher(LENGTHS, 60, seed=3)
    batches = b.batches(0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) * max(LENGTHS[i] for i in batch) <= 60


def test_batches_group_similar_lengths():
    b = data.TokenBatcher(LENGTHS, 60, seed=3)
    spread = [max(LENGTHS[i] for i in x) - min(LENGTHS[i] for i in x) for x in b.batches(0)]
    assert sum(spread) / len(spread) < 5  # random batches would spread over ~15


def test_batches_deterministic_per_seed_and_epoch():
    a, b = data.TokenBatcher(LENGTHS, 60, seed=3), data.TokenBatcher(LENGTHS, 60, seed=3)
    assert a.batches(1) == b.batches(1)
    assert a.batches(1) != a.batches(2)
    assert a.batches(1) != data.TokenBatcher(LENGTHS, 60, seed=4).batches(1)


def test_batches_resume_mid_epoch():
    b = data.TokenBatcher(LENGTHS, 60, seed=3)
    assert list(b.epoch(2, start=5)) == b.batches(2)[5:]


def test_batcher_rejects_examples_over_budget():
    with pytest.raises(ValueError, match=r"1 example\(s\) are longer than max_tokens=10"):
        data.TokenBatcher([3, 11, 4], 10)
