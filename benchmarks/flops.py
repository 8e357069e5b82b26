"""Matmul FLOPs of the models benchmarked here (2 per multiply-add; norms etc. ignored)."""

from __future__ import annotations

from qkv import ModelConfig


def _ff(cfg: ModelConfig) -> int:
    """Per-token FLOPs of one feed-forward block."""
    n_mats = 3 if cfg.activation == "swiglu" else 2
    return 2 * n_mats * cfg.d_model * cfg.d_ff


def _attn(cfg: ModelConfig, T: int, S: int, cross: bool) -> int:
    """FLOPs of one attention block: T queries over S keys (K/V projected from S tokens)."""
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    kv_tokens = S if cross else T
    proj = T * 2 * 2 * d * d + kv_tokens * 2 * 2 * d * kv  # q, out; k, v
    return proj + 2 * 2 * T * S * d  # Q K^T and A V over all H heads


def encoder_decoder_forward(cfg: ModelConfig, S: int, T: int) -> int:
    """One sequence pair: S source and T target tokens, full (unskipped) attention."""
    enc = cfg.n_layers * (_attn(cfg, S, S, False) + S * _ff(cfg))
    dec = cfg.n_decoder_layers * (_attn(cfg, T, T, False) + _attn(cfg, T, S, True)
                                  + T * _ff(cfg))
    return enc + dec + T * 2 * cfg.d_model * cfg.vocab_size


def training_step(cfg: ModelConfig, batch: int, S: int, T: int) -> int:
    """Forward and backward (about 3x the forward's matmul FLOPs)."""
    return 3 * batch * encoder_decoder_forward(cfg, S, T)
