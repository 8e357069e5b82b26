"""qkv.attention against the paper's formula and torch; MultiHeadAttention; KVCache."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from qkv import (
    EncoderDecoder,
    KVCache,
    MultiHeadAttention,
    attention,
    attention_probs,
    causal_mask,
    kernel,
    padding_mask,
    preset,
    record_attention,
)

A = importlib.import_module("qkv.attention")  # the module; qkv.attention is the function
F64 = dict(rtol=0, atol=1e-10)

# ---------------------------------------------------------------- references


def allowed_keys(T: int, S: int, mask, causal: bool) -> torch.Tensor:
    """(., T, S) bool built independently of qkv: tril with the bottom-right offset S - T."""
    allowed = torch.ones(T, S, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(diagonal=S - T)
    return allowed if mask is None else allowed & mask


def ref_probs(q, k, mask=None, causal=False):
    """softmax(Q K^T / sqrt(D)) with K/V head h // (H // G); empty rows are zeros."""
    H, T, S, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, S)
    scores = scores.masked_fill(~allowed_keys(T, S, mask, causal), float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0)


def ref_attention(q, k, v, mask=None, causal=False):
    """Equation (1) of the paper in plain math."""
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return ref_probs(q, k, mask, causal) @ v


def torch_sdpa(q, k, v, mask=None, causal=False):
    """torch's SDPA on explicitly repeated K/V heads and an explicit mask."""
    R = q.shape[1] // k.shape[1]
    allowed = allowed_keys(q.shape[2], k.shape[2], mask, causal)
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1), attn_mask=allowed
    )


def qkv_tensors(B, H, G, T, S, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, G, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, G, S, D, generator=g, dtype=dtype)
    return q, k, v


MASK_KINDS = ("none", "padding", "TS", "B1TS", "BHTS", "11TS")


def make_mask(kind, B, H, T, S, seed=0):
    """A random boolean mask of the given broadcast layout; every row keeps >= 1 key."""
    g = torch.Generator().manual_seed(seed)
    shape = {"none": None, "padding": (B, 1, 1, S), "TS": (T, S), "B1TS": (B, 1, T, S),
             "BHTS": (B, H, T, S), "11TS": (1, 1, T, S)}[kind]
    if shape is None:
        return None
    mask = torch.rand(shape, generator=g) < 0.6
    mask[..., 0] = True  # key 0: no empty row, even with causal when S >= T
    return mask


def kv_heads_for(H):
    """G in {H (MHA), a proper divisor (GQA), 1 (MQA)}."""
    divisors = [g for g in range(2, H) if H % g == 0]
    return sorted({H, 1, *divisors[:1]})


# -------------------------------------------------------- attention: numerics

CASES = [  # (B, H, T, S, D)
    (2, 4, 5, 5, 8),
    (1, 6, 3, 7, 4),  # T < S: a query block after a cached prefix
    (3, 8, 1, 6, 16),  # a single decoding step
    (2, 4, 6, 6, 3),
]


