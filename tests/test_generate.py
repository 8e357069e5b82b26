"""Generation (cached, batched, sampled), streaming detokenisation, perplexity, and the
`qkv generate` / `qkv perplexity` commands, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qkv import gguf as G
from qkv import pretrained as P
from qkv.cli import main
from qkv.config import ModelConfig
from qkv.generate import TextStream, _windows, generate, perplexity, read_fraction, sample
from qkv.models import DecoderLM, EncoderClassifier

TOKENS = ["<|endoftext|>", *G._byte_alphabet().values(), "he", "ll", "hell", "Ġw"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def byte_tokenizer():
    return G.gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
                             "tokenizer.ggml.merges": MERGES,
                             "tokenizer.ggml.token_type": [3] + [1] * (len(TOKENS) - 1)})


def tiny_lm(**kw) -> DecoderLM:
    cfg = ModelConfig(**{**dict(vocab_size=len(TOKENS), d_model=32, n_heads=4, n_kv_heads=2,
                                n_layers=2, d_ff=64, max_seq_len=64, dropout=0.0,
                                positions="rope", norm="rmsnorm", norm_place="pre",
                                activation="swiglu", bias=False, scale_embeddings=False), **kw})
    return DecoderLM(cfg).eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """No cache: the whole sequence again at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ------------------------------------------------------------------------ generate


@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal"])
def test_cached_greedy_equals_full_recompute(positions):
    model = tiny_lm(positions=positions)
    prompt = [5, 9, 100, 7]
    assert generate(model, [prompt], 12) == [greedy_reference(model, prompt, 12)]


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_lm()
    prompts = [[5, 9, 100, 7, 8, 3], [11], [40, 41, 42]]
    batched = generate(model, prompts, 10)
    assert batched == [generate(model, [p], 10)[0] for p in prompts]
    assert batched == [greedy_reference(model, p, 10) for p in prompts]


def test_seed_makes_sampling_deterministic():
    model = tiny_lm()
    kw = dict(temperature=1.0, top_p=0.95)
    a = generate(model, [[1, 2, 3]] * 2, 20, seed=7, **kw)
    assert a == generate(model, [[1, 2, 3]] * 2, 20, seed=7, **kw)
    assert a != generate(model, [[1, 2, 3]] * 2, 20, seed=8, **kw)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_lm()
    greedy = generate(model, [[4, 5, 6]], 10)
    assert generate(model, [[4, 5, 6]], 10, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, [[4, 5, 6]], 10, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities .64 .24 .09 ...: the nucleus of 0.8 is the first two tokens
    assert set(sample(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}


def test_stops_at_eos_and_honours_min_new_tokens():
    model = tiny_lm()
    free = generate(model, [[1, 2]], 10)[0]
    eos = free[3]
    first = free.index(eos)
    assert generate(model, [[1, 2]], 10, eos_id=eos) == [free[: first + 1]]
    later = generate(model, [[1, 2]], 10, eos_id=eos, min_new_tokens=first + 1)[0]
    assert eos not in later[: first + 1]


def test_stream_reports_every_token_and_none_after_eos():
    model = tiny_lm()
    prompts = [[1, 2], [7, 8, 9]]
    free = generate(model, prompts, 8)
    eos = free[0][1]
    steps = []
    out = generate(model, prompts, 8, eos_id=eos, stream=steps.append)
    for row, result in enumerate(out):
        seen = [s[row] for s in steps]
        assert [t for t in seen if t is not None] == result
        assert all(t is None for t in seen[len(result):])


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]], max_new_tokens=3), "at least one token"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1] * 60], max_new_tokens=5), "65 tokens exceed the model's max_seq_len=64"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=-1.0), "temperature=-1.0"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0, top_p=1.5), "top_p=1.5"),
    (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0, top_k=0), "top_k=0"),
])
def test_generate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_lm(), **kwargs)


def test_generate_needs_a_decoder_lm():
    with pytest.raises(ValueError, match="needs a DecoderLM, got EncoderClassifier"):
        generate(EncoderClassifier(ModelConfig(vocab_size=10, d_model=8, n_heads=2, d_ff=8,
                                               n_layers=1)), [[1]], 2)


# ------------------------------------------------------------------ detokenisation


def test_text_stream_waits_for_whole_characters():
    tok = byte_tokenizer()
    text = "hello wörld 日本 😀!"
    ids = tok.encode(text).ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text and stream.finish() == ""
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the multi-byte characters arrive over several tokens


def test_text_stream_finish_flushes_an_unfinished_character():
    tok = byte_tokenizer()
    stream = TextStream(tok)
    ids = tok.encode("ab日").ids
    assert "".join(stream.push(i) for i in ids[:-1]) == "ab"
    assert stream.finish() == "\ufffd"


# ---------------------------------------------------------------------- perplexity


