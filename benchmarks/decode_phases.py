"""Decode steps by the host's memory phase: each round times a bandwidth probe, then every model.

On a shared host the memory bandwidth moves in phases of minutes (the probe of
decode_bound.py read 38-81 GB/s on the same Zen 5: docs/benchmarks.md, sessions 12-13),
and a whole run of decode_bound.py may fall in one phase. Here every round times the
probe (a sum over 512 MiB) and right after it one call of each model's decode steps
(SmolLM2-shaped DecoderLMs with 9, 3 and 1 kv heads, as in decode_bound.py, batch 16,
context 2,048). The rounds are then split at --split GB/s: each side gets its medians, its
steps over the bound of their own round's probe, and each model's speed-up over MHA
taken round by round.
"""

from __future__ import annotations

import math
import statistics

import torch
from common import (
    command_line,
    context_line,
    fmt,
    machine_info,
    parser,
    setup,
    table,
    timed,
    write,
)
from decode_bound import QUICK, SMOLLM2, bytes_read, filled_cache, step_fn

from qkv import DecoderLM, ModelConfig


def rounds(models: dict[int, DecoderLM], batch: int, context: int, steps: int, n: int,
           probe: torch.Tensor) -> list[dict]:
    """n rounds of: the probe (GB/s), then each model's `steps` steps (ms per step); the
    models' order alternates from round to round."""
    fns = {g: step_fn(m, filled_cache(m, batch, context, steps), context, steps)
           for g, m in models.items()}
    for fn in fns.values():
        fn()  # warm-up: packed weights, the kernel library
    out = []
    for i in range(n):
        row = {"probe_gbs": probe.numel() * probe.element_size() / timed(probe.sum) / 1e9}
        for g in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            row[str(g)] = timed(fns[g]) * 1e3 / steps
        out.append(row)
    return out


def bound_ms(model: DecoderLM, batch: int, context: int, steps: int, gbs: float) -> float:
    """(weight bytes + KV bytes read per step) / bandwidth, as in decode_bound.py."""
    return bytes_read(model, batch, context, steps, torch.float32) / gbs / 1e6


def summary(rows: list[dict], models: dict[int, DecoderLM], batch: int, context: int,
            steps: int) -> list[dict]:
    """Per model over `rows` (rounds of one phase): medians of ms, step/bound, vs MHA."""
    mha = str(max(models))
    out = []
    for g, model in models.items():
        ms = [r[str(g)] for r in rows]
        over = [r[str(g)] / bound_ms(model, batch, context, steps, r["probe_gbs"]) for r in rows]
        out.append(dict(n_kv_heads=g, rounds=len(rows),
                        probe_gbs=statistics.median(r["probe_gbs"] for r in rows),
                        step_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                        step_over_bound=statistics.median(over),
                        vs_mha=statistics.median(r[mha] / r[str(g)] for r in rows)))
    return out


def markdown(phases: dict[str, list[dict]], info: dict, args, steps: int) -> str:
    body = [[phase, s["rounds"], fmt(s["probe_gbs"]), s["n_kv_heads"],
             f"{fmt(s['step_ms'])} ({fmt(s['min_ms'])}-{fmt(s['max_ms'])})",
             fmt(s["step_over_bound"]), fmt(s["vs_mha"])]
            for phase, stats in phases.items() for s in stats]
    return "\n\n".join([
        f"### Decode steps by memory phase: batch {args.batch}, context {args.context}",
        context_line(info, command_line()),
        f"{args.rounds} rounds; each times the probe (sum of a {args.probe_mib} MiB float32 "
        "tensor), then "
        f"{steps} decode steps of every model (the order alternating), float32. Rounds with "
        f"the probe above {args.split:g} GB/s are \"fast\", the others \"slow\". Medians over "
        "a phase's rounds; step/bound divides each step by the bound from its own round's "
        "probe; vs MHA is MHA's step over this model's, round by round.",
        table(["memory", "rounds", "probe GB/s", "kv heads", "ms/step (min-max)",
               "step/bound", "speed-up vs MHA"], body),
    ])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds (default: --repeats if given, else 60)")
    p.add_argument("--split", type=float, default=60.0,
                   help="probe GB/s that separates slow from fast rounds (default 60)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args()
    for name in ("rounds", "repeats", "batch", "context"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if not (math.isfinite(args.split) and args.split > 0):
        p.error(f"--split must be a positive, finite GB/s, got {args.split}")
    if args.rounds is None:  # qkv bench passes --repeats to every script
        args.rounds = 60 if args.repeats is None else args.repeats
    base, steps = QUICK if args.quick else SMOLLM2, 2
    if args.quick:  # tiny sizes, whatever was asked
        args.batch, args.context, args.rounds = 2, 16, min(args.rounds, 4)
    if args.context + steps > base["max_seq_len"]:
        p.error(f"--context {args.context} + {steps} steps exceeds the models' max_seq_len "
                f"{base['max_seq_len']}")
    out = setup(args)
    info = machine_info()
    args.probe_mib = 8 if args.quick else 512  # --quick's probe fits in cache: not memory
    probe = torch.rand(args.probe_mib * 2**20 // 4)
    models = {g: DecoderLM(ModelConfig(**{**base, "n_kv_heads": g})).eval()
              for g in (base["n_heads"], base["n_kv_heads"], 1)}
    data = rounds(models, args.batch, args.context, steps, args.rounds, probe)
    phases = {name: summary(rs, models, args.batch, args.context, steps)
              for name, rs in (("fast", [r for r in data if r["probe_gbs"] > args.split]),
                               ("slow", [r for r in data if r["probe_gbs"] <= args.split]))
              if rs}
    write(out, "decode_phases", markdown(phases, info, args, steps),
          {"machine": info, "split_gbs": args.split, "batch": args.batch,
           "context": args.context, "rounds": data, "phases": phases})


if __name__ == "__main__":
    main()
