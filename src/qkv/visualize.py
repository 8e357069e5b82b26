"""Attention heatmaps labelled with tokens: `attention_maps`, `plot_attention`, `qkv attention-map`.

Translation models give three maps per layer: encoder self-attention, decoder
self-attention and cross-attention (the source-target alignment); language models and
classifiers give self-attention. Rows are queries, columns keys. For a decoder, row i is
labelled with the token predicted there (teacher forcing: the input is bos + target).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .attention import record_attention
from .models import DecoderLM, EncoderClassifier, EncoderDecoder
from .tokenizer import BOS_ID, EOS_ID

_NAME = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(self_attn|cross_attn)$")


@dataclass
class AttentionMap:
    """The attention weights of one module for one sentence."""

    name: str  # module name, e.g. "decoder.layers.2.cross_attn"
    kind: str  # "encoder self-attention", "decoder self-attention", "cross-attention", ...
    layer: int
    probs: Tensor  # (H, T, S), rows sum to 1
    queries: list[str]  # T labels
    keys: list[str]  # S labels


def _kind(model: nn.Module, stack: str, attn: str) -> str:
    if attn == "cross_attn":
        return "cross-attention"
    if isinstance(model, EncoderDecoder):
        return f"{stack} self-attention"
    return "self-attention"


def _n_layers(model: nn.Module) -> int:
    cfg = model.cfg
    return cfg.n_decoder_layers if isinstance(model, DecoderLM) else cfg.n_layers


def _check_index(value: int | None, n: int, what: str) -> int | None:
    if value is None:
        return None
    if not -n <= value < n:
        raise ValueError(f"{what} {value} is out of range: the model has {n} {what}s "
                         f"(0..{n - 1}, or negative from the end)")
    return value % n


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable token strings: word-boundary markers (Metaspace, byte-level) shown as '_'."""
    labels = []
    for i in ids:
        tok = tokenizer.id_to_token(int(i))
        labels.append("?" if tok is None else tok.replace("\u2581", "_").replace("\u0120", "_"))
    return labels


@torch.inference_mode()
def maps_from_ids(model: nn.Module, src: list[int], tgt: list[int] | None = None,
                  layer: int | None = None) -> list[tuple[str, str, int, Tensor]]:
    """(name, kind, layer, probs (H, T, S)) for each attention module of `layer` (all if None).

    src: the source (translation) or the tokens (LM, classifier). tgt: the decoder input
    (bos + target) for translation models.
    """
    layer = _check_index(layer, _n_layers(model), "layer")
    was_training = model.training
    model.eval()
    src_t = torch.tensor([src], dtype=torch.long)
    try:
        with record_attention(model) as recorded:
            if isinstance(model, EncoderDecoder):
                model(src_t, torch.tensor([tgt], dtype=torch.long))
            else:
                model(src_t)
    finally:
        model.train(was_training)
    out = []
    for name, probs in recorded.items():
        m = _NAME.search(name)
        if m is None or not probs or (layer is not None and int(m[2]) != layer):
            continue
        out.append((name, _kind(model, m[1], m[3]), int(m[2]), probs[0][0].float()))
    return out


def _translation_ids(model: EncoderDecoder, tokenizer, text: str,
                     target: str | None) -> tuple[list[int], list[int]]:
    """Source ids (with eos) and the target's output ids (with eos), decoded greedily if None."""
    from .search import greedy
    from .tokenizer import encode
    from .translate import encode_source

    src = encode_source(tokenizer, text, model.cfg.max_seq_len)
    if target is None:
        out = greedy(model, torch.tensor([src], dtype=torch.long))[0]
    else:
        out = encode(tokenizer, target)[: model.cfg.max_seq_len - 1]
    return src, out + [EOS_ID]


