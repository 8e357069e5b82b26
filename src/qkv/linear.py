"""Linear layers for inference: packed weights (a compiled kernel for 2-64 rows, oneDNN
above), skinny products reversed.

F.linear computes x @ W^T. When x has only a few rows (a decoding step of a batch), the
CPU's GEMM handles the weight as the second operand and re-packs all of it on every call.
Computing (W @ x^T)^T instead makes W the first operand, which it streams once. On the
2-core Xeon of docs/benchmarks.md, for SmolLM2's 211 weight matrices in float32, this
was 1.3-1.5x faster at 8 to 48 rows and no faster at 1, 4 or 64 rows; on the 2-core AMD
EPYC it was 2.7-2.8x faster at 2 and 4 rows as well (benchmarks/skinny_linear.py). The result
is a transposed view, not a copy: the same values as F.linear up to rounding, with other
strides.

A single row is a matrix-vector product, which MKL ran on one core of the EPYC at about
half the memory bandwidth. `linear` splits W into one block of rows per thread and lets
`torch.bmm` run the blocks side by side.

From 4 rows up, for weights big enough, `linear` uses oneDNN (shipped inside PyTorch) with
the weight packed once into oneDNN's blocked layout and kept (`packed_weight`): on a
2-core AMD EPYC Zen 4, SmolLM2's matrices at 16 rows took 38 ms as oneDNN's packed product
(45.5 ms through `linear` with its checks) against 64 ms reversed and 77 ms with F.linear
(docs/benchmarks.md, session 11). The packed copy costs
the weight's own size again in memory while the weight lives; QKV_PACKED=0 never packs.

From 2 to 64 rows (BLOCKED_MIN_ROWS, BLOCKED_MAX_ROWS, `kernel.skinny_max_rows()`), float32
weights of at least BLOCKED_MIN_WEIGHT elements go to qkv's compiled product instead
(csrc/skinny_linear.c), with its own packed copy (`blocked_weight`): at a few rows the
time is the time to stream the weight, and that kernel prefetches it far ahead while it
computes. On a 2-core AMD EPYC Zen 5, over SmolLM2's matrices at 16 rows, 1.5x faster than
oneDNN's packed product through `linear`; at 32-64 rows 1.07-1.29x, and over the Table 2
model's matrices at 8-64 rows 1.1-1.45x (docs/benchmarks.md, session 12). A weight used
with both row counts (a long prompt, then decode steps) has both copies: twice its size
again.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from qkv import kernel
from qkv.kernel import _functorch_wrapped
from qkv.kernel import _transformed as _traced_or_forward_ad

# (W @ x^T)^T was measured faster at 8-48 rows on the Xeon and 2-64 on the EPYC (float32,
# no autograd); at 2-7 rows the Xeon measured 0.96x (4 rows), at 64 rows 0.97x.
SKINNY_ROWS = range(2, 49)
# oneDNN with a packed weight, measured per matrix shape on the Zen 4 (2 threads, ad hoc):
# float32 faster than the paths here when rows x N x C >= 2^20 multiply-adds (below, its
# ~20 us per call lost: 0.8-1.0x): 1.06-1.13x at 4 rows for 1024 x 256 and 576 x 576, a tie
# over all of SmolLM2's matrices at 4 rows, 1.6-2x from 8 (benchmarks/skinny_linear.py);
# bfloat16 1.15-1.57x at every row count from 128 x 128.
# The compiled skinny product (kernel.skinny_linear) for BLOCKED_MIN_ROWS to
# BLOCKED_MAX_ROWS rows, float32, weights of at least BLOCKED_MIN_WEIGHT elements: see the
# module's docstring. One row keeps `_matvec`: on the Zen 5, whole decodes at batch 1 were a
# tie (0.95x-1.03x), at 2-3 rows 1.36-1.59x faster with the kernel (ad hoc,
# docs/benchmarks.md, session 12).
BLOCKED_MIN_ROWS = 2
BLOCKED_MAX_ROWS = 64
BLOCKED_MIN_WEIGHT = 1 << 14
PACKED_MIN_ROWS = 4
PACKED_MIN_MACS = 1 << 20
PACKED_MIN_BF16_WEIGHT = 1 << 14

# weight -> {"onednn" or "blocked": ((data_ptr, version), packed copy)}
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
_switch = threading.local()  # .off: kinds switched off by `packing_disabled()` in this thread
_dropped: list = []  # called when packed copies are dropped wholesale (qkv.fused keeps addresses)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., C) @ weight (N, C)^T + bias (N,) -> (..., N), like F.linear."""
    rows = math.prod(x.shape[:-1])
    if (x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype
            or torch.is_grad_enabled() or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or (bias is not None and bias.shape != weight.shape[:1])):
        return F.linear(x, weight, bias)  # also for its errors and broadcasting rules
    kind = _packed_kind(x, weight, bias, rows)
    if kind == "blocked":
        y = kernel.skinny_linear(x.reshape(rows, x.shape[-1]).contiguous(),
                                 blocked_weight(weight), bias, weight.shape[0])
        return y.view(*x.shape[:-1], weight.shape[0])
    if kind == "onednn":
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]),
                                               packed_weight(weight), bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    if x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if rows == 1:
        return _matvec(x, weight, bias)
    if rows not in SKINNY_ROWS:
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).T  # (C, rows)
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
    return y.T.reshape(*x.shape[:-1], weight.shape[0])  # (N, rows) -> (..., N), a view


