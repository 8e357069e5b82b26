"""qkv vs Hugging Face transformers on the same weights and dtype (float32, or --dtype).

1. SmolLM2-135M's shape as `LlamaForCausalLM` (random weights, seed 0) copied into a qkv
   `DecoderLM`; logits are checked equal first. Greedy generation of 128 new tokens after
   a 128-token prompt, batch 1 and 16: `model.generate` vs `qkv.generate.generate`.
2. A `MarianMTModel` of the Table 2 encoder-decoder shape (random weights, sinusoidal
   positions overwritten with qkv's table) copied into a qkv `EncoderDecoder`; logits
   checked equal. Beam search, 4 beams, forced output length: `generate(num_beams=4)` vs
   `qkv.search.beam_search`.
Both sides end generation only at the forced length (no eos stop), so they do the same work.
"""

from __future__ import annotations

import torch
from common import (
    DTYPES,
    command_line,
    context_line,
    fmt,
    fmt_stats,
    machine_info,
    measure,
    parser,
    setup,
    table,
    write,
)
from decode_bound import QUICK, SMOLLM2
from torch import nn

from qkv import DecoderLM, EncoderDecoder, ModelConfig, kernel
from qkv.generate import generate
from qkv.layers import sinusoidal_table
from qkv.linear import packing_disabled
from qkv.search import beam_search

# ------------------------------------------------------------------ weight copying


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy weight (and bias) of a Linear or norm."""
    dst.weight.copy_(src.weight)
    if getattr(dst, "bias", None) is not None:
        dst.bias.copy_(src.bias)


def _copy_attention(dst, src) -> None:
    for a, b in [("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                 ("out_proj", "o_proj" if hasattr(src, "o_proj") else "out_proj")]:
        _copy(getattr(dst, a), getattr(src, b))


def llama_config(cfg: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"],
        intermediate_size=cfg["d_ff"], num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
        head_dim=cfg["d_model"] // cfg["n_heads"], max_position_embeddings=cfg["max_seq_len"],
        rms_norm_eps=cfg["norm_eps"], rope_theta=cfg["rope_base"], tie_word_embeddings=True,
        hidden_act="silu", attention_bias=False, mlp_bias=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )


@torch.no_grad()
def llama_to_qkv(hf, cfg: dict) -> DecoderLM:
    model = DecoderLM(ModelConfig(**cfg)).eval()
    dec, src = model.decoder, hf.model
    dec.embed.tok.weight.copy_(src.embed_tokens.weight)
    for ours, theirs in zip(dec.layers, src.layers, strict=True):
        _copy_attention(ours.self_attn, theirs.self_attn)
        _copy(ours.ff.gate, theirs.mlp.gate_proj)
        _copy(ours.ff.fc1, theirs.mlp.up_proj)
        _copy(ours.ff.fc2, theirs.mlp.down_proj)
        _copy(ours.norm1, theirs.input_layernorm)
        _copy(ours.norm3, theirs.post_attention_layernorm)
    _copy(dec.norm, src.norm)
    return model


def marian_config(cfg: ModelConfig):
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_layers,
        decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_seq_len,
        activation_function="relu", scale_embedding=True, dropout=0.0, pad_token_id=0,
        eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=None,
        tie_word_embeddings=True, share_encoder_decoder_embeddings=True,
    )


@torch.no_grad()
def marian_to_qkv(hf, cfg: ModelConfig) -> EncoderDecoder:
    """Copy a Marian model into qkv; Marian's positions are overwritten with qkv's table."""
    model = EncoderDecoder(cfg).eval()
    table_ = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    for stack in (hf.model.encoder, hf.model.decoder):
        stack.embed_positions.weight.copy_(table_)
    model.encoder.embed.tok.weight.copy_(hf.model.shared.weight)
    for ours, theirs in zip(model.encoder.layers, hf.model.encoder.layers, strict=True):
        _copy_attention(ours.self_attn, theirs.self_attn)
        _copy(ours.norm1, theirs.self_attn_layer_norm)
        _copy(ours.ff.fc1, theirs.fc1)
        _copy(ours.ff.fc2, theirs.fc2)
        _copy(ours.norm2, theirs.final_layer_norm)
    for ours, theirs in zip(model.decoder.layers, hf.model.decoder.layers, strict=True):
        _copy_attention(ours.self_attn, theirs.self_attn)
        _copy_attention(ours.cross_attn, theirs.encoder_attn)
        _copy(ours.norm1, theirs.self_attn_layer_norm)
        _copy(ours.norm2, theirs.encoder_attn_layer_norm)
        _copy(ours.ff.fc1, theirs.fc1)
        _copy(ours.ff.fc2, theirs.fc2)
        _copy(ours.norm3, theirs.final_layer_norm)
    return model


# ------------------------------------------------------------------ the benchmarks


@torch.inference_mode()
def max_logit_diff_lm(hf, ours, tokens) -> float:
    return float((hf(tokens).logits - ours(tokens)).abs().max())


@torch.inference_mode()
def max_logit_diff_mt(hf, ours, src, tgt) -> float:
    theirs = hf(input_ids=src, decoder_input_ids=tgt).logits
    return float((theirs - ours(src, tgt)).abs().max())


NO_KERNEL = "qkv without kernel"  # qkv with kernel.disabled(): PyTorch's SDPA instead
UNPACKED = "qkv without packed weights"  # qkv with linear.packing_disabled()


def variants(run_ours, compare_kernel: bool, compare_packed: bool) -> dict:
    """qkv's own comparison runs: without the decode kernel, without packed weights."""
    return (({NO_KERNEL: kernel.disabled()(run_ours)} if compare_kernel else {})
            | ({UNPACKED: packing_disabled()(run_ours)} if compare_packed else {}))


