"""`qkv bench --quick` runs the scripts end to end on tiny sizes; bad input is rejected."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from qkv.bench import BENCHMARKS, benchmarks_dir
from qkv.cli import main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("which", ["machine", "train"])
def test_quick_benchmark_writes_markdown_json_and_context(which, tmp_path):
    assert main(["bench", which, "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    stem = Path(BENCHMARKS[which]).stem
    md = (tmp_path / f"{stem}.md").read_text()
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    for fact in ("cores", "threads", "torch", "Command: `python benchmarks/"):
        assert fact in md
    assert data["machine"]["threads"] == 1


def test_decode_quick_rows_and_plot(tmp_path):
    assert main(["bench", "decode", "--quick", "--out", str(tmp_path)]) == 0
    assert "bandwidth" in (tmp_path / "decode_bound.md").read_text()
    rows = json.loads((tmp_path / "decode_bound.json").read_text())["rows"]
    assert {(r["n_kv_heads"], r["batch"], r["context"]) for r in rows} == {
        (g, b, c) for g in (4, 2, 1) for b in (1, 2) for c in (8, 16)}
    kv = {r["n_kv_heads"]: r["kv_bytes_per_token"] for r in rows}
    assert kv[4] == 4 * kv[1] and kv[2] == 2 * kv[1]  # 2 * L * G * D * 4 bytes
    assert (tmp_path / "decode_bound.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_compares_with_and_without_the_kernel_and_packed_weights(tmp_path):
    assert main(["bench", "decode", "--quick", "--compare-kernel", "--compare-packed",
                 "--compare-blocked", "--compare-fused", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "decode_bound.md").read_text()
    assert "through the modules, one operator call at a time" in md
    assert "without the compiled decode attention" in md and "without packed weights" in md
    assert "with oneDNN's packed product instead of the compiled skinny one" in md
    rows = json.loads((tmp_path / "decode_bound.json").read_text())["rows"]
    for r in rows:
        assert r["kernel_speedup"] == pytest.approx(r["sdpa_step_ms"][0] / r["step_ms"][0])
        assert r["packed_speedup"] == pytest.approx(r["unpacked_step_ms"][0] / r["step_ms"][0])
        assert r["blocked_speedup"] == pytest.approx(r["onednn_step_ms"][0] / r["step_ms"][0])
        assert r["fused_speedup"] == pytest.approx(r["modules_step_ms"][0] / r["step_ms"][0])


def test_decode_bfloat16_halves_the_bytes(tmp_path):
    assert main(["bench", "decode", "--quick", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "decode_bound_bfloat16.md").read_text()
    assert "bfloat16 weights and KV cache" in md
    data = json.loads((tmp_path / "decode_bound_bfloat16.json").read_text())
    assert data["dtype"] == "bfloat16"
    assert main(["bench", "decode", "--quick", "--out", str(tmp_path)]) == 0
    fp32 = json.loads((tmp_path / "decode_bound.json").read_text())["rows"]
    for r16, r32 in zip(data["rows"], fp32, strict=True):
        assert r16["kv_bytes_per_token"] * 2 == r32["kv_bytes_per_token"]
        assert r16["weight_bytes"] * 2 == r32["weight_bytes"]


def test_equal_size_variants_match_parameter_count():
    sys.path.insert(0, str(BENCH))
    try:
        from table2 import base_config, equal_size, n_params
    finally:
        sys.path.remove(str(BENCH))
    base = base_config(quick=False)
    for g in (2, 1):
        cfg = equal_size(base, g)
        assert cfg.n_kv_heads == g and cfg.d_ff > base.d_ff
        assert abs(n_params(cfg) - n_params(base)) / n_params(base) < 0.002


def test_bench_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "machine", "--repeats", "0"]) == 2
    assert "--repeats 0 must be >= 1" in capsys.readouterr().err
    assert main(["bench", "machine", "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 applies to decode and hf only, not machine" in capsys.readouterr().err
    assert main(["bench", "machine", "--compare-kernel"]) == 2
    assert "--compare-kernel applies to decode and hf only, not machine" in (
        capsys.readouterr().err)
    assert main(["bench", "hf", "--compare-blocked"]) == 2
    assert "--compare-blocked applies to decode only, not hf" in capsys.readouterr().err
    assert main(["bench", "train", "--compare-packed"]) == 2
    assert "--compare-packed applies to decode and hf only, not train" in (
        capsys.readouterr().err)
    monkeypatch.setenv("QKV_BENCHMARKS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="benchmark scripts not found"):
        benchmarks_dir()
    assert main(["bench", "machine", "--quick"]) == 2
    assert "run qkv bench from a source checkout" in capsys.readouterr().err


def test_decode_attention_quick_rows_and_agreement(tmp_path):
    """The script checks its ways agree with qkv.attention before timing them."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "decode_attention.py"), "--quick",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "decode_attention.json").read_text())["rows"]
    assert {(r["n_kv_heads"], r["way"]) for r in rows} == {
        (g, w) for g in (9, 3, 1) for w in ("qkv", "sdpa", "matmul", "enable_gqa", "read")}
    kv = {r["n_kv_heads"]: r["kv_bytes"] for r in rows}
    assert kv[9] == 9 * kv[1] and kv[3] == 3 * kv[1]


