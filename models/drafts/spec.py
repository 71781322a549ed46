"""What every draft module exposes, as one `DraftSpec` (its `SPEC`), so callers never branch on the
algorithm: the registry in `models/drafts/__init__.py` maps `algo.name` to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class DraftInputs:
    """What building a draft for a target takes besides the algorithm's settings."""

    target_config: Any  # the target's transformers config; drafts read its text config
    layer_ids: list[int]  # the captured target layers whose features the draft reads
    mask_token_id: int
    embed: torch.Tensor  # the target's input embedding [V, d], shared and frozen
    head: torch.Tensor  # the target's LM head [V, d]
    # how often each target token is supervised in the training data ([V] int64), computed on demand:
    # Eagle3 builds its reduced vocabulary from it
    token_counts: Callable[[], torch.Tensor] | None = None


Samples = list[dict[str, Any]]  # a micro-batch as the sample streams yield it (tasks/cache/loader.py)
Stats = dict[str, torch.Tensor]  # slot_hits and slot_counts [slots], and any scalar statistic


@dataclass(frozen=True)
class DraftSpec:
    """One algorithm, end to end.

    settings         the dataclass typing `algo.*` (values in conf/algo/<name>.yaml); its method
                     `problems(layer_ids, num_hidden_layers)` lists what is wrong, before anything runs
    architectures    the `architectures[0]` values of the `config.json` files it writes
    needs_teacher    whether training reads the target's distribution (`models/teacher.py`)
    build            (settings, DraftInputs) -> the untrained draft
    training_loss    (forward, model, samples, settings, teacher, generator) -> (loss, stats): one
                     micro-batch, `forward` being the model or the DeepSpeed engine wrapping it. It reads
                     trained weights only inside `forward`: ZeRO-3 holds them whole only there (the
                     frozen target weights are whole everywhere, `tasks/train/recipe.frozen_as_buffers`)
    save, load       the training output (config.json and the draft's own weights) and back
    export           (model, out_dir, target_config) -> architecture: the layout the engines load
    validate_export  the problems that would stop an engine loading an export; [] when it loads
    """

    name: str
    settings: type
    architectures: tuple[str, ...]
    needs_teacher: bool
    build: Callable[[Any, DraftInputs], nn.Module]
    training_loss: Callable[..., tuple[torch.Tensor, Stats]]
    save: Callable[[nn.Module, Path], None]
    load: Callable[[Path, torch.Tensor, torch.Tensor], nn.Module]
    export: Callable[[nn.Module, Path, Any], str]
    validate_export: Callable[[Path], list[str]]
