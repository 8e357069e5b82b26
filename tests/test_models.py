"""Models: the paper's EncoderDecoder vs torch.nn.Transformer; cached decoding; padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qkv import (
    DecoderLM,
    EncoderClassifier,
    EncoderDecoder,
    ModelConfig,
    causal_mask,
    count_parameters,
    padding_mask,
    preset,
)
from qkv.models import MODELS

F64 = dict(rtol=0, atol=1e-10)
V = 23  # tiny vocabulary; 0 is padding


def tiny(**kw) -> ModelConfig:
    return preset("tiny", **{"vocab_size": V, "max_seq_len": 32, **kw})


def tokens(B: int, T: int, seed: int = 0, low: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, V, (B, T), generator=g)


# ------------------------------------------------------- vs torch.nn.Transformer


def copy_mha(ours, theirs: nn.MultiheadAttention) -> None:
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                           ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.load_state_dict(ours.out_proj.state_dict())


def copy_block(ours, theirs, cross: bool) -> None:
    copy_mha(ours.self_attn, theirs.self_attn)
    theirs.linear1.load_state_dict(ours.ff.fc1.state_dict())
    theirs.linear2.load_state_dict(ours.ff.fc2.state_dict())
    theirs.norm1.load_state_dict(ours.norm1.state_dict())
    if cross:
        copy_mha(ours.cross_attn, theirs.multihead_attn)
        theirs.norm2.load_state_dict(ours.norm2.state_dict())
        theirs.norm3.load_state_dict(ours.norm3.state_dict())
    else:
        theirs.norm2.load_state_dict(ours.norm2.state_dict())


def torch_transformer_like(model: EncoderDecoder) -> nn.Transformer:
    cfg = model.cfg
    t = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_decoder_layers, cfg.d_ff,
                       dropout=0.0, activation="relu", batch_first=True, norm_first=False)
    t.encoder.norm = None  # the paper's post-LN stack has no final norm
    t.decoder.norm = None
    t.encoder.enable_nested_tensor = False  # keep padded positions, as we do
    t = t.double().eval()
    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, t.encoder.layers, strict=True):
            copy_block(ours, theirs, cross=False)
        for ours, theirs in zip(model.decoder.layers, t.decoder.layers, strict=True):
            copy_block(ours, theirs, cross=True)
    return t


def test_encoder_decoder_equals_torch_transformer():
    """The paper's form (post-LN, ReLU), same embedded inputs, whole outputs compared."""
    cfg = tiny(n_layers=2, n_decoder_layers=3)
    model = EncoderDecoder(cfg).double().eval()
    reference = torch_transformer_like(model)
    src, tgt = tokens(3, 7), tokens(3, 5, seed=1)
    src[1, 5:] = 0
    src[2, 2:] = 0
    embed = model.encoder.embed
    src_x = embed(src, torch.arange(7))
    tgt_x = embed(tgt, torch.arange(5))
    ignore = src == 0  # torch's polarity: True = ignore
    expected = reference(src_x, tgt_x, tgt_mask=~causal_mask(5), src_key_padding_mask=ignore,
                         memory_key_padding_mask=ignore)
    expected_memory = reference.encoder(src_x, src_key_padding_mask=ignore)
    memory, src_mask = model.encode(src)
    assert_close(memory, expected_memory, **F64)
    assert_close(model.decoder(tgt, memory, src_mask), expected, **F64)
    logits = expected @ model.encoder.embed.tok.weight.T  # tied output projection
    assert_close(model(src, tgt), logits, **F64)


def test_tied_embeddings_are_one_tensor():
    model = EncoderDecoder(tiny())
    w = model.encoder.embed.tok.weight
    assert model.decoder.embed.tok.weight is w and model.lm_head is None
    untied = EncoderDecoder(tiny(tie_embeddings=False))
    assert untied.decoder.embed.tok.weight is not untied.encoder.embed.tok.weight
    extra = 2 * V * untied.cfg.d_model  # a second embedding and an output matrix
    assert count_parameters(untied) - count_parameters(model) == extra


# ------------------------------------------------------------ incremental decoding

KV_HEADS = [4, 2, 1]  # tiny has n_heads=4: MHA, GQA, MQA


def lm(G: int, positions: str) -> DecoderLM:
    return DecoderLM(tiny(n_kv_heads=G, positions=positions)).double().eval()


