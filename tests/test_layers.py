"""Layers: positions (sinusoidal, RoPE), embeddings, norms, feed-forward, residual blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import qkv.linear as QL
from qkv import kernel, preset
from qkv.layers import (
    DecoderLayer,
    Embeddings,
    EncoderLayer,
    FeedForward,
    RotaryEmbedding,
    make_norm,
    sinusoidal_table,
)
from qkv.linear import SKINNY_ROWS, Linear, linear

F64 = dict(rtol=0, atol=1e-10)


def tiny(**kw):
    return preset("tiny", **{"vocab_size": 11, **kw})


def test_sinusoidal_table_is_the_paper_formula():
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    n, d = 9, 6
    expected = torch.tensor([
        [(math.sin if c % 2 == 0 else math.cos)(pos / 10000 ** ((c - c % 2) / d))
         for c in range(d)]
        for pos in range(n)
    ])
    assert_close(sinusoidal_table(n, d), expected)


def test_rope_rotates_half_pairs():
    """Channel pairs (i, i + D/2) turn by pos * base^(-2i/D), as in Llama/HF."""
    D, base = 8, 10000.0
    rope = RotaryEmbedding(D, 16, base)
    x = torch.randn(2, 3, 5, D)
    pos = torch.tensor([0, 3, 4, 9, 15])
    half = D // 2
    theta = pos[:, None].double() * base ** (-torch.arange(half).double() * 2 / D)  # (T, D/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(theta), theta)
    expected = torch.cat([z.real, z.imag], -1).float()
    assert_close(rope(x, pos), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 32)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum()

    assert_close(score(5, 2), score(13, 10), rtol=1e-6, atol=1e-6)
    assert_close(score(0, 0), (q * k).sum(), rtol=1e-6, atol=1e-6)


def test_rope_batched_positions_equal_per_row():
    rope = RotaryEmbedding(4, 16)
    x = torch.randn(2, 3, 4, 4)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = rope(x, pos)
    for b in range(2):
        assert_close(out[b : b + 1], rope(x[b : b + 1], pos[b]))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope", "none"])
def test_embeddings_scale_and_positions(positions):
    cfg = tiny(positions=positions, dropout=0.0)
    emb = Embeddings(cfg)
    tokens, pos = torch.tensor([[3, 4, 5]]), torch.arange(3)
    expected = emb.tok.weight[tokens] * math.sqrt(cfg.d_model)
    if positions == "sinusoidal":
        expected = expected + sinusoidal_table(cfg.max_seq_len, cfg.d_model)[pos]
    elif positions == "learned":
        expected = expected + emb.pos.weight[pos]
    assert_close(emb(tokens, pos), expected)


def test_embeddings_token_types_and_norm():
    cfg = tiny(type_vocab_size=2, embed_norm=True, scale_embeddings=False, positions="none")
    emb = Embeddings(cfg)
    tokens, types = torch.tensor([[3, 4]]), torch.tensor([[0, 1]])
    expected = emb.norm(emb.tok.weight[tokens] + emb.types.weight[types])
    assert_close(emb(tokens, torch.arange(2), types), expected)


def test_norms():
    assert isinstance(make_norm(tiny()), nn.LayerNorm)
    rms = make_norm(tiny(norm="rmsnorm", norm_eps=1e-6))
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * rms.weight.double()
    assert_close(rms.double()(x), expected, **F64)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
def test_feed_forward(activation):
    ff = FeedForward(tiny(activation=activation)).double()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    h = x @ ff.fc1.weight.T + ff.fc1.bias
    if activation == "relu":
        h = h.clamp(min=0)
    elif activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif activation == "gelu_tanh":
        h = F.gelu(h, approximate="tanh")
    else:
        g = x @ ff.gate.weight.T + ff.gate.bias
        h = g * torch.sigmoid(g) * h
    assert_close(ff(x), h @ ff.fc2.weight.T + ff.fc2.bias, **F64)
    assert (ff.gate is not None) == (activation == "swiglu")


@pytest.mark.parametrize("place", ["post", "pre"])
def test_encoder_layer_residual_placement(place):
    layer = EncoderLayer(tiny(norm_place=place)).double().eval()
    x = torch.randn(2, 4, 64, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])[:, None, None, :]

    def attn(h):
        return layer.self_attn(h, mask=mask)

    if place == "post":
        h = layer.norm1(x + attn(x))
        expected = layer.norm2(h + layer.ff(h))
    else:
        h = x + attn(layer.norm1(x))
        expected = h + layer.ff(layer.norm2(h))
    assert_close(layer(x, mask), expected, **F64)


@pytest.mark.parametrize("place", ["post", "pre"])
def test_decoder_layer_residual_placement(place):
    layer = DecoderLayer(tiny(norm_place=place)).double().eval()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    memory = torch.randn(2, 5, 64, dtype=torch.float64)
    sa = lambda h: layer.self_attn(h, causal=True)  # noqa: E731
    ca = lambda h: layer.cross_attn(h, memory)  # noqa: E731
    if place == "post":
        h = layer.norm1(x + sa(x))
        h = layer.norm2(h + ca(h))
        expected = layer.norm3(h + layer.ff(h))
    else:
        h = x + sa(layer.norm1(x))
        h = h + ca(layer.norm2(h))
        expected = h + layer.ff(layer.norm3(h))
    assert_close(layer(x, memory), expected, **F64)


def test_decoder_layer_without_cross_attention():
    layer = DecoderLayer(tiny(), cross=False)
    assert layer.cross_attn is None and layer.norm2 is None
    assert layer(torch.randn(1, 3, 64)).shape == (1, 3, 64)


def test_dropout_only_in_training():
    layer = EncoderLayer(tiny(dropout=0.5))
    x = torch.randn(2, 4, 64)
    layer.eval()
    assert_close(layer(x), layer(x))
    layer.train()
    assert (layer(x) - layer(x)).abs().amax() > 1e-3


# --------------------------------------------------------------------- skinny linear


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16, 48, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_at_every_row_count(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(rows, 1, 24)  # a decode step: (B, T=1, C)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (rows, 1, 40)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # 2-48 rows: the reversed product, a transposed view whose rows are not contiguous
    assert y.is_contiguous() == (rows not in SKINNY_ROWS)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_one_row_is_one_block_of_weight_rows_per_thread(threads, bias, monkeypatch):
    """A single row goes through bmm in `threads` blocks of W's rows when they divide N
    (40 rows: 2 blocks of 20), else (1 thread, or 3) through F.linear."""
    blocks = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, **kw: blocks.append(
            (a[-2].shape, a[-1].stride())) or real(*a, **kw))
    torch.manual_seed(threads)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(1, 1, 24)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            y = layer(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert y.shape == (1, 1, 40) and y.is_contiguous()
    # x as a transposed row (strides (0, 1, C)): as a column bmm took a much slower path
    assert blocks == ([((2, 20, 24), (0, 1, 24))] if threads == 2 else [])


@pytest.mark.parametrize("rows", [1, 4])
def test_linear_takes_f_linear_inputs_and_errors(rows):
    """1-D inputs, a broadcast bias, a non-contiguous weight: F.linear's results; a wrong
    input width: F.linear's error."""
    torch.manual_seed(rows)
    w, x = torch.randn(6, 4), torch.randn(rows, 4)
    with torch.inference_mode():
        for args in [(x, w), (x[0], w), (x, w, torch.randn(1)), (x, w.T.contiguous().T)]:
            torch.testing.assert_close(linear(*args), F.linear(*args))
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            linear(torch.randn(rows, 5), w)


