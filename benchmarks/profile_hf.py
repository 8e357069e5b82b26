"""Where the time goes: torch.profiler over one generate call of qkv and of Hugging Face.

Same weights and settings as hf.py; prints the top operators of each side and a
breakdown (linear layers, attention, KV-cache copies, the rest) to profile_hf.md.
"""

from __future__ import annotations

import time

import torch
from common import command_line, context_line, fmt, machine_info, parser, setup, table, write
from decode_bound import QUICK, SMOLLM2
from hf import llama_config, llama_to_qkv, lm_fns, marian_config, marian_to_qkv, mt_fns
from torch.profiler import ProfilerActivity, profile

GROUPS = {
    "linear (matmul)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul",
                        "mkldnn::_linear_pointwise"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_attention_math", "aten::_softmax"),
    "cache copies (cat, index_select, index, copy_)": ("aten::cat", "aten::index_select",
                                                       "aten::index", "aten::copy_",
                                                       "aten::index_put_"),
    "top-k, sort, log_softmax": ("aten::topk", "aten::sort", "aten::_log_softmax"),
}


def breakdown(prof) -> tuple[dict[str, float], float, list]:
    """Self CPU seconds per group, total, and the top ops."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups = {g: sum(e.self_cpu_time_total for e in events if e.key in names) / 1e6
              for g, names in GROUPS.items()}
    groups["everything else (Python, small ops)"] = total - sum(groups.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return groups, total, [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top]


def run(fns: dict) -> dict:
    out = {}
    for name, fn in fns.items():
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
        out[name] = (*breakdown(prof), wall)
    return out


def section(title: str, res: dict) -> str:
    groups = list(next(iter(res.values()))[0])
    rows = [[g] + [f"{fmt(r[0][g])} s ({r[0][g] / r[1]:.0%})" for r in res.values()]
            for g in groups]
    rows.append(["total self CPU"] + [f"{fmt(r[1])} s" for r in res.values()])
    rows.append(["wall time of the profiled call"] + [f"{fmt(r[3])} s" for r in res.values()])
    rows.append(["outside operators: wall - self CPU (Python, qkv's compiled kernels, the "
                 "profiler's own cost)"]
                + [f"{fmt(r[3] - r[1])} s" for r in res.values()])
    tops = "\n".join(f"- {lib}: " + "; ".join(f"{k} {fmt(t)} s x{c}" for k, t, c in r[2])
                     for lib, r in res.items())
    return "\n\n".join([f"#### {title}", table(["group", *res], rows), "Top operators:",
                        tops])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = setup(args)
    info = machine_info()
    from table2 import base_config
    from transformers import LlamaForCausalLM, MarianMTModel

    cfg = dict(QUICK if args.quick else SMOLLM2, max_seq_len=64 if args.quick else 2048)
    B, prompt, new = (2, 8, 8) if args.quick else (16, 128, 32)
    hf = LlamaForCausalLM(llama_config(cfg)).eval()
    prompts = torch.randint(4, cfg["vocab_size"], (B, prompt))
    lm = run(lm_fns(hf, llama_to_qkv(hf, cfg), prompts, new))
    mcfg = base_config(args.quick).replace(dropout=0.0)
    Bm, S, L = (2, 8, 6) if args.quick else (16, 48, 48)
    mt_hf = MarianMTModel(marian_config(mcfg)).eval()
    src = torch.randint(4, mcfg.vocab_size, (Bm, S))
    mt = run(mt_fns(mt_hf, marian_to_qkv(mt_hf, mcfg), src, L))
    md = "\n\n".join([
        "### Profiles: qkv vs Hugging Face",
        context_line(info, command_line()),
        "torch.profiler, one call after one warm-up; self CPU time per operator group. "
        "qkv's compiled kernels (decode attention, the skinny product of 2-64 rows, beam "
        "search's logsumexp) are called through ctypes: the profiler does not see them, so "
        "their time is in the last row with Python's and the profiler's, not in the groups.",
        section(f"LM greedy, batch {B}, prompt {prompt}, {new} new tokens", lm),
        section(f"MT beam 4, {Bm} sources of {S}, {L} output tokens", mt),
    ])
    write(out, "profile_hf", md, {"machine": info})


if __name__ == "__main__":
    main()