@pytest.mark.parametrize("B,H,T,S,D", CASES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_plain_math_and_sdpa_float64(B, H, T, S, D, kind, causal):
    for G in kv_heads_for(H):
        q, k, v = qkv_tensors(B, H, G, T, S, D)
        mask = make_mask(kind, B, H, T, S)
        out = attention(q, k, v, mask, causal=causal)
        assert out.shape == (B, H, T, D)
        assert_close(out, ref_attention(q, k, v, mask, causal), **F64)
        assert_close(out, torch_sdpa(q, k, v, mask, causal), **F64)


@pytest.mark.parametrize("kind", ["none", "padding", "BHTS"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_float32_close_to_float64_reference(kind, causal):
    B, H, T, S, D = 2, 8, 7, 9, 16
    for G in kv_heads_for(H):
        q, k, v = qkv_tensors(B, H, G, T, S, D)
        mask = make_mask(kind, B, H, T, S)
        expected = ref_attention(q, k, v, mask, causal).float()
        out = attention(q.float(), k.float(), v.float(), mask, causal=causal)
        assert out.dtype == torch.float32
        assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_causal_is_bottom_right_aligned():
    m = causal_mask(2, 4)
    assert_close(m, torch.tensor([[True, True, True, False], [True, True, True, True]]))
    assert_close(causal_mask(3), torch.ones(3, 3, dtype=torch.bool).tril())


def test_padding_mask_shape_and_polarity():
    tokens = torch.tensor([[5, 6, 0], [7, 0, 0]])
    expected = torch.tensor([[True, True, False], [True, False, False]])[:, None, None, :]
    assert_close(padding_mask(tokens, pad_id=0), expected)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3), H=st.sampled_from([1, 2, 4, 6, 8]), T=st.integers(1, 6),
    S=st.integers(1, 6), D=st.integers(1, 8), causal=st.booleans(),
    kind=st.sampled_from(MASK_KINDS), g_pick=st.integers(0, 2), seed=st.integers(0, 2**16),
)
def test_attention_property(B, H, T, S, D, causal, kind, g_pick, seed):
    """Any shape, mask layout, causal offset and grouping: equals the plain-math formula.

    Masks here may leave rows empty (e.g. causal with S < T): those rows must be zeros.
    """
    G = kv_heads_for(H)[g_pick % len(kv_heads_for(H))]
    q, k, v = qkv_tensors(B, H, G, T, S, D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    shape = {"none": None, "padding": (B, 1, 1, S), "TS": (T, S), "B1TS": (B, 1, T, S),
             "BHTS": (B, H, T, S), "11TS": (1, 1, T, S)}[kind]
    mask = None if shape is None else torch.rand(shape, generator=g) < 0.5
    out = attention(q, k, v, mask, causal=causal)
    assert_close(out, ref_attention(q, k, v, mask, causal), **F64)


def test_gqa_path_does_not_repeat_kv_heads(monkeypatch):
    """The fused call sees K/V with G heads, never H (no materialised repeat)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append(k.shape[1])
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv_tensors(2, 8, 2, 5, 5, 4)
    for mask in (None, make_mask("padding", 2, 8, 5, 5), make_mask("BHTS", 2, 8, 5, 5)):
        for causal in (False, True):
            attention(q, k, v, mask, causal=causal)
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("G", [4, 1])
def test_decode_step_feeds_sdpa_unit_stride_head_dims(rows, G, monkeypatch):
    """The fused kernel needs stride 1 in D; with a larger stride SDPA silently takes its
    math path, which copied the whole KV cache (5x slower at 2,048 tokens). Linear's
    transposed outputs for 2-48 rows must not leak into it."""
    strides = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, G).eval()
    cache = KVCache(1, rows, G, 8, 6)
    with torch.inference_mode(), kernel.disabled():  # the SDPA path, used without the kernel
        mha(torch.randn(rows, 3, 32), causal=True, cache=cache)  # prefill
        mha(torch.randn(rows, 1, 32), causal=True, cache=cache)  # one decode step
    assert strides and set(strides) == {(1, 1, 1)}


# ------------------------------------------------------------ empty rows


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    B, H, G, T, S, D = 2, 4, 2, 4, 5, 8
    q, k, v = (t.requires_grad_() for t in qkv_tensors(B, H, G, T, S, D))
    mask = make_mask("B1TS", B, H, T, S)
    mask[0, :, 1] = False  # query 1 of batch 0 may attend nothing
    mask[1] = False  # batch 1 sees nothing at all
    out = attention(q, k, v, mask)
    assert_close(out, ref_attention(q, k, v, mask), **F64)
    assert_close(out[0, :, 1], torch.zeros(H, D, dtype=out.dtype))
    assert_close(out[1], torch.zeros(H, T, D, dtype=out.dtype))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert_close(q.grad[1], torch.zeros_like(q.grad[1]))
    assert_close(q.grad[0, :, 1], torch.zeros_like(q.grad[0, :, 1]))


@pytest.mark.parametrize("G", [4, 2, 1])
def test_causal_with_fewer_keys_than_queries_gives_zero_rows(G):
    """causal with S < T: queries i < T - S see no key (bottom-right alignment)."""
    B, H, T, S, D = 1, 4, 5, 3, 4
    q, k, v = (t.requires_grad_() for t in qkv_tensors(B, H, G, T, S, D))
    out = attention(q, k, v, causal=True)
    assert_close(out, ref_attention(q, k, v, causal=True), **F64)
    assert_close(out[:, :, : T - S], torch.zeros(B, H, T - S, D, dtype=out.dtype))
    assert out[:, :, T - S :].abs().amin() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gradients_match_reference():
    q, k, v = (t.requires_grad_() for t in qkv_tensors(2, 4, 2, 5, 6, 8))
    mask = make_mask("padding", 2, 4, 5, 6)
    grads = torch.autograd.grad(attention(q, k, v, mask, causal=True).sum(), (q, k, v))
    expected = torch.autograd.grad(ref_attention(q, k, v, mask, True).sum(), (q, k, v))
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, **F64)


# ------------------------------------------------------------ probabilities


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_probs_match_reference_and_sum_to_one(kind, causal):
    B, H, T, S, D = 2, 4, 4, 6, 8
    for G in kv_heads_for(H):
        q, k, v = qkv_tensors(B, H, G, T, S, D)
        mask = make_mask(kind, B, H, T, S)
        p = attention_probs(q, k, v, mask, causal=causal)
        assert p.shape == (B, H, T, S)
        assert_close(p, ref_probs(q, k, mask, causal), **F64)
        assert_close(p.sum(-1), torch.ones(B, H, T, dtype=p.dtype), **F64)
        v_rep = v.repeat_interleave(H // G, 1)
        assert_close(p @ v_rep, attention(q, k, v, mask, causal=causal), **F64)


def test_attention_probs_empty_rows_are_zero():
    q, k, v = qkv_tensors(1, 2, 1, 4, 2, 4)
    p = attention_probs(q, k, v, causal=True)  # rows 0, 1 see nothing
    assert_close(p[:, :, :2], torch.zeros(1, 2, 2, 2, dtype=p.dtype))
    assert_close(p[:, :, 2:].sum(-1), torch.ones(1, 2, 2, dtype=p.dtype))


def test_record_attention_captures_every_module():
    cfg = preset("tiny", vocab_size=20, n_kv_heads=2)
    model = EncoderDecoder(cfg).double().eval()
    src = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 10]])
    tgt = torch.tensor([[2, 4, 5], [2, 6, 7]])
    with record_attention(model) as maps:
        logits = model(src, tgt)
    names = {n for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    assert set(maps) == names and len(names) == 3 * cfg.n_layers
    for name, probs in maps.items():
        assert len(probs) == 1
        S = 4 if name.startswith("encoder") or "cross" in name else 3
        T = 4 if name.startswith("encoder") else 3
        assert probs[0].shape == (2, cfg.n_heads, T, S)
    dec_self = maps["decoder.layers.0.self_attn"][0]
    assert_close(dec_self.triu(1), torch.zeros_like(dec_self))  # causal
    cross = maps["decoder.layers.1.cross_attn"][0]
    assert_close(cross[0, :, :, 3], torch.zeros_like(cross[0, :, :, 3]))  # padded source key
    assert_close(cross.sum(-1), torch.ones(2, cfg.n_heads, 3, dtype=cross.dtype))
    assert all(m.recorder is None for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert_close(model(src, tgt), logits)  # recording changed nothing


def test_recorded_probs_are_the_weights_used():
    """The recorded map times V (through out_proj) reproduces the module's output."""
    mha = MultiHeadAttention(16, 4, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with record_attention(mha) as maps:
        out = mha(x, causal=True)
    (p,) = maps[""]
    v = mha._split_heads(mha.v_proj(x), 2).repeat_interleave(2, 1)  # (B, H, S, D)
    assert_close(mha.out_proj(mha._merge_heads(p @ v)), out, **F64)


# --------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "shapes,mask,match",
    [
        (((2, 4, 3), (2, 2, 3, 8), (2, 2, 3, 8)), None,
         r"attention expects q \(B, H, T, D\).*got q \(2, 4, 3\)"),
        (((2, 4, 3, 8), (2, 3, 3, 8), (2, 3, 3, 8)), None,
         "query heads H=4 are not divisible by key/value heads G=3"),
        (((2, 4, 3, 8), (2, 2, 3, 4), (2, 2, 3, 4)), None,
         r"head dim of q \(2, 4, 3, 8\) and k \(2, 2, 3, 4\) differ"),
        (((2, 4, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), None,
         r"batch of q \(2, 4, 3, 8\) and k \(1, 2, 3, 8\) differ"),
        (((2, 4, 3, 8), (2, 2, 3, 8), (2, 2, 5, 8)), None,
         r"k \(2, 2, 3, 8\) and v \(2, 2, 5, 8\) must have the same shape"),
        (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), torch.ones(2, 1, 1, 5),
         "mask must be boolean"),
        (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), torch.ones(2, 1, 1, 4, dtype=torch.bool),
         r"mask \(2, 1, 1, 4\) does not broadcast to \(B, H, T, S\) = \(2, 4, 3, 5\)"),
        (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), torch.ones(3, 1, 1, 5, dtype=torch.bool),
         r"mask \(3, 1, 1, 5\) does not broadcast"),
        (((1, 4, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8)), torch.ones(2, 1, 1, 5, dtype=torch.bool),
         r"mask \(2, 1, 1, 5\) does not broadcast to \(B, H, T, S\) = \(1, 4, 3, 5\)"),
        (((1, 4, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8)), torch.ones(1, 1, 1, 1, 5, dtype=torch.bool),
         r"mask \(1, 1, 1, 1, 5\) does not broadcast"),
    ],
)
def test_attention_errors(shapes, mask, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, mask)
    with pytest.raises(ValueError, match=match):
        attention_probs(q, k, v, mask)


