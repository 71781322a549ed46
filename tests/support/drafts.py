"""Drafts made as the train stage makes them, without training: for the evaluate and export stages."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from deepspec.models.drafts import draft_spec
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.target import load_tokenizer, mask_token_id
from deepspec.tasks.config import algo_settings
from deepspec.tasks.paths import run_paths


def save_untrained_draft(cfg, target) -> nn.Module:
    """A draft of `cfg.algo` on `target`'s embedding and head, saved where and as training saves it."""
    spec = draft_spec(cfg.algo.name)
    tokenizer = load_tokenizer(cfg.target.path)
    inputs = DraftInputs(
        target_config=AutoConfig.from_pretrained(cfg.target.path),
        layer_ids=list(cfg.target.layer_ids),
        mask_token_id=mask_token_id(tokenizer, cfg.target.mask_token_id),
        embed=target.get_input_embeddings().weight.detach(),
        head=target.get_output_embeddings().weight.detach(),
    )
    torch.manual_seed(0)
    draft = spec.build(algo_settings(cfg), inputs)
    spec.save(draft, run_paths(cfg).draft_dir)
    return draft
