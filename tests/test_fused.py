"""qkv.fused: a decode step through all layers in one compiled call, against the modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qkv import fused, kernel, linear
from qkv.attention import record_attention
from qkv.config import ModelConfig
from qkv.generate import generate
from qkv.layers import DecoderLayer, FeedForward
from qkv.models import DecoderLM

LLAMA = dict(vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96,
             max_seq_len=64, dropout=0.0, positions="rope", norm="rmsnorm", norm_place="pre",
             activation="swiglu", bias=False, scale_embeddings=False)


@pytest.fixture(scope="module")
def built():
    if not kernel.available():
        pytest.skip("the compiled kernels are unavailable here (QKV_KERNEL=0 or no compiler)")


@pytest.fixture
def calls(monkeypatch):
    """How many decode steps went through the compiled layers."""
    count = {"fused": 0}
    step = fused.decode_step

    def counted(*args):
        out = step(*args)
        count["fused"] += out is not None
        return out

    monkeypatch.setattr(fused, "decode_step", counted)
    return count


def lm(**kw) -> DecoderLM:
    return DecoderLM(ModelConfig(**{**LLAMA, **kw})).eval()


def steps(model, B, n, prompt=5, mask=None, positions=None, seed=0):
    """A prompt then n one-token steps, with the same tokens through the compiled layers and
    through the modules: both logits (B, n, V) and both caches."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.cfg.vocab_size, (B, prompt + n), generator=g)
    out = []
    for ctx in (torch.inference_mode, fused.disabled):
        cache, logits = model.make_cache(B, prompt + n), []
        with torch.inference_mode(), ctx():
            for lo, hi in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + n)]:
                m = None if mask is None else mask[..., :hi]
                p = None if positions is None else positions[:, lo:hi]
                logits.append(model(tokens[:, lo:hi], mask=m, cache=cache, positions=p)[:, -1])
        out.append((torch.stack(logits[1:], 1), cache))
    return out


@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("B", [1, 3, 16])
def test_steps_equal_the_modules(built, calls, H, G, B):
    model = lm(n_heads=H, n_kv_heads=G, d_model=16 * H)
    (a, cache_a), (b, cache_b) = steps(model, B, 4)
    assert calls["fused"] == 4  # the modules' run, under fused.disabled(), made none
    assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cache_a.lengths == cache_b.lengths == [9, 9]
    for ka, kb in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v, strict=True):
        assert_close(ka, kb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [8, 24, 128])
def test_other_head_dims(built, calls, D):
    (a, _), (b, _) = steps(lm(n_heads=2, n_kv_heads=1, d_model=2 * D), 3, 3)
    assert calls["fused"] == 3
    assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_left_padding_mask_and_positions_per_row(built, calls):
    """generate's left padding: a (B, 1, 1, S) mask and positions that differ per row."""
    B, P, n = 3, 6, 4
    pads = torch.tensor([0, 2, 5])
    keys = torch.arange(P + n)
    mask = (keys[None, :] >= pads[:, None])[:, None, None, :]
    positions = (keys[None, :] - pads[:, None]).clamp(min=0)
    model = lm()
    (a, _), (b, _) = steps(model, B, n, prompt=P, mask=mask, positions=positions)
    assert calls["fused"] == n
    assert_close(a, b, rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15]]
    out = generate(model, prompts, 6)
    with fused.disabled():
        assert generate(model, prompts, 6) == out


def test_a_mask_shared_by_the_batch(built, calls):
    keep = torch.ones(9, dtype=torch.bool)
    keep[1] = keep[3] = False
    (a, _), (b, _) = steps(lm(), 2, 4, mask=keep)  # (S,): broadcast to every row
    assert calls["fused"] == 4
    assert_close(a, b, rtol=1e-5, atol=1e-5)


