"""Model configuration: a frozen dataclass that validates itself, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

POSITIONS = ("sinusoidal", "learned", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACES = ("post", "pre")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
POOLINGS = ("mean", "cls")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _check_types(cfg) -> None:
    """Each field holds its annotated type ("int", "int | None", "float", "str", "bool");
    an int is accepted for a float (dropout = 0) and stored as a float."""
    for f in fields(cfg):
        value, kinds = getattr(cfg, f.name), f.type.split(" | ")
        if value is None and "None" in kinds:
            continue
        if "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, value := float(value))
        ok = any(isinstance(value, {"int": int, "float": float, "str": str, "bool": bool}[k])
                 and (k == "bool" or not isinstance(value, bool)) for k in kinds if k != "None")
        if not ok:
            raise ValueError(f"{f.name}={value!r}: expected {f.type}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Transformer. Defaults are the paper's base model (Table 3).

    n_kv_heads: key/value heads; n_heads (default) is MHA, 1 is MQA, in between GQA.
    norm_place: "post" is the paper's x = norm(x + sublayer(x)); "pre" is
        x = x + sublayer(norm(x)) with a final norm after the stack.
    n_decoder_layers: decoder depth when it differs from the encoder's (default n_layers).
    """

    vocab_size: int = 37000
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None
    n_layers: int = 6
    n_decoder_layers: int | None = None
    d_ff: int = 2048
    max_seq_len: int = 512
    dropout: float = 0.1
    attn_dropout: float = 0.0
    positions: str = "sinusoidal"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    norm_place: str = "post"
    norm_eps: float = 1e-5
    activation: str = "relu"
    bias: bool = True
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    embed_norm: bool = False
    type_vocab_size: int = 0
    pad_id: int = 0
    n_classes: int = 2
    pooling: str = "mean"

    def __post_init__(self):
        _check_types(self)
        if self.n_kv_heads is None:  # "same as n_heads": resolve once, at construction
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_decoder_layers is None:
            object.__setattr__(self, "n_decoder_layers", self.n_layers)
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers",
                     "n_decoder_layers", "d_ff", "max_seq_len", "n_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size={self.type_vocab_size} must be >= 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got head_dim={self.head_dim}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside [0, vocab_size={self.vocab_size})")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise ValueError(
                f"norm_eps={self.norm_eps} and rope_base={self.rope_base} must be > 0"
            )
        _choice("positions", self.positions, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("norm_place", self.norm_place, NORM_PLACES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("pooling", self.pooling, POOLINGS)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def attention_kind(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again).

        n_kv_heads and n_decoder_layers that equal n_heads and n_layers follow them when
        those change and they are not given: an MHA config stays MHA, a symmetric one
        symmetric. Other values are kept as they are (MQA stays 1 kv head).
        """
        for derived, source in (("n_kv_heads", "n_heads"), ("n_decoder_layers", "n_layers")):
            if (source in changes and derived not in changes
                    and getattr(self, derived) == getattr(self, source)):
                changes[derived] = None  # resolved again from the new value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**d)


# The paper's base and big models (Table 3), and small ones that train on 2 CPU cores.
PRESETS: dict[str, dict] = {
    "base": dict(d_model=512, n_heads=8, n_layers=6, d_ff=2048, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, n_layers=6, d_ff=4096, dropout=0.3),
    "small": dict(d_model=256, n_heads=8, n_layers=3, d_ff=1024, dropout=0.1),
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.0, max_seq_len=128),
}


def preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig for a named preset, with fields overridden (e.g. vocab_size, n_kv_heads)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
