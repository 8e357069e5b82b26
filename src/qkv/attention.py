"""Scaled dot-product attention, masks, MultiHeadAttention (MHA / GQA / MQA) and KVCache.

Shape letters, used in every shape comment of the package:
    B batch, T query length, S key length, H query heads, G key/value heads,
    D head dim, C model width (d_model), R queries that share one K/V row.

One mask convention everywhere: boolean, True = may attend, broadcastable to (B, H, T, S).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernel
from .linear import Linear

# --------------------------------------------------------------------------- masks


def causal_mask(T: int, S: int | None = None, device=None) -> Tensor:
    """(T, S) bool: query i may attend key j <= i + (S - T), aligned bottom-right.

    With a cached prefix of S - T keys, the T new queries are the last T positions.
    """
    S = T if S is None else S
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, 1, 1, S) bool from (B, S) token ids: True where the key is a real token."""
    return (tokens != pad_id)[:, None, None, :]


# ---------------------------------------------------------------------- attention


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q (B, H, T, D) and k, v (B, G, S, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    (B, H, _, D), (Bk, G, S, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if Bk != B:
        raise ValueError(f"batch of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if Dk != D:
        raise ValueError(f"head dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if G == 0 or H % G:
        raise ValueError(f"query heads H={H} are not divisible by key/value heads G={G}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = may attend), got {mask.dtype}")
        target = (B, H, q.shape[2], S)
        # expandable to target (torch.broadcast_shapes would also let the mask grow it)
        dims = zip(mask.shape[::-1], target[::-1], strict=False)  # aligned from the right
        if mask.dim() > 4 or any(m not in (1, t) for m, t in dims):
            raise ValueError(
                f"mask {tuple(mask.shape)} does not broadcast to (B, H, T, S) = {target}"
            )


def _full_mask(mask: Tensor | None, causal: bool, T: int, S: int, device) -> Tensor | None:
    """Combine a user mask and the bottom-right causal mask by AND."""
    if causal:
        c = causal_mask(T, S, device)
        mask = c if mask is None else mask & c
    return mask


def _expand_heads(x: Tensor, H: int) -> Tensor:
    """(B, G, S, D) -> (B, H, S, D): query head h reads key/value head h // (H // G)."""
    G = x.shape[1]
    return x if G == H else x.repeat_interleave(H // G, dim=1)


def _fold_groups(q: Tensor, mask: Tensor | None, G: int) -> tuple[Tensor, Tensor | None]:
    """Put the R = H // G query heads of each group in the query axis: no K/V copies.

    q (B, H, T, D) -> (B, G, R*T, D); mask (., 1, T, S) -> (., 1, R*T, S).
    """
    B, H, T, D = q.shape
    q = q.reshape(B, G, (H // G) * T, D)  # (B, G, R*T, D)
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:  # (., 1, 1, S) broadcasts
        mask = mask.expand(*mask.shape[:-2], T, mask.shape[-1])  # (., 1, T, S)
        mask = mask.unsqueeze(-3).expand(*mask.shape[:-2], H // G, T, mask.shape[-1])
        mask = mask.flatten(-3, -2)  # (., 1, R*T, S)
    return q, mask


def _guard_empty_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows where no key is allowed would give NaN: let them attend everywhere, then zero them.

    Returns the safe mask and (., ., T, 1) rows that have at least one key, or None when
    every row has one (the common case: no extra work on the output).
    """
    has_key = mask.any(dim=-1, keepdim=True)
    if bool(has_key.all()):
        return mask, None
    return mask | ~has_key, has_key


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """softmax(Q K^T / sqrt(D)) V, eq. (1) of Vaswani et al. 2017, for MHA, GQA and MQA.

    Args:
        q: (B, H, T, D). k, v: (B, G, S, D) with H divisible by G: G == H is multi-head,
            1 < G < H grouped-query, G == 1 multi-query attention.
        mask: bool, True = may attend, broadcastable to (B, H, T, S).
        causal: query i may attend keys j <= i + (S - T) (bottom-right); ANDed with mask.
        dropout: dropout probability on the attention weights.
    Returns:
        (B, H, T, D). A query row with no key allowed gives zeros.
    """
    _check(q, k, v, mask)
    if mask is not None and mask.dim() < 2:  # SDPA wants at least (T, S)
        mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
    if kernel.applies(q, k, v, mask, causal, dropout):  # decode steps: csrc/decode_attention.c
        return kernel.attention(q, k, v, mask)
    (B, H, T, D), G, S = q.shape, k.shape[1], k.shape[2]
    if causal and mask is None and T == S:
        # The fused kernel's own causal path skips masked blocks.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=G != H
        )
    mask = _full_mask(mask, causal and T > 1, T, S, q.device)
    has_key = None
    if mask is not None:
        mask, has_key = _guard_empty_rows(mask)
    head_free = mask is None or mask.dim() < 3 or mask.shape[-3] == 1
    if G != H and head_free:
        qf, mf = _fold_groups(q, mask, G)  # (B, G, R*T, D)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, dropout_p=dropout)
        out = out.reshape(B, H, T, D)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=G != H
        )
    return out if has_key is None else out * has_key


def attention_probs(
    q: Tensor, k: Tensor, v: Tensor | None = None, mask: Tensor | None = None, *,
    causal: bool = False,
) -> Tensor:
    """The attention weights softmax(Q K^T / sqrt(D)), (B, H, T, S), for interpretation.

    Rows sum to 1; a row with no key allowed is all zeros. `v` is only checked.
    """
    _check(q, k, k if v is None else v, mask)
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    scores = q @ _expand_heads(k, H).transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = _full_mask(mask, causal, T, S, q.device)
    if mask is None:
        return scores.softmax(dim=-1)
    mask, has_key = _guard_empty_rows(mask)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs if has_key is None else probs * has_key


# ------------------------------------------------------------------------ KV cache


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer.

    Self-attention K/V: per layer, (B, G, max_seq_len, D) buffers filled left to right.
    Cross-attention K/V: computed once per source by the first decoding step and reused;
    their batch is the number of sources, so the beams of one sentence share them and
    `reorder` (which must keep each beam within its sentence) copies none of them; it only
    selects among them when finished sentences leave the batch (`sources`).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, val in [("n_layers", n_layers), ("batch_size", batch_size),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                          ("max_seq_len", max_seq_len)]:
            if val < 1:
                raise ValueError(f"KVCache {name}={val} must be >= 1")
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self._spare: list[Tensor] | None = None  # reorder's one-layer k and v buffers

    @property
    def length(self) -> int:
        """Tokens stored (equal for all layers between forward passes)."""
        return self.lengths[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes held for self-attention K/V, including reorder's spare layer."""
        spare = self._spare or []
        return sum(t.nbytes for t in self.k + self.v + spare)

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32) -> int:
        """Self-attention cache bytes per token per sequence: 2 * L * G * D * element size."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * n_kv_heads * head_dim * itemsize

    def fill_random_(self, n: int) -> None:
        """Pretend `n` tokens are stored (uniform random K/V): for timing decode steps."""
        if not 0 <= n <= self.max_seq_len:
            raise ValueError(f"fill_random_ n={n} must be in [0, max_seq_len={self.max_seq_len}]")
        for buf in self.k + self.v:
            buf[:, :, :n].uniform_(-1, 1)  # uniform_: much cheaper than normal_
        self.lengths = [n] * len(self.lengths)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, G, T, D) to `layer`; return all its keys and values (B, G, S, D)."""
        start, T = self.lengths[layer], k.shape[2]
        if start + T > self.max_seq_len:
            raise ValueError(
                f"KVCache is full: {start} + {T} tokens exceed max_seq_len={self.max_seq_len}"
            )
        K, V = self.k[layer], self.v[layer]
        if k.shape[:2] != K.shape[:2] or k.shape[3] != K.shape[3]:
            raise ValueError(
                f"k {tuple(k.shape)} does not fit the cache's (B, G, ., D) = "
                f"{(K.shape[0], K.shape[1], '.', K.shape[3])}"
            )
        K[:, :, start : start + T] = k
        V[:, :, start : start + T] = v
        self.lengths[layer] = start + T
        return K[:, :, : start + T], V[:, :, : start + T]

    def reorder(self, indices: Tensor, sources: Tensor | None = None) -> None:
        """Select batch rows (beam search): row b becomes old row indices[b].

        indices may be shorter than the batch, dropping finished rows; then `sources`
        (the memory rows that stay) also selects the cross-attention K/V.
        """
        if len(indices) != self.batch_size:  # rows dropped: new, smaller buffers
            self.k = [buf.index_select(0, indices) for buf in self.k]
            self.v = [buf.index_select(0, indices) for buf in self.v]
            self._spare = None
        else:  # one copy per layer through a spare layer, no allocation after the first
            if self._spare is None:
                self._spare = [torch.empty_like(self.k[0]), torch.empty_like(self.v[0])]
            for i, bufs in enumerate((self.k, self.v)):
                self._spare[i] = _gather_rows(bufs, indices, self.length, self._spare[i])
        if sources is not None:
            self.cross = [None if kv is None else (kv[0][sources], kv[1][sources])
                          for kv in self.cross]

    def reset(self) -> None:
        """Forget every stored token and the cross-attention K/V; keep the buffers."""
        self.lengths = [0] * len(self.lengths)
        self.cross = [None] * len(self.cross)


def _gather_rows(bufs: list[Tensor], indices: Tensor, n: int, spare: Tensor) -> Tensor:
    """Select rows of each layer's first n positions into `spare` and swap the two: the
    gathered layer takes the buffer's place, the old buffer becomes the spare for the next
    layer. One layer of extra memory instead of a second cache. Returns the last spare."""
    for layer, buf in enumerate(bufs):
        if buf.requires_grad:  # out= does not record autograd
            spare[:, :, :n] = buf[indices, :, :n]
        else:
            torch.index_select(buf[:, :, :n], 0, indices, out=spare[:, :, :n])
        bufs[layer], spare = spare, buf
    return spare


# --------------------------------------------------------------- MultiHeadAttention


class MultiHeadAttention(nn.Module):
    """Multi-head attention (section 3.2.2) with H query heads and G key/value heads.

        MHA  (G == H)      GQA (1 < G < H)     MQA (G == 1)
        q: 1 2 3 4         q: 1 2 3 4          q: 1 2 3 4
        k: 1 2 3 4         k: 1   2            k: 1
        v: 1 2 3 4         v: 1   2            v: 1

    Query head h reads key/value head h // (H // G). Self-attention when `context` is
    None, cross-attention (queries from x, keys and values from context) otherwise.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        layer_idx: int = 0,
        rope: nn.Module | None = None,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout, self.layer_idx, self.rope = dropout, layer_idx, rope
        kv_dim = n_kv_heads * self.head_dim
        self.q_proj = Linear(d_model, d_model, bias=bias)
        self.k_proj = Linear(d_model, kv_dim, bias=bias)
        self.v_proj = Linear(d_model, kv_dim, bias=bias)
        self.out_proj = Linear(d_model, d_model, bias=bias)
        self.recorder: list | None = None  # set by `record_attention`

    def _split_heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        if x.stride(-1) != 1:  # Linear's transposed output for 2-48 rows: SDPA's fused
            x = x.contiguous()  # kernel needs unit stride in D, else it takes the slow path
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def _merge_heads(self, x: Tensor) -> Tensor:
        B, _, T, _ = x.shape
        return x.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)

    def _project_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        k = self._split_heads(self.k_proj(src), self.n_kv_heads)  # (B, G, S, D)
        v = self._split_heads(self.v_proj(src), self.n_kv_heads)
        return k, v

    def _self_kv(self, x, cache, rope_tables) -> tuple[Tensor, Tensor]:
        k, v = self._project_kv(x)
        if self.rope is not None:
            k = self.rope.rotate(k, *rope_tables)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return k, v

    def _cross_kv(self, context: Tensor, cache: KVCache | None) -> tuple[Tensor, Tensor]:
        if cache is None:
            return self._project_kv(context)
        if cache.cross[self.layer_idx] is None:
            cache.cross[self.layer_idx] = self._project_kv(context)
        return cache.cross[self.layer_idx]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        rope_tables: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, C), context (B', S, C) -> (B, T, C).

        mask: bool, True = may attend, broadcastable to (B, H, T, S). With a cache, the
        self-attention keys are the cached prefix plus x, so S = cached + T. For
        cross-attention B may be a multiple R of B' (R beams per source, each sharing its
        source's keys); the mask is then (B', 1, 1, S). positions (T,) or (B, T) feed RoPE
        and default to cached + arange(T); rope_tables, RoPE's (cos, sin) for them, save
        the lookup when a decoder has done it once for all its layers.
        """
        q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        if context is None:
            if self.rope is not None:
                if rope_tables is None:
                    if positions is None:
                        start = cache.lengths[self.layer_idx] if cache is not None else 0
                        positions = torch.arange(start, start + x.shape[1], device=x.device)
                    rope_tables = self.rope.tables(positions, q.dtype)
                q = self.rope.rotate(q, *rope_tables)
            k, v = self._self_kv(x, cache, rope_tables)
        else:
            k, v = self._cross_kv(context, cache)
        out = self._attend(q, k, v, mask, causal)
        return self.out_proj(self._merge_heads(out))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask, causal: bool) -> Tensor:
        """Attention where q's batch may be R times k's batch (beams sharing a source)."""
        B, H, T, D = q.shape
        R = B // k.shape[0]
        if R > 1 and B == R * k.shape[0]:
            if mask is not None and mask.dim() >= 3 and mask.shape[-2] != 1:
                raise ValueError(
                    f"with {R} queries per key row the mask must be (B', 1, 1, S), "
                    f"got {tuple(mask.shape)}"
                )
            q = q.view(k.shape[0], R, H, T, D).transpose(1, 2).reshape(-1, H, R * T, D)
        drop = self.dropout if self.training else 0.0
        out = attention(q, k, v, mask, causal=causal, dropout=drop)  # (B', H, R*T, D)
        if self.recorder is not None:
            self.recorder.append(attention_probs(q, k, v, mask, causal=causal).detach())
        if R > 1:
            out = out.view(-1, H, R, T, D).transpose(1, 2).reshape(B, H, T, D)
            if self.recorder is not None:
                p = self.recorder[-1]
                self.recorder[-1] = p.view(-1, H, R, T, p.shape[-1]).transpose(1, 2).reshape(
                    B, H, T, p.shape[-1]
                )
        return out


@contextmanager
def record_attention(model: nn.Module):
    """Record the attention weights of every MultiHeadAttention in `model`.

    Yields a dict {module name: [probs (B, H, T, S) per forward call]}:

        with record_attention(model) as maps:
            model(src, tgt)
        maps["decoder.layers.0.cross_attn"][0]
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    maps: dict[str, list[Tensor]] = {name: [] for name in modules}
    for name, m in modules.items():
        m.recorder = maps[name]
    try:
        yield maps
    finally:
        for m in modules.values():
            m.recorder = None