def changes(model: DecoderLM):
    """Ways to change a weight between two steps that the compiled layers must see."""
    layer = model.decoder.layers[1]

    @torch.no_grad()
    def in_place():
        layer.self_attn.v_proj.weight.mul_(1.5)
        layer.norm3.weight.add_(0.25)

    def assigned():
        layer.ff.fc2.weight = nn.Parameter(torch.randn_like(layer.ff.fc2.weight))

    def module_replaced():
        layer.self_attn.q_proj = nn.Linear(64, 64, bias=False).eval()

    def through_data():
        layer.ff.gate.weight.data = torch.randn_like(layer.ff.gate.weight)

    def through_data_twice():  # the second tensor may land where the first one was
        for _ in range(2):
            layer.ff.fc1.weight.data = torch.randn_like(layer.ff.fc1.weight)

    def through_data_in_place():
        layer.self_attn.k_proj.weight.data.mul_(2)  # not seen by the version counter...
        linear.clear_packed()  # ...which is why linear documents clear_packed()

    return [in_place, assigned, module_replaced, through_data, through_data_twice,
            through_data_in_place]


def lockstep(model, tokens, change=None, at=2, cache_len=16):
    """One-token steps through the compiled layers and through the modules, side by side on
    two caches (so both see the same history), `change` made after `at` steps; compares
    every step's logits."""
    B, n = tokens.shape
    caches = model.make_cache(B, cache_len), model.make_cache(B, cache_len)
    for t in range(n):
        if change is not None and t == at:
            change()
        with torch.inference_mode():
            a = model(tokens[:, t : t + 1], cache=caches[0])
            with fused.disabled():
                b = model(tokens[:, t : t + 1], cache=caches[1])
        assert_close(a, b, rtol=1e-5, atol=1e-5,
                     msg=lambda m, t=t: f"{getattr(change, '__name__', '')}, step {t}: {m}")


def test_weights_changed_between_steps_are_used(built, calls):
    model = lm()
    tokens = torch.randint(1, 97, (2, 5))  # varying tokens: every weight shows in the logits
    for change in changes(model):
        lockstep(model, tokens, change)
    assert calls["fused"] == 5 * len(changes(model))


def test_reordered_and_shrunk_caches(built, calls):
    """Beam search's reorder swaps the buffers, or makes smaller ones when rows finish."""
    model = lm()
    tok = torch.tensor([[3], [4], [5]])
    caches = [model.make_cache(3, 16), model.make_cache(3, 16)]
    out = []
    for cache, ctx in zip(caches, (torch.inference_mode, fused.disabled), strict=True):
        with torch.inference_mode(), ctx():
            model(torch.tensor([[1, 2], [2, 3], [3, 4]]), cache=cache)
            model(tok, cache=cache)
            cache.reorder(torch.tensor([2, 0, 0]))
            a = model(tok, cache=cache)
            cache.reorder(torch.tensor([1, 2]))
            b = model(tok[:2], cache=cache)
        out.append((a, b))
    assert calls["fused"] == 3
    assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_where_it_does_not_apply(built, calls):
    """Each of these goes through the modules, and gives what they give."""
    model = lm()
    tok, cache = torch.tensor([[3]]), model.make_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache)  # two tokens: the modules
        model(tok, cache=cache)  # no_grad counts as well as inference_mode
    assert calls["fused"] == 1
    model(tok, cache=cache)  # gradients enabled
    model.train()
    with torch.no_grad():
        model(tok, cache=cache)  # training mode
    model.eval()
    with torch.inference_mode():
        model(tok)  # no cache
        with fused.disabled():
            model(tok, cache=cache)
        with kernel.disabled():
            model(tok, cache=cache)
        with linear.packing_disabled("blocked"):
            model(tok, cache=cache)
        model(tok, mask=torch.ones(1, 1, 1, 1, cache.length + 1, dtype=torch.bool)[0],
              cache=cache, positions=None)  # (1, 1, 1, S) is a key mask: it applies
    assert calls["fused"] == 2
    for kw in [dict(bias=True), dict(norm="layernorm"), dict(activation="gelu"),
               dict(positions="learned"), dict(norm_place="post")]:
        other, c = lm(**kw), None
        with torch.inference_mode():
            c = other.make_cache(1, 4)
            other(tok, cache=c)
    assert calls["fused"] == 2
    with torch.inference_mode():
        model.half()(tok, cache=model.make_cache(1, 4))  # not float32
        made_here = lm()  # inference tensors: no version counter to see changes by
        made_here(tok, cache=made_here.make_cache(1, 4))
    assert calls["fused"] == 2


