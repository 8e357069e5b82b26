"""Compiled kernels for decode steps: attention of a few query rows against a long K/V
cache (csrc/decode_attention.c), products of a few rows with a weight (csrc/skinny_linear.c,
used by qkv.linear; see `skinny_linear`), and whole Llama-style decoder layers calling both
(csrc/decode_layers.c, used by qkv.fused).

PyTorch runs a decode step's attention as matrix products of R rows (R = H // G query
heads per key/value head, times the beams sharing a source); for R from 2 to 64 its
kernels run far below this CPU's memory speed, which is what made MQA's decode steps only
4x faster than MHA's instead of 9x (docs/benchmarks.md, "Session 6"). csrc/decode_attention.c
reads each cached key and value once for all R rows.

It is built with the system C compiler (`$CC`, default `cc`; GCC >= 12 or clang) the
first time attention needs it, in about half a second, cached under
`$QKV_CACHE_DIR` (default `~/.cache/qkv`) and called through ctypes. `attention()` uses it
only where it applies (`applies`): plain float32 CPU tensors, no gradient, no dropout, no
tracing or functorch transform; T == 1 if causal; a mask, if any, that selects keys only;
head dim a multiple of 8 up to 256; at most MAX_ROWS query rows per K/V head. Elsewhere,
and when it cannot be built, PyTorch's SDPA gives the same result to float rounding.

QKV_KERNEL=0 never uses it; QKV_KERNEL=1 makes a failed build an error instead of a
warning (CI sets it); unset, a failed build warns once and falls back.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("decode_attention.c", "skinny_linear.c", "decode_layers.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
MAX_ROWS = 64  # query rows per (batch row, kv head); beyond, SDPA's products are efficient

_switch = threading.local()  # .off: set by `disabled()` in this thread only


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded (QKV_KERNEL=1 makes this an error)."""


def _setting() -> str:
    value = os.environ.get("QKV_KERNEL", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"QKV_KERNEL={value!r} must be 0 (never), 1 (required) or unset (auto)")
    return value


def _cache_dir() -> Path:
    return Path(os.environ.get("QKV_CACHE_DIR") or Path.home() / ".cache" / "qkv")


