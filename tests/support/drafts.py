"""Drafts made as the train stage makes them, without training: for the evaluate and export stages."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from deepspec.models.drafts import draft_spec
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.target import load_tokenizer
from deepspec.tasks.config import algo_settings
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.recipe import draft_inputs


def target_draft_inputs(cfg, target) -> DraftInputs:
    """The recipe's `draft_inputs` for a target model already loaded (its embedding and head)."""
    embed, head = (
        target.get_input_embeddings().weight.detach(),
        target.get_output_embeddings().weight.detach(),
    )
    config = AutoConfig.from_pretrained(cfg.target.path)
    return draft_inputs(cfg, load_tokenizer(cfg.target.path), config, embed, head)


def save_untrained_draft(cfg, target) -> nn.Module:
    """A draft of `cfg.algo` on `target`'s embedding and head, saved where and as training saves it."""
    spec = draft_spec(cfg.algo.name)
    torch.manual_seed(0)
    draft = spec.build(algo_settings(cfg), target_draft_inputs(cfg, target))
    spec.save(draft, run_paths(cfg).draft_dir)
    return draft