@pytest.mark.parametrize("swap", ["norm", "bias", "rope"])
def test_modules_swapped_for_others_go_through_the_modules(built, calls, swap):
    """The C code computes what the config builds; a module of another kind is left to itself."""
    model = lm()
    layer = model.decoder.layers[1]
    if swap == "norm":
        layer.norm3 = nn.LayerNorm(64, eps=1e-5)
    elif swap == "bias":
        layer.self_attn.v_proj.bias = nn.Parameter(torch.randn(32))
    else:
        layer.self_attn.rope = type(model.decoder.rope)(16, 64, base=500.0)
    tok, cache = torch.tensor([[3]]), model.make_cache(1, 4)
    with torch.inference_mode():
        model(tok, cache=cache)
    assert calls["fused"] == 0


def test_observers_see_every_layer(built, calls):
    """Forward hooks and record_attention need the modules: those steps go through them."""
    model = lm()
    seen = []
    handle = model.decoder.layers[1].ff.register_forward_hook(lambda *a: seen.append(1))
    cache = model.make_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[3]]), cache=cache)
        handle.remove()
        model(torch.tensor([[3]]), cache=cache)
        with record_attention(model) as maps:
            model(torch.tensor([[3]]), cache=cache)
    assert seen == [1]
    assert [len(v) for v in maps.values()] == [1, 1]
    assert calls["fused"] == 1


def test_a_full_cache_raises_as_the_modules_do(built):
    model = lm()
    cache = model.make_cache(1, 2)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), cache=cache)
        with pytest.raises(ValueError, match="KVCache is full"):
            model(torch.tensor([[3]]), cache=cache)


@pytest.mark.parametrize("n", [1, 15, 16, 33, 1000])
def test_silu_mul_equals_torch(built, n):
    lib = kernel._library()
    g = torch.randn(n) * 8
    g[: min(n, 6)] = torch.tensor([0.0, -0.0, 90.0, -90.0, float("inf"), float("nan")])[: min(n, 6)]
    u = torch.randn(n)
    out = g.clone()
    lib.qkv_silu_mul(out.data_ptr(), u.data_ptr(), n)
    assert_close(out, torch.nn.functional.silu(g) * u, rtol=1e-6, atol=1e-30, equal_nan=True)


def test_avx2_build_gives_the_same_steps(built, calls, avx2_library, monkeypatch):
    """CI may run on a CPU without AVX-512: the layers built for AVX2 (8-float weight blocks,
    8-lane e^x) against the modules, on this machine."""
    lib = avx2_library
    monkeypatch.setattr(kernel, "_library", lambda: lib)
    (a, _), (b, _) = steps(lm(n_heads=8, n_kv_heads=1), 5, 3)  # packed anew at 8 floats
    assert calls["fused"] == 3
    assert_close(a, b, rtol=1e-5, atol=1e-5)


