"""A decode step through a Llama-style decoder in one compiled call (csrc/decode_layers.c).

Through the modules, each decoder layer of a decode step makes ~15 operator calls from
Python. With SmolLM2's shape at batch 16 that was ~240 us of Python and small operators
per layer, ~7 ms of a 30-layer step, while the compiled products and attention took
~310 us per layer (docs/benchmarks.md, session 13). `Decoder.forward` hands one new token
per sequence to `decode_step` instead, which runs all layers in C with the same kernels
(`qkv.linear`'s packed products, `kernel.attention`) and the norms, RoPE, cache writes,
SwiGLU and residuals written as plain loops.

It applies (`applies`) to what `DecoderLM` builds with pre-norm RMSNorm, RoPE, SwiGLU and
no biases (SmolLM2 and Llama-shaped configs), in eval mode without gradients, float32 on
the CPU, one new token per sequence, 1 to 64 sequences, with a KV cache and a mask that
only selects keys. Everything else, and anything that would observe the layers (forward
hooks, `record_attention`), goes through the modules, which give the same results to
float rounding (tests/test_fused.py). `disabled()` turns it off in a block; QKV_KERNEL=0
and `qkv.linear.packing_disabled("blocked")` turn it off as well.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import kernel, linear
from .attention import KVCache, MultiHeadAttention
from .layers import FeedForward

_switch = threading.local()  # .off: set by `disabled()` in this thread only


@contextmanager
def disabled():
    """Decode steps through the modules inside the block, in this thread: for comparisons."""
    before, _switch.off = getattr(_switch, "off", False), True
    try:
        yield
    finally:
        _switch.off = before


def _shape_fits(cfg) -> bool:
    """A config whose decoder layers csrc/decode_layers.c computes."""
    return (cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.norm_place == "pre"
            and cfg.activation == "swiglu" and not cfg.bias and cfg.head_dim % 8 == 0
            and cfg.head_dim <= 256 and cfg.n_heads // cfg.n_kv_heads <= kernel.MAX_ROWS)


_structure = 0  # moves whenever any module gets a parameter or submodule assigned


def _registered(*args) -> None:
    global _structure
    _structure += 1


nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_module_registration_hook(_registered)


def _parts(decoder: nn.Module) -> tuple[list[nn.Module], list[Tensor] | None]:
    """The layers' modules, and their weights in csrc/decode_layers.c's slot order (None if
    a layer is not what the C code computes): looked up through the modules (~0.3 ms for
    30 layers) only after a parameter or module was assigned somewhere."""
    kept = decoder.__dict__.get("_fused_parts")
    if kept is None or kept[0] != _structure:
        layers = list(decoder.layers)
        fits = all(_layer_fits(layer, decoder) for layer in layers)
        weights = [w for layer in layers for w in _layer_tensors(layer)] if fits else None
        kept = decoder._fused_parts = (_structure, list(decoder.layers.modules()), weights)
    return kept[1:]


def _layer_fits(layer: nn.Module, decoder: nn.Module) -> bool:
    """The modules Decoder builds for such a config, of the same kinds: a norm swapped for
    another, a bias added or another RoPE would be computed wrongly in C."""
    cfg, a, ff = decoder.cfg, layer.self_attn, layer.ff
    if (layer.cross_attn is not None or not layer.pre or not isinstance(a, MultiHeadAttention)
            or a.rope is not decoder.rope or (a.n_heads, a.n_kv_heads) != (cfg.n_heads,
                                                                          cfg.n_kv_heads)
            or not isinstance(ff, FeedForward) or ff.gate is None):
        return False
    linears = (a.q_proj, a.k_proj, a.v_proj, a.out_proj, ff.gate, ff.fc1, ff.fc2)
    return (all(type(n) is nn.RMSNorm and n.weight is not None and n.eps == cfg.norm_eps
                for n in (layer.norm1, layer.norm3))
            and all(isinstance(m, nn.Linear) and m.bias is None for m in linears))


def _observed(modules: list[nn.Module]) -> bool:
    """Whether something watches the layers' modules (hooks, attention recorders)."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               or m.__dict__.get("recorder") is not None for m in modules)


