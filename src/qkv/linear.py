"""Linear layers that multiply skinny inputs the other way round, for decoding.

F.linear computes x @ W^T. When x has only a few rows (a decoding step of a batch), the
CPU's GEMM handles the weight as the second operand and re-packs all of it on every call.
Computing (W @ x^T)^T instead makes W the first operand, which it streams once. On the
2-core Xeon of docs/benchmarks.md, for SmolLM2's 211 weight matrices in float32, this
was 1.3-1.5x faster at 8 to 48 rows and no faster at 1, 4 or 64 rows
(benchmarks/skinny_linear.py). The result is a transposed view, not a copy: the
same values as F.linear up to rounding, with other strides.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SKINNY_ROWS = range(8, 49)  # where (W @ x^T)^T was measured faster (float32, no autograd)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., C) @ weight (N, C)^T + bias (N,) -> (..., N), like F.linear."""
    rows = math.prod(x.shape[:-1])
    if (rows not in SKINNY_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).T  # (C, rows)
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
    return y.T.reshape(*x.shape[:-1], weight.shape[0])  # (N, rows) -> (..., N), a view


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
