"""GGUF files (llama.cpp's format): read the metadata and tensors, map a Llama model's
tensors onto a qkv DecoderLM and build its byte-level BPE tokenizer.

`qkv.pretrained.load_gguf` puts these together; numpy and struct only, no `gguf` package.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .config import ModelConfig

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # float32/float16 values, or the raw bytes (rows, row bytes) if quantised


class _Cursor:
    """Little-endian reads from a memory-mapped GGUF file."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item in _GGUF_SCALARS and item != 7:  # numbers in one go
                a = np.frombuffer(self.buf, _GGUF_SCALARS[item], n, self.pos)
                self.pos += a.nbytes
                return a.tolist()
            return [self.value(item) for _ in range(n)]
        return self.scalar(_GGUF_SCALARS[kind])


def read_gguf(path: str | os.PathLike) -> tuple[dict, list[GGUFTensor]]:
    """Metadata and tensors (memory-mapped) of a GGUF v2/v3 file.

    A lean reader: gguf.GGUFReader builds numpy views for every byte of metadata, which
    takes seconds on a 49k-token vocabulary.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    mm = np.memmap(path, mode="r")
    c = _Cursor(memoryview(mm))
    if bytes(c.buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(c.buf[:4])!r})")
    c.pos = 4
    version, n_tensors, n_kv = c.scalar("<I"), c.scalar("<Q"), c.scalar("<Q")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.scalar("<I")
        dims = [c.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(c.scalar("<I")), c.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        block, size = GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(dims)) * size // block
        raw = mm[start + offset : start + offset + n_bytes]
        if kind.name in ("F32", "F16"):
            data = raw.view(np.float32 if kind.name == "F32" else np.float16).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, kind))
        tensors.append(GGUFTensor(name, kind, data))
    return meta, tensors


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k rows (pairs (2i, 2i+1) per head) -> the rotate-half layout (i, i+D/2).

    Inverse of llama.cpp's convert_hf_to_gguf `permute`; (n_heads*D, C) -> same shape.
    """
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The rotate-half layout -> llama.cpp's (what its converter writes into GGUF files)."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t: GGUFTensor, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, a type qkv cannot "
            "dequantize (F32, F16, BF16, Q4_0..Q8_0, K-quants and IQ types work)") from None
    return torch.from_numpy(np.array(data, dtype=np.float32))


def llama_config(meta: dict, path: Path, untied: bool) -> ModelConfig:
    a = "llama"
    n_heads = int(meta[f"{a}.attention.head_count"])
    d_model = int(meta[f"{a}.embedding_length"])
    rope_dim = int(meta.get(f"{a}.rope.dimension_count", d_model // n_heads))
    if rope_dim != d_model // n_heads or f"{a}.rope.scaling.type" in meta:
        raise ValueError(f"{path}: partial or scaled RoPE (dimension_count={rope_dim}) is not "
                         "supported")
    return ModelConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), d_model=d_model, n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{a}.attention.head_count_kv", n_heads)),
        n_layers=int(meta[f"{a}.block_count"]), d_ff=int(meta[f"{a}.feed_forward_length"]),
        max_seq_len=int(meta[f"{a}.context_length"]), dropout=0.0, positions="rope",
        rope_base=float(meta.get(f"{a}.rope.freq_base", 10000.0)), norm="rmsnorm",
        norm_place="pre", norm_eps=float(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        activation="swiglu", bias=False, scale_embeddings=False, tie_embeddings=not untied,
        pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    )


_LLAMA_LAYER = {
    "attn_norm.weight": "norm1.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.out_proj.weight", "ffn_norm.weight": "norm3.weight",
    "ffn_gate.weight": "ff.gate.weight", "ffn_up.weight": "ff.fc1.weight",
    "ffn_down.weight": "ff.fc2.weight",
}
_LLAMA_GLOBAL = {"token_embd.weight": "decoder.embed.tok.weight",
                 "output_norm.weight": "decoder.norm.weight", "output.weight": "lm_head.weight"}


def _llama_name(name: str) -> str | None:
    if name in _LLAMA_GLOBAL:
        return _LLAMA_GLOBAL[name]
    parts = name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LLAMA_LAYER:
        return f"decoder.layers.{parts[1]}.{_LLAMA_LAYER[parts[2]]}"
    return None


def llama_state(tensors: list[GGUFTensor], cfg: ModelConfig, path: Path,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    state, unknown = {}, []
    for i, t in enumerate(tensors):
        if progress is not None:
            progress(i, len(tensors))
        ours = _llama_name(t.name)
        if ours is None:
            unknown.append(t.name)
            continue
        w = _dequantize(t, path)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, cfg.n_kv_heads)
        state[ours] = w
    if unknown:
        raise ValueError(f"{path}: tensors qkv's Llama loader does not know: {unknown[:5]}")
    return state


def meta_int(meta: dict, key: str) -> int | None:
    """meta[key] as an int, None when the file does not have it."""
    return int(meta[key]) if key in meta else None


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _pre_tokenizer(pre: str | None):
    """The split of llama.cpp's `tokenizer.ggml.pre`; "smollm" splits digits one by one."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def gguf_tokenizer(meta: dict) -> Tokenizer:
    """Byte-level BPE from GGUF metadata, as transformers' GGUF converter builds it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported; qkv builds byte-level BPE "
                         "('gpt2') tokenizers")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {(t if set(t) <= letters else "".join(alphabet[b] for b in t.encode())): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=False)
                            if k == 3 and set(t) <= letters])  # 3: control
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=False) if k == 4])  # 4: user-defined
    return tok
