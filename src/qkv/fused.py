"""A decode step through a Llama-style decoder in one compiled call (csrc/decode_layers.c).

Through the modules, each decoder layer of a decode step makes ~15 operator calls from
Python. With SmolLM2's shape at batch 16 that was ~240 us of Python and small operators
per layer, ~7 ms of a 30-layer step, while the compiled products and attention took
~310 us per layer (docs/benchmarks.md, session 13). `Decoder.forward` hands one new token
per sequence to `decode_step` instead, which runs all layers in C with the same kernels
(`qkv.linear`'s packed products, `kernel.attention`) and the norms, RoPE, cache writes,
SwiGLU and residuals written as plain loops.

It applies (`applies`) to the modules `DecoderLM` builds with pre-norm RMSNorm, RoPE,
SwiGLU and no biases (SmolLM2 and Llama-shaped configs), of exactly those classes, in eval
mode without gradients, float32 on the CPU, one new token per sequence, 1 to 64 sequences,
with a KV cache and a mask that only selects keys. Everything else, and anything that would
observe or change the layers' computation (forward hooks, `record_attention`, a module in
training mode, a subclass or a patched `forward`), goes through the modules, which give the
same results to float rounding (tests/test_fused.py). `disabled()` turns it off in a block;
QKV_KERNEL=0 and `qkv.linear.packing_disabled("blocked")` turn it off as well.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import kernel, linear
from .attention import KVCache, MultiHeadAttention
from .layers import DecoderLayer, FeedForward, RotaryEmbedding

_switch = threading.local()  # .off: set by `disabled()` in this thread only
# decoder -> (structure, its layers' modules, each layer's 9 weight-holding modules or None)
_parts_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# decoder -> (key, weight address table, what must stay alive while it is used)
_tables_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_structure = 0  # moves whenever any module gets a parameter or submodule assigned


@contextmanager
def disabled():
    """Decode steps through the modules inside the block, in this thread: for comparisons."""
    before, _switch.off = getattr(_switch, "off", False), True
    try:
        yield
    finally:
        _switch.off = before


def _forget() -> None:
    """Drop every kept address table, and with it the old weights and packed copies it holds."""
    _tables_kept.clear()


def _registered(*args) -> None:
    global _structure
    _structure += 1
    _forget()


nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_module_registration_hook(_registered)
linear.on_packed_dropped(_forget)  # clear_packed() and optimizer steps


def _shape_fits(cfg) -> bool:
    """A config whose decoder layers csrc/decode_layers.c computes."""
    return (cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.norm_place == "pre"
            and cfg.activation == "swiglu" and not cfg.bias and cfg.head_dim % 8 == 0
            and cfg.head_dim <= 256 and cfg.n_heads // cfg.n_kv_heads <= kernel.MAX_ROWS)


def _leaves(layer: DecoderLayer) -> list[nn.Module]:
    """The modules holding csrc/decode_layers.c's weights, in its slot order."""
    a, ff = layer.self_attn, layer.ff
    return [layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.norm3, ff.gate,
            ff.fc1, ff.fc2]


def _layer_fits(layer: nn.Module, i: int, decoder: nn.Module) -> bool:
    """Layer i is of the classes Decoder builds for such a config, wired as it wires them:
    a subclass, another norm, a bias, another RoPE or cache slot would be computed
    wrongly in C."""
    cfg = decoder.cfg
    if type(layer) is not DecoderLayer or layer.cross_attn is not None or not layer.pre:
        return False
    a, ff = layer.self_attn, layer.ff
    if (type(a) is not MultiHeadAttention or type(ff) is not FeedForward or ff.gate is None
            or a.layer_idx != i or a.rope is not decoder.rope
            or type(decoder.rope) is not RotaryEmbedding
            or (a.n_heads, a.n_kv_heads, a.head_dim) != (cfg.n_heads, cfg.n_kv_heads,
                                                         cfg.head_dim)):
        return False
    leaves = _leaves(layer)
    norms, linears = (leaves[0], leaves[5]), leaves[1:5] + leaves[6:]
    return (all(type(n) is nn.RMSNorm and n.eps == cfg.norm_eps
                and n.normalized_shape == (cfg.d_model,) for n in norms)
            and all(type(m) in (linear.Linear, nn.Linear) and m.bias is None for m in linears))


def _parts(decoder: nn.Module) -> tuple[list[nn.Module], list[nn.Module] | None]:
    """The layers' modules, and the modules holding their weights in slot order (None if a
    layer is not what the C code computes): looked up through the modules (~0.3 ms for 30
    layers) only after a parameter or module was assigned somewhere."""
    kept = _parts_kept.get(decoder)
    if kept is None or kept[0] != _structure:
        layers = list(decoder.layers)
        fits = all(_layer_fits(layer, i, decoder) for i, layer in enumerate(layers))
        leaves = [m for layer in layers for m in _leaves(layer)] if fits else None
        kept = _parts_kept[decoder] = (_structure, list(decoder.layers.modules()), leaves)
    return kept[1:]