@pytest.mark.parametrize(
    "args,match",
    [
        ((16, 4, 3), "n_heads=4 is not divisible by n_kv_heads=3"),
        ((16, 4, 0), "n_heads=4 is not divisible by n_kv_heads=0"),
        ((18, 4, 2), "d_model=18 is not divisible by n_heads=4"),
    ],
)
def test_multihead_attention_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(*args)


def test_beams_need_a_key_padding_mask():
    mha = MultiHeadAttention(16, 4, 2)
    x, memory = torch.randn(4, 3, 16), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"with 2 queries per key row the mask must be"):
        mha(x, memory, mask=torch.ones(2, 1, 3, 5, dtype=torch.bool))


# --------------------------------------------------------------------- KVCache


def test_bytes_per_token_matches_the_buffers():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        L, B, G, D, N = 3, 2, 2, 8, 7
        cache = KVCache(L, B, G, D, N, dtype=dtype)
        measured = cache.nbytes // (B * N)
        itemsize = torch.finfo(dtype).bits // 8
        assert KVCache.bytes_per_token(L, G, D, dtype) == measured == 2 * L * G * D * itemsize


def test_kv_cache_update_full_reset():
    cache = KVCache(2, 1, 2, 4, max_seq_len=5)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    ks, vs = cache.update(0, k, v)
    assert_close(ks, k)
    assert_close(vs, v)
    cache.update(1, k, v)
    assert cache.length == 3
    with pytest.raises(ValueError, match=r"KVCache is full: 3 \+ 3 tokens exceed max_seq_len=5"):
        cache.update(0, k, v)
    k2, v2 = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    ks, vs = cache.update(0, k2, v2)
    assert_close(ks, torch.cat([k, k2], 2))
    assert_close(vs, torch.cat([v, v2], 2))
    cache.cross[0] = (k, v)
    cache.reset()
    assert cache.length == 0 and cache.lengths == [0, 0] and cache.cross == [None, None]
    ks, _ = cache.update(0, k2, v2)
    assert_close(ks, k2)


