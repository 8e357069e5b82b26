"""qkv.attention vs raw SDPA vs naive attention vs nn.MultiheadAttention (CPU, float32).

Every case times all implementations interleaved in the same run, rotating the order
each repeat, so load from other processes hits them alike; ratios are taken against raw
SDPA, i.e. `F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=G < H)`.
With one torch thread (--threads 1) the clock is the CPU time of the measuring thread,
which leaves out time the process spends descheduled while other jobs hold the cores.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import (
    Stats,
    command_line,
    context_line,
    fmt,
    fmt_stats,
    machine_info,
    parser,
    setup,
    table,
    write,
)
from torch import nn

import qkv

qkv_attention = importlib.import_module("qkv.attention")
B, H, D = 8, 8, 64


def naive(q, k, v, causal: bool):
    """softmax(Q K^T / sqrt(D)) V with repeated K/V heads and a materialised mask."""
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)  # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def attention_fns(T: int, G: int, causal: bool, mask=None, with_naive=True,
                  batch: int = B, head_dim: int = D) -> dict:
    """name -> (fn(q, k, v) -> output, inputs(requires_grad) -> [q, k, v])."""
    q, k, v = (torch.randn(batch, n, T, head_dim) for n in (H, G, G))

    def inputs(grad):
        return [t.detach().requires_grad_(grad) for t in (q, k, v)]

    fns = {
        "raw SDPA": lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, attn_mask=mask, is_causal=causal, enable_gqa=G < H),
        "qkv.attention": lambda a, b, c: qkv.attention(a, b, c, mask, causal=causal),
    }
    if with_naive:
        fns["naive"] = lambda a, b, c: naive(a, b, c, causal)
    return {name: (fn, inputs) for name, fn in fns.items()}


def module_fns(T: int, causal: bool) -> dict:
    """qkv.MultiHeadAttention vs nn.MultiheadAttention (G == H), projections included."""
    C = H * D
    ours = qkv.MultiHeadAttention(C, H).eval()
    theirs = nn.MultiheadAttention(C, H, batch_first=True).eval()
    x = torch.randn(B, T, C)
    blocked = ~qkv.causal_mask(T) if causal else None  # torch's polarity: True = blocked

    def inputs(grad):
        return [x.detach().requires_grad_(grad)]

    fns = {
        "qkv.MultiHeadAttention": lambda a: ours(a, causal=causal),
        "nn.MultiheadAttention": lambda a: theirs(a, a, a, attn_mask=blocked, is_causal=causal,
                                                  need_weights=False)[0],
    }
    return {name: (fn, inputs) for name, fn in fns.items()}


def runner(fn, inputs, backward: bool):
    """A no-argument callable: forward (no grad) or forward + backward."""
    if not backward:
        args = inputs(False)

        def forward():
            with torch.no_grad():
                fn(*args)
        return forward
    args = inputs(True)

    def forward_backward():
        out = fn(*args)
        torch.autograd.grad(out, args, torch.ones_like(out))
    return forward_backward


def qkv_path(T: int, G: int, causal: bool, mask=None) -> str:
    """Which fused call qkv.attention makes for this case (spied, not re-derived)."""
    calls = []
    sdpa = qkv_attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False, **kw):
        parts = ["fold" if q.shape[1] != H else "", "is_causal" if is_causal else "",
                 "mask" if attn_mask is not None else "", "enable_gqa" if enable_gqa else ""]
        calls.append("+".join(p for p in parts if p) or "plain")
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    enable_gqa=enable_gqa, **kw)

    qkv_attention.F.scaled_dot_product_attention = spy
    try:
        b = 1 if mask is None else mask.shape[0]
        qkv.attention(torch.randn(b, H, T, 4), *[torch.randn(b, G, T, 4)] * 2, mask,
                      causal=causal)
    finally:
        qkv_attention.F.scaled_dot_product_attention = sdpa
    return ", ".join(calls)


CLOCK = time.perf_counter  # main() switches to time.thread_time with one thread
BUDGET = 2.0  # seconds of measured time per implementation and case, when --repeats is unset
REPEATS: int | None = None


def measure(fns: dict, warmup: int = 1, cap: int = 60) -> dict[str, Stats]:
    """Interleaved A B C, B C A, ...; repeats fill BUDGET (5 to cap) unless --repeats."""
    names = list(fns)
    probe = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t0 = CLOCK()
        fns[name]()  # after the warm-up's one-time costs: sizes the number of repeats
        probe[name] = CLOCK() - t0
    repeats = REPEATS or max(5, min(cap, int(BUDGET / max(probe.values()))))
    out = {name: Stats() for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = CLOCK()
            fns[name]()
            out[name].times.append(CLOCK() - t0)
    return out


def run_case(fns: dict, backward: bool, cap: int = 60) -> dict:
    timed = {name: runner(fn, inputs, backward) for name, (fn, inputs) in fns.items()}
    return measure(timed, cap=cap)


def paired(stats: dict, name: str, ref: str = "raw SDPA") -> list[float]:
    """Per-repeat ratios name / ref: both timed back to back in the same repeat."""
    return [a / b for a, b in zip(stats[name].times, stats[ref].times, strict=True)]


def ratio_cell(ratios: list[float]) -> str:
    return fmt_stats(statistics.median(ratios), min(ratios), max(ratios))


def padding(T: int, batch: int = B) -> torch.Tensor:
    """(B, 1, 1, S) key-padding mask: row b keeps its first T - b*T/(4B) keys."""
    lengths = torch.tensor([T - b * T // (4 * batch) for b in range(batch)])
    return (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]


def masked_rows(T: int) -> list[list]:
    """qkv.attention vs raw SDPA with a key-padding mask (the encoder's case)."""
    rows = []
    for G in (8, 2, 1):
        for backward in (False, True):
            mask = padding(T)
            stats = run_case(attention_fns(T, G, False, mask, with_naive=False), backward)
            rows.append([T, G, "fwd+bwd" if backward else "fwd", qkv_path(T, G, False, mask),
                         len(stats["raw SDPA"].times),
                         fmt_stats(*stats["raw SDPA"].scaled(1e3)),
                         fmt_stats(*stats["qkv.attention"].scaled(1e3)),
                         ratio_cell(paired(stats, "qkv.attention")),
                         fmt(stats["qkv.attention"].min / stats["raw SDPA"].min)])
            print(rows[-1], flush=True)
    return rows


def overhead_rows() -> list[list]:
    """Fixed cost per call at a size where the kernel is nearly free (B=1, T=S=8, D=8)."""
    rows = []
    for G, causal, masked in [(8, False, False), (2, False, False), (2, True, False),
                              (8, False, True), (2, False, True)]:
        mask = padding(8, 1) if masked else None
        fns = attention_fns(8, G, causal, mask, with_naive=False, batch=1, head_dim=8)
        stats = run_case(fns, False, cap=1000)
        sdpa, ours = stats["raw SDPA"], stats["qkv.attention"]
        rows.append([G, causal, "padding" if masked else "none", qkv_path(8, G, causal, mask),
                     len(sdpa.times),
                     fmt_stats(*sdpa.scaled(1e6)), fmt_stats(*ours.scaled(1e6)),
                     fmt((ours.median - sdpa.median) * 1e6)])
        print(rows[-1], flush=True)
    return rows


def path_fns(T: int, G: int, causal: bool) -> dict:
    """The ways to run GQA/MQA through SDPA: which should qkv.attention pick?"""
    q, k, v = (torch.randn(B, n, T, D) for n in (H, G, G))
    R = H // G
    fold_mask = qkv.causal_mask(T).repeat(R, 1) if causal else None  # (R*T, S)

    def inputs(grad):
        return [t.detach().requires_grad_(grad) for t in (q, k, v)]

    def fold(a, b, c):
        out = F.scaled_dot_product_attention(a.reshape(B, G, R * T, D), b, c, attn_mask=fold_mask)
        return out.reshape(B, H, T, D)  # (B, G, R*T, D) -> (B, H, T, D)

    fns = {
        "enable_gqa": lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, is_causal=causal, enable_gqa=True),
        "fold": fold,
        "repeat K/V": lambda a, b, c: F.scaled_dot_product_attention(
            a, b.repeat_interleave(R, 1), c.repeat_interleave(R, 1), is_causal=causal),
    }
    return {name: (fn, inputs) for name, fn in fns.items()}


