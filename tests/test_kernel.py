"""qkv.kernel: the compiled decode attention against float64 math, where it applies, its build."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import threading
from contextlib import nullcontext

import pytest
import torch
from torch.testing import assert_close

from qkv import KVCache, MultiHeadAttention, attention, kernel

A = importlib.import_module("qkv.attention")  # the module; qkv.attention is the function


@pytest.fixture(scope="module")
def built():
    """Skip when no C compiler can build it, unless QKV_KERNEL=1 (CI) makes that an error."""
    if os.environ.get("QKV_KERNEL") == "0" or not kernel.available():
        pytest.skip("the decode attention kernel is unavailable here (QKV_KERNEL=0 or no compiler)")


def reference(q, k, v, keep):
    """Equation (1) in float64 with repeated K/V heads; keep (B or 1, S); empty rows -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ v).float()


def tensors(B, H, G, T, S, D, spare=5, seed=0):
    """q (B, H, T, D) as the transposed view a projection gives; k, v slices of a longer cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # (B, H, T, D), not contiguous
    k = torch.randn(B, G, S + spare, D, generator=g)[:, :, :S]  # (B, G, S, D) of a cache
    v = torch.randn(B, G, S + spare, D, generator=g)[:, :, :S]
    return q, k, v


SHAPES = [  # (B, H, G, T, S, D): tails of 8-key blocks and 64-key tiles, every D branch
    (2, 9, 9, 1, 130, 64),  # MHA
    (2, 9, 3, 1, 65, 64),  # GQA
    (3, 9, 1, 1, 200, 64),  # MQA
    (2, 8, 2, 4, 33, 128),  # four queries per sequence (beams sharing a source)
    (2, 4, 1, 1, 1, 32),  # one key
    (1, 6, 2, 1, 9, 24),  # D outside the compiled constants
    (2, 2, 2, 3, 7, 8),
    (1, 2, 1, 1, 300, 256),
    (1, 9, 1, 1, 2000, 64),  # one (row, kv head) pair: keys cut into 4 chunks across threads
    (1, 8, 2, 1, 1030, 32),  # two pairs, chunks of 258 and 256 keys
    (2, 5, 1, 1, 77, 64),  # 5 rows: a block of 3 (on AVX-512) and 2 left over
    (2, 8, 1, 1, 150, 32),  # 8 rows: 2 blocks, the next tile prefetched, 2 left over
    (1, 8, 1, 2, 70, 128),  # 16 rows of D 128: blocked scores, value sums row by row
    (1, 4, 4, 1, 70, 128),  # one row of D 128: the widest one-row path at 16 lanes
    (2, 3, 3, 1, 50, 24),  # one row of D 24: the one-row path at 8 lanes
]


@pytest.mark.parametrize("B,H,G,T,S,D", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "per_row", "shared", "keys_only", "empty_row"])
def test_kernel_matches_float64_math(built, B, H, G, T, S, D, mask_kind):
    q, k, v = tensors(B, H, G, T, S, D)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(B, S, generator=g) < 0.7
    keep[:, -1] = True
    if mask_kind == "empty_row":
        keep[0] = False
    mask = {"none": None, "per_row": keep[:, None, None, :], "shared": keep[:1, None, None, :],
            "keys_only": keep[0], "empty_row": keep[:, None, None, :]}[mask_kind]
    assert kernel.applies(q, k, v, mask, False, 0.0)
    expected_keep = {"none": None, "shared": keep[:1].expand(B, S),
                     "keys_only": keep[:1].expand(B, S)}.get(mask_kind, keep)
    out = attention(q, k, v, mask)
    assert out.shape == (B, H, T, D) and out.dtype == torch.float32
    assert_close(out, reference(q, k, v, expected_keep), rtol=1e-5, atol=2e-6)
    if mask_kind == "empty_row":
        assert out[0].abs().max() == 0


def test_chunks_with_no_allowed_key_are_merged_correctly(built):
    """Batch 1 cuts the keys into chunks; a chunk whose keys are all masked adds nothing."""
    q, k, v = tensors(1, 9, 1, 1, 2048, 64)
    keep = torch.ones(1, 2048, dtype=torch.bool)
    keep[0, :1500] = False  # the first chunks entirely masked
    keep[0, 1600:1700] = False
    out = attention(q, k, v, keep[:, None, None, :])
    assert_close(out, reference(q, k, v, keep), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_threads(built, threads):
    """The key chunks depend on the thread count; the result must not."""
    before = torch.get_num_threads()
    q, k, v = tensors(1, 8, 2, 1, 1030, 32)
    try:
        torch.set_num_threads(threads)
        out = attention(q, k, v)
    finally:
        torch.set_num_threads(before)
    assert_close(out, reference(q, k, v, None), rtol=1e-5, atol=2e-6)


def _sdpa_path(q, k, v, mask=None):
    with kernel.disabled():
        return attention(q, k, v, mask)


@pytest.mark.parametrize("S", [40, 2048])  # one chunk; chunks at batch 1
def test_nan_and_inf_inputs_give_what_sdpa_gives(built, S):
    q, k, v = tensors(1, 4, 1, 1, S, 8)
    q[0, :, :, 0] = torch.tensor([1.0, 1.0, 1.0, -1.0])[:, None]
    q[0, 1] = float("nan")  # a NaN query row: NaN
    k[0, 0, 7, 0] = -float("inf")  # key 7: score -inf for heads 0 and 2 (weight 0) ...
    k[0, 0, 7, 1:] = 0  # ... and +inf for head 3 (NaN, as SDPA gives)
    out = attention(q, k, v)
    assert out[0, 1].isnan().all() and out[0, 3].isnan().all()
    assert out[0, 0].isfinite().all() and out[0, 2].isfinite().all()
    assert_close(out, _sdpa_path(q, k, v), rtol=1e-5, atol=2e-6, equal_nan=True)
    q, k, v = tensors(1, 2, 1, 1, S, 8)
    k[0, 0, : S // 2] = float("nan")  # NaN keys in the first chunk only
    assert attention(q, k, v).isnan().all() and _sdpa_path(q, k, v).isnan().all()


def test_nan_at_a_masked_key_is_ignored_for_blocks_of_rows(built):
    q, k, v = tensors(2, 6, 1, 1, 40, 8)  # 6 rows per K/V head: blocks of 3 on AVX-512
    k[:, 0, 5] = float("nan")
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[:, 5] = False
    out = attention(q, k, v, keep[:, None, None, :])
    assert out.isfinite().all()
    assert_close(out, reference(q, k, v, keep), rtol=1e-5, atol=2e-6)


def test_all_scores_minus_inf_give_what_sdpa_gives(built):
    """SDPA on the CPU gives zeros where every score is -inf; so does the kernel."""
    q = torch.ones(1, 2, 1, 8)
    k = torch.full((1, 1, 2048, 8), -float("inf"))
    v = torch.randn(1, 1, 2048, 8)
    assert_close(attention(q, k, v), _sdpa_path(q, k, v))
    assert attention(q, k, v).abs().max() == 0
    k[0, 0, 1500:] = torch.randn(548, 8)  # finite scores in the last chunk only
    out = attention(q, k, v)
    assert out.isfinite().all()
    assert_close(out, _sdpa_path(q, k, v), rtol=1e-5, atol=2e-6)


def test_other_layouts_of_k_and_v(built):
    """K/V as (B, S, G, D) transposed (a projection's view) and as stride-0 expansions."""
    q, _, _ = tensors(2, 8, 2, 1, 50, 16)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 50, 2, 16, generator=g).transpose(1, 2)  # (B, G, S, D)
    v = torch.randn(2, 50, 2, 16, generator=g).transpose(1, 2)
    assert kernel.applies(q, k, v, None, False, 0.0)
    assert_close(attention(q, k, v), reference(q, k, v, None), rtol=1e-5, atol=2e-6)
    k1, v1 = k[:1].expand(2, -1, -1, -1), v[:, :1].expand(-1, 2, -1, -1)  # stride 0
    assert_close(attention(q, k1, v1), reference(q, k1, v1, None), rtol=1e-5, atol=2e-6)


