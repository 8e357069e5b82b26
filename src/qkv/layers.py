"""Building blocks: embeddings and positions, norms, feed-forward, encoder and decoder blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention
from .config import ModelConfig
from .linear import Linear

# ----------------------------------------------------------------------- positions


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """(n_positions, d_model): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)

    Section 3.5 of the paper.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return table.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), in the rotate-half layout of Llama/HF.

    Rotates channel pairs (i, i + D/2) of q or k by angle pos * base^(-2i/D).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (P, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (P, D)
        sin = angles.sin()
        sin[:, : head_dim // 2] *= -1  # rotate() pairs x.roll(D/2) = (x2, x1) with (-sin, sin)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin for positions (T,) or (B, T): (T, D) or (B, 1, T, D), in `dtype`.

        The sin table's first half is negated (see `rotate`). A decoder looks them up once
        per forward and hands them to every layer.
        """
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (., T, D)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        return cos, sin

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, H, T, D) rotated by the angles of `tables`: x cos + (-x2, x1) sin.

        (-x2, x1) sin is computed as x.roll(D/2) = (x2, x1) times the signed table
        (-sin, sin): two fewer operators per call than negating and concatenating halves.
        """
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, H, T, D), positions (T,) or (B, T) -> rotated x, same shape."""
        return self.rotate(x, *self.tables(positions, x.dtype))


class Embeddings(nn.Module):
    """Token embeddings (times sqrt(d_model), section 3.4) plus positions, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=cfg.d_model**-0.5)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
            self.register_buffer("pos_table", table, persistent=False)
        self.types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: Tensor, positions: Tensor, token_types: Tensor | None = None):
        """tokens (B, T), positions (T,) or (B, T) -> (B, T, C)."""
        x = self.tok(tokens)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        if self.cfg.positions in ("learned", "sinusoidal"):
            learned = self.cfg.positions == "learned"
            x = x + (self.pos(positions) if learned else self.pos_table[positions])
        if self.types is not None:
            x = x + self.types(torch.zeros_like(tokens) if token_types is None else token_types)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


# ------------------------------------------------------------- norms, feed-forward


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class FeedForward(nn.Module):
    """Position-wise feed-forward (section 3.3): W2 act(W1 x), or SwiGLU W2 (silu(Wg x) * W1 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        swiglu = cfg.activation == "swiglu"
        self.gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if swiglu else None
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gate is not None:
            h = F.silu(self.gate(x)) * h
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.fc2(h)


# --------------------------------------------------------------------------- blocks


class _Block(nn.Module):
    """Residual sublayers: post-LN x = norm(x + drop(f(x))) or pre-LN x + drop(f(norm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm_place == "pre"
        self.drop = nn.Dropout(cfg.dropout)

    def _sublayer(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        if self.pre:
            return x + self._drop(fn(norm(x)))
        return norm(x + self._drop(fn(x)))

    def _drop(self, x: Tensor) -> Tensor:
        return self.drop(x) if self.training else x  # no module call per sublayer in eval


def _attention(cfg: ModelConfig, layer_idx: int, rope: nn.Module | None) -> MultiHeadAttention:
    return MultiHeadAttention(
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias, dropout=cfg.attn_dropout,
        layer_idx=layer_idx, rope=rope,
    )


class EncoderLayer(_Block):
    """Self-attention then feed-forward (section 3.1, encoder)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, rope: nn.Module | None = None):
        super().__init__(cfg)
        self.self_attn = _attention(cfg, layer_idx, rope)
        self.ff = FeedForward(cfg)
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, S, C), mask broadcastable to (B, H, S, S) -> (B, S, C)."""
        x = self._sublayer(x, self.norm1, lambda h: self.self_attn(h, mask=mask))
        return self._sublayer(x, self.norm2, self.ff)


class DecoderLayer(_Block):
    """Masked self-attention, cross-attention over the encoder output (if any), feed-forward."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, rope: nn.Module | None = None,
                 cross: bool = True):
        super().__init__(cfg)
        self.self_attn = _attention(cfg, layer_idx, rope)
        self.cross_attn = _attention(cfg, layer_idx, None) if cross else None
        self.ff = FeedForward(cfg)
        self.norm1, self.norm3 = make_norm(cfg), make_norm(cfg)
        self.norm2 = make_norm(cfg) if cross else None

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        rope_tables: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, C), memory (B', S, C) -> (B, T, C). mask: extra self-attention mask.

        rope_tables: RoPE's (cos, sin) for these positions, when the caller has them."""
        x = self._sublayer(x, self.norm1, lambda h: self.self_attn(
            h, mask=mask, causal=True, cache=cache, positions=positions,
            rope_tables=rope_tables))
        if self.cross_attn is not None:
            x = self._sublayer(x, self.norm2, lambda h: self.cross_attn(
                h, memory, mask=memory_mask, cache=cache))
        return self._sublayer(x, self.norm3, self.ff)
