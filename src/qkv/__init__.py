"""qkv: the Transformer of "Attention Is All You Need" with MHA, GQA and MQA as one mechanism."""

from .attention import (
    KVCache,
    MultiHeadAttention,
    attention,
    attention_probs,
    causal_mask,
    padding_mask,
    record_attention,
)
from .checkpoint import CheckpointError, load, save
from .config import PRESETS, ModelConfig, preset
from .models import (
    Decoder,
    DecoderLM,
    Encoder,
    EncoderClassifier,
    EncoderDecoder,
    count_parameters,
)

__all__ = [
    "KVCache", "MultiHeadAttention", "attention", "attention_probs", "causal_mask",
    "padding_mask", "record_attention", "CheckpointError", "load", "save", "PRESETS",
    "ModelConfig", "preset", "Decoder", "DecoderLM", "Encoder", "EncoderClassifier",
    "EncoderDecoder", "count_parameters",
]
__version__ = "0.1.0"
