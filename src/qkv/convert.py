"""Fewer key/value heads for a trained model (MHA -> GQA -> MQA), and uptraining afterwards.

Ainslie et al. 2023 (GQA, section 2.1): a checkpoint with G key/value heads becomes one
with N by mean-pooling the K and V projection heads of each group of G / N; a short
"uptraining" with the original objective then recovers most of the quality.
Commands: `qkv convert --kv-heads N MODEL OUT`, `qkv uptrain MODEL TEXTFILE --steps N --out DIR`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .attention import KVCache, MultiHeadAttention

# ------------------------------------------------------------------------ conversion


def pool_heads(t: Tensor, n_from: int, n_to: int) -> Tensor:
    """Mean of each group of n_from / n_to consecutive heads: (n_from*D, ...) -> (n_to*D, ...)."""
    D = t.shape[0] // n_from
    grouped = t.reshape(n_to, n_from // n_to, D, *t.shape[1:])  # (N, G/N, D, ...)
    return grouped.mean(1).reshape(n_to * D, *t.shape[1:])


def convert_kv_heads(model: nn.Module, n_kv_heads: int) -> nn.Module:
    """A new model like `model` whose attention has `n_kv_heads` key/value heads.

    Query head h reads kv head h // (H / G); the new kv head j is the mean of the old heads
    j * G/N ... (j+1) * G/N - 1, exactly the ones its query heads read before. Applies to
    every MultiHeadAttention (self- and cross-attention). N == G copies the model.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not any(isinstance(m, MultiHeadAttention) for m in model.modules()):
        raise ValueError(f"cannot convert a {type(model).__name__}: not a qkv model with attention")
    G = cfg.n_kv_heads
    if n_kv_heads < 1 or G % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide the model's current "
                         f"n_kv_heads={G} (mean-pooling merges whole groups of heads)")
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            for proj in ("k_proj", "v_proj"):
                for leaf in ("weight", "bias"):
                    key = f"{name}.{proj}.{leaf}"
                    if key in state:
                        state[key] = pool_heads(state[key], G, n_kv_heads)
    new = type(model)(cfg.replace(n_kv_heads=n_kv_heads))
    new.load_state_dict(state)
    dtype = next(model.parameters()).dtype
    return new.to(dtype).train(model.training)


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """KV-cache bytes per token per sequence of a decoder (self-attention K and V)."""
    cfg = model.cfg
    return KVCache.bytes_per_token(cfg.n_decoder_layers, cfg.n_kv_heads, cfg.head_dim, dtype)


def _is_checkpoint(path: Path) -> bool:
    try:
        checkpoint.read_metadata(path)
    except (checkpoint.CheckpointError, NotADirectoryError, OSError):
        return False
    return True


def convert_checkpoint(src: str, out: str | Path, n_kv_heads: int) -> nn.Module:
    """Convert a qkv checkpoint dir (keeping its extra files) or a pretrained model to OUT."""
    meta = {"converted_from": str(src), "kv_heads_conversion": "mean-pool (Ainslie et al. 2023)"}
    if _is_checkpoint(Path(src)):
        model = checkpoint.load(src)
        names = checkpoint._read_manifest(Path(src))["files"]
        files = {k: checkpoint.read_file(src, k) for k in names if k != "weights"}
        new = convert_kv_heads(model, n_kv_heads)
        checkpoint.save(new, out, files=files, metadata={**checkpoint.read_metadata(src), **meta})
        return new
    from .pretrained import load_pretrained

    p = load_pretrained(src)
    p.model = convert_kv_heads(p.model, n_kv_heads)
    p.save(out, metadata=meta)
    return p.model


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a qkv checkpoint dir, a pretrained name or weights file")
    parser.add_argument("out", help="directory for the converted qkv checkpoint")
    parser.add_argument("--kv-heads", type=int, required=True,
                        help="new number of key/value heads (1 = MQA); must divide the current")


def run_convert(args: argparse.Namespace) -> int:
    new = convert_checkpoint(args.model, args.out, args.kv_heads)
    cfg = new.cfg
    print(f"converted {args.model} -> {args.out}: {cfg.n_heads} query heads, "
          f"{cfg.n_kv_heads} key/value heads ({cfg.attention_kind})")
    if hasattr(new, "decoder"):
        print(f"KV cache: {kv_bytes_per_token(new)} bytes per token (float32)")
    return 0


