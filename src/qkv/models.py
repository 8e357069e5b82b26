"""Encoder, Decoder and the three models built from them, assembled in the paper's order."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fused
from .attention import KVCache, padding_mask
from .config import ModelConfig
from .layers import DecoderLayer, Embeddings, EncoderLayer, RotaryEmbedding, make_norm
from .linear import Linear, linear


def _rope(cfg: ModelConfig) -> RotaryEmbedding | None:
    if cfg.positions != "rope":
        return None
    return RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)


def _positions(T: int, start: int, max_seq_len: int, device) -> Tensor:
    if start + T > max_seq_len:
        raise ValueError(
            f"sequence of {start + T} positions is longer than max_seq_len={max_seq_len}"
        )
    return torch.arange(start, start + T, device=device)


class Encoder(nn.Module):
    """Embeddings, N self-attention layers, a final norm when pre-LN (section 3.1)."""

    def __init__(self, cfg: ModelConfig, embed: Embeddings | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = embed if embed is not None else Embeddings(cfg)
        rope = _rope(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i, rope) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_place == "pre" else None

    def forward(self, tokens: Tensor, mask: Tensor | None = None,
                token_types: Tensor | None = None) -> Tensor:
        """tokens (B, S) -> (B, S, C). mask defaults to the padding mask (B, 1, 1, S)."""
        mask = padding_mask(tokens, self.cfg.pad_id) if mask is None else mask
        positions = _positions(tokens.shape[1], 0, self.cfg.max_seq_len, tokens.device)
        x = self.embed(tokens, positions, token_types)
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """Embeddings, N masked self-attention (+ cross-attention) layers, final norm if pre-LN."""

    def __init__(self, cfg: ModelConfig, embed: Embeddings | None = None, cross: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = embed if embed is not None else Embeddings(cfg)
        self.rope = _rope(cfg)  # shared by the layers; no persistent state
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rope, cross) for i in range(cfg.n_decoder_layers)
        )
        self.norm = make_norm(cfg) if cfg.norm_place == "pre" else None

    def forward(
        self,
        tokens: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, T) -> hidden states (B, T, C).

        With a cache, tokens follow the cache.length tokens already stored. mask: an extra
        self-attention mask over all S = cached + T keys (e.g. left padding), (B, 1, 1, S).
        """
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = _positions(tokens.shape[1], start, self.cfg.max_seq_len, tokens.device)
        x = self.embed(tokens, positions)
        tables = None if self.rope is None else self.rope.tables(positions, x.dtype)
        done = None
        if fused.applies(self, x, memory, mask, cache):  # one token: all layers in one C call
            done = fused.decode_step(self, x, cache, tables, mask)
        if done is not None:
            x = done
        else:
            for layer in self.layers:
                x = layer(x, memory, memory_mask, mask=mask, cache=cache, positions=positions,
                          rope_tables=tables)
        return x if self.norm is None else self.norm(x)


class _OutputHead(nn.Module):
    """Logits from hidden states: the (tied) embedding matrix, section 3.4."""

    def _init_head(self, cfg: ModelConfig, embed: Embeddings) -> None:
        self._embed_for_head = [embed]  # a list: not registered twice as a submodule
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size,
                                                             bias=False)

    def logits(self, h: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, vocab_size)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return linear(h, self._embed_for_head[0].tok.weight)

    def make_cache(self, batch_size: int, max_seq_len: int | None = None, *,
                   dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for this model's decoder."""
        cfg, p = self.cfg, next(self.parameters())
        return KVCache(
            cfg.n_decoder_layers, batch_size, cfg.n_kv_heads, cfg.head_dim,
            max_seq_len or cfg.max_seq_len, dtype=dtype or p.dtype, device=p.device,
        )


class EncoderDecoder(_OutputHead):
    """The Transformer (Figure 1): shared source/target embeddings tied to the output layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        embed = Embeddings(cfg)
        self.encoder = Encoder(cfg, embed)
        self.decoder = Decoder(cfg, embed if cfg.tie_embeddings else None, cross=True)
        self._init_head(cfg, self.decoder.embed)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, C) and its padding mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.cfg.pad_id)
        return self.encoder(src, src_mask), src_mask

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor,
               cache: KVCache | None = None) -> Tensor:
        """tgt (B, T) -> logits (B, T, V). B may be R times memory's batch (R beams)."""
        return self.logits(self.decoder(tgt, memory, src_mask, cache=cache))

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), tgt (B, T) (starting with bos) -> logits (B, T, V)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt, memory, src_mask)


class DecoderLM(_OutputHead):
    """A decoder-only language model (no cross-attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg, cross=False)
        self._init_head(cfg, self.decoder.embed)

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, V). See `Decoder.forward` for mask and cache."""
        return self.logits(self.decoder(tokens, mask=mask, cache=cache, positions=positions))


class EncoderClassifier(nn.Module):
    """An encoder, pooled (mean over real tokens, or the first token), then a linear layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def features(self, tokens: Tensor, mask: Tensor | None = None,
                 token_types: Tensor | None = None) -> Tensor:
        """tokens (B, S) -> pooled features (B, C)."""
        mask = padding_mask(tokens, self.cfg.pad_id) if mask is None else mask
        h = self.encoder(tokens, mask, token_types)  # (B, S, C)
        if self.cfg.pooling == "cls":
            return h[:, 0]
        keep = mask.reshape(mask.shape[0], -1)[:, -tokens.shape[1]:].to(h.dtype)  # (B, S)
        return (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None,
                token_types: Tensor | None = None) -> Tensor:
        """tokens (B, S) -> class logits (B, n_classes)."""
        return self.head(self.drop(self.features(tokens, mask, token_types)))


MODELS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (EncoderDecoder, DecoderLM, EncoderClassifier)
}


def count_parameters(model: nn.Module) -> int:
    """Parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in model.parameters())