def lm_fns(hf, ours, prompts: torch.Tensor, new: int, compare_kernel: bool = False,
           compare_packed: bool = False):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    mask = torch.ones_like(prompts)
    lists = prompts.tolist()

    @torch.inference_mode()
    def run_hf():
        hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=new,
                    min_new_tokens=new)

    def run_ours():
        generate(ours, lists, new)

    fns = {"Hugging Face": run_hf, "qkv": run_ours}
    return fns | variants(run_ours, compare_kernel, compare_packed)


def mt_fns(hf, ours, src: torch.Tensor, out_len: int, compare_kernel: bool = False,
           compare_packed: bool = False):
    hf.generation_config.eos_token_id = 3
    hf.generation_config.forced_eos_token_id = 3  # eos at max_length, as qkv's limit does
    mask = torch.ones_like(src)

    @torch.inference_mode()
    def run_hf():
        hf.generate(src, attention_mask=mask, num_beams=4, do_sample=False,
                    max_new_tokens=out_len + 1, min_new_tokens=out_len, early_stopping=True)

    def run_ours():
        beam_search(ours, src, beam=4, max_len=out_len, min_len=out_len)

    fns = {"Hugging Face": run_hf, "qkv": run_ours}
    return fns | variants(run_ours, compare_kernel, compare_packed)


def speedup_cells(stats: dict, name: str) -> list[str]:
    """HF time / this library's time, wall-clock and CPU; blank for HF itself."""
    if name == "Hugging Face":
        return ["", ""]
    hf, s = stats["Hugging Face"], stats[name]
    return [fmt(hf.median / s.median), fmt(hf.cpu_median / s.cpu_median)]


def lm_section(args, repeats: int) -> tuple[list, dict]:
    from transformers import LlamaForCausalLM

    cfg = dict(QUICK if args.quick else SMOLLM2, max_seq_len=64 if args.quick else 2048)
    prompt, new = (8, 8) if args.quick else (128, 128)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(cfg)).eval()
    ours = llama_to_qkv(hf, cfg)
    hf, ours = hf.to(DTYPES[args.dtype]), ours.to(DTYPES[args.dtype])
    probe = torch.randint(4, cfg["vocab_size"], (2, 16))
    diff = max_logit_diff_lm(hf, ours, probe)
    rows, data = [], {"logit_max_abs_diff": diff}
    for batch in (1, 16) if not args.quick else (1, 2):
        prompts = torch.randint(4, cfg["vocab_size"], (batch, prompt))
        stats = measure(lm_fns(hf, ours, prompts, new, args.compare_kernel,
                                      args.compare_packed), repeats, 1)
        tps = {k: (batch * new / s.median, batch * new / s.max, batch * new / s.min)
               for k, s in stats.items()}
        ratio = stats["Hugging Face"].median / stats["qkv"].median
        cpu_ratio = stats["Hugging Face"].cpu_median / stats["qkv"].cpu_median
        rows += [[f"LM greedy, batch {batch}", k, fmt_stats(*s.scaled(1)), fmt(s.cpu_median),
                  fmt_stats(*tps[k]), *speedup_cells(stats, k)] for k, s in stats.items()]
        data[f"lm_batch{batch}"] = {"tokens_per_s": tps, "ratio": ratio, "cpu_ratio": cpu_ratio,
                                    "stats": {k: s.to_dict() for k, s in stats.items()}}
    return rows, data