# ------------------------------------------------------------------------- uptraining


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr / 10 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


PARAM_GROUPS = {
    "all": lambda name: True,
    "attention": lambda name: ".self_attn." in name,
    "kv": lambda name: ".k_proj." in name or ".v_proj." in name,
}


def trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze all parameters but `which` (all, attention, kv); return the trainable ones."""
    if which not in PARAM_GROUPS:
        raise ValueError(f"params={which!r} is not one of {', '.join(PARAM_GROUPS)}")
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(PARAM_GROUPS[which](name))
        if p.requires_grad:
            chosen.append(p)
    return chosen


def lm_batches(ids: Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless (B, seq_len + 1) windows at random offsets of a token stream."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size, 1), generator=g)
        yield ids[starts + offsets]  # (B, seq_len + 1)


def uptrain(model: nn.Module, ids: Tensor, steps: int, *, lr: float = 1e-4,
            batch_size: int = 4, seq_len: int = 256, warmup: int = 20, params: str = "all",
            seed: int = 0, log: Callable[[int, float, float], None] | None = None,
            checkpoint_every: int = 0, save: Callable[[int], None] | None = None) -> list[float]:
    """Continue training a DecoderLM on `ids` with next-token cross-entropy (AdamW).

    Returns the loss of each step. `save(step)` runs every `checkpoint_every` steps and
    at the end; `log(step, loss, tokens_per_s)` after every step.
    """
    if steps < 1 or lr <= 0 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"need steps ({steps}), lr ({lr}), batch_size ({batch_size}) and "
                         f"seq_len ({seq_len}) > 0")
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={model.cfg.max_seq_len}")
    model.train()
    opt = torch.optim.AdamW(trainable(model, params), lr=lr, weight_decay=0.0, fused=True)
    batches, losses = lm_batches(ids, batch_size, seq_len, seed), []
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = next(batches)
        logits = model(x[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step + 1, losses[-1], x[:, 1:].numel() / (time.perf_counter() - t0))
        if save is not None and (step + 1 == steps or
                                 (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            save(step + 1)
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def add_uptrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a (converted) LM: qkv checkpoint dir or pretrained name")
    parser.add_argument("text", help="a UTF-8 text file to train on")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True, help="checkpoint directory")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--fraction", default="0:0.9",
                        help="part of the text to train on, by characters")
    parser.add_argument("--params", default="all", choices=sorted(PARAM_GROUPS),
                        help="what to train: all weights, attention only, or K/V projections")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also save every N steps (0: only at the end)")
    parser.add_argument("--seed", type=int, default=0)


def run_uptrain(args: argparse.Namespace) -> int:
    from .generate import load_lm, read_fraction

    text = read_fraction(args.text, args.fraction)  # errors before the slow model load
    p = load_lm(args.model)
    ids = torch.tensor(p.encode(text), dtype=torch.long)
    print(f"uptraining on {len(ids)} tokens of {args.text} [{args.fraction}]", flush=True)
    meta = {"uptrain": {"from": args.model, "text": str(args.text), "fraction": args.fraction,
                        "lr": args.lr, "batch_size": args.batch_size, "seq_len": args.seq_len,
                        "params": args.params}}

    def log(step: int, loss: float, tps: float) -> None:
        print(f"step {step}/{args.steps} loss {loss:.4f} {tps:.0f} tokens/s", flush=True)

    def save(step: int) -> None:
        p.model.eval()
        p.save(args.out, metadata={**meta, "step": step})
        p.model.train()
        print(f"saved {args.out} at step {step}", flush=True)

    warmup = args.steps // 10 if args.warmup is None else args.warmup
    uptrain(p.model, ids, args.steps, lr=args.lr, batch_size=args.batch_size,
            seq_len=args.seq_len, warmup=max(1, warmup), params=args.params, seed=args.seed,
            log=log, checkpoint_every=args.checkpoint_every, save=save)
    return 0
