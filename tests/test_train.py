"""`qkv train` / `qkv average`: config validation, schedule, exact resume after SIGKILL,
two-process DDP against one process, averaging, and overfitting 50 Multi30k pairs."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qkv import checkpoint
from qkv.cli import main
from qkv.train import (
    Trainer,
    checkpoints,
    lr_at,
    optimizer_from_bytes,
    optimizer_to_bytes,
)
from qkv.trainconfig import load_config, parse_config

EN = "the a cat dog man woman sees likes small big red blue house car tree ball".split()
DE = "der ein katze hund mann frau sieht mag kleine grosse rote blaue haus auto baum ball".split()


def _corpus(tmp_path: Path, n: int = 40) -> tuple[str, str]:
    """A toy parallel corpus: random word sequences, translated word by word."""
    rng = random.Random(0)
    src, tgt = [], []
    for _ in range(n):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randrange(3, 9))]
        src.append(" ".join(EN[i] for i in idx))
        tgt.append(" ".join(DE[i] for i in idx))
    (tmp_path / "toy.en").write_text("\n".join(src) + "\n")
    (tmp_path / "toy.de").write_text("\n".join(tgt) + "\n")
    return str(tmp_path / "toy.en"), str(tmp_path / "toy.de")


TRAINING = dict(max_steps="10", batch_tokens="120", warmup_steps="4", lr_scale="2.0",
                log_every="1", eval_every="100", save_every_steps="3", threads="1")


def _config(tmp_path: Path, training: str = "", model: str = "", data: str = "") -> Path:
    """A tiny translation config; `training` lines ("key = value") override TRAINING."""
    src, tgt = _corpus(tmp_path)
    t = dict(TRAINING)
    for line in filter(None, training.split("\n")):
        key, value = (x.strip() for x in line.split("=", 1))
        t[key] = value
    text = textwrap.dedent(f"""\
        [model]
        preset = "tiny"
        d_model = 32
        n_layers = 1
        d_ff = 64
        {model}
        [data]
        train = ["{src}", "{tgt}"]
        vocab_size = 60
        {data}
        [training]
        """) + "".join(f"{k} = {v}\n" for k, v in t.items())
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize("text, message", [
    ("[data]\ntrain=['a']\n[training]\nlr_warmup = 4", r"training.lr_warmup: unknown key"),
    ("[data]\ntrain=['a']\n[model]\nd_modle = 4", r"model.d_modle: unknown key"),
    ("[data]\ntrain=['a']\n[training]\nmax_steps = 'ten'",
     r"training.max_steps='ten': expected int"),
    ("[data]\ntrain=['a']\n[training]\nmax_steps = 0", r"training.max_steps=0: must be >= 1"),
    ("[data]\ntrain=['a']\n[training]\nschedule = 'cosine'",
     r"training.schedule='cosine': expected one of"),
    ("[data]\ntrain=['a']\n[training]\nbetas = [0.9]", r"training.betas=\[0.9\]: expected two"),
    ("[data]\ntrain=['a']\n[training]\nbetas = ['a', 'b']",
     r"training.betas=\['a', 'b'\]: expected two numbers"),
    ("[data]\ntrain=['a']\nlabels = [0, 1]", r"data.labels=\[0, 1\]: expected a list of class"),
    ("[data]\ntrain=['a']\n[training]\nbf16 = 1", r"training.bf16=1: expected bool"),
    ("[data]\ntrain=['a']\ntask = 'parsing'", r"data.task='parsing': expected one of"),
    ("[data]\ntrain=['a', 'b', 'c']", r"data.train=.*expected a list of 1 or 2 file names"),
    ("[data]\ntrain=['${QKV_SURELY_UNSET_VAR}/x']", r"data.train=.*environment variable"),
    ("[data]\ntrain=['a']\n[decoding]\nbeam = 0", r"decoding.beam=0: must be >= 1"),
    ("[data]\ntrain=['a']\n[decoding]\nalpha = nan", r"decoding.alpha=nan: must be a finite"),
    ("[data]\ntrain=['a']\n[optimizer]\nlr = 1", r"optimizer: unknown section"),
    ("[training]\nmax_steps = 1", r"data: missing section"),
    ("[data]\ntrain=['a']\n[model]\npreset = 'huge'", r"model.preset='huge': expected one of"),
    ("[data\n", r"config is not valid TOML"),
    # [model] values: at parse time, before any data is read or BPE trained
    ("[data]\ntrain=['a']\n[model]\nn_heads = 8\nn_kv_heads = 3",
     r"^model.n_heads=8 is not divisible by n_kv_heads=3$"),
    ("[data]\ntrain=['a']\n[model]\nd_model = '64'", r"^model.d_model='64': expected int$"),
    ("[data]\ntrain=['a']\n[model]\ndropout = 1.5", r"^model.dropout=1.5 must be in \[0, 1\)$"),
    ("[data]\ntrain=['a']\n[model]\nn_kv_heads = true",
     r"^model.n_kv_heads=True: expected int \| None$"),
    ("[data]\ntrain=['a']\n[model]\npositions = 3", r"^model.positions=3: expected str$"),
])
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config(text)


def test_model_config_takes_an_int_for_a_float():
    cfg = parse_config("[data]\ntrain=['a']\n[model]\ndropout = 0").model.build()
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)


def test_config_paths_relative_to_file(tmp_path):
    (tmp_path / "c.toml").write_text("[data]\ntrain = ['x.en', 'x.de']\n")
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.data.train == [str(tmp_path / "x.en"), str(tmp_path / "x.de")]


def test_bad_config_exit_status_2(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[data]\ntrain = ['x']\n[training]\nwarmup = 3\n")
    assert main(["train", str(tmp_path / "c.toml")]) == 2
    assert "training.warmup: unknown key" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.toml")]) == 2


# ------------------------------------------------------------------ schedule, optimizer


def test_inverse_sqrt_schedule_peaks_at_warmup():
    cfg = parse_config("[data]\ntrain=['a']\n[training]\nwarmup_steps = 100\nlr_scale = 2.0")
    lrs = [lr_at(s, cfg, 256) for s in range(1, 400)]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == 100
    assert lr_at(100, cfg, 256) == pytest.approx(2.0 * 256**-0.5 * 100**-0.5)
    assert lr_at(400, cfg, 256) == pytest.approx(lr_at(100, cfg, 256) / 2)  # step^-0.5


def test_optimizer_state_round_trip_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.98), eps=1e-9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    blob, groups = optimizer_to_bytes(opt)
    opt2 = torch.optim.Adam(model.parameters())
    optimizer_from_bytes(opt2, blob, json.loads(json.dumps(groups)))
    for k in opt.state_dict()["state"]:
        for name, v in opt.state_dict()["state"][k].items():
            torch.testing.assert_close(opt2.state_dict()["state"][k][name], v)
    assert opt2.param_groups[0]["betas"] == [0.9, 0.98]


# ------------------------------------------------------------------------ resume


KILL_AT_STEP_8 = """
import os, signal, sys
from qkv import train
log = train.Trainer._log
def _log(self, record):
    log(self, record)
    if record.get("step") == 8:
        os.kill(os.getpid(), signal.SIGKILL)  # after the checkpoint at step 6