def paths_main(args, out, info) -> None:
    """--paths: time the candidate fused calls for G < H (the choice in qkv.attention)."""
    rows = []
    for T in ([32] if args.quick else [512]):
        for causal in (False, True):
            for G in (2, 1):
                for backward in (False, True):
                    stats = run_case(path_fns(T, G, causal), backward)
                    rows.append([T, causal, G, "fwd+bwd" if backward else "fwd",
                                 len(stats["fold"].times),
                                 *(fmt_stats(*s.scaled(1e3)) for s in stats.values()),
                                 ratio_cell(paired(stats, "fold", "enable_gqa")),
                                 ratio_cell(paired(stats, "repeat K/V", "enable_gqa"))])
                    print(rows[-1], flush=True)
    md = "\n\n".join([
        "### GQA/MQA through SDPA: enable_gqa vs folding query heads vs repeating K/V",
        context_line(info, command_line()),
        f"B={B}, H={H}, D={D}, float32. fold: q viewed as (B, G, R*T, D), with an explicit "
        "(R*T, S) causal mask when causal (the kernel's is_causal would be wrong for the "
        "folded axis); repeat K/V: K/V materialised to H heads, then is_causal. Times in ms "
        "(median (min-max)); ratios are medians of paired per-repeat ratios.",
        table(["T", "causal", "G", "pass", "n", "enable_gqa ms", "fold ms", "repeat K/V ms",
               "fold / enable_gqa", "repeat / enable_gqa"], rows),
    ])
    write(out, "attention_paths", md, {"machine": info, "rows": rows})


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--paths", action="store_true",
                   help="only compare the fused calls qkv.attention could make for G < H")
    args = p.parse_args()
    out = setup(args)
    global CLOCK, REPEATS, BUDGET
    CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    REPEATS, BUDGET = args.repeats, 0.2 if args.quick else BUDGET
    info = machine_info()
    if args.paths:
        return paths_main(args, out, info)
    seqs = [16, 32] if args.quick else args.seq
    rows, mod_rows, data = [], [], []
    for T in seqs:
        for causal in (False, True):
            for G in (8, 2, 1):
                for backward in (False, True):
                    stats = run_case(attention_fns(T, G, causal), backward)
                    ref = stats["raw SDPA"].median
                    kind = {8: "MHA", 1: "MQA"}.get(G, "GQA")
                    row = [T, causal, f"{G} ({kind})", "fwd+bwd" if backward else "fwd",
                           qkv_path(T, G, causal), len(stats["raw SDPA"].times)]
                    for name in ("raw SDPA", "qkv.attention", "naive"):
                        row.append(fmt_stats(*stats[name].scaled(1e3)))
                    row += [ratio_cell(paired(stats, "qkv.attention")),
                            fmt(stats["qkv.attention"].min / stats["raw SDPA"].min),
                            fmt(stats["naive"].median / ref)]
                    rows.append(row)
                    data.append({"T": T, "causal": causal, "G": G, "backward": backward,
                                 **{k: s.to_dict() for k, s in stats.items()}})
                    print(row, flush=True)
            for backward in (False, True):
                stats = run_case(module_fns(T, causal), backward)
                ours, theirs = stats["qkv.MultiHeadAttention"], stats["nn.MultiheadAttention"]
                ratio = ours.median / theirs.median
                mod_rows.append([T, causal, "fwd+bwd" if backward else "fwd", len(ours.times),
                                 fmt_stats(*theirs.scaled(1e3)), fmt_stats(*ours.scaled(1e3)),
                                 fmt(ratio)])
                data.append({"T": T, "causal": causal, "module": True, "backward": backward,
                             **{k: s.to_dict() for k, s in stats.items()}})
                print(mod_rows[-1], flush=True)
    ratios = [r[-3].split(" ")[0] for r in rows]
    clock = "CPU time of the thread" if CLOCK is time.thread_time else "wall clock"
    mask_rows = masked_rows(seqs[len(seqs) // 2])
    over_rows = overhead_rows()
    md = "\n\n".join([
        "### Attention: qkv.attention vs raw SDPA vs naive",
        context_line(info, command_line()),
        f"B={B}, H={H}, D={D}, float32, S = T. Times in ms per call ({clock}), median "
        "(min-max) of n interleaved repeats after one warm-up (n fills ~2 s per "
        "implementation, 5 to 60); "
        "`qkv / SDPA` is the median (min-max) of per-repeat ratios, each taken between calls "
        "timed back to back; `min / min` compares the fastest calls (load only ever adds time); "
        "`naive / SDPA` is a ratio of medians. `qkv path` is the fused "
        "call qkv.attention makes (spied on, not re-derived): fold = query heads of a group "
        "folded into the query axis, (B, G, R*T, D).",
        table(["T", "causal", "G", "pass", "qkv path", "n", "raw SDPA ms", "qkv.attention ms",
               "naive ms", "qkv / SDPA", "min / min", "naive / SDPA"], rows),
        f"qkv / SDPA (paired medians) over all {len(ratios)} cases: " + ", ".join(ratios),
        "### With a key-padding mask (B, 1, 1, S), not causal",
        "Both get the same boolean mask; qkv.attention also guards rows with no key.",
        table(["T", "G", "pass", "qkv path", "n", "raw SDPA ms", "qkv.attention ms",
               "qkv / SDPA", "min / min"], mask_rows),
        "### Fixed overhead per call (B=1, H=8, T=S=8, D=8, forward)",
        "Microseconds per call, median (min-max) of the repeats; the last column is what "
        "qkv.attention adds (checks, mask handling) over the bare kernel call.",
        table(["G", "causal", "mask", "qkv path", "n", "raw SDPA us", "qkv.attention us",
               "added us"], over_rows),
        "### Module level, G = H: qkv.MultiHeadAttention vs nn.MultiheadAttention",
        f"d_model={H * D}, projections included; ratio of medians.",
        table(["T", "causal", "pass", "n", "nn.MultiheadAttention ms", "qkv.MultiHeadAttention ms",
               "qkv / nn"], mod_rows),
    ])
    write(out, "attention", md, {"machine": info, "B": B, "H": H, "D": D, "cases": data})


if __name__ == "__main__":
    main()