def run_cached(model, x, chunks, **kw):
    """Logits of model run on x in the given chunk sizes through one cache."""
    cache = model.make_cache(x.shape[0], 16)
    out, start = [], 0
    for n in chunks:
        out.append(model(x[:, start : start + n], cache=cache, **kw))
        start += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("G", KV_HEADS)
@pytest.mark.parametrize("positions", ["rope", "sinusoidal", "learned"])
def test_decoder_lm_cached_equals_full(G, positions):
    model = lm(G, positions)
    x = tokens(2, 8)
    full = model(x)
    stepped, cache = run_cached(model, x, [3, 1, 1, 2, 1])  # chunked prefill, then steps
    assert_close(stepped, full, **F64)
    assert cache.length == 8 and cache.dtype == torch.float64


@pytest.mark.parametrize("G", KV_HEADS)
def test_decoder_lm_future_tokens_do_not_change_the_past(G):
    model = lm(G, "rope")
    x = tokens(2, 8)
    y = x.clone()
    y[:, 5:] = tokens(2, 3, seed=7)
    assert_close(model(x)[:, :5], model(y)[:, :5], **F64)
    assert (model(x)[:, 5:] - model(y)[:, 5:]).abs().amax() > 1e-3


@pytest.mark.parametrize("G", KV_HEADS)
@pytest.mark.parametrize("positions", ["rope", "sinusoidal"])
def test_decoder_lm_left_padding_leaves_real_tokens_unchanged(G, positions):
    """Left padding + padding mask + positions counted from each row's first real token."""
    model = lm(G, positions)
    a, b = tokens(1, 6), tokens(1, 4, seed=1)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = padding_mask(batch, 0)  # (B, 1, 1, S)
    pos = (mask[:, 0, 0].long().cumsum(1) - 1).clamp(min=0)  # (B, T)
    out = model(batch, mask=mask, positions=pos)
    assert torch.isfinite(out).all()
    assert_close(out[0], model(a)[0], **F64)
    assert_close(out[1, 2:], model(b)[0], **F64)
    # the same through the cache: prefill, then one step with one more key allowed
    cache = model.make_cache(2, 16)
    model(batch[:, :5], mask=mask[..., :5], positions=pos[:, :5], cache=cache)
    step = model(batch[:, 5:], mask=mask, positions=pos[:, 5:], cache=cache)
    assert_close(step, out[:, 5:], **F64)


def encdec(G: int) -> EncoderDecoder:
    return EncoderDecoder(tiny(n_kv_heads=G)).double().eval()


@pytest.mark.parametrize("G", KV_HEADS)
def test_encoder_decoder_cached_equals_full(G):
    model = encdec(G)
    src, tgt = tokens(2, 6), tokens(2, 7, seed=1)
    src[1, 4:] = 0
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    cache = model.make_cache(2, 16)
    out = [model.decode(tgt[:, :3], memory, src_mask, cache)]
    out += [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(3, 7)]
    assert_close(torch.cat(out, 1), full, **F64)
    assert all(kv is not None and kv[0].shape[0] == 2 for kv in cache.cross)


@pytest.mark.parametrize("G", KV_HEADS)
def test_encoder_decoder_beams_share_cross_kv_and_reorder(G):
    """R beams per source, stepped through one cache, with a reorder in the middle."""
    model, R = encdec(G), 3
    src = tokens(2, 6)
    src[0, 3:] = 0
    tgt = tokens(2 * R, 6, seed=2)  # rows s*R .. s*R+R-1 are the beams of source s
    memory, src_mask = model.encode(src)
    cache = model.make_cache(2 * R, 16)
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(3)]
    rep_memory, rep_mask = memory.repeat_interleave(R, 0), src_mask.repeat_interleave(R, 0)
    assert_close(torch.cat(steps, 1), model.decode(tgt[:, :3], rep_memory, rep_mask), **F64)
    order = torch.tensor([2, 2, 0, 4, 3, 3])  # beams stay within their sentence
    cache.reorder(order)
    new = torch.cat([tgt[order, :3], tgt[:, 3:]], 1)
    steps = [model.decode(new[:, t : t + 1], memory, src_mask, cache) for t in range(3, 6)]
    expected = model.decode(new, rep_memory, rep_mask)[:, 3:]
    assert_close(torch.cat(steps, 1), expected, **F64)
    assert cache.cross[0][0].shape[0] == 2  # one K/V per source, never per beam