def _matvec(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One row: W @ x as P = torch threads blocks of N / P rows of W, one bmm batch each.

    x enters bmm as a transposed (1, C) row, strides (0, 1, C). As a (C, 1) column, strides
    (0, 1, 1), the same product took another path, 1.3-1.7x slower than F.linear on the
    EPYC with 2 threads.
    """
    P, (N, C) = torch.get_num_threads(), weight.shape
    if P < 2 or N % P or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    w = weight.view(P, N // P, C)  # (P, N/P, C), no copy
    xs = x.reshape(1, C).T.expand(P, C, 1)  # (P, C, 1), strides (0, 1, C)
    y = torch.bmm(w, xs) if bias is None else torch.baddbmm(bias.view(P, N // P, 1), w, xs)
    return y.view(*x.shape[:-1], N)  # (P, N/P, 1) -> (..., N), contiguous


def _packed_kind(x: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> str | None:
    """Which packed copy of `weight` computes this call: "blocked", "onednn" or None."""
    N, C = weight.shape
    kinds = []
    if x.dtype == torch.float32:
        if N * C >= BLOCKED_MIN_WEIGHT and BLOCKED_MIN_ROWS <= rows <= BLOCKED_MAX_ROWS:
            kinds.append("blocked")
        if rows >= PACKED_MIN_ROWS and rows * N * C >= PACKED_MIN_MACS and _HAVE_PACKED:
            kinds.append("onednn")
    elif rows > 0 and N * C >= PACKED_MIN_BF16_WEIGHT and _HAVE_PACKED and bf16_is_native():
        kinds.append("onednn")
    if kinds:
        off = _packing_off()
        kinds = [k for k in kinds if k not in off]
    if not kinds or not _may_pack(x, weight, bias):
        return None
    if kinds[0] == "blocked" and rows > kernel.skinny_max_rows():  # builds the library once
        kinds.pop(0)
    return kinds[0] if kinds else None


def _may_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a packed copy of `weight` may stand in for it in this call."""
    return ((bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and all(_plain(t) for t in (x, weight, bias) if t is not None)
            and not weight.is_inference() and not _transformed()
            and not torch.is_autocast_enabled("cpu"))  # autocast picks F.linear's dtype


def packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed copy of `weight` (N, C) (see `_cached` for when it is made again)."""
    return _cached(weight, "onednn", torch.ops.mkldnn._reorder_linear_weight)


def blocked_weight(weight: Tensor) -> Tensor:
    """The compiled skinny product's copy of `weight` (N, C): `kernel.pack_skinny`."""
    return _cached(weight, "blocked", kernel.pack_skinny)


def _cached(weight: Tensor, kind: str, make) -> Tensor:
    """make(weight), made at first use and kept while `weight` lives; made again once
    `weight` changes: an in-place op moves its version counter (load_state_dict, SGD), and
    any optimizer step drops the copies of its parameters (fused Adam writes without moving
    it). Writes through `weight.data` are not seen: call `clear_packed()` after them."""
    key = (weight.data_ptr(), weight._version)
    copies = _packed.get(weight)
    hit = None if copies is None else copies.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    copies = {k: hit for k, hit in (copies or {}).items() if hit[0] == key}
    with torch.inference_mode():
        copies[kind] = (key, make(weight.detach()))
    _packed[weight] = copies  # copies made before `weight` changed go now
    return copies[kind][1]


def clear_packed() -> None:
    """Free every packed copy (they are made again at the next use)."""
    _packed.clear()
    for forget in _dropped:
        forget()


def _drop_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step, forget the packed copies of the weights it updated."""
    if _packed:
        for group in optimizer.param_groups:
            for p in group["params"]:
                _packed.pop(p, None)
        for forget in _dropped:
            forget()


register_optimizer_step_post_hook(_drop_after_step)


def on_packed_dropped(forget) -> None:
    """Call forget() whenever packed copies are dropped wholesale (`clear_packed`, an
    optimizer's step): qkv.fused keeps their addresses and lets go of them then."""
    _dropped.append(forget)


KINDS = ("onednn", "blocked")  # the packed copies `linear` makes


@contextmanager
def packing_disabled(*kinds: str):
    """`linear` without packed copies inside the block, in this thread (others keep them):
    for comparisons in one process. kinds: "onednn" and/or "blocked" (the compiled skinny
    product); none given: both."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"packing_disabled{kinds}: unknown kind {unknown[0]!r}; "
                         f"expected some of {KINDS}")
    before = getattr(_switch, "off", frozenset())
    _switch.off = before | frozenset(kinds or KINDS)
    try:
        yield
    finally:
        _switch.off = before


def _packing_off() -> frozenset | tuple:
    """The kinds of packed copies switched off here: by `packing_disabled` in this thread,
    or all of them by QKV_PACKED=0."""
    value = os.environ.get("QKV_PACKED", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"QKV_PACKED={value!r} must be 0 (never pack weights) or 1/unset (pack)")
    return KINDS if value == "0" else getattr(_switch, "off", ())


_HAVE_PACKED = (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _plain(t: Tensor) -> bool:
    """A dense CPU tensor that no transform (vmap, fake or subclass tensors) wraps."""
    return (type(t) in (torch.Tensor, nn.Parameter) and t.is_cpu
            and t.layout == torch.strided and not _functorch_wrapped(t))


def _transformed() -> bool:
    """Tracing, forward-mode AD (the kernel's own test) or compiling: keep to F.linear,
    which they all know."""
    return _traced_or_forward_ad() or torch.compiler.is_compiling()


def bf16_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16, AMX, or oneDNN's
    AVX-512 path). Without it, e.g. on an AVX2-only AMD EPYC, a bfloat16 matmul took a
    fallback path measured at 1.3 GFLOP/s, 35-58x slower than float32 on the same core."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API gone: cannot tell, assume yes
        return True


def warn_if_slow_bf16(what: str) -> None:
    """Warn (once per call site) that `what` asks for bfloat16 on a CPU without bf16 units."""
    if not bf16_is_native():
        warnings.warn(
            f"{what} uses bfloat16, but this CPU ({torch.backends.cpu.get_cpu_capability()}) "
            "has no bfloat16 matmul units: bfloat16 matmuls will run many times slower than "
            "float32 here; use float32 on this machine", RuntimeWarning, stacklevel=2)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose inference forward is `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
