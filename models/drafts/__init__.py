"""Draft architectures, one per file, and `load_draft`, which picks the file from a saved draft's
`config.json`: its `architectures[0]` names the model class, as the serving engines read it.

    draft = load_draft("runs/x/train/draft", embed_weight, head_weight)   # DFlash, Eagle3 or DSpark
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from deepspec.models.errors import ConfigError

ALGOS = ("dflash", "eagle3", "dspark")
ARCHITECTURES = {  # architectures[0] of a saved draft -> its algorithm
    "DFlashDraftModel": "dflash",
    "LlamaForCausalLMEagle3": "eagle3",
    "Qwen3DSparkModel": "dspark",
    "Gemma4DSparkModel": "dspark",
}


def check_algo_name(name: str) -> str:
    if name not in ALGOS:
        raise ConfigError(f"algo.name={name!r}: expected one of {list(ALGOS)}")
    return name


def draft_algo(draft_dir: str | Path) -> str:
    """The algorithm of the draft saved in `draft_dir`, from its `config.json`."""
    config_file = Path(draft_dir) / "config.json"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file}: cannot read the draft's config ({err})") from err
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConfigError(
        f"{config_file}: architectures={architectures}, expected one of {sorted(ARCHITECTURES)}"
    )


def load_draft(draft_dir: str | Path, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> nn.Module:
    """A saved draft (training output or export) of any algorithm, on the target's embedding and LM head."""
    algo = draft_algo(draft_dir)
    if algo == "dflash":
        from deepspec.models.drafts.dflash import load_draft as load
    elif algo == "eagle3":
        from deepspec.models.drafts.eagle3 import load_draft as load
    else:
        from deepspec.models.drafts.dspark import load_dspark as load
    return load(Path(draft_dir), embed_weight, head_weight)