def test_linear_trains_like_nn_linear():
    torch.manual_seed(0)
    ours, ref = Linear(6, 5), nn.Linear(6, 5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(16, 6)  # 16 rows, but gradients are on: the plain path
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert set(ours.state_dict()) == {"weight", "bias"}
    with torch.no_grad():  # float64 and bfloat16 take the plain path too
        for dtype in (torch.float64, torch.bfloat16):
            layer = Linear(6, 5).to(dtype)
            assert layer(x.to(dtype)).is_contiguous()


# --------------------------------------------------------------------- packed weights


def _packed_layer(bias: bool, dtype=torch.float32) -> Linear:
    torch.manual_seed(1)
    return Linear(256, 512, bias=bias).to(dtype)  # 16 rows x 512 x 256 = 2^21 multiply-adds


def _kinds(weight) -> list[str]:
    """The packed copies held for `weight`."""
    return sorted(QL._packed.get(weight, {}))


@pytest.mark.parametrize("rows", [4, 16, 17, 64, 65, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, bias):
    layer = _packed_layer(bias)
    x = torch.randn(rows, 1, 256)
    QL.clear_packed()
    with torch.inference_mode():
        y = layer(x)
    if rows <= kernel.skinny_max_rows():
        assert _kinds(layer.weight) == ["blocked"]
    else:
        big = rows * 512 * 256 >= QL.PACKED_MIN_MACS
        assert _kinds(layer.weight) == (["onednn"] if big else [])
    assert y.shape == (rows, 1, 512)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not kernel.skinny_max_rows(), reason="the compiled kernels are unavailable")
@pytest.mark.parametrize("shape", [(512, 256), (1000, 1024), (40, 512), (8, 4096), (100, 200),
                                   (200, 129), (130, 127), (1400, 12)])
@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_equals_f_linear_at_every_row_count(shape, bias, monkeypatch):
    """1 to skinny_max_rows() rows (several chunks of 16 from 17 rows on), with output
    widths that leave a padded last block (1000, 40, 8, 100, 130 are not multiples of 16),
    a width of 1024 (rows 4 KB apart), odd widths (the loop's tail over K), an input width of 12
    (less than one 16 x 16 block of the transposed input) and inputs that
    are 3-D or not contiguous."""
    monkeypatch.setattr(QL, "BLOCKED_MIN_ROWS", 1)  # the kernel takes 1 row too
    N, K = shape
    torch.manual_seed(N + K)
    w, b = torch.randn(N, K) * K**-0.5, torch.randn(N) if bias else None  # outputs ~1
    QL.clear_packed()
    with torch.no_grad():
        for rows in range(1, kernel.skinny_max_rows() + 1):
            for x in (torch.randn(rows, 1, K), torch.randn(rows, 2 * K)[:, ::2]):
                torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b),
                                           rtol=1e-5, atol=1e-4)
    assert _kinds(w) == ["blocked"]