def test_beams_sharing_cross_attention_keys(built):
    """MultiHeadAttention folds 4 beams per source into query rows: kernel vs SDPA path."""
    torch.manual_seed(0)
    for G in (4, 1):
        mha = MultiHeadAttention(32, 4, G).eval()
        memory, x = torch.randn(3, 11, 32), torch.randn(12, 1, 32)  # 3 sources, 4 beams each
        mask = torch.rand(3, 1, 1, 11) > 0.3
        mask[..., 0] = True
        with torch.inference_mode():
            out = mha(x, memory, mask=mask)
            with kernel.disabled():
                expected = mha(x, memory, mask=mask)
        assert_close(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.filterwarnings("ignore")  # tracer and vmap fallback warnings
def test_tracing_and_transforms_do_not_use_the_kernel(built):
    """The C call is invisible to torch.jit.trace, vmap and forward-mode AD: SDPA there."""
    q, k, v = tensors(2, 4, 1, 1, 30, 8)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k, v: attention(q, k, v), (q, k, v))
    q2, k2, v2 = tensors(2, 4, 1, 1, 30, 8, seed=5)
    q2, k2, v2 = q2.contiguous(), k2.contiguous(), v2.contiguous()
    assert_close(traced(q2, k2, v2), reference(q2, k2, v2, None), rtol=1e-5, atol=2e-6)
    batched = torch.vmap(lambda q: attention(q, k, v))(q[None].expand(3, -1, -1, -1, -1))
    assert_close(batched[1], reference(q, k, v, None), rtol=1e-5, atol=2e-6)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not kernel.applies(fwAD.make_dual(q, torch.ones_like(q)), k, v, None, False, 0.0)


