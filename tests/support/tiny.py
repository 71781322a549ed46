"""Tiny random target configs (width 32, vocabulary 50) and drafts of one, for draft tests that need no real
weights."""

from __future__ import annotations

import torch
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft
from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft
from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft

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


# Randomly initialised drafts of a 3-layer tiny Qwen3 (blocks of 4 slots, 4 Eagle3 steps), whose head
# and embedding are random too, for tests of drafting itself; `draft_context` gives their inputs.
DRAFT_TARGET = qwen3(layers=3)


def _draft_weights(vocab: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(vocab, hidden), torch.randn(vocab, hidden) * 0.3


def dflash_draft(block_size: int = 4) -> DFlashDraft:
    torch.manual_seed(0)
    cfg = DFlashConfig.from_target(
        DRAFT_TARGET, num_layers=2, block_size=block_size, layer_ids=[0, 2], mask_token_id=3
    )
    return DFlashDraft(cfg, *_draft_weights(cfg.vocab_size, cfg.hidden_size))


def dspark_draft(block_size: int = 4) -> DSparkDraft:
    torch.manual_seed(0)
    cfg = DSparkConfig.from_target(
        DRAFT_TARGET, num_layers=2, block_size=block_size, layer_ids=[0, 2], mask_token_id=3, markov_rank=8,
        markov_head_type="vanilla", confidence_head=True, confidence_head_with_markov=True, num_anchors=8,
    )  # fmt: skip
    return DSparkDraft(cfg, *_draft_weights(cfg.backbone.vocab_size, cfg.backbone.hidden_size))


def eagle3_draft() -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = Eagle3Config.from_target(DRAFT_TARGET, layer_ids=[0, 1, 2], ttt_steps=4, draft_vocab_size=None)
    return Eagle3Draft(cfg, *_draft_weights(cfg.vocab_size, cfg.hidden_size))


def draft_context(n_features: int, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Random context features [length, n_features] and token ids [length]."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(length, n_features, generator=gen)
    return features, torch.randint(0, DRAFT_TARGET.vocab_size, (length,), generator=gen)