train.Trainer._log = _log
from qkv.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    cfg = _config(tmp_path, model="dropout = 0.1")  # dropout: the random state must resume too
    assert main(["train", str(cfg), "--out", str(tmp_path / "full")]) == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_8, "train", str(cfg), "--out",
                             str(tmp_path / "cut")], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in checkpoints(tmp_path / "cut")][-1] == "ckpt-00000006"
    assert main(["train", str(cfg), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == list(range(1, 11))
    assert resumed == full
    a, b = checkpoint.load(tmp_path / "full" / "last"), checkpoint.load(tmp_path / "cut" / "last")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_resume_errors(tmp_path, capsys):
    cfg = _config(tmp_path, training="max_steps = 3")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 0
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "already holds checkpoints; use --resume" in capsys.readouterr().err


def test_resume_rejects_changed_settings(tmp_path, capsys):
    """Only settings that do not change what the steps compute may differ on --resume."""
    run = str(tmp_path / "r")
    assert main(["train", str(_config(tmp_path, training="max_steps = 3")), "--out", run]) == 0
    capsys.readouterr()
    changed = _config(tmp_path, training="max_steps = 5\nseed = 7", model="n_heads = 2")
    assert main(["train", str(changed), "--out", run, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "model.n_heads='unset' (now 2); training.seed=1 (now 7)" in err, err
    assert "only training.max_steps, training.threads" in err
    assert [p.name for p in checkpoints(run)] == ["ckpt-00000003"]  # nothing trained
    longer = _config(tmp_path, training="max_steps = 4\nthreads = 2\nkeep_last = 2")
    assert main(["train", str(longer), "--out", run, "--resume"]) == 0
    assert [p.name for p in checkpoints(run)] == ["ckpt-00000003", "ckpt-00000004"]
    capsys.readouterr()
    assert main(["train", str(longer), "--out", run, "--resume"]) == 0
    assert "is already at step 4, training.max_steps=4: nothing to train" in (
        capsys.readouterr().err)


def test_resume_takes_the_same_files_however_spelled(tmp_path):
    """Paths are saved as the config's folder joined with the file's: compare real paths."""
    _config(tmp_path, training="max_steps = 2")
    (tmp_path / "sub").mkdir()
    text = (tmp_path / "tiny.toml").read_text().replace(str(tmp_path), "..")
    (tmp_path / "sub" / "c.toml").write_text(text)
    run = str(tmp_path / "r")
    assert main(["train", str(tmp_path / "sub" / "c.toml"), "--out", run]) == 0
    other = tmp_path / "sub" / ".." / "sub" / "c.toml"
    assert main(["train", str(other), "--out", run, "--resume"]) == 0


def test_out_must_be_a_folder_and_data_files_exist(tmp_path, capsys):
    cfg = _config(tmp_path, training="max_steps = 2")
    (tmp_path / "file").write_text("x")
    assert main(["train", str(cfg), "--out", str(tmp_path / "file")]) == 2
    assert "--out " + str(tmp_path / "file") + ": exists and is not a folder" in (
        capsys.readouterr().err)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 0
    assert main(["average", "--out", str(tmp_path / "file"), str(tmp_path / "r")]) == 2
    assert str(tmp_path / "file") + ": exists and is not a folder" in capsys.readouterr().err
    (tmp_path / "empty.en").write_text("\n")
    (tmp_path / "empty.de").write_text("\n")
    empty = _config(tmp_path, data="").read_text().replace("toy.", "empty.")
    (tmp_path / "empty.toml").write_text(empty)
    assert main(["train", str(tmp_path / "empty.toml"), "--out", str(tmp_path / "e")]) == 2
    assert (f"data.train: no text in {tmp_path / 'empty.en'} / {tmp_path / 'empty.de'}"
            in capsys.readouterr().err)
    typo = _config(tmp_path, data='test = ["toy.en", "tyo.de"]')
    assert main(["train", str(typo), "--out", str(tmp_path / "r2")]) == 2
    assert f"data.test: {tmp_path / 'tyo.de'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_keep_last_and_average(tmp_path, capsys):
    cfg = _config(tmp_path, training="max_steps = 4\nsave_every_steps = 1\nkeep_last = 3")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    assert [p.name for p in checkpoints(run)] == [f"ckpt-0000000{i}" for i in (2, 3, 4)]
    assert main(["average", "--out", str(tmp_path / "avg"), str(run), "--last", "2"]) == 0
    avg = checkpoint.load(tmp_path / "avg")
    m3, m4 = checkpoint.load(run / "ckpt-00000003"), checkpoint.load(run / "ckpt-00000004")
    for name, t in avg.state_dict().items():
        torch.testing.assert_close(t, (m3.state_dict()[name] + m4.state_dict()[name]) / 2)
    assert checkpoint.read_file(tmp_path / "avg", "tokenizer") is not None
    assert main(["average", "--out", str(tmp_path / "x"), str(tmp_path / "nothing")]) == 2
    assert "neither a checkpoint nor a run folder" in capsys.readouterr().err


def _grads_of_one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.opt.step = lambda: None  # keep the gradients: Adam would amplify rounding noise
    trainer.opt.zero_grad = lambda set_to_none=True: None
    trainer.train_step()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two accumulated batches in a step == the same examples in one batch."""
    cfg = load_config(_config(tmp_path, training="accum_steps = 2"))
    acc = Trainer(cfg, tmp_path / "acc")
    batches = acc.batcher.batches(0)[:2]
    one = Trainer(load_config(_config(tmp_path)), tmp_path / "one")
    one._next_batch = lambda: batches[0] + batches[1]
    one.model.load_state_dict(acc.model.state_dict())
    expected, got = _grads_of_one_step(one), _grads_of_one_step(acc)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- DDP


def test_two_process_ddp_matches_one_process(tmp_path):
    cfg = _config(tmp_path, training="max_steps = 6\nsave_every_steps = 100")
    assert main(["train", str(cfg), "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "qkv", "train", str(cfg), "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([x for _, x in two]),
                               torch.tensor([x for _, x in one]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- other tasks


def test_language_model_task_trains(tmp_path):
    text = tmp_path / "lm.txt"
    text.write_text("".join(f"{' '.join(EN[i:i + 5])}\n" for i in range(12)) * 5)
    cfg = _config(tmp_path, data=f'task = "lm"\nvalid = ["{text}"]',
                  model="max_seq_len = 16", training="max_steps = 3")
    cfg.write_text(cfg.read_text().replace('train = ["', f'train = ["{text}"] # ["'))
    assert main(["train", str(cfg), "--out", str(tmp_path / "lm")]) == 0
    assert type(checkpoint.load(tmp_path / "lm" / "last")).__name__ == "DecoderLM"
    assert "valid_ppl" in (tmp_path / "lm" / "metrics.jsonl").read_text()


def test_training_data_errors_exit_2(tmp_path, capsys):
    cfg = _config(tmp_path)
    (tmp_path / "toy.de").write_text("nur eine zeile\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "e")]) == 2
    assert "toy.en has 40 lines but" in capsys.readouterr().err


# ----------------------------------------------------------------- real data


def test_tiny_model_overfits_50_multi30k_pairs(data_dir, tmp_path):
    from qkv.data import read_parallel

    pairs = read_parallel(data_dir / "multi30k" / "train.en.gz",
                          data_dir / "multi30k" / "train.de.gz")
    for lang, lines in (("en", pairs.src[:50]), ("de", pairs.tgt[:50])):
        (tmp_path / f"p50.{lang}").write_text("\n".join(lines) + "\n")
    p50 = [str(tmp_path / "p50.en"), str(tmp_path / "p50.de")]
    (tmp_path / "of.toml").write_text(textwrap.dedent(f"""\
        [model]
        preset = "tiny"
        [data]
        train = {json.dumps(p50)}
        valid = {json.dumps(p50)}
        vocab_size = 1000
        [training]
        max_steps = 100
        batch_tokens = 1200
        schedule = "constant"
        lr = 3e-3
        warmup_steps = 10
        label_smoothing = 0.0
        eval_every = 100
        save_every_steps = 100
        eval_bleu_sentences = 50
        threads = 1
        """))
    assert main(["train", str(tmp_path / "of.toml"), "--out", str(tmp_path / "of")]) == 0
    records = [json.loads(x) for x in (tmp_path / "of" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert records[-1]["valid_bleu_greedy"] >= 90, records[-1]


def test_batch_tokens_smaller_than_an_example(tmp_path, capsys):
    cfg = _config(tmp_path, training="batch_tokens = 5")
    assert main(["train", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "training.batch_tokens=5 (/ accum_steps=1) is smaller than the longest" in \
        capsys.readouterr().err


def test_bf16_autocast_trains(tmp_path, monkeypatch):
    import qkv.linear as QL

    monkeypatch.setattr(QL, "bf16_is_native", lambda: False)  # an AVX2-only CPU
    cfg = _config(tmp_path, training="bf16 = true\nmax_steps = 3")
    with pytest.warns(RuntimeWarning, match=r"training.bf16 = true \(autocast\) uses bfloat16"):
        assert main(["train", str(cfg), "--out", str(tmp_path / "bf")]) == 0
    losses = [x for _, x in _losses(tmp_path / "bf")]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    fp32 = _config(tmp_path, training="max_steps = 3")
    assert main(["train", str(fp32), "--out", str(tmp_path / "fp")]) == 0
    first = _losses(tmp_path / "fp")[0][1]
    assert losses[0] == pytest.approx(first, rel=0.05) and losses[0] != first


def _init_from_config(cfg: Path, model: str, data: str = "") -> Path:
    """The tiny config with its [model] table replaced by `model`, `data` lines added."""
    rest = cfg.read_text().split("[data]", 1)[1]
    path = cfg.parent / "from.toml"
    path.write_text(f"[model]\n{model}\n[data]\n{data}{rest}")
    return path


def test_uptrain_a_converted_translation_checkpoint(tmp_path, capsys):
    """MHA -> MQA by qkv convert, then qkv train from it: every weight carries over, the
    step count starts afresh, the lineage is recorded, and --resume needs only the run."""
    cfg = _config(tmp_path, model="n_heads = 4", training="max_steps = 2")
    assert main(["train", str(cfg), "--out", str(tmp_path / "mha")]) == 0
    assert main(["convert", str(tmp_path / "mha" / "last"), str(tmp_path / "mqa"),
                 "--kv-heads", "1"]) == 0
    up = _init_from_config(cfg, 'init_from = "mqa"\ndropout = 0.1')  # relative to the file
    trainer = Trainer(load_config(up), tmp_path / "up")
    start = checkpoint.load(tmp_path / "mqa")
    assert start.cfg.dropout == 0.0  # the tiny preset's
    assert trainer.model.cfg.n_kv_heads == 1 and trainer.model.cfg.dropout == 0.1
    for name, t in start.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], t, rtol=0, atol=0)
    capsys.readouterr()
    assert main(["train", str(up), "--out", str(tmp_path / "up")]) == 0
    assert (f"qkv: starting from {tmp_path / 'mqa'} (EncoderDecoder, 4 query heads, "
            "1 key/value heads: MQA) at step 0") in capsys.readouterr().err
    assert _losses(tmp_path / "up")[0][0] == 1
    last = tmp_path / "up" / "last"
    meta = checkpoint.read_metadata(last)
    assert meta["step"] == 2 and meta["init_from"] == str(tmp_path / "mqa")
    assert meta["converted_from"] == str(tmp_path / "mha" / "last")
    assert checkpoint.load(last).cfg.n_kv_heads == 1
    assert checkpoint.read_file(last, "tokenizer") == checkpoint.read_file(tmp_path / "mqa",
                                                                            "tokenizer")
    shutil.rmtree(tmp_path / "mqa")  # resuming reads the run's own checkpoint
    up.write_text(up.read_text().replace("max_steps = 2", "max_steps = 3"))
    assert main(["train", str(up), "--out", str(tmp_path / "up"), "--resume"]) == 0
    meta = checkpoint.read_metadata(tmp_path / "up" / "last")
    assert meta["step"] == 3 and meta["init_from"] == str(tmp_path / "mqa")


@pytest.mark.parametrize("model, data, message", [
    ('init_from = "nowhere"', "", r"expected a qkv checkpoint of a 'translation' run "
     r"\(written by qkv train, average or convert\), found no such folder"),
    ('init_from = "."', "", r"found a folder that is not a qkv checkpoint"),
    ('init_from = "mha/last"\nd_ff = 128', "", r"\[model\] d_ff=128 differs from the "
     r"checkpoint's d_ff=64; beside init_from only dropout, attn_dropout may be set"),
    ('init_from = "mha/last"\ndropout = 0.3\nn_heads = 2', "",
     r"\[model\] n_heads=2 differs from the checkpoint's n_heads=4;"),
    ('init_from = "mha/last"\npreset = "tiny"', "",
     r"model.preset='tiny': not used with model.init_from"),
    ('init_from = "mha/last"', 'task = "lm"\n',
     r"expected a qkv checkpoint of a 'lm' run .* found a checkpoint of task 'translation'"),
    ('init_from = "mha/last"', 'tokenizer = "mha/last"\n',
     r"data.tokenizer=.* and model.init_from=.* are both set"),
])
def test_init_from_errors_exit_2(tmp_path, capsys, model, data, message):
    cfg = _config(tmp_path, training="max_steps = 1")
    assert main(["train", str(cfg), "--out", str(tmp_path / "mha")]) == 0
    path = _init_from_config(cfg, model, data)
    if "lm" in data:  # one text file: the English side
        path.write_text(path.read_text().replace('", "', '"] # ["', 1))
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "dropout=0.3" not in err