@pytest.mark.skipif(not kernel.skinny_max_rows(), reason="the compiled kernels are unavailable")
def test_blocked_and_onednn_copies_follow_the_weight(monkeypatch):
    """Both copies of one weight (a prompt, then decode steps) are made again after it
    changes; QKV_KERNEL=0 leaves the product to oneDNN."""
    layer = _packed_layer(True)
    with torch.no_grad():
        for rows in (300, 4, 300, 4):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                       rtol=1e-5, atol=1e-4)
        assert _kinds(layer.weight) == ["blocked", "onednn"]
        layer.weight.mul_(-1)
        x = torch.randn(4, 256)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
        assert _kinds(layer.weight) == ["blocked"]  # the stale oneDNN copy is gone
        monkeypatch.setenv("QKV_KERNEL", "0")
        QL.clear_packed()
        x = torch.randn(16, 256)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
        assert _kinds(layer.weight) == ["onednn"]


def test_packed_weight_is_made_again_after_the_weight_changes():
    """An optimizer step or load_state_dict changes the weight in place: the packed copy
    must follow, or inference after training would use the old weights."""
    layer, x = _packed_layer(True), torch.randn(16, 256)
    with torch.no_grad():
        before = layer(x)
        packed = QL.packed_weight(layer.weight)
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
        assert QL.packed_weight(layer.weight) is not packed
        layer.load_state_dict(_packed_layer(True).state_dict())
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # gradients on: F.linear, nothing packed
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_weight_follows_adam_steps(fused):
    """Fused Adam writes the weights without moving their version counters: validation
    between training steps must still see the new weights."""
    layer, x = _packed_layer(True), torch.randn(16, 256)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=fused)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                       rtol=1e-5, atol=1e-4)
        assert layer.weight in QL._packed
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert layer.weight not in QL._packed


def test_packed_path_takes_any_strides_and_keeps_autocast():
    """A strided bias or input and a transposed weight give F.linear's result; under autocast
    the product keeps autocast's dtype (F.linear's path)."""
    layer, x = _packed_layer(True), torch.randn(16, 512)
    strided_bias = torch.randn(1024)[::2]
    wt = torch.randn(256, 512).T  # (512, 256), not contiguous
    with torch.no_grad():
        for args in [(x[:, ::2], layer.weight, layer.bias),
                     (x[:, :256], layer.weight, strided_bias), (x[:, ::2], wt, layer.bias)]:
            torch.testing.assert_close(linear(*args), F.linear(*args), rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x[:, :256])
        assert y.dtype == torch.bfloat16