def test_kv_cache_rejects_wrong_shapes():
    cache = KVCache(1, 2, 2, 4, max_seq_len=5)
    with pytest.raises(ValueError, match=r"k \(2, 1, 1, 4\) does not fit the cache's"):
        cache.update(0, torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    with pytest.raises(ValueError, match="KVCache head_dim=0 must be >= 1"):
        KVCache(1, 2, 2, 0, 5)


def test_kv_cache_reorder_selects_rows_and_keeps_cross():
    L = 3
    cache = KVCache(L, 3, 1, 2, max_seq_len=4)
    size = cache.nbytes
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2).clone()  # row b holds b
    for layer in range(L):  # layer l holds 10 * l + row: a swap between layers would show
        cache.update(layer, k + 10 * layer, -k - 10 * layer)
    cross = (torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2))
    cache.cross[0] = cross
    cache.reorder(torch.tensor([2, 2, 0]))
    expected = torch.tensor([2.0, 2.0, 0.0])[:, None, None, None].expand(3, 1, 2, 2)
    for layer in range(L):
        assert_close(cache.k[layer][:, :, :2], expected + 10 * layer)
        assert_close(cache.v[layer][:, :, :2], -expected - 10 * layer)
    assert cache.length == 2 and cache.cross[0] is cross
    step = torch.tensor([5.0, 6.0, 7.0])[:, None, None, None].expand(3, 1, 1, 2)
    for layer in range(L):
        cache.update(layer, step + 10 * layer, -step - 10 * layer)
    cache.reorder(torch.tensor([1, 0, 0]))  # a second reorder: the swapped buffers again
    expected = torch.tensor([[2.0, 2.0, 6.0], [2.0, 2.0, 5.0], [2.0, 2.0, 5.0]])
    expected = expected[:, None, :, None].expand(3, 1, 3, 2)
    for layer in range(L):
        assert_close(cache.k[layer][:, :, :3], expected + 10 * layer)
        assert_close(cache.v[layer][:, :, :3], -expected - 10 * layer)
    # reorder holds one spare layer for k and one for v, not a second cache
    assert cache.nbytes == size * (L + 1) // L
    assert len({t.data_ptr() for t in cache.k + cache.v + cache._spare}) == 2 * L + 2


