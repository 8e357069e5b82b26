"""torch.profiler over decode steps of the SmolLM2-shaped DecoderLM (see decode_bound.py)."""

from __future__ import annotations

from common import command_line, context_line, machine_info, parser, setup, write
from decode_bound import QUICK, SMOLLM2, filled_cache, step_fn
from torch.profiler import ProfilerActivity, profile

from qkv import DecoderLM, ModelConfig


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=1)
    args = p.parse_args()
    out = setup(args)
    info = machine_info()
    base = QUICK if args.quick else SMOLLM2
    if args.quick:
        args.batch, args.context = 2, 8
    model = DecoderLM(ModelConfig(**{**base, "n_kv_heads": args.kv_heads})).eval()
    steps = 2
    run = step_fn(model, filled_cache(model, args.batch, args.context, steps), args.context,
                  steps)
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    md = "\n\n".join([
        f"### Profile of {steps} decode steps: batch {args.batch}, context {args.context}, "
        f"{args.kv_heads} kv heads", context_line(info, command_line()), "```", top, "```"])
    write(out, "profile_step", md, {"machine": info})


if __name__ == "__main__":
    main()
