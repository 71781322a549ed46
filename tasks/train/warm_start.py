"""`release.init=released`: training starts from the released draft's weights instead of from scratch.

    deepspec retrain release.dir=/data/release/qwen3-4b-dflash release.init=released

The retrain flow keeps the trained draft of every release beside its export (`<release.dir>/current/
draft/`, `tasks/release.py`). With `release.init=released` the recipe loads those weights into the draft
it builds, before the engine is made (a checkpoint of the same run, when resuming, still wins), and the
training hash names them (`init_hash`), so another release makes the next run train again. Without a
release yet, training starts from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from deepspec.models.drafts import draft_algo
from deepspec.models.drafts.files import WEIGHTS_FILE
from deepspec.models.drafts.spec import DraftSpec
from deepspec.models.errors import ConfigError
from deepspec.tasks.files import sha256_file
from deepspec.tasks.paths import release_paths

log = logging.getLogger(__name__)


def initial_draft(cfg: DictConfig) -> Path | None:
    """The released draft's folder (resolved, so a promotion meanwhile does not swap it) when
    `release.init=released` and a draft is released; None: train from scratch."""
    release = release_paths(cfg)
    if cfg.release.init != "released" or release is None:
        return None
    if not (release.draft / WEIGHTS_FILE).is_file():
        log.info("release.init=released: nothing released in %s yet; training from scratch", release.root)
        return None
    return release.draft.resolve()


def init_hash(cfg: DictConfig) -> list[dict[str, Any]]:
    """What the trained draft owes its start: [] from scratch (so such runs keep their hash), else the
    initial weights' sha256."""
    draft = initial_draft(cfg)
    return [] if draft is None else [{"init_sha256": sha256_file(draft / WEIGHTS_FILE)}]


def load_initial(
    cfg: DictConfig, spec: DraftSpec, model: nn.Module, embed: torch.Tensor, head: torch.Tensor
) -> None:
    """Load the released draft's weights into `model`, just built; nothing from scratch."""
    draft = initial_draft(cfg)
    if draft is None:
        return
    if draft_algo(draft) != spec.name:
        raise ConfigError(
            f"release.init=released: the draft released at {draft} is a {draft_algo(draft)} draft, but "
            f"algo={spec.name}; set release.init=scratch"
        )
    try:
        model.load_state_dict(spec.load(draft, embed, head).state_dict())
    except RuntimeError as err:  # another shape of draft (algo.* settings changed)
        raise ConfigError(
            f"release.init=released: the draft released at {draft} does not fit this run's draft "
            f"({str(err).splitlines()[-1].strip()}); set release.init=scratch"
        ) from err
    log.info("training starts from the released draft %s", draft)