def test_kv_cache_fill_random():
    cache = KVCache(2, 1, 1, 2, max_seq_len=4)
    cache.fill_random_(3)
    assert cache.length == 3
    for buf in cache.k + cache.v:
        assert buf[:, :, :3].abs().max() <= 1 and buf[:, :, :3].abs().sum() > 0
        assert buf[:, :, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"fill_random_ n=5 must be in \[0, max_seq_len=4\]"):
        cache.fill_random_(5)


# ---------------------------------------------------- MultiHeadAttention vs torch


def copy_into_torch_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)


def mha_pair(C=16, H=4):
    ours = MultiHeadAttention(C, H).double().eval()
    theirs = nn.MultiheadAttention(C, H, batch_first=True).double().eval()
    copy_into_torch_mha(ours, theirs)
    return ours, theirs


def test_mha_equals_torch_multihead_attention_self_attention():
    ours, theirs = mha_pair()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 1])
    ignore = torch.arange(6)[None, :] >= lengths[:, None]  # torch's polarity: True = ignore
    out = ours(x, mask=~ignore[:, None, None, :])
    expected, _ = theirs(x, x, x, key_padding_mask=ignore, need_weights=False)
    assert_close(out, expected, **F64)
    # causal: torch's attn_mask True = not allowed
    out = ours(x, causal=True)
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(6), need_weights=False)
    assert_close(out, expected, **F64)


def test_mha_equals_torch_multihead_attention_cross_attention():
    ours, theirs = mha_pair()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    memory = torch.randn(2, 7, 16, dtype=torch.float64)
    ignore = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    out = ours(x, memory, mask=~ignore[:, None, None, :])
    expected, weights = theirs(x, memory, memory, key_padding_mask=ignore,
                               average_attn_weights=False)
    assert_close(out, expected, **F64)
    with record_attention(ours) as maps:
        ours(x, memory, mask=~ignore[:, None, None, :])
    assert_close(maps[""][0], weights, **F64)