def test_perplexity_one_window_is_exp_mean_cross_entropy():
    model = tiny_lm()
    ids = torch.randint(0, len(TOKENS), (40,)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    ref = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert perplexity(model, ids, window=64, stride=32) == pytest.approx(ref, rel=1e-5)


def test_perplexity_strided_windows_match_reference():
    model = tiny_lm()
    ids = torch.randint(0, len(TOKENS), (50,)).tolist()
    x, nll, n, prev = torch.tensor(ids), 0.0, 0, 0
    with torch.no_grad():  # Hugging Face's recipe: labels before the new tokens are -100
        for begin in range(0, 50, 8):
            end = min(begin + 20, 50)
            labels = x[begin:end].clone()
            labels[: -(end - prev)] = -100
            logits = model(x[None, begin:end])[0]
            nll += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                   reduction="sum").item()
            n += int((labels[1:] != -100).sum())
            prev = end
            if end == 50:
                break
    assert n == 49
    assert perplexity(model, ids, window=20, stride=8) == pytest.approx(math.exp(nll / n),
                                                                        rel=1e-5)


def test_windows_score_each_token_once():
    for n, w, s in [(50, 20, 8), (64, 16, 16), (10, 32, 4)]:
        spans = _windows(n, w, s)
        assert spans[-1][1] == n
        assert all(e - b <= w for b, e, _ in spans)
    assert sum(k for *_, k in _windows(50, 20, 8)) == 49


@pytest.mark.parametrize("ids, window, stride, match", [
    ([1], 8, 4, "at least 2 tokens"),
    ([1, 2, 3], 8, 16, r"stride \(16\) <= window \(8\)"),
    ([1, 2, 3], 128, 16, r"<= max_seq_len \(64\)"),
])
def test_perplexity_errors(ids, window, stride, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_lm(), ids, window=window, stride=stride)


def test_read_fraction_cuts_at_line_starts(tmp_path):
    path = tmp_path / "t.txt"
    lines = [f"line {i}\n" for i in range(20)]
    path.write_text("".join(lines))
    head, tail = read_fraction(path, "0:0.5"), read_fraction(path, "0.5:1")
    assert head + tail == "".join(lines)
    assert head.endswith("\n") and tail in "".join(lines) and tail.startswith("line")
    with pytest.raises(ValueError, match="'0.9:0.1' needs 0 <= start < end <= 1"):
        read_fraction(path, "0.9:0.1")
    with pytest.raises(ValueError, match="'half' must look like 0:0.9"):
        read_fraction(path, "half")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def lm_dir(tmp_path):
    return P.Pretrained(tiny_lm(), byte_tokenizer(), eos_id=0).save(tmp_path / "lm")


def test_generate_command_streams_the_greedy_text(lm_dir, capsys):
    assert main(["generate", "--model", str(lm_dir), "hello", "--max-new-tokens", "6"]) == 0
    p = P.load_pretrained(lm_dir)
    expected = p.decode(generate(p.model, [p.encode("hello")], 6, eos_id=0)[0])
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_warns_only_on_a_cpu_without_bf16_units(lm_dir, native, monkeypatch):
    """On an AVX2-only CPU a bf16 matmul ran 35-58x slower than float32: say so, once."""
    import warnings

    import qkv.linear as QL

    monkeypatch.setattr(QL, "bf16_is_native", lambda: native)
    argv = ["generate", "--model", str(lm_dir), "hi", "--max-new-tokens", "2", "--dtype"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "bfloat16"]) == 0
        assert main([*argv, "float32"]) == 0
    slow = [w for w in caught if "no bfloat16 matmul units" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "qkv generate --dtype bfloat16" in str(slow[0].message)
        assert slow[0].category is RuntimeWarning


@pytest.mark.filterwarnings("ignore:.*no bfloat16 matmul units")  # tested above
def test_generate_command_bfloat16_decodes_the_bfloat16_model(lm_dir, capsys, monkeypatch):
    import qkv.generate as G

    seen, real = [], G.generate
    monkeypatch.setattr(G, "generate", lambda model, *a, **k: (
        seen.append(next(model.parameters()).dtype), real(model, *a, **k))[1])
    argv = ["generate", "--model", str(lm_dir), "hello", "--max-new-tokens", "6"]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert seen == [torch.bfloat16]
    p = P.load_pretrained(lm_dir)
    model = p.model.to(torch.bfloat16)
    assert model.make_cache(1, 8).dtype == torch.bfloat16
    expected = p.decode(generate(model, [p.encode("hello")], 6, eos_id=0)[0])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_command_errors(lm_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(lm_dir), "hi", "--temperature", "-2"]) == 2
    assert "temperature=-2.0 must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(lm_dir), "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    clf = EncoderClassifier(ModelConfig(vocab_size=len(TOKENS), d_model=8, n_heads=2, d_ff=8,
                                        n_layers=1))
    P.Pretrained(clf, byte_tokenizer()).save(tmp_path / "clf")
    assert main(["generate", "--model", str(tmp_path / "clf"), "hi"]) == 2
    assert "not a language model (DecoderLM)" in capsys.readouterr().err


def test_perplexity_command(lm_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 10)
    argv = ["perplexity", "--model", str(lm_dir), str(text), "--window", "32", "--stride", "16"]
    assert main(argv) == 0
    p = P.load_pretrained(lm_dir)
    ids = p.encode(text.read_text())
    expected = perplexity(p.model, ids, window=32, stride=16)
    assert capsys.readouterr().out == (f"perplexity {expected:.4f} over {len(ids) - 1} tokens "
                                       "(window 32, stride 16)\n")
    assert main(argv[:-4] + ["--window", "999"]) == 2
    assert "max_seq_len (64)" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(lm_dir), str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