def _cpu_flags() -> str:
    """The CPU feature flags: a -march=native library suits only CPUs that have them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        return done.stdout.split("\n", 1)[0]
    except (OSError, subprocess.TimeoutExpired):
        return ""  # no compiler: the build reports it


def library_path(cc: str) -> Path:
    """Where the library built from this source, compiler (and its version), flags and
    CPU is kept."""
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), cc.encode(), _compiler_version(cc).encode(),
                 " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file and rename it: concurrent processes never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelUnavailable(f"could not run the C compiler {cc!r}: {e}") from e
        if done.returncode != 0:
            raise KernelUnavailable(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0o600 would hide it from other users
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.qkv_decode_attention
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    fn.argtypes = [p, p, p, p, p, i, i, i, i, i, n, n, n, n, n, n, n, ctypes.c_float, i]
    fn.restype = i
    fn = lib.qkv_skinny_linear
    fn.argtypes = [p, p, p, p, i, i, i, i]
    fn.restype = i
    lib.qkv_skinny_width.restype = lib.qkv_skinny_max_rows.restype = i
    lib.qkv_logsumexp_rows.argtypes = [p, n, i, p, i]
    lib.qkv_logsumexp_rows.restype = None
    lib.qkv_silu_mul.argtypes = [p, p, n]
    lib.qkv_silu_mul.restype = None
    fn = lib.qkv_decode_layers
    fn.argtypes = [p, p, i, p, i, i, i, i, i, n, n, p, p, n, p, n, ctypes.c_float, i]
    fn.restype = i
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built library, or None (with one warning) when it cannot be had."""
    cc = os.environ.get("CC", "cc")
    try:
        path = library_path(cc)
        if not path.is_file():
            _build(cc, path)
        try:
            return _load(path)
        except OSError:  # a damaged or foreign file under our name: build it once more
            _build(cc, path)
            return _load(path)
    except (KernelUnavailable, OSError) as e:
        if _setting() == "1":
            raise KernelUnavailable(f"QKV_KERNEL=1 but the decode attention kernel is "
                                    f"unavailable: {e}") from e
        warnings.warn(
            f"qkv: the compiled kernels are unavailable ({e}); decode steps use PyTorch's "
            "attention and products, which are slower. QKV_KERNEL=0 skips the kernels and "
            "this warning.", RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    """Whether attention() may use the kernel here (builds it on the first call)."""
    return _on() and _setting() != "0" and _library() is not None


def _on() -> bool:
    return not getattr(_switch, "off", False)


@contextmanager
def disabled():
    """Attention and `logsumexp_rows` without the compiled kernels inside the block, in this
    thread (others keep them): for comparisons in one process. The products have their own
    switch, `qkv.linear.packing_disabled("blocked")`."""
    before, _switch.off = not _on(), True
    try:
        yield
    finally:
        _switch.off = before


def skinny_max_rows() -> int:
    """The most rows `skinny_linear` takes; 0 when the library cannot be had or QKV_KERNEL=0
    (attention's `disabled()` does not switch the products off: qkv.linear has its own)."""
    if _setting() == "0":
        return 0
    lib = _library()
    return 0 if lib is None else lib.qkv_skinny_max_rows()


def pack_skinny(weight: Tensor) -> Tensor:
    """weight (N, K) float32 as `skinny_linear` reads it: (ceil(N / VW), K, VW), blocks of
    VW output columns (16 with AVX-512, 8 with AVX2), the last padded with zeros. A copy:
    the weight's size again."""
    vw, (N, K) = _library().qkv_skinny_width(), weight.shape
    full, rest = divmod(N, vw)
    out = weight.new_zeros(full + (rest > 0), K, vw)
    out[:full] = weight[: full * vw].view(full, vw, K).transpose(1, 2)
    if rest:
        out[full, :, :rest] = weight[full * vw :].T
    return out


def skinny_linear(x: Tensor, packed: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """x (M, K) contiguous float32 @ W^T + bias -> (M, n), 1 <= M <= skinny_max_rows(), W
    given as pack_skinny(W) (n its rows); bias (n,) contiguous or None."""
    M, K = x.shape
    lib = _library()
    vw, most = lib.qkv_skinny_width(), lib.qkv_skinny_max_rows()
    if not 1 <= M <= most:
        raise ValueError(f"skinny_linear: {M} rows; expected 1 to {most}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"skinny_linear: x must be contiguous float32, got {x.dtype} "
                         f"with strides {x.stride()}")
    if packed.shape != (-(-n // vw), K, vw) or not packed.is_contiguous():
        raise ValueError(f"skinny_linear: packed {tuple(packed.shape)} is not pack_skinny's "
                         f"layout of a ({n}, {K}) weight: ({-(-n // vw)}, {K}, {vw})")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()
                             or bias.dtype != torch.float32):
        raise ValueError(f"skinny_linear: bias must be ({n},) contiguous float32, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    y = x.new_empty(M, n)
    failed = lib.qkv_skinny_linear(
        packed.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), M, K, n, torch.get_num_threads())
    if failed:
        raise MemoryError(f"skinny linear: no memory for {M} x {K} floats of scratch")
    return y


def logsumexp_rows(x: Tensor) -> Tensor:
    """x.logsumexp(-1) for x (N, V), with the compiled e^x for a plain contiguous float32
    x that needs no gradient: beam search's (64, 8000) logits in ~93 us against torch's
    ~220 (Zen 5, 2 threads, ad hoc). Otherwise, or without the library, torch's."""
    if not (_plain(x) and x.dim() == 2 and x.is_contiguous() and x.shape[1] > 0
            and not (torch.is_grad_enabled() and x.requires_grad) and not _transformed()
            and available()):
        return x.logsumexp(-1)
    out = x.new_empty(x.shape[0])
    _library().qkv_logsumexp_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(),
                                  torch.get_num_threads())
    return out


def _key_mask(mask: Tensor | None, B: int) -> Tensor | None:
    """A mask that only selects keys, (B or 1, S) contiguous; None if it depends on the query."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (., ., ., S)
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, B):
        return None
    return m[:, 0, 0, :]  # (B or 1, S)


def _plain(t: Tensor) -> bool:
    """A float32 CPU tensor with real memory, seen by no transform: ctypes reads its data
    pointer, which tracing, vmap, forward-mode AD and fake tensors would not see or lack."""
    return (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
            and t.layout == torch.strided and not _functorch_wrapped(t))


# vmap's and grad's wrappers (private API; if it goes, type(t) still rules out subclasses)
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor",
                             lambda t: False)


def _transformed() -> bool:
    """Inside torch.jit.trace or a forward-mode AD level: the C call would be invisible."""
    return torch.jit.is_tracing() or torch.autograd.forward_ad._current_level >= 0


def applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
            dropout: float) -> bool:
    """Whether the kernel computes this attention call (shapes already checked)."""
    (B, H, T, D), G = q.shape, k.shape[1]
    if not _on() or dropout > 0 or _transformed():
        return False
    if not all(_plain(t) for t in (q, k, v)):
        return False
    if mask is not None and (type(mask) is not torch.Tensor or mask.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if D == 0 or D % 8 or D > 256 or (H // G) * T > MAX_ROWS or k.shape[2] == 0:
        return False
    if (causal and T > 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if mask is not None and _key_mask(mask, B) is None:  # _check allowed at most 4 dims
        return False
    return available()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(D)) V where `applies`: q (B, H, T, D), k, v (B, G, S, D)."""
    (B, H, T, D), (G, S) = q.shape, k.shape[1:3]
    R = (H // G) * T
    qf = q.reshape(B, G, R, D).contiguous()  # (B, G, R, D): query heads of a group, then time
    out = torch.empty_like(qf)
    keep = _key_mask(mask, B)
    if keep is not None:
        keep = keep.expand(keep.shape[0], S).contiguous()  # (B or 1, S)
    failed = _library().qkv_decode_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), None if keep is None else keep.data_ptr(),
        out.data_ptr(), B, G, R, S, D, *k.stride()[:3], *v.stride()[:3],
        0 if keep is None or keep.shape[0] == 1 else S, D**-0.5, torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"decode attention: no memory for {R} x {S} floats of scratch")
    return out.view(B, H, T, D)