def test_zero_head_dim_is_left_to_sdpa(built):
    q, k, v = torch.zeros(2, 4, 1, 0), torch.zeros(2, 1, 5, 0), torch.zeros(2, 1, 5, 0)
    assert not kernel.applies(q, k, v, None, False, 0.0)


def test_kernel_keeps_large_scores_finite(built):
    """Scores of hundreds: e^(s - max) underflows for most keys, never to NaN or inf. A
    score's rounding is then amplified by e^x: the kernel may be off the reference by as
    much as PyTorch's SDPA is (1.8e-5 here), no more."""
    q, k, v = tensors(2, 4, 1, 1, 100, 64)
    out, ref = attention(q * 40, k, v), reference(q * 40, k, v, None)
    assert torch.isfinite(out).all()
    with kernel.disabled():
        sdpa_error = (attention(q * 40, k, v) - ref).abs().max()
    assert (out - ref).abs().max() <= max(sdpa_error, 2e-6)


def test_kernel_equals_sdpa_path_and_is_used(built, monkeypatch):
    """Same numbers as qkv's SDPA path; with the kernel, SDPA is not called at all."""
    q, k, v = tensors(4, 8, 2, 1, 70, 32)
    with kernel.disabled():
        assert not kernel.applies(q, k, v, None, True, 0.0)
        expected = attention(q, k, v, causal=True)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", None)  # would raise if called
    assert_close(attention(q, k, v, causal=True), expected, rtol=1e-5, atol=2e-6)


def _applies(q, k, v, mask=None, causal=False, dropout=0.0):
    return kernel.applies(q, k, v, mask, causal, dropout)


