"""Shared benchmark harness: interleaved timing (median, min, max), machine facts, output.

Every script measures A and B in the same run, alternating them inside each repeat, so
that load from other processes hits both alike; ratios are taken within that run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkv.generate import DTYPES  # --dtype choices, as in qkv generate
from qkv.linear import warn_if_slow_bf16

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


@dataclass
class Stats:
    """Seconds per call over the measured repeats (warm-up excluded).

    times are wall-clock; cpu_times the process's CPU seconds over the same calls, which
    preemption by other processes does not inflate (with one thread, the work done).
    """

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def scaled(self, factor: float) -> tuple[float, float, float]:
        """(median, min, max) times `factor`, e.g. 1e3 / tokens for ms per token."""
        return self.median * factor, self.min * factor, self.max * factor

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "times": self.times,
                "cpu_times": self.cpu_times}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fns: dict[str, Callable[[], object]], repeats: int = 5,
            warmup: int = 1, settle: bool = False) -> dict[str, Stats]:
    """Time each fn `repeats` times after `warmup` calls, interleaved A B C A B C ...

    The order rotates every repeat so that neither side always runs first. settle: call
    each fn once more, untimed, right before each timed call, so that data which fits in
    the caches is there for every fn alike (otherwise fns that share data, like products
    of the same weights, find it warm and fns with their own copies find it cold).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Stats() for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if settle:
                fns[name]()
            cpu = time.process_time()
            out[name].times.append(timed(fns[name]))
            out[name].cpu_times.append(time.process_time() - cpu)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def fmt(x: float, digits: int = 3) -> str:
    """A number with `digits` significant figures, no scientific notation for usual sizes."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_stats(median: float, lo: float, hi: float) -> str:
    """'median (min-max)'."""
    return f"{fmt(median)} ({fmt(lo)}-{fmt(hi)})"


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def context_line(info: dict, command: str) -> str:
    """The facts every table states: machine, threads, torch version, load, the command."""
    load_end = round(os.getloadavg()[0], 2)
    return (
        f"Machine: {info['nproc']} cores, {info['cpu']}; torch {info['torch']}, "
        f"{info['threads']} threads; 1-min load average {info['loadavg_start']} at start, "
        f"{load_end} at end (other helpers' jobs shared the cores when it is well above 0). "
        f"Command: `{command}`"
    )


def parser(description: str, *, dtype: bool = False) -> argparse.ArgumentParser:
    """The common options; `dtype=True` adds --dtype (weights, activations and KV cache)."""
    p = argparse.ArgumentParser(description=description)
    if dtype:
        p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                       help="dtype of the models on every side (default float32)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs end to end")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for NAME.md, NAME.json, NAME*.png (default docs/benchmarks)")
    return p


def setup(args: argparse.Namespace) -> Path:
    """Apply --threads, fix the seed, and return the output directory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "dtype", None) == "bfloat16":
        warn_if_slow_bf16("--dtype bfloat16")
    torch.manual_seed(0)
    out = args.out or DOCS
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def write(out: Path, name: str, markdown: str, data: dict) -> None:
    """Write NAME.md and NAME.json in `out` and echo the markdown."""
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(markdown)


def figure(nrows: int = 1, ncols: int = 1, **kw):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kw)