def applies(decoder: nn.Module, x: Tensor, memory: Tensor | None, mask: Tensor | None,
            cache: KVCache | None) -> bool:
    """Whether `decode_step` computes this step of `decoder` (embedded tokens x (B, T, C))."""
    if (getattr(_switch, "off", False) or cache is None or memory is not None
            or decoder.training or torch.is_grad_enabled() or x.dim() != 3 or x.shape[1] != 1
            or not _shape_fits(decoder.cfg)):
        return False
    modules, weights = _parts(decoder)
    B, L, start = x.shape[0], len(decoder.layers), cache.length
    if (not kernel._plain(x) or cache.dtype != torch.float32 or cache.batch_size != B
            or len(cache.lengths) != L or cache.lengths.count(start) != L
            or start >= cache.max_seq_len or not 1 <= B <= linear.BLOCKED_MAX_ROWS
            or cache.k[0].shape[1::2] != (decoder.cfg.n_kv_heads, decoder.cfg.head_dim)):
        return False  # the modules raise the errors (a full cache, a wrong batch)
    if mask is not None and (type(mask) is not torch.Tensor or mask.dtype != torch.bool
                             or mask.device.type != "cpu" or mask.shape[-1] not in (1, start + 1)
                             or kernel._key_mask(mask, B) is None):
        return False
    if ("blocked" in linear._packing_off() or linear._transformed()
            or torch.is_autocast_enabled("cpu") or weights is None or _observed(modules)):
        return False
    return kernel.available() and kernel.skinny_max_rows() >= B


def _layer_tensors(layer: nn.Module) -> list[Tensor]:
    """The weights in csrc/decode_layers.c's slot order, norms first of each half."""
    a, ff = layer.self_attn, layer.ff
    return [layer.norm1.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
            a.out_proj.weight, layer.norm3.weight, ff.gate.weight, ff.fc1.weight, ff.fc2.weight]


def _table(decoder: nn.Module, cache: KVCache) -> Tensor | None:
    """(L, 11) int64 addresses: per layer its norm weights, packed products and K/V caches.
    Kept while the weights, their packed copies and the cache's buffers stay the same;
    None when a weight cannot be used (not float32, an inference tensor)."""
    weights = _parts(decoder)[1]
    try:
        key = (linear._generation, tuple((w.data_ptr(), w._version) for w in weights),
               tuple(b.data_ptr() for b in cache.k + cache.v))
    except RuntimeError:  # inference tensors keep no version: linear does not pack them
        return None
    kept = decoder.__dict__.get("_fused_table")
    if kept is not None and kept[0] == key:
        return kept[1]
    if not all(linear._plain(w) and w.dtype == torch.float32 and w.is_contiguous()
               for w in weights):
        return None
    rows, held, per = [], [], len(weights) // len(decoder.layers)
    for i in range(len(decoder.layers)):
        t = weights[i * per : (i + 1) * per]
        packed = [t[0], *map(linear.blocked_weight, t[1:5]), t[5],
                  *map(linear.blocked_weight, t[6:])]
        held += packed
        rows.append([p.data_ptr() for p in packed] + [cache.k[i].data_ptr(), cache.v[i].data_ptr()])
    table = torch.tensor(rows, dtype=torch.int64)
    # the weights and packed copies are held with the addresses: no freed memory is read,
    # and no new weight at a freed one's address passes for it
    decoder._fused_table = (key, table, weights, held)
    return table


def decode_step(decoder: nn.Module, x: Tensor, cache: KVCache,
                tables: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor | None:
    """x (B, 1, C) embedded new tokens -> the last layer's output (B, 1, C), the cache one
    token longer. None (nothing done) when a weight does not suit the compiled layers."""
    table = _table(decoder, cache)
    if table is None or not all(b.is_contiguous() for b in cache.k + cache.v):
        return None
    cfg, (B, _, C), start = decoder.cfg, x.shape, cache.length
    D = cfg.head_dim
    cos, sin = (t.reshape(-1, D).contiguous() for t in tables)  # (1 or B, D)
    keep, keep_b = None, 0
    if mask is not None:
        keep = kernel._key_mask(mask, B)  # (1 or B, S)
        keep = keep.expand(keep.shape[0], start + 1)
        if keep.stride(-1) != 1:
            keep = keep.contiguous()
        keep_b = keep.stride(0) if keep.shape[0] > 1 else 0
    out = x.reshape(B, C).clone()
    failed = kernel._library().qkv_decode_layers(
        table.data_ptr(), len(decoder.layers), out.data_ptr(), B, C, cfg.n_heads,
        cfg.n_kv_heads, cfg.d_ff, cache.max_seq_len, start, cos.data_ptr(), sin.data_ptr(),
        D if cos.shape[0] > 1 else 0, None if keep is None else keep.data_ptr(), keep_b,
        cfg.norm_eps, torch.get_num_threads())
    if failed:
        raise MemoryError(f"decode step: no memory for the scratch of {B} sequences")
    cache.lengths = [start + 1] * len(cache.lengths)
    return out.view(B, 1, C)
