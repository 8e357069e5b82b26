"""Corpora and batches: parallel text (two aligned files or a TSV), SST-2, Multi30k download,
and token-count batching that is deterministic given (seed, epoch) and resumable mid-epoch.

Every reading error is a `DataError` (a ValueError) naming the file and the line.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad corpus input: the message names the file and line."""


# ------------------------------------------------------------------- reading text


def _open_bytes(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


BOM = "\ufeff"  # a UTF-8 byte order mark, which some editors write at the start of a file


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (gzip if it ends in .gz), without line ends, and
    without the byte order mark some editors write first (it would be a token of its own)."""
    path = Path(path)
    lines = []
    with _open_bytes(path) as f:
        try:
            for i, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{i}: invalid UTF-8 ({e.reason} at byte {e.start})"
                    ) from None
        except (gzip.BadGzipFile, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if lines:
        lines[0] = lines[0].removeprefix(BOM)
    return lines


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs with their 1-based line numbers, the names of the two columns
    (files, or a TSV's columns), and how many pairs were dropped, why, and where first."""

    src: list[str]
    tgt: list[str]
    lines: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "file:line"

    def __len__(self) -> int:
        return len(self.src)

    def where(self, i: int, column: int = 0) -> str:
        """`file:line` of pair i in column 0 (source) or 1 (target)."""
        return f"{self.names[column]}:{self.lines[i]}"


def _split_tsv(path: Path) -> tuple[list[str], list[str]]:
    src, tgt = [], []
    for i, line in enumerate(read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{i}: expected 2 tab-separated columns, found {len(parts)}")
        src.append(parts[0])
        tgt.append(parts[1])
    return src, tgt


def read_parallel(src: str | os.PathLike, tgt: str | os.PathLike | None = None, *,
                  skip_empty: bool = False, max_chars: int = 0,
                  skip_long: bool = False) -> ParallelCorpus:
    """Pairs from two aligned files, or from one TSV file (source TAB target) when tgt is None.

    Empty lines are an error unless skip_empty (the pair is dropped). Lines longer than
    max_chars (0: no limit) are an error that counts them, unless skip_long.
    """
    paths = [Path(src)] if tgt is None else [Path(src), Path(tgt)]
    if tgt is None:
        columns = _split_tsv(paths[0])
        names = [f"{paths[0]} (column 1)", f"{paths[0]} (column 2)"]
    else:
        columns = (read_lines(paths[0]), read_lines(paths[1]))
        names = [str(p) for p in paths]
        if len(columns[0]) != len(columns[1]):
            raise DataError(f"{paths[0]} has {len(columns[0])} lines but {paths[1]} has "
                            f"{len(columns[1])}; parallel files must be aligned line by line")
    return _filter(columns, names, skip_empty, max_chars, skip_long)


def _filter(columns, names, skip_empty, max_chars, skip_long) -> ParallelCorpus:
    out = ParallelCorpus([], [], names=names)
    first = out.first_skipped
    empty = long = 0
    for i, (s, t) in enumerate(zip(*columns, strict=True), 1):
        if not s.strip() or not t.strip():
            name = names[0] if not s.strip() else names[1]
            if not skip_empty:
                raise DataError(f"{name}:{i}: empty line (use skip_empty to drop such pairs)")
            empty += 1
            first.setdefault("empty", f"{name}:{i}")
            continue
        if max_chars and max(len(s), len(t)) > max_chars:
            long += 1
            first.setdefault("too_long", f"{names[0 if len(s) > max_chars else 1]}:{i}")
            continue
        out.src.append(s)
        out.tgt.append(t)
        out.lines.append(i)
    if long and not skip_long:
        raise DataError(f"{long} line(s) longer than max_chars={max_chars}, first at "
                        f"{first['too_long']} (raise the limit or use skip_long to drop them)")
    out.skipped = {"empty": empty, "too_long": long}
    return out


def read_sst2(path: str | os.PathLike) -> tuple[list[int], list[str]]:
    """Labels and sentences from SST-2 lines `LABEL sentence` (LABEL 0 negative, 1 positive)."""
    labels, texts = [], []
    for i, line in enumerate(read_lines(path), 1):
        label, _, text = line.partition(" ")
        if label not in ("0", "1") or not text.strip():
            raise DataError(f"{path}:{i}: expected 'LABEL sentence' with LABEL 0 or 1, "
                            f"got {line[:40]!r}")
        labels.append(int(label))
        texts.append(text.strip())
    return labels, texts


# ------------------------------------------------------------------------ Multi30k

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("en", "de", "fr", "cs")
# sha256 of the En/De files, computed from the offline copies in ../shared/data/multi30k.
# Fr/Cs could not be checksummed offline: they are downloaded and copied unverified.
MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, name: str, source) -> bool:
    """True if checked, False if no checksum is known; DataError naming `source` (the mirror
    file or URL that `path` came from) on a mismatch."""
    expected = MULTI30K_SHA256.get(name)
    if expected is None:
        return False
    got = _sha256(path)
    if got != expected:
        raise DataError(f"{source}: sha256 {got} does not match the expected {expected}")
    return True


def _fetch(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(target, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        target.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({e}); without network, copy from an offline "
                        f"mirror with --from DIR") from None


def _multi30k_names(langs: Sequence[str]) -> list[str]:
    """The file names of `langs`, after checking every language (before any copying)."""
    if not langs:
        raise DataError(f"no Multi30k language given; choose from {', '.join(MULTI30K_LANGS)}")
    for lang in langs:
        if lang not in MULTI30K_LANGS:
            raise DataError(f"unknown Multi30k language {lang!r}; choose from "
                            f"{', '.join(MULTI30K_LANGS)}")
    return [f"{split}.{lang}.gz" for lang in langs for split in MULTI30K_SPLITS]


def get_multi30k(dest: str | os.PathLike, from_dir: str | os.PathLike | None = None,
                 langs: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Download (or copy from `from_dir`) Multi30k task 1 raw files into `dest`.

    Returns (file name, "verified" | "unverified" | "missing in mirror") per file. With
    langs=None (all languages) a mirror may lack some; the files it has are copied and
    checked. Languages named in `langs` must be complete in the mirror.
    """
    names = _multi30k_names(MULTI30K_LANGS if langs is None else langs)
    if from_dir is not None and langs is not None:
        missing = [n for n in names if not (Path(from_dir) / n).is_file()]
        if missing:
            raise DataError(f"{from_dir}: the mirror lacks {', '.join(missing)} (asked for "
                            f"languages {','.join(langs)})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return [_get_one(name, dest, from_dir) for name in names]


def _get_one(name: str, dest: Path, from_dir) -> tuple[str, str]:
    """Copy or download `name` to a .part file, check it, then move it into place."""
    target = dest / name
    tmp = target.with_name(target.name + ".part")
    if from_dir is None:
        source = MULTI30K_URL + name
        _fetch(source, tmp)
    else:
        source = Path(from_dir) / name
        if not source.is_file():
            return name, "missing in mirror"
        shutil.copyfile(source, tmp)
    try:
        verified = _verify(tmp, name, source)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return name, "verified" if verified else "unverified"


def add_data_arguments(parser) -> None:
    parser.add_argument("action", choices=["get"], help="get: download or copy a corpus")
    parser.add_argument("dataset", choices=["multi30k"], help="the corpus")
    parser.add_argument("--dest", default="data/multi30k", help="output folder")
    parser.add_argument("--from", dest="from_dir", metavar="DIR",
                        help="copy from an offline mirror instead of downloading")
    parser.add_argument("--langs", help="comma-separated languages, each required complete "
                        "in a --from mirror (default: en,de,fr,cs, as many as the mirror has)")


def run_data(args) -> int:
    if args.from_dir is not None and not Path(args.from_dir).is_dir():
        raise FileNotFoundError(f"--from {args.from_dir}: no such directory")
    langs = None if args.langs is None else [x for x in args.langs.split(",") if x]
    report = get_multi30k(args.dest, args.from_dir, langs)
    for name, status in report:
        print(f"{name}\t{status}")
    if all(status == "missing in mirror" for _, status in report):
        raise DataError(f"--from {args.from_dir}: no Multi30k files found there")
    return 0


# ------------------------------------------------------------------------ batching


class TokenBatcher:
    """Batches of example indices grouped by similar length, sized by token count.

    A batch holds n examples with n * (its longest length) <= max_tokens. The order of an
    epoch is a pure function of (seed, epoch): shuffle, sort by length inside pools of
    `pool` batches' worth of examples, cut into batches, shuffle the batches. Resuming
    mid-epoch is skipping the batches already done.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, seed: int = 0,
                 shuffle: bool = True, pool: int = 100):
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(f"{len(too_long)} example(s) are longer than max_tokens="
                             f"{max_tokens} (first: example {too_long[0]}, "
                             f"{lengths[too_long[0]]} tokens)")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.max_tokens, self.seed, self.shuffle, self.pool = max_tokens, seed, shuffle, pool

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """The batches of `epoch`, from batch number `start` on."""
        yield from self.batches(epoch)[start:]

    def batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        pool_size = max(1, self.pool * self.max_tokens // max(1, int(self.lengths.float().mean())))
        batches = []
        for p in range(0, n, pool_size):
            chunk = order[p : p + pool_size]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += self._cut(chunk.tolist())
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _cut(self, indices: list[int]) -> list[list[int]]:
        out, cur, longest = [], [], 0
        for i in indices:
            n = int(self.lengths[i])
            if cur and max(longest, n) * (len(cur) + 1) > self.max_tokens:
                out.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        return out + ([cur] if cur else [])


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """(B, T) long tensor, right-padded with pad_id."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