def attention_maps(model: nn.Module, tokenizer, text: str, *, target: str | None = None,
                   layer: int | None = -1) -> list[AttentionMap]:
    """Attention maps of `model` on `text` for one layer (default the last; all if None).

    model: an EncoderDecoder (with `target`, or its greedy translation when None), a
    DecoderLM or an EncoderClassifier; tokenizer: a `tokenizers.Tokenizer`.
    """
    if not text.strip():
        raise ValueError("the sentence to draw attention for is empty")
    if isinstance(model, EncoderDecoder):
        src, out = _translation_ids(model, tokenizer, text, target)
        tgt_in = [BOS_ID] + out[:-1]
        labels = {"encoder": token_labels(tokenizer, src),
                  "decoder": token_labels(tokenizer, out),
                  "decoder_in": token_labels(tokenizer, tgt_in)}
    elif isinstance(model, DecoderLM | EncoderClassifier):
        if target is not None:
            raise ValueError("a target sentence only applies to translation models")
        src = tokenizer.encode(text, add_special_tokens=False).ids[: model.cfg.max_seq_len]
        tgt_in = None
        names = token_labels(tokenizer, src)
        labels = {"encoder": names, "decoder": names, "decoder_in": names}
    else:
        raise ValueError(f"cannot draw attention for a {type(model).__name__}")
    maps = []
    for name, kind, i, probs in maps_from_ids(model, src, tgt_in, layer):
        stack = name.split(".")[0]
        keys = labels["encoder" if kind == "cross-attention" or stack == "encoder"
                      else "decoder_in"]
        maps.append(AttentionMap(name, kind, i, probs, labels[stack], keys))
    return maps


def _draw(ax, probs: Tensor, queries: list[str], keys: list[str], title: str,
          show_queries: bool) -> object:
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
    ax.set_yticks(range(len(queries)), queries if show_queries else [], fontsize=7)
    ax.set_title(title, fontsize=8)
    return image


def plot_attention(maps: list[AttentionMap], path: str | Path, *, head: int | None = None,
                   max_cols: int = 5, dpi: int = 100) -> Path:
    """Heatmaps to a PNG: each map's heads (or only `head`) in rows of at most `max_cols`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("no attention maps to draw")
    n_heads = maps[0].probs.shape[0]
    head = _check_index(head, n_heads, "head")
    heads = list(range(n_heads)) if head is None else [head]
    cols = min(len(heads), max_cols)
    per_map = -(-len(heads) // cols)  # rows per map, rounded up
    size = max(2.2, 0.2 * max(max(len(m.keys), len(m.queries)) for m in maps) + 1.2)
    fig, axes = plt.subplots(len(maps) * per_map, cols, squeeze=False, layout="constrained",
                             figsize=(size * cols + 1.0, size * len(maps) * per_map))
    for ax in axes.ravel():
        ax.set_visible(False)
    for r, m in enumerate(maps):
        for i, h in enumerate(heads):
            ax = axes[r * per_map + i // cols][i % cols]
            ax.set_visible(True)
            title = f"layer {m.layer} {m.kind}, head {h}"
            image = _draw(ax, m.probs[h], m.queries, m.keys, title, i % cols == 0)
    fig.colorbar(image, ax=axes[:, -1].tolist(), shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def add_attention_map_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint directory or pretrained name (e.g. smollm2-135m)")
    parser.add_argument("sentence", help="the input sentence (the source, for translation)")
    parser.add_argument("--layer", type=int, default=-1, help="layer to draw (default: last)")
    parser.add_argument("--head", type=int, default=None,
                        help="one head (default: a grid of every head)")
    parser.add_argument("--target", default=None,
                        help="translation to align with (default: the greedy translation)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")


def run_attention_map(args) -> int:
    from .pretrained import load_pretrained

    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output {args.output} must end in .png")
    loaded = load_pretrained(args.model)
    maps = attention_maps(loaded.model, loaded.tokenizer, args.sentence, target=args.target,
                          layer=args.layer)
    if args.target is None and isinstance(loaded.model, EncoderDecoder):
        print("target (greedy):", " ".join(maps[-1].queries))
    plot_attention(maps, args.output, head=args.head)
    print(f"wrote {args.output}")
    return 0