def test_hf_quick_with_and_without_the_kernel_and_packed_weights(tmp_path):
    """hf.py on tiny models: same logits as Hugging Face, and the no-kernel and unpacked rows."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "hf.py"), "--quick", "--compare-kernel",
                           "--compare-packed", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "hf.json").read_text())
    assert data["lm"]["logit_max_abs_diff"] < 1e-4 and data["mt"]["logit_max_abs_diff"] < 1e-4
    assert set(data["mt"]["mt"]["stats"]) == {"Hugging Face", "qkv", "qkv without kernel",
                                              "qkv without packed weights"}
    md = (tmp_path / "hf.md").read_text()
    assert "| qkv without kernel |" in md and "| qkv without packed weights |" in md


@pytest.mark.parametrize("weights", ["smollm2", "table2"])
def test_skinny_linear_quick_times_every_product(weights, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "skinny_linear.py"), "--quick",
                           "--weights", weights, "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    name = "skinny_linear" + ("" if weights == "smollm2" else "_table2")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["weights"] == weights
    assert set(data["stats"]) == {"1", "16"}  # --quick's row counts (JSON keys)
    for stats in data["stats"].values():
        assert set(stats) == {"F.linear", "(W @ x^T)^T", "qkv.linear unpacked",
                              "qkv.linear, oneDNN only", "oneDNN packed",
                              "qkv.linear"}
    assert f"Skinny linears ({weights})" in (tmp_path / f"{name}.md").read_text()


def test_decode_phases_quick_splits_rounds_by_the_probe(tmp_path):
    """decode_phases.py: every round has the probe and each model; the phases partition them."""
    import subprocess

    def run(split):
        done = subprocess.run([sys.executable, str(BENCH / "decode_phases.py"), "--quick",
                               "--threads", "1", "--split", str(split), "--out", str(tmp_path)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "decode_phases.json").read_text())

    data = run(1e-9)  # every probe is faster than this: all rounds fast
    assert len(data["rounds"]) == 4 and set(data["phases"]) == {"fast"}
    for r in data["rounds"]:
        assert set(r) == {"probe_gbs", "4", "2", "1"} and r["probe_gbs"] > 0
    fast = {s["n_kv_heads"]: s for s in data["phases"]["fast"]}
    assert fast[4]["vs_mha"] == 1 and all(s["rounds"] == 4 for s in fast.values())
    assert fast[1]["step_ms"] == pytest.approx(statistics.median(r["1"] for r in data["rounds"]))
    assert set(run(1e9)["phases"]) == {"slow"}  # and none this fast
    md = (tmp_path / "decode_phases.md").read_text()
    assert "| slow | 4 |" in md and "Command: `python benchmarks/decode_phases.py" in md


def test_decode_phases_rejects_bad_options(tmp_path):
    import subprocess

    for bad, message in ((["--rounds", "0"], "--rounds must be >= 1, got 0"),
                         (["--repeats", "0"], "--repeats must be >= 1, got 0"),
                         (["--split", "-1"], "--split must be a positive, finite GB/s, got -1"),
                         (["--split", "nan"], "--split must be a positive, finite GB/s, got nan"),
                         (["--context", "5000"], "exceeds the models' max_seq_len")):
        done = subprocess.run([sys.executable, str(BENCH / "decode_phases.py"), *bad,
                               "--out", str(tmp_path)], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_decode_phases_summary_takes_ratios_round_by_round(monkeypatch):
    """summary(): medians per model, each step over its own round's bound, MHA's step over
    this model's in the same round (an inverted ratio would fail), bound = bytes / GB/s."""
    from qkv import DecoderLM, ModelConfig

    monkeypatch.syspath_prepend(str(BENCH))
    import decode_phases
    from decode_bound import QUICK

    models = {g: DecoderLM(ModelConfig(**{**QUICK, "n_kv_heads": g})).eval() for g in (4, 1)}
    rows = [{"probe_gbs": 10.0, "4": 8.0, "1": 2.0}, {"probe_gbs": 20.0, "4": 6.0, "1": 3.0},
            {"probe_gbs": 30.0, "4": 9.0, "1": 1.0}]
    out = {s["n_kv_heads"]: s for s in decode_phases.summary(rows, models, 2, 16, 2)}
    assert out[1]["vs_mha"] == 4.0 and out[4]["vs_mha"] == 1.0  # median of 8/2, 6/3, 9/1
    assert (out[1]["step_ms"], out[1]["min_ms"], out[1]["max_ms"]) == (2.0, 1.0, 3.0)
    assert out[1]["probe_gbs"] == 20.0 and out[1]["rounds"] == 3
    cfg = models[1].cfg
    weights = sum(p.numel() * 4 for p in models[1].parameters())
    kv_per_token = 2 * cfg.n_decoder_layers * 1 * cfg.head_dim * 4
    bound = [(weights + 2 * 17 * kv_per_token) / r["probe_gbs"] / 1e6 for r in rows]
    assert decode_phases.bound_ms(models[1], 2, 16, 2, 10.0) == pytest.approx(bound[0])
    assert out[1]["step_over_bound"] == pytest.approx(
        statistics.median(r["1"] / b for r, b in zip(rows, bound, strict=True)))
