"""`qkv bench`: run the benchmark scripts in benchmarks/ (results go to docs/benchmarks/).

Each script is a separate process, so one benchmark's memory and threads never affect
the next. The scripts live in the source checkout, not in the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .generate import DTYPES  # --dtype choices, as in qkv generate

# name -> script in benchmarks/
BENCHMARKS: dict[str, str] = {
    "machine": "machine.py",
    "table2": "table2.py",
    "decode": "decode_bound.py",
    "phases": "decode_phases.py",
    "hf": "hf.py",
    "train": "train_throughput.py",
}
WITH_DTYPE = {"decode", "hf"}  # the benchmarks that take --dtype
# the --compare-* flags and the benchmarks that take each
COMPARISONS = {"compare_kernel": {"decode", "hf"}, "compare_packed": {"decode", "hf"},
               "compare_blocked": {"decode"}, "compare_fused": {"decode"}}


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout (or $QKV_BENCHMARKS)."""
    path = Path(os.environ.get("QKV_BENCHMARKS") or Path(__file__).resolve().parents[2]
                / "benchmarks")
    if not (path / BENCHMARKS["machine"]).is_file():
        raise FileNotFoundError(
            f"benchmark scripts not found in {path}: run qkv bench from a source checkout "
            "(or set QKV_BENCHMARKS to its benchmarks/ folder)")
    return path


def script_args(args, name: str) -> list[str]:
    extra = ["--quick"] if args.quick else []
    if args.dtype != "float32" and name in WITH_DTYPE:
        extra += ["--dtype", args.dtype]
    for flag, allowed in COMPARISONS.items():
        if getattr(args, flag) and name in allowed:
            extra += ["--" + flag.replace("_", "-")]
    for flag in ("repeats", "threads"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{flag} {value} must be >= 1")
            extra += [f"--{flag}", str(value)]
    if args.out is not None:
        extra += ["--out", str(args.out)]
    return extra


def add_bench_arguments(parser) -> None:
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                        help="which benchmark (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that everything runs end to end")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="model dtype for decode and hf (the others run float32)")
    parser.add_argument("--compare-kernel", action="store_true",
                        help="decode and hf: also time qkv without its compiled decode "
                             "attention, interleaved")
    parser.add_argument("--compare-packed", action="store_true",
                        help="decode and hf: also time qkv without packed weights "
                             "(qkv.linear), interleaved")
    parser.add_argument("--compare-blocked", action="store_true",
                        help="decode: also time qkv with oneDNN's packed product instead of "
                             "the compiled skinny one for 2-64 rows, interleaved")
    parser.add_argument("--compare-fused", action="store_true",
                        help="decode: also time qkv's steps through the modules instead of "
                             "one compiled call for all layers (qkv.fused), interleaved")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default docs/benchmarks)")


def run_bench(args) -> int:
    folder = benchmarks_dir()
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    if args.dtype != "float32" and not WITH_DTYPE & set(names):
        raise ValueError(f"--dtype {args.dtype} applies to {' and '.join(sorted(WITH_DTYPE))} "
                         f"only, not {args.which}")
    for flag, allowed in COMPARISONS.items():
        if getattr(args, flag) and not allowed & set(names):
            raise ValueError(f"--{flag.replace('_', '-')} applies to "
                             f"{' and '.join(sorted(allowed))} only, "
                             f"not {args.which}")
    failed = []
    for name in names:
        print(f"== qkv bench {name}", flush=True)
        extra = script_args(args, name)
        done = subprocess.run([sys.executable, str(folder / BENCHMARKS[name]), *extra],
                              cwd=folder.parent)
        if done.returncode:
            failed.append(name)
    if failed:
        print(f"qkv bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