def test_where_the_kernel_applies(built):
    q, k, v = tensors(2, 8, 2, 1, 16, 32)
    assert _applies(q, k, v) and _applies(q, k, v, causal=True)
    assert not _applies(q, k, v, dropout=0.1)
    assert not _applies(q.double(), k.double(), v.double())
    assert not _applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not _applies(q, k.to("meta"), v)  # every tensor on the CPU, not only q
    assert not _applies(q, k, v, torch.ones(16, dtype=torch.bool, device="meta"))
    assert not _applies(q.clone().requires_grad_(), k, v)
    with torch.no_grad():
        assert _applies(q.clone().requires_grad_(), k, v)
    assert not _applies(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # stride in D
    q4, k4, v4 = tensors(2, 8, 2, 4, 16, 32)
    assert _applies(q4, k4, v4) and not _applies(q4, k4, v4, causal=True)  # prefill: SDPA
    assert not _applies(q4, k4, v4, torch.ones(2, 1, 4, 16, dtype=torch.bool))  # per query
    assert not _applies(q4, k4, v4, torch.ones(2, 8, 1, 16, dtype=torch.bool))  # per head
    assert not _applies(*tensors(2, 4, 4, 1, 16, 12))  # D not a multiple of 8
    assert not _applies(*tensors(1, 32, 1, 4, 16, 8))  # 128 rows per kv head: SDPA
    with kernel.disabled():
        assert not _applies(q, k, v)


def test_disabled_is_per_thread(built):
    """kernel.disabled() in one thread leaves the kernel on in another, and nests."""
    q, k, v = tensors(2, 4, 2, 1, 16, 8)
    seen = {}
    with kernel.disabled():
        other = threading.Thread(target=lambda: seen.update(other=_applies(q, k, v)))
        other.start()
        other.join()
        with kernel.disabled():
            pass
        seen["here"] = _applies(q, k, v)
    seen["after"] = _applies(q, k, v)
    assert seen == {"other": True, "here": False, "after": True}


def test_decode_with_cache_matches_without_kernel(built):
    """MultiHeadAttention decoding from a KV cache, MHA/GQA/MQA: kernel vs SDPA path."""
    torch.manual_seed(0)
    for G in (4, 2, 1):
        mha = MultiHeadAttention(64, 4, G).eval()
        x = torch.randn(3, 12, 64)
        outs = []
        for use in (True, False):
            cache = KVCache(1, 3, G, 16, 12)
            with torch.inference_mode(), (nullcontext() if use else kernel.disabled()):
                mha(x[:, :8], causal=True, cache=cache)
                outs.append(torch.cat([mha(x[:, t:t + 1], causal=True, cache=cache)
                                       for t in range(8, 12)], 1))
        assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------- build and settings


def _fresh(monkeypatch, tmp_path, **env):
    """A kernel module state with its own cache folder and environment."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kernel._library.cache_clear()


@pytest.fixture
def restore_library():
    yield
    kernel._library.cache_clear()  # the next test builds (or finds) the real one again


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path, restore_library):
    monkeypatch.delenv("QKV_KERNEL", raising=False)
    _fresh(monkeypatch, tmp_path, CC=str(tmp_path / "no-such-cc"))
    q, k, v = tensors(2, 4, 1, 1, 10, 8)
    with pytest.warns(RuntimeWarning, match="no-such-cc.*QKV_KERNEL=0"):
        assert not kernel.applies(q, k, v, None, False, 0.0)
    out = attention(q, k, v)  # no second warning: the result is cached
    assert_close(out, reference(q, k, v, None), rtol=1e-5, atol=2e-6)


def test_required_kernel_that_cannot_build_is_an_error(monkeypatch, tmp_path, restore_library):
    _fresh(monkeypatch, tmp_path, CC=str(tmp_path / "no-such-cc"), QKV_KERNEL="1")
    with pytest.raises(kernel.KernelUnavailable, match="QKV_KERNEL=1.*no-such-cc"):
        kernel.available()


def test_compiler_errors_are_reported(monkeypatch, tmp_path, restore_library):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'decode_attention.c:1: error: broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    _fresh(monkeypatch, tmp_path, CC=str(fake), QKV_KERNEL="1")
    with pytest.raises(kernel.KernelUnavailable, match=r"exit 3\):\ndecode_attention.c:1: error"):
        kernel.available()
    assert list(tmp_path.glob("*.so")) == []  # no half-written library left behind


def test_kernel_setting_zero_and_bad_values(monkeypatch, tmp_path, restore_library):
    _fresh(monkeypatch, tmp_path, QKV_KERNEL="0", CC=str(tmp_path / "no-such-cc"))
    q, k, v = tensors(2, 4, 1, 1, 10, 8)
    assert not kernel.applies(q, k, v, None, False, 0.0)  # no build tried, no warning
    monkeypatch.setenv("QKV_KERNEL", "yes")
    with pytest.raises(ValueError, match="QKV_KERNEL='yes' must be 0"):
        kernel.available()


def test_library_is_built_once_and_reused(built, tmp_path):
    """A second process finds the cached library instead of compiling again."""
    env = dict(os.environ, QKV_CACHE_DIR=str(tmp_path), QKV_KERNEL="1")
    env.pop("CC", None)
    code = "from qkv import kernel; assert kernel.available(); print(kernel.library_path('cc'))"
    mtimes = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        mtimes.append(os.stat(done.stdout.strip()).st_mtime_ns)
    assert mtimes[0] == mtimes[1] and len(list(tmp_path.glob("*.so"))) == 1
    mode = next(tmp_path.glob("*.so")).stat().st_mode
    umask = os.umask(0)
    os.umask(umask)
    assert mode & 0o777 == 0o755 & ~umask  # readable by others unless the umask says not
    assert kernel.library_path("clang") != kernel.library_path("cc")  # compiler in the key


# ------------------------------------------------------------------ logsumexp_rows


def _no_torch_logsumexp(monkeypatch):
    """Make Tensor.logsumexp fail: what passes then came from the compiled path."""
    def fail(*args, **kwargs):
        raise AssertionError("torch's logsumexp was called")
    monkeypatch.setattr(torch.Tensor, "logsumexp", fail)


@pytest.mark.parametrize("shape", [(64, 8000), (1, 7), (3, 8), (5, 9), (2, 1), (0, 5), (3, 17)])
def test_logsumexp_rows_equals_torch(built, shape, monkeypatch):
    torch.manual_seed(shape[1])
    x = torch.randn(*shape) * 10
    ref = torch.logsumexp(x, -1)
    _no_torch_logsumexp(monkeypatch)
    with torch.no_grad():
        assert_close(kernel.logsumexp_rows(x), ref, rtol=1e-6, atol=1e-5)


def test_logsumexp_rows_special_values_as_torch(built, monkeypatch):
    x = torch.randn(6, 21)
    x[0] = float("-inf")  # every value -inf: -inf
    x[1, 3] = float("inf")  # +inf: +inf
    x[2, 20] = float("nan")  # NaN, in the scalar tail: NaN
    x[3, 4] = float("nan")  # NaN in a vector
    x[4, :20] = float("-inf")  # one finite value
    x[5, 0] = 1e30  # one huge value: its own log-sum
    ref = torch.logsumexp(x, -1)
    _no_torch_logsumexp(monkeypatch)
    assert_close(kernel.logsumexp_rows(x), ref, equal_nan=True)


def test_logsumexp_rows_falls_back_to_torch(built, monkeypatch):
    """Not contiguous, gradients wanted, float64, kernel.disabled() or QKV_KERNEL=0:
    torch's own logsumexp (seen being called)."""
    x = torch.randn(4, 30)
    calls = []
    real = torch.Tensor.logsumexp
    monkeypatch.setattr(torch.Tensor, "logsumexp",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    for t in (x[:, ::2], x.double(), x.clone().requires_grad_()):
        assert_close(kernel.logsumexp_rows(t), torch.logsumexp(t, -1))
    g = x.clone().requires_grad_()
    kernel.logsumexp_rows(g).sum().backward()  # torch's op: a gradient comes back
    assert_close(g.grad, torch.softmax(x, -1))
    with kernel.disabled():
        assert_close(kernel.logsumexp_rows(x), torch.logsumexp(x, -1))
    monkeypatch.setenv("QKV_KERNEL", "0")
    assert_close(kernel.logsumexp_rows(x), torch.logsumexp(x, -1))
    assert len(calls) == 6


def test_avx2_build_gives_the_same_results(built, avx2_library, monkeypatch):
    """CI may run on a CPU without AVX-512: the kernels built for AVX2 (8-lane blocks, 12-row
    chunks of the skinny product) against PyTorch, on this machine."""
    lib = avx2_library
    assert (lib.qkv_skinny_width(), lib.qkv_skinny_max_rows()) == (8, 64)
    monkeypatch.setattr(kernel, "_library", lambda: lib)
    torch.manual_seed(0)
    for N, K in [(100, 129), (40, 64)]:
        w, b = torch.randn(N, K) * K**-0.5, torch.randn(N)
        packed = kernel.pack_skinny(w)
        for M in (1, 2, 12, 13, 25, 64):  # chunks of 12 rows: 13 and 25 cross them
            x = torch.randn(M, K)
            assert_close(kernel.skinny_linear(x, packed, b, N), torch.nn.functional.linear(x, w, b),
                         rtol=1e-5, atol=1e-4)
    for B, H, G, T, S, D in [(2, 9, 1, 1, 77, 64), (2, 8, 2, 4, 33, 128), (2, 9, 9, 1, 130, 64)]:
        q, k, v = tensors(B, H, G, T, S, D)
        assert_close(kernel.attention(q, k, v, None), reference(q, k, v, None),
                     rtol=1e-5, atol=2e-6)
    x = torch.randn(3, 8000) * 5
    assert_close(kernel.logsumexp_rows(x), torch.logsumexp(x, -1), rtol=1e-6, atol=1e-5)