@pytest.mark.parametrize("G", KV_HEADS)
def test_source_padding_leaves_outputs_unchanged(G):
    model = encdec(G)
    src, tgt = tokens(2, 5), tokens(2, 4, seed=1)
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1)
    memory, _ = model.encode(src)
    padded_memory, _ = model.encode(padded)
    assert_close(padded_memory[:, :5], memory, **F64)
    assert_close(model(padded, tgt), model(src, tgt), **F64)


def test_classifier_mean_pooling_ignores_padding():
    model = EncoderClassifier(tiny(n_classes=3)).double().eval()
    x = tokens(2, 5)
    padded = torch.cat([x, torch.zeros(2, 2, dtype=torch.long)], 1)
    assert model(x).shape == (2, 3)
    assert_close(model(padded), model(x), **F64)
    cls = EncoderClassifier(tiny(pooling="cls")).double().eval()
    assert_close(cls.features(x), cls.encoder(x)[:, 0], **F64)


def test_positions_beyond_max_seq_len_raise():
    model = DecoderLM(tiny(max_seq_len=4))
    with pytest.raises(ValueError, match="sequence of 5 positions is longer than max_seq_len=4"):
        model(tokens(1, 5))
    cache = model.make_cache(1, 8)
    model(tokens(1, 4), cache=cache)
    with pytest.raises(ValueError, match="sequence of 5 positions is longer than max_seq_len=4"):
        model(tokens(1, 1), cache=cache)


# ------------------------------------------------------------------ sizes, registry


def test_base_preset_parameter_count():
    """The paper's base model with a 37,000-token shared vocabulary (~65M in the paper)."""
    cfg = preset("base", vocab_size=37000)
    C, F, L, V_ = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    attn = 4 * (C * C + C)
    ff = C * F + F + F * C + C
    norm = 2 * C
    expected = V_ * C + L * (attn + ff + 2 * norm) + L * (2 * attn + ff + 3 * norm)
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    assert count_parameters(model) == expected
    assert 60e6 < expected < 66e6


@pytest.mark.parametrize("G", [8, 2, 1])
def test_fewer_kv_heads_shrink_only_kv_projections(G):
    with torch.device("meta"):
        mha = count_parameters(EncoderDecoder(preset("small", vocab_size=100)))
        gqa = count_parameters(EncoderDecoder(preset("small", vocab_size=100, n_kv_heads=G)))
    cfg = preset("small")
    kv_saved = 2 * (cfg.d_model + 1) * (cfg.n_heads - G) * cfg.head_dim  # k and v: W and b
    assert mha - gqa == kv_saved * (cfg.n_layers + 2 * cfg.n_decoder_layers)


def test_models_registry():
    assert set(MODELS) == {"EncoderDecoder", "DecoderLM", "EncoderClassifier"}


@pytest.mark.parametrize("G", KV_HEADS)
def test_encoder_decoder_future_target_tokens_do_not_change_the_past(G):
    model = encdec(G)
    src, tgt = tokens(2, 6), tokens(2, 7, seed=1)
    other = tgt.clone()
    other[:, 4:] = tokens(2, 3, seed=9)
    a, b = model(src, tgt), model(src, other)
    assert_close(a[:, :4], b[:, :4], **F64)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3


@pytest.mark.parametrize("G", [2, 1])
def test_gqa_model_equals_mha_model_with_repeated_kv_weights(G):
    """A whole GQA/MQA EncoderDecoder equals the MHA one whose K/V rows are repeated."""
    gqa = encdec(G)
    mha = encdec(4)
    H, D = gqa.cfg.n_heads, gqa.cfg.head_dim
    state = {}
    for name, t in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:  # (G*D, ...) -> (H*D, ...)
            t = t.reshape(G, D, *t.shape[1:]).repeat_interleave(H // G, 0).flatten(0, 1)
        state[name] = t
    mha.load_state_dict(state)
    src, tgt = tokens(2, 6), tokens(2, 5, seed=1)
    src[1, 4:] = 0
    assert_close(gqa(src, tgt), mha(src, tgt), **F64)