class LoRA(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class MyLayer(DecoderLayer):
    def forward(self, x, *args, **kwargs):
        return super().forward(x, *args, **kwargs) + 1


class Wrapped(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, x, *args, **kwargs):
        return self.inner(x, *args, **kwargs)


def rewired(model: DecoderLM):
    """Changes to the modules that the modules compute and the C code would not."""
    layers = model.decoder.layers

    def subclassed_linear():
        old = layers[0].self_attn.v_proj
        layers[0].self_attn.v_proj = LoRA(64, 32, bias=False).eval()
        layers[0].self_attn.v_proj.weight = old.weight

    def subclassed_layer():
        mine = MyLayer(model.cfg, 1, model.decoder.rope, cross=False).eval()
        mine.load_state_dict(layers[1].state_dict())
        layers[1] = mine

    def patched_forward():
        ff = layers[1].ff
        ff.forward = lambda x: FeedForward.forward(ff, x) * 0.5

    def wrapped_layer():
        layers[1] = Wrapped(layers[1]).eval()

    def permuted_layers():  # cache slots follow layer_idx, not the list's order
        layers[0], layers[1] = layers[1], layers[0]

    def narrower_feed_forward():
        ff = layers[0].ff
        ff.fc1, ff.gate = nn.Linear(64, 40, bias=False).eval(), nn.Linear(64, 40, bias=False).eval()
        ff.fc2 = nn.Linear(40, 64, bias=False).eval()

    def training_layer():
        layers[1].train()

    def parametrized():
        nn.utils.parametrize.register_parametrization(layers[0].ff.fc2, "weight", Double())

    return [subclassed_linear, subclassed_layer, patched_forward, wrapped_layer,
            permuted_layers, narrower_feed_forward, training_layer, parametrized]


class Double(nn.Module):
    def forward(self, w):
        return w * 2


@pytest.mark.parametrize("which", range(8))
def test_rewired_modules_go_through_the_modules(built, calls, which):
    model = lm()
    change = rewired(model)[which]
    tokens = torch.randint(1, 97, (2, 4))
    lockstep(model, tokens, change, at=2)
    assert calls["fused"] == 2  # the two steps before the change


def test_functional_call_weights_are_used(built, calls):
    """torch.func.functional_call swaps tensors into the modules without registering them:
    steps after a first one with the model's own weights must use the swapped ones."""
    model = lm()
    other = lm()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for w in (other.decoder.layers[1].ff.fc2.weight, other.decoder.layers[1].ff.gate.weight):
            w.normal_()
    swapped = {k: v for k, v in other.state_dict().items() if "layers.1.ff" in k}
    tokens = torch.randint(1, 97, (2, 4))
    cache, ref = model.make_cache(2, 8), other.make_cache(2, 8)
    with torch.inference_mode():
        model(tokens[:, :1], cache=cache)  # builds the address table with its own weights
        other(tokens[:, :1], cache=ref)  # layer 1's feed-forward changes no cached K/V
        for t in range(1, 4):
            a = torch.func.functional_call(model, swapped, (tokens[:, t : t + 1],),
                                           {"cache": cache})
            b = other(tokens[:, t : t + 1], cache=ref)
            assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls["fused"] == 8


def test_mismatched_inputs_raise_what_the_modules_raise(built, calls):
    model = lm()
    tok = torch.randint(1, 97, (4, 1))
    for ctx in (torch.inference_mode, fused.disabled):  # positions for 2 of 4 sequences
        with torch.inference_mode(), ctx(), pytest.raises(RuntimeError):
            model(tok, cache=model.make_cache(4, 4), positions=torch.tensor([[0], [0]]))
    meta = model.make_cache(4, 4)
    meta.k = [torch.empty_like(k, device="meta") for k in meta.k]
    with torch.inference_mode(), pytest.raises((RuntimeError, NotImplementedError)):
        model(tok, cache=meta)
    cache = model.make_cache(4, 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="does not broadcast"):
        model(tok, cache=cache, mask=torch.ones(1, 1, 1, 1, 1, dtype=torch.bool))
    assert calls["fused"] == 0
    with torch.inference_mode():  # a 0-dim mask broadcasts, as through the modules
        a = model(tok, cache=cache, mask=torch.tensor(True))
        with fused.disabled():
            b = model(tok, cache=model.make_cache(4, 4), mask=torch.tensor(True))
    assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nothing_is_kept_on_the_model_and_clear_packed_frees(built, calls):
    import gc
    import weakref

    model = lm()
    with torch.inference_mode():
        model(torch.tensor([[3]]), cache=model.make_cache(1, 4))
    assert calls["fused"] == 1
    assert not any("fused" in name for name in vars(model.decoder))  # nothing to pickle
    packed = weakref.ref(linear.blocked_weight(model.decoder.layers[0].ff.fc2.weight))
    linear.clear_packed()
    gc.collect()
    assert packed() is None


@pytest.mark.parametrize("B,H,G,D,prompt,threads", [
    (64, 2, 1, 32, 3, 2),  # the most sequences
    (2, 2, 2, 256, 3, 2),  # the widest heads
    (1, 4, 1, 16, 600, 2),  # one (sequence, kv head) pair: keys cut into chunks
    (3, 4, 2, 16, 5, 1),  # one thread
])
def test_other_sizes(built, calls, B, H, G, D, prompt, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = lm(n_heads=H, n_kv_heads=G, d_model=H * D, norm_eps=1e-3, max_seq_len=640)
        (a, _), (b, _) = steps(model, B, 2, prompt=prompt)
    finally:
        torch.set_num_threads(before)
    assert calls["fused"] == 2
    assert_close(a, b, rtol=1e-5, atol=1e-5)
