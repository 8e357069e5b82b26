"""Greedy and beam search, translate_lines and the `qkv translate` command."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv
from qkv import EncoderDecoder, preset
from qkv.cli import main
from qkv.search import (
    _row_topk,
    beam_search,
    decode_beam,
    decode_greedy,
    greedy,
    length_penalty,
)
from qkv.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, to_bytes, train_bpe
from qkv.translate import encode_source, pad_batch, translate_lines

pytestmark = pytest.mark.usefixtures("one_thread")


V = 40


def random_model(**overrides) -> EncoderDecoder:
    """A tiny random model whose outputs vary (a wide untied output layer)."""
    torch.manual_seed(0)
    model = EncoderDecoder(preset("tiny", vocab_size=V, tie_embeddings=False, **overrides))
    nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def sources() -> torch.Tensor:
    """(4, 7) sources of lengths 7, 4, 2, 6 (eos last), pad-padded."""
    torch.manual_seed(1)
    rows = [torch.randint(4, V, (n - 1,)).tolist() + [EOS_ID] for n in (7, 4, 2, 6)]
    return pad_batch(rows)


def assert_same(a, b) -> None:
    """Two lists of Hypothesis: same tokens, log-probs and scores."""
    assert [h.tokens for h in a] == [h.tokens for h in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.logprobs, y.logprobs, rtol=1e-4, atol=1e-5)
        assert x.score == pytest.approx(y.score, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------- greedy and beam


def test_beam_one_equals_greedy():
    model, src = random_model(), sources()
    for alpha in (0.0, 0.6):
        beam = decode_beam(model, src, beam=1, alpha=alpha, max_extra=6)
        plain = decode_greedy(model, src, max_extra=6)
        assert [h.tokens for h in beam] == [h.tokens for h in plain]
        for b, g in zip(beam, plain, strict=True):
            torch.testing.assert_close(b.logprobs, g.logprobs)
    assert len({len(h.tokens) for h in plain}) > 1  # sentences end at different steps


@pytest.mark.parametrize("overrides", [
    dict(n_kv_heads=4), dict(n_kv_heads=2), dict(n_kv_heads=1),
    dict(positions="rope", norm_place="pre", n_kv_heads=2), dict(positions="learned"),
])
def test_cached_equals_uncached(overrides):
    model, src = random_model(**overrides), sources()
    assert_same(decode_greedy(model, src, max_extra=6),
                decode_greedy(model, src, max_extra=6, use_cache=False))
    assert_same(decode_beam(model, src, beam=3, max_extra=6),
                decode_beam(model, src, beam=3, max_extra=6, use_cache=False))


def test_logprobs_are_the_models():
    """Each hypothesis's log-probs are those of a full forward pass over it."""
    model, src = random_model(), sources()
    for hyps in (decode_greedy(model, src, max_extra=6),
                 decode_beam(model, src, beam=4, max_extra=6)):
        for i, h in enumerate(hyps):
            tgt = torch.tensor([[BOS_ID] + h.tokens])
            n = (src[i] != PAD_ID).sum()
            logp = model(src[i : i + 1, :n], tgt)[0].log_softmax(-1)  # (T, V)
            expected = logp.gather(1, torch.tensor(h.tokens + [EOS_ID])[:, None])[:, 0]
            torch.testing.assert_close(h.logprobs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_batch_equals_one_at_a_time(beam):
    """Padding and batch neighbours do not change any sentence's result."""
    model, src = random_model(), sources()
    batch = decode_beam(model, src, beam=beam, max_extra=6)
    alone = [decode_beam(model, src[i : i + 1, : (src[i] != PAD_ID).sum()], beam=beam,
                         max_extra=6)[0] for i in range(len(src))]
    assert_same(batch, alone)


def test_output_length_limits():
    model, src = random_model(), sources()
    src_len = (src != PAD_ID).sum(1).tolist()
    for hyps in (greedy(model, src, max_extra=0), beam_search(model, src, max_extra=0)):
        assert all(len(h) <= n for h, n in zip(hyps, src_len, strict=True))
    for fixed in (greedy(model, src, min_len=5, max_len=5),
                  beam_search(model, src, beam=2, min_len=5, max_len=5)):
        assert [len(h) for h in fixed] == [5] * len(src)
    for hyps in (greedy(model, src, min_len=9), beam_search(model, src, min_len=9)):
        assert min(len(h) for h in hyps) >= 9
        assert all(t not in (PAD_ID, BOS_ID, EOS_ID) for h in hyps for t in h)


@pytest.mark.parametrize("V", [50, 8000, 8003])
def test_row_topk_equals_topk(V):
    torch.manual_seed(0)
    x = torch.randn(6, V)
    x[2, : V // 2] = float("-inf")
    x[3] = float("-inf")
    x[3, EOS_ID] = 0.0
    values, indices = _row_topk(x, 8)
    expected = x.topk(8, dim=1)
    torch.testing.assert_close(values, expected.values)
    finite = expected.values.isfinite()
    assert torch.equal(indices[finite], expected.indices[finite])


def test_cache_reorder_can_drop_sentences():
    """KVCache.reorder with fewer rows (finished sentences dropped) and their sources."""
    model, src = random_model(), sources()
    memory, src_mask = model.encode(src)
    tgt = torch.randint(4, V, (8, 3))  # 2 beams per sentence
    cache = model.make_cache(8, 3)
    model.decode(tgt[:, :2], memory, src_mask, cache)
    rows, keep = torch.tensor([3, 2, 7, 7]), torch.tensor([1, 3])
    cache.reorder(rows, keep)
    step = model.decode(tgt[rows, 2:], memory[keep], src_mask[keep], cache)
    full = model.decode(tgt[rows], memory[keep].repeat_interleave(2, 0),
                        src_mask[keep].repeat_interleave(2, 0))
    torch.testing.assert_close(step[:, 0], full[:, 2], rtol=1e-4, atol=1e-5)


def test_decoding_restores_training_mode():
    model = random_model().train()
    greedy(model, sources(), max_extra=2)
    beam_search(model, sources(), max_extra=2)
    assert model.training


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam=0), "beam=0 must be >= 1"),
    (dict(alpha=-1.0), "alpha=-1.0 must be >= 0"),
    (dict(max_extra=-1), "max_extra=-1 must be >= 0"),
    (dict(min_len=-2), "min_len=-2 must be >= 0"),
    (dict(max_len=0), "max_len=0 must be >= 1"),
    (dict(beam=V), f"beam={V} must be below vocab_size={V}"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        beam_search(random_model(), sources(), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"src must be \(B, S\) token ids"):
        greedy(random_model(), sources().float())
    with pytest.raises(ValueError, match=r"src must be \(B, S\) token ids"):
        beam_search(random_model(), sources()[0])
    lm = qkv.DecoderLM(preset("tiny", vocab_size=V))
    with pytest.raises(ValueError, match="needs an EncoderDecoder, got DecoderLM"):
        greedy(lm, sources())


# ------------------------------------------- hand-set Markov chain: known answers

A, B, C, D, E = range(4, 9)  # the chain's ordinary tokens, after pad unk bos eos


class _OneHot(nn.Module):
    def forward(self, tokens, memory, src_mask, cache=None):
        return F.one_hot(tokens, 9).float()  # (N, T, 9)


class Chain(EncoderDecoder):
    """A decoder whose next-token log-probs are table[previous token]: known optima."""

    def __init__(self, rows: dict[int, dict[int, float]]):
        super().__init__(preset("tiny", vocab_size=9))
        table = torch.full((9, 9), 1e-3)
        table[:, EOS_ID] = 1e-6
        for prev, probs in rows.items():
            for tok, p in probs.items():
                table[prev, tok] = p
        self.table = (table / table.sum(1, keepdim=True)).log()  # (9, 9) log-probs
        self.decoder = _OneHot()

    def logits(self, h):
        return h @ self.table


def exhaustive_best(table: torch.Tensor, limit: int, alpha: float) -> tuple[list[int], float]:
    """The best GNMT-scored output of at most `limit` tokens, by enumeration."""
    logp = table.tolist()
    best: tuple[list[int], float] = ([], -math.inf)
    for n in range(limit + 1):
        for seq in itertools.product([UNK_ID, A, B, C, D, E], repeat=n):
            raw = sum(logp[p][t] for p, t in itertools.pairwise([BOS_ID, *seq, EOS_ID]))
            score = raw / ((5 + n + 1) / 6) ** alpha
            if score > best[1]:
                best = (list(seq), score)
    return best


SRC = torch.tensor([[A, B, EOS_ID]])  # limit = 3 + max_extra


def test_beam_finds_the_best_sequence_greedy_misses():
    chain = Chain({BOS_ID: {A: 0.6, B: 0.4}, A: {A: 0.34, C: 0.33, EOS_ID: 0.33},
                   B: {EOS_ID: 0.9}})
    best, score = exhaustive_best(chain.table, 5, alpha=0.0)
    assert best == [B]
    assert greedy(chain, SRC, max_extra=2) == [[A] * 5]  # A A A ... to the limit
    hyp = decode_beam(chain, SRC, beam=2, alpha=0.0, max_extra=2)[0]
    assert hyp.tokens == best
    assert hyp.score == pytest.approx(score, abs=1e-5)


def test_length_penalty_favours_longer_outputs():
    """Short A (more probable) vs long B C D E: alpha decides, as exhaustive search."""
    chain = Chain({BOS_ID: {A: 0.6, B: 0.4}, A: {EOS_ID: 0.95}, B: {C: 0.99}, C: {D: 0.99},
                   D: {E: 0.99}, E: {EOS_ID: 0.99}})
    found = {}
    for alpha in (0.0, 0.6, 2.0, 3.0):
        best, score = exhaustive_best(chain.table, 5, alpha)
        hyp = decode_beam(chain, SRC, beam=2, alpha=alpha, max_extra=2)[0]
        assert hyp.tokens == best
        assert hyp.score == pytest.approx(score, abs=1e-5)
        found[alpha] = best
    assert found[0.0] == found[0.6] == [A]
    assert found[2.0] == found[3.0] == [B, C, D, E]


def test_length_penalty_values():
    torch.testing.assert_close(length_penalty(torch.tensor([1, 7]), 0.6),
                               torch.tensor([1.0, 2.0**0.6]))
    assert float(length_penalty(10, 0.0)) == 1.0


# -------------------------------------------------- a tiny model that has learnt

def test_overfit_model_reproduces_its_targets():
    torch.manual_seed(0)
    model = EncoderDecoder(preset("tiny", vocab_size=20))
    pairs = [(torch.randint(4, 20, (n,)).tolist(), torch.randint(4, 20, (n + 1,)).tolist())
             for n in (3, 4, 5, 6)]
    src = pad_batch([s + [EOS_ID] for s, _ in pairs])
    tgt_in = pad_batch([[BOS_ID] + t for _, t in pairs])
    tgt_out = pad_batch([t + [EOS_ID] for _, t in pairs])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # 150 steps: loss ~1e-3. At 50 (loss 0.085) the outputs were right on an AVX2 EPYC and
    # wrong on an AVX-512 one: a margin that thin depends on the CPU's rounding.
    for _ in range(150):
        loss = F.cross_entropy(model(src, tgt_in).transpose(1, 2), tgt_out, ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    targets = [t for _, t in pairs]
    assert beam_search(model.eval(), src) == targets
    assert greedy(model, src) == targets


# ------------------------------------------------------- text interface and CLI

LINES = ["a man rides a horse .", "two dogs play in the snow .", "a woman reads a book .",
         "children run on the beach .", "the man is playing a guitar ."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random EncoderDecoder with a tiny BPE tokenizer, saved as a checkpoint."""
    tok = train_bpe(LINES * 4, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = EncoderDecoder(preset("tiny", vocab_size=tok.get_vocab_size(),
                                  tie_embeddings=False))
    nn.init.normal_(model.lm_head.weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt")
    qkv.save(model, path, files={"tokenizer": to_bytes(tok)})
    return path, model.eval(), tok


def test_translate_lines_keeps_order_and_empty_lines(checkpoint):
    _, model, tok = checkpoint
    lines = [LINES[0], "", LINES[1], "   ", LINES[2], LINES[3]]
    out = translate_lines(model, tok, lines, beam=3, batch_size=2)
    assert len(out) == len(lines)
    assert out[1] == "" and out[3] == ""
    alone = [translate_lines(model, tok, [line], beam=3)[0] for line in lines]
    assert out == alone
    assert all("\n" not in line for line in out)
    assert translate_lines(model, tok, [], beam=3) == []


def test_encode_source_cuts_long_lines(checkpoint):
    _, _, tok = checkpoint
    with pytest.warns(UserWarning, match="cut to max_seq_len=4"):
        ids = encode_source(tok, LINES[1], 4)
    assert len(ids) == 4 and ids[-1] == EOS_ID


def run_cli(argv, stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("beam", ["1", "4"])
def test_translate_cli_streams_lines_in_order(checkpoint, monkeypatch, capsys, beam):
    path, model, tok = checkpoint
    lines = [LINES[4], "", LINES[0], LINES[1], "", LINES[2]]
    status, out, err = run_cli(["translate", "--model", str(path), "--beam", beam,
                                "--batch-size", "2"], "\n".join(lines) + "\n", monkeypatch,
                               capsys)
    assert status == 0, err
    expected = translate_lines(model, tok, lines, beam=int(beam))
    assert out == "".join(line + "\n" for line in expected)
    assert out.split("\n")[1] == "" and out.split("\n")[4] == ""


def test_translate_cli_last_line_without_newline(checkpoint, monkeypatch, capsys):
    path, model, tok = checkpoint
    status, out, _ = run_cli(["translate", "--model", str(path)], "\n" + LINES[3],
                             monkeypatch, capsys)
    assert status == 0
    assert out == "\n" + translate_lines(model, tok, [LINES[3]])[0] + "\n"


def test_translate_cli_reads_bytes_and_rejects_bad_utf8(checkpoint, monkeypatch, capsys):
    path, model, tok = checkpoint
    good = io.TextIOWrapper(io.BytesIO((LINES[0] + "\r\n\n").encode()), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", good)
    assert main(["translate", "--model", str(path)]) == 0
    assert capsys.readouterr().out == translate_lines(model, tok, [LINES[0]])[0] + "\n\n"
    bad = io.TextIOWrapper(io.BytesIO(b"a man .\nok\n\xff\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", bad)
    assert main(["translate", "--model", str(path), "--batch-size", "1"]) == 2
    captured = capsys.readouterr()
    assert "qkv: error: stdin line 3 is not valid UTF-8" in captured.err
    assert len(captured.out.splitlines()) == 2  # the lines before it were written


def test_translate_cli_errors(checkpoint, tmp_path, monkeypatch, capsys):
    path, _, _ = checkpoint
    cases = [
        (["--model", str(tmp_path / "nope")], "no such file"),
        (["--model", str(path), "--beam", "0"], "--beam=0 must be >= 1"),
        (["--model", str(path), "--batch-size", "0"], "--batch-size=0 must be >= 1"),
        (["--model", str(path), "--alpha", "-1"], "must be >= 0"),
    ]
    lm_dir = tmp_path / "lm"
    qkv.save(qkv.DecoderLM(preset("tiny", vocab_size=V)), lm_dir)
    cases.append((["--model", str(lm_dir)], "holds a DecoderLM; translation needs an"))
    for args, match in cases:
        status, out, err = run_cli(["translate", *args], "a man .\n", monkeypatch, capsys)
        assert status == 2, args
        assert err.startswith("qkv: error:") and match in err, err
        assert out == ""


# ------------------------------------------- review s9: defaults, input text, errors


def spy_translate_lines(monkeypatch, module: str = "qkv.translate") -> list[dict]:
    """Record the lines and keyword arguments of each translate_lines call in `module`."""
    calls = []

    def spy(model, tok, lines, **kwargs):
        calls.append({"lines": list(lines), **kwargs})
        return translate_lines(model, tok, lines, **kwargs)

    monkeypatch.setattr(f"{module}.translate_lines", spy)
    return calls


@pytest.fixture(scope="module")
def trained_with_decoding(checkpoint, tmp_path_factory):
    """The same model saved with a [decoding] section in its metadata, as qkv train does."""
    _, model, tok = checkpoint
    path = tmp_path_factory.mktemp("ckpt_decoding")
    qkv.save(model, path, files={"tokenizer": to_bytes(tok)},
             metadata={"decoding": {"beam": 2, "alpha": 1.5, "batch_size": 3}})
    return path


def test_translate_cli_defaults_to_the_saved_decoding_section(
        checkpoint, trained_with_decoding, monkeypatch, capsys):
    calls = spy_translate_lines(monkeypatch)
    status, _, err = run_cli(["translate", "--model", str(trained_with_decoding)],
                             LINES[0] + "\n", monkeypatch, capsys)
    assert status == 0, err
    assert {k: calls[-1][k] for k in ("beam", "alpha", "batch_size", "max_extra")} == {
        "beam": 2, "alpha": 1.5, "batch_size": 3, "max_extra": 50}
    status, _, err = run_cli(["translate", "--model", str(trained_with_decoding), "--beam", "1",
                              "--alpha", "0", "--batch-size", "5", "--max-extra", "7"],
                             LINES[0] + "\n", monkeypatch, capsys)
    assert status == 0, err  # flags win
    assert {k: calls[-1][k] for k in ("beam", "alpha", "batch_size", "max_extra")} == {
        "beam": 1, "alpha": 0.0, "batch_size": 5, "max_extra": 7}
    path, _, _ = checkpoint  # no [decoding] saved: the documented defaults
    assert run_cli(["translate", "--model", str(path)], LINES[0] + "\n", monkeypatch,
                   capsys)[0] == 0
    assert {k: calls[-1][k] for k in ("beam", "alpha", "batch_size", "max_extra")} == {
        "beam": 4, "alpha": 0.6, "batch_size": 32, "max_extra": 50}


def test_translate_cli_help_names_the_saved_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["translate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the checkpoint's [decoding] alpha, else 0.6)" in text
    assert "(default: the checkpoint's [decoding] beam, else 4)" in text


def test_translate_cli_drops_a_byte_order_mark(checkpoint, monkeypatch, capsys):
    path, model, tok = checkpoint
    calls = spy_translate_lines(monkeypatch)
    text = io.TextIOWrapper(io.BytesIO(("\ufeff" + LINES[0] + "\n\ufeffx\n").encode()),
                            encoding="utf-8")
    monkeypatch.setattr("sys.stdin", text)
    assert main(["translate", "--model", str(path)]) == 0
    assert calls[0]["lines"] == [LINES[0], "\ufeffx"]  # only at the start of the input
    assert capsys.readouterr().out.splitlines()[0] == translate_lines(model, tok, [LINES[0]])[0]


def test_extra_spaces_do_not_change_the_source(checkpoint):
    _, model, tok = checkpoint
    spaced = "  a man  rides a   horse .  "
    assert encode_source(tok, spaced, 128) == encode_source(tok, LINES[0], 128)
    for text in (LINES[0], "a\u00a0man\trides"):  # tabs and no-break spaces kept, as trained
        assert encode_source(tok, text, 128) == qkv.tokenizer.encode(tok, text, eos=True)
    assert translate_lines(model, tok, [spaced]) == translate_lines(model, tok, [LINES[0]])


def test_cut_source_warning_names_the_line(checkpoint, tmp_path, monkeypatch, capsys):
    path, _, _ = checkpoint
    long = " ".join(LINES * 30)  # far over max_seq_len=128 tokens
    with pytest.warns(UserWarning, match=r"^stdin line 3: source of \d+ tokens cut to "
                                         r"max_seq_len=128$"):
        status, _, err = run_cli(["translate", "--model", str(path), "--batch-size", "2",
                                  "--beam", "1", "--max-extra", "2"],
                                 f"{LINES[0]}\n{LINES[1]}\n{long}\n", monkeypatch, capsys)
    assert status == 0, err
    (tmp_path / "src.txt").write_text(f"{long}\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"src.txt line 1: source of"):
        main(["evaluate", "--model", str(path), "--src", str(tmp_path / "src.txt"), "--ref",
              str(tmp_path / "src.txt"), "--beam", "1", "--max-extra", "2"])


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_translate_cli_rejects_a_non_finite_alpha(checkpoint, monkeypatch, capsys, alpha):
    path, _, _ = checkpoint
    status, out, err = run_cli(["translate", "--model", str(path), f"--alpha={alpha}"],
                               "a man .\n", monkeypatch, capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"qkv: error: --alpha={float(alpha)} must be a finite number >= 0")


def test_non_finite_alpha_rejected_by_search_and_from_checkpoint(checkpoint, tmp_path,
                                                                 monkeypatch, capsys):
    for alpha in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"alpha={alpha} must be a finite number >= 0"):
            beam_search(random_model(), sources(), alpha=alpha)
    _, model, tok = checkpoint
    qkv.save(model, tmp_path / "bad", files={"tokenizer": to_bytes(tok)},
             metadata={"decoding": {"alpha": math.nan, "beam": 0}})
    status, _, err = run_cli(["translate", "--model", str(tmp_path / "bad"), "--beam", "2"],
                             "a man .\n", monkeypatch, capsys)
    assert status == 2  # --beam 2 overrides the bad saved beam; the saved alpha is checked
    assert err == (f"qkv: error: {tmp_path / 'bad'}: decoding.alpha=nan must be a finite "
                   f"number >= 0 (saved with the checkpoint; give --alpha to override it)\n")


def test_translate_cli_points_from_a_run_folder_to_its_checkpoints(checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "ckpt-00000004").mkdir(parents=True)
    (run / "last").symlink_to("ckpt-00000004")
    status, _, err = run_cli(["translate", "--model", str(run)], "a man .\n", monkeypatch,
                             capsys)
    assert status == 2
    assert f"is {run} a run folder? use {run}/last or {run}/ckpt-NNNNNNNN" in err


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_translate_cli_stops_quietly_when_the_reader_goes(checkpoint, monkeypatch, capsys):
    path, _, _ = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO(LINES[0] + "\n"))
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["translate", "--model", str(path)]) == 1
    assert capsys.readouterr().err == ""


def test_translate_piped_into_head_exits_quietly(checkpoint):
    """`qkv translate | head -1`: the real pipe, closed after the first line."""
    import os
    import subprocess
    import sys

    path, _, _ = checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "translate", "--model", str(path),
                             "--batch-size", "1", "--beam", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdin.write((LINES[0] + "\n").encode())
    proc.stdin.flush()
    assert proc.stdout.readline().endswith(b"\n")
    proc.stdout.close()  # as head does after one line
    proc.stdin.write("".join(line + "\n" for line in LINES[1:]).encode())
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == ""