def test_a_new_tensor_behind_the_weight_is_packed_again():
    layer, x = _packed_layer(False), torch.randn(16, 256)
    with torch.no_grad():
        layer(x)
        layer.weight.data = torch.randn(512, 256)  # new storage: a new data_ptr
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def test_writes_through_data_need_clear_packed():
    layer, x = _packed_layer(False), torch.randn(16, 256)
    with torch.no_grad():
        layer(x)
        layer.weight.data.mul_(2)  # .data has its own version counter: not seen
        QL.clear_packed()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def test_packing_can_be_switched_off(monkeypatch):
    layer, x = _packed_layer(False), torch.randn(16, 256)
    QL.clear_packed()
    with torch.no_grad():
        with QL.packing_disabled():
            layer(x)
        assert layer.weight not in QL._packed
        monkeypatch.setenv("QKV_PACKED", "0")
        layer(x)
        assert layer.weight not in QL._packed
        monkeypatch.setenv("QKV_PACKED", "yes")
        with pytest.raises(ValueError, match=r"QKV_PACKED='yes' must be 0 \(never pack"):
            layer(x)
        monkeypatch.setenv("QKV_PACKED", "1")
        layer(x)
        assert layer.weight in QL._packed


@pytest.mark.skipif(not kernel.skinny_max_rows(), reason="the compiled kernels are unavailable")
def test_skinny_linear_rejects_bad_inputs():
    w = torch.randn(32, 16)
    packed = kernel.pack_skinny(w)
    with pytest.raises(ValueError, match="65 rows; expected 1 to 64"):
        kernel.skinny_linear(torch.randn(65, 16), packed, None, 32)
    with pytest.raises(ValueError, match="x must be contiguous float32"):
        kernel.skinny_linear(torch.randn(4, 32)[:, ::2], packed, None, 32)
    with pytest.raises(ValueError, match=r"packed \(\d+, 16, \d+\) is not pack_skinny's layout "
                                         r"of a \(48, 16\) weight"):
        kernel.skinny_linear(torch.randn(4, 16), packed, None, 48)
    with pytest.raises(ValueError, match=r"bias must be \(32,\) contiguous float32"):
        kernel.skinny_linear(torch.randn(4, 16), packed, torch.randn(31), 32)


def test_packing_can_be_switched_off_by_kind():
    layer, x = _packed_layer(False), torch.randn(4, 256)
    QL.clear_packed()
    with torch.no_grad():
        with QL.packing_disabled("blocked"):
            y = layer(x)  # 4 x 512 x 256 is below oneDNN's 2^20: the reversed product
        assert _kinds(layer.weight) == []
        with QL.packing_disabled("onednn"):
            torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        assert _kinds(layer.weight) == (["blocked"] if kernel.skinny_max_rows() else [])
    with pytest.raises(ValueError, match=r"unknown kind 'mkl'; expected some of \('onednn', "
                                         r"'blocked'\)"):
        with QL.packing_disabled("mkl"):
            pass


def test_packed_copy_goes_with_its_weight():
    import gc

    layer = _packed_layer(False)
    with torch.no_grad():
        layer(torch.randn(16, 256))
    n = len(QL._packed)
    del layer
    gc.collect()
    assert len(QL._packed) == n - 1


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                            "ignore:.*torch.jit.trace.*:DeprecationWarning")
def test_inference_tensor_weights_and_tracing_are_not_packed():
    """An inference tensor has no version counter to notice changes; a trace would record
    the packed copy as a constant. Both take the unpacked paths, with the same results."""
    x = torch.randn(16, 256)
    with torch.inference_mode():
        layer = _packed_layer(True)
        y = layer(x)
    assert layer.weight.is_inference() and layer.weight not in QL._packed
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
    plain = _packed_layer(True)
    QL.clear_packed()
    with torch.no_grad():
        traced = torch.jit.trace(plain, x, check_trace=False)  # the check runs it untraced
    assert plain.weight not in QL._packed
    assert "mkldnn" not in str(traced.graph)


@pytest.mark.skipif(not QL.bf16_is_native(), reason="this CPU has no bfloat16 matmul units")
@pytest.mark.parametrize("rows", [1, 16])
def test_packed_linear_bfloat16(rows):
    layer, x = _packed_layer(True, torch.bfloat16), torch.randn(rows, 256).bfloat16()
    QL.clear_packed()
    with torch.no_grad():
        y = layer(x)
    assert layer.weight in QL._packed and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=5e-2)