def _left_alone(modules: list[nn.Module]) -> bool:
    """No module is watched (hooks, attention recorders), training, or given its own
    `forward` on the instance."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for m in modules:
        d = m.__dict__
        if (d["training"] or d["_forward_hooks"] or d["_forward_pre_hooks"]
                or d.get("recorder") is not None or "forward" in d):
            return False
    return True


def applies(decoder: nn.Module, x: Tensor, memory: Tensor | None, mask: Tensor | None,
            cache: KVCache | None) -> bool:
    """Whether `decode_step` may compute this step of `decoder` (embedded tokens x (B, T, C));
    `decode_step` may still decline (weights that are not float32, for one)."""
    if (getattr(_switch, "off", False) or cache is None or memory is not None
            or decoder.training or torch.is_grad_enabled() or x.dim() != 3 or x.shape[1] != 1
            or not _shape_fits(decoder.cfg)):
        return False
    B, L, start, cfg = x.shape[0], len(decoder.layers), cache.length, decoder.cfg
    if (not kernel._plain(x) or cache.batch_size != B or len(cache.lengths) != L
            or cache.lengths.count(start) != L or start >= cache.max_seq_len
            or not 1 <= B <= linear.BLOCKED_MAX_ROWS
            or not all(kernel._plain(b) and b.is_contiguous() for b in cache.k + cache.v)
            or cache.k[0].shape[1::2] != (cfg.n_kv_heads, cfg.head_dim)):
        return False  # the modules raise the errors (a full cache, a wrong batch or device)
    if mask is not None and (type(mask) is not torch.Tensor or mask.dtype != torch.bool
                             or mask.device.type != "cpu" or not 1 <= mask.dim() <= 4
                             or mask.shape[-1] not in (1, start + 1)
                             or kernel._key_mask(mask, B) is None):
        return False
    if ("blocked" in linear._packing_off() or linear._transformed()
            or torch.is_autocast_enabled("cpu")):
        return False
    modules, leaves = _parts(decoder)
    if leaves is None or not _left_alone(modules):
        return False
    return kernel.available() and kernel.skinny_max_rows() >= B


def _shapes(cfg) -> list[tuple[int, ...]]:
    """The 9 weights' shapes in slot order."""
    C, F, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim
    return [(C,), (C, C), (kv, C), (kv, C), (C, C), (C,), (F, C), (F, C), (C, F)]


def _table(decoder: nn.Module, leaves: list[nn.Module]) -> tuple | None:
    """(table, held): (L, 9) int64 addresses of each layer's norm weights and packed products,
    and what must stay alive while C reads them. Kept until a weight's tensor, storage or
    version changes (and see `_forget`). None when a weight does not suit: not a float32
    tensor of the config's shape, or an inference tensor (no version counter)."""
    weights = [m._parameters.get("weight") for m in leaves]  # functional_call swaps these
    try:
        key = tuple((w.data_ptr(), w._version) for w in weights)
    except (AttributeError, RuntimeError):  # None; an inference tensor: linear won't pack it
        return None
    kept = _tables_kept.get(decoder)
    if kept is not None and kept[0] == key:
        return kept[1:]
    shapes = _shapes(decoder.cfg)
    if not all(linear._plain(w) and w.dtype == torch.float32 and w.is_contiguous()
               and w.shape == shapes[i % len(shapes)] for i, w in enumerate(weights)):
        return None
    addresses = [w if w.dim() == 1 else linear.blocked_weight(w) for w in weights]
    table = torch.tensor([a.data_ptr() for a in addresses], dtype=torch.int64).view(-1, 9)
    # held with the addresses: the packed copies, and the weights' storages (detached views),
    # so that no new tensor lands at a held address and passes for the old one
    held = (addresses, [w.detach() for w in weights])
    _tables_kept[decoder] = (key, table, held)
    return table, held


def decode_step(decoder: nn.Module, x: Tensor, cache: KVCache,
                tables: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor | None:
    """x (B, 1, C) embedded new tokens -> the last layer's output (B, 1, C), the cache one
    token longer. None (nothing done) when a weight or the RoPE tables do not suit."""
    cfg, (B, _, C), start = decoder.cfg, x.shape, cache.length
    D = cfg.head_dim
    cos, sin = (t.reshape(-1, t.shape[-1]) for t in tables)  # (1 or B, D)
    if cos.shape[0] not in (1, B) or cos.shape[1] != D:
        return None  # positions for another batch: the modules raise the error
    kept = _table(decoder, _parts(decoder)[1])
    if kept is None:
        return None
    table, held = kept  # held here too: another thread may drop the kept entry meanwhile
    cos, sin = cos.contiguous(), sin.contiguous()
    caches = torch.tensor([b.data_ptr() for pair in zip(cache.k, cache.v, strict=True)
                           for b in pair], dtype=torch.int64)  # (L, 2)
    keep, keep_b = None, 0
    if mask is not None:
        keep = kernel._key_mask(mask, B)  # (1 or B, S)
        keep = keep.expand(keep.shape[0], start + 1)
        if keep.stride(-1) != 1:
            keep = keep.contiguous()
        keep_b = keep.stride(0) if keep.shape[0] > 1 else 0
    out = x.reshape(B, C).clone()
    failed = kernel._library().qkv_decode_layers(
        table.data_ptr(), caches.data_ptr(), len(decoder.layers), out.data_ptr(), B, C,
        cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cache.max_seq_len, start, cos.data_ptr(),
        sin.data_ptr(), D if cos.shape[0] > 1 else 0, None if keep is None else keep.data_ptr(),
        keep_b, cfg.norm_eps, torch.get_num_threads())
    if failed:
        raise MemoryError(f"decode step: no memory for the scratch of {B} sequences")
    cache.lengths = [start + 1] * len(cache.lengths)
    return out.view(B, 1, C)