def mt_section(args, repeats: int) -> tuple[list, dict]:
    from table2 import base_config
    from transformers import MarianMTModel

    cfg = base_config(args.quick).replace(dropout=0.0)
    B, S, L = (2, 8, 6) if args.quick else (16, 48, 48)
    torch.manual_seed(0)
    hf = MarianMTModel(marian_config(cfg)).eval()
    ours = marian_to_qkv(hf, cfg)
    hf, ours = hf.to(DTYPES[args.dtype]), ours.to(DTYPES[args.dtype])
    src = torch.randint(4, cfg.vocab_size, (B, S))
    tgt = torch.cat([torch.full((B, 1), 2), torch.randint(4, cfg.vocab_size, (B, 9))], 1)
    diff = max_logit_diff_mt(hf, ours, src, tgt)
    stats = measure(mt_fns(hf, ours, src, L, args.compare_kernel, args.compare_packed), repeats, 1)
    tps = {k: (B * L / s.median, B * L / s.max, B * L / s.min) for k, s in stats.items()}
    ratio = stats["Hugging Face"].median / stats["qkv"].median
    cpu_ratio = stats["Hugging Face"].cpu_median / stats["qkv"].cpu_median
    rows = [[f"MT beam 4, {B} sources", k, fmt_stats(*s.scaled(1)), fmt(s.cpu_median),
             fmt_stats(*tps[k]), *speedup_cells(stats, k)] for k, s in stats.items()]
    return rows, {"logit_max_abs_diff": diff, "mt": {
        "tokens_per_s": tps, "ratio": ratio, "cpu_ratio": cpu_ratio,
        "stats": {k: s.to_dict() for k, s in stats.items()}}}


def main() -> None:
    p = parser(__doc__.splitlines()[0], dtype=True)
    p.add_argument("--compare-kernel", action="store_true",
                   help=f"also run qkv without its compiled decode attention ('{NO_KERNEL}')")
    p.add_argument("--compare-packed", action="store_true",
                   help=f"also run qkv without oneDNN's packed weights ('{UNPACKED}')")
    args = p.parse_args()
    out = setup(args)
    info = machine_info()
    import transformers

    repeats = args.repeats or (2 if args.quick else 3)
    lm_rows, lm_data = lm_section(args, repeats)
    mt_rows, mt_data = mt_section(args, repeats)
    md = "\n\n".join([
        "### qkv vs Hugging Face transformers",
        context_line(info, command_line()) + f"; transformers {transformers.__version__}.",
        f"Same weights and dtype ({args.dtype}) on both sides, copied from a randomly "
        "initialised Hugging Face model; max abs logit difference before timing: LM "
        f"{lm_data['logit_max_abs_diff']:.1e}, MT {mt_data['logit_max_abs_diff']:.1e}. "
        "LM: SmolLM2-135M shape (30 layers, d_model 576, 9 heads, 3 kv heads), prompt 128, "
        "128 new tokens, greedy, KV cache (HF's default dynamic cache). MT: the Table 2 "
        "MHA encoder-decoder as MarianMTModel, 16 sources of 48 tokens, 48 output tokens "
        "then eos (forced), 4 beams. Seconds per generate call, median (min-max) of "
        f"{repeats} after one warm-up, HF and qkv interleaved; tokens/s counts new tokens "
        "over the batch (prefill included). CPU s: the process's CPU seconds per call "
        "(median), which preemption by other jobs does not inflate; the speed-ups are "
        "HF time / qkv time from wall-clock and from CPU medians."
        + (f" '{NO_KERNEL}': qkv with `kernel.disabled()`, i.e. PyTorch's SDPA for the "
           "decode steps' attention and torch.logsumexp in beam search (the skinny products "
           "stay), interleaved with the others." if args.compare_kernel
           else "")
        + (f" '{UNPACKED}': qkv with `linear.packing_disabled()`, i.e. its linear layers "
           "without oneDNN's packed weights, interleaved with the others."
           if args.compare_packed else ""),
        table(["task", "library", "wall s", "CPU s", "new tokens/s (wall)",
               "qkv speed-up (wall)", "qkv speed-up (CPU)"], lm_rows + mt_rows),
    ])
    name = "hf" if args.dtype == "float32" else f"hf_{args.dtype}"
    write(out, name, md, {"machine": info, "dtype": args.dtype,
                          "transformers": transformers.__version__,
                          "lm": lm_data, "mt": mt_data})


if __name__ == "__main__":
    main()
