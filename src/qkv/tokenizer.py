"""Subword tokenizers: a joint BPE vocabulary trained with Hugging Face `tokenizers`.

Special tokens have fixed ids in every qkv-trained vocabulary: pad 0, unk 1, bos 2, eos 3.
Tokenizers are stored inside checkpoints (`save(..., files={"tokenizer": ...})`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def train_bpe(lines: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
    """A BPE tokenizer learnt from `lines` (all languages together for a joint vocabulary).

    Metaspace pre-tokenisation (as SentencePiece) makes decoding give back plain text.
    """
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIALS)} special tokens")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(lines), trainer=trainer)
    return tok


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
    return (line for line in lines if line.strip())


def encode(tok: Tokenizer, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False).ids
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Plain text, special tokens dropped."""
    return tok.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)],
                      skip_special_tokens=True)


def to_bytes(tok: Tokenizer) -> bytes:
    return tok.to_str().encode()


def from_bytes(data: bytes) -> Tokenizer:
    return Tokenizer.from_str(data.decode())


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a qkv checkpoint directory."""
    from .checkpoint import CheckpointError, read_file

    data = read_file(directory, "tokenizer")
    if data is None:
        raise CheckpointError(f"{directory}: this checkpoint holds no tokenizer")
    return from_bytes(data)