def expand_kv_weights(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """An MHA whose K/V projections hold each group's weights repeated for its query heads."""
    H, G, D = gqa.n_heads, gqa.n_kv_heads, gqa.head_dim
    C = H * D
    mha = MultiHeadAttention(C, H).to(gqa.q_proj.weight.dtype)

    def rep(t):  # (G*D, ...) -> (H*D, ...): head h gets group h // (H // G)
        rest = t.shape[1:]
        return t.reshape(G, D, *rest).repeat_interleave(H // G, 0).reshape(H * D, *rest)

    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(rep(src.weight))
            dst.bias.copy_(rep(src.bias))
    return mha


@pytest.mark.parametrize("G", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(G):
    gqa = MultiHeadAttention(32, 4, G).double()
    mha = expand_kv_weights(gqa)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    memory = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = make_mask("padding", 2, 4, 5, 6)
    assert_close(gqa(x, causal=True), mha(x, causal=True), **F64)
    assert_close(gqa(x, memory, mask=mask), mha(x, memory, mask=mask), **F64)
    with record_attention(gqa) as a, record_attention(mha) as b:
        gqa(x, memory, mask=mask)
        mha(x, memory, mask=mask)
    assert_close(a[""][0], b[""][0], **F64)


# ------------------------------------------------- MultiHeadAttention with cache


@pytest.mark.parametrize("G", [4, 2, 1])
@pytest.mark.parametrize("use_rope", [False, True])
def test_mha_incremental_equals_full_causal(G, use_rope):
    from qkv.layers import RotaryEmbedding

    rope = RotaryEmbedding(8, 16) if use_rope else None
    mha = MultiHeadAttention(32, 4, G, rope=rope).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    full = mha(x, causal=True)
    cache = KVCache(1, 2, G, 8, max_seq_len=10, dtype=torch.float64)
    steps = [mha(x[:, :3], causal=True, cache=cache)]  # chunked prefill
    steps += [mha(x[:, t : t + 1], causal=True, cache=cache) for t in range(3, 7)]
    assert_close(torch.cat(steps, 1), full, **F64)
    assert cache.length == 7


def test_cross_attention_with_beams_shares_source_kv():
    """R beams per source (rows s*R .. s*R+R-1) read their source's K/V computed once."""
    mha = MultiHeadAttention(16, 4, 1).double().eval()
    R, memory = 3, torch.randn(2, 5, 16, dtype=torch.float64)
    mask = make_mask("padding", 2, 4, 1, 5)
    x = torch.randn(2 * R, 4, 16, dtype=torch.float64)
    expected = mha(x, memory.repeat_interleave(R, 0), mask=mask.repeat_interleave(R, 0))
    cache = KVCache(1, 2 * R, 1, 4, max_seq_len=8, dtype=torch.float64)
    out = [mha(x[:, t : t + 1], memory, mask=mask, cache=cache) for t in range(4)]
    assert_close(torch.cat(out, 1), expected, **F64)
    assert cache.cross[0][0].shape == (2, 1, 5, 4)  # per source, not per beam


def test_kv_cache_reorder_can_drop_finished_rows():
    """Fewer indices than rows: a smaller cache; `sources` selects the cross K/V too."""
    cache = KVCache(1, 4, 1, 2, max_seq_len=3)
    k = torch.arange(4.0)[:, None, None, None].expand(4, 1, 2, 2).clone()  # row b holds b
    cache.update(0, k, -k)
    cross_k = torch.arange(2.0)[:, None, None, None].expand(2, 1, 5, 2)  # 2 sources
    cache.cross[0] = (cross_k, -cross_k)
    cache.reorder(torch.tensor([3, 2]), sources=torch.tensor([1]))
    assert cache.batch_size == 2 and cache.length == 2
    expected = torch.tensor([3.0, 2.0])[:, None, None, None].expand(2, 1, 2, 2)
    assert_close(cache.k[0][:, :, :2], expected)
    assert_close(cache.v[0][:, :, :2], -expected)
    assert_close(cache.cross[0][0], cross_k[1:])
    ks, _ = cache.update(0, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    assert_close(ks[:, :, :2], expected)


def test_attention_dropout_only_while_training():
    mha = MultiHeadAttention(16, 4, 2, dropout=0.5).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mha.eval()
    assert_close(mha(x), mha(x), **F64)
    mha.train()
    assert (mha(x) - mha(x)).abs().amax() > 1e-3
    q, k, v = qkv_tensors(1, 4, 2, 5, 5, 8)
    torch.manual_seed(1)
    a = attention(q, k, v, dropout=0.5)
    torch.manual_seed(1)
    assert_close(attention(q, k, v, dropout=0.5), a, **F64)  # seeded: reproducible
    assert (a - attention(q, k, v)).abs().amax() > 1e-3
