"""Tiny random target configs (width 32, vocabulary 50) for draft tests that need no real weights."""

from __future__ import annotations

from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 50}  # fmt: skip


def llama(layers: int = 4, **changes) -> LlamaConfig:
    return LlamaConfig(**{**TINY, "num_hidden_layers": layers, **changes})


def qwen3(layers: int = 4, **changes) -> Qwen3Config:
    return Qwen3Config(**{**TINY, "head_dim": 16, "num_hidden_layers": layers, **changes})


def gemma3(layers: int = 2, **changes) -> Gemma3TextConfig:
    """Gemma-style: fewer, wider heads, and a cap on the logits."""
    gemma = {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "final_logit_softcapping": 2.0,
    }
    return Gemma3TextConfig(**{**TINY, **gemma, "num_hidden_layers": layers, **changes})
