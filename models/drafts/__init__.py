"""The drafts, one module per algorithm, and the table of them.

    spec = draft_spec("dflash")                       # DFlash, Eagle3 or DSpark: a `DraftSpec`
    draft = load_draft("runs/x/train/dflash/draft", embed_weight, head_weight)

Every draft module (`dflash.py`, `eagle3.py`, `dspark.py`) ends with its `SPEC` (`spec.py` says what each
field is): its settings schema, build, one micro-batch's training loss, save and load, export and the
export's validator. Layers they share are in `layers.py`, reading and writing their files in `files.py`.
A saved draft's `config.json` names its model class in `architectures[0]`, as the serving engines read
it, and that picks the module back (`draft_algo`).

To add an algorithm: a module exposing a `SPEC`, a line in `DRAFTS`, and `conf/algo/<name>.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepspec.models.cpu_products import multiply_rows_first
from deepspec.models.drafts import dflash, dspark, eagle3
from deepspec.models.drafts.files import read_config
from deepspec.models.drafts.spec import DraftSpec
from deepspec.models.errors import ConfigError

DRAFTS: dict[str, DraftSpec] = {spec.name: spec for spec in (dflash.SPEC, eagle3.SPEC, dspark.SPEC)}


def draft_spec(name: str) -> DraftSpec:
    if name not in DRAFTS:
        raise ConfigError(f"algo.name={name!r}: expected one of {list(DRAFTS)}")
    return DRAFTS[name]


def draft_algo(draft_dir: str | Path) -> str:
    """The algorithm of the draft saved in `draft_dir`, from its `config.json`."""
    architectures = read_config(Path(draft_dir)).get("architectures") or []
    for spec in DRAFTS.values():
        if set(architectures) & set(spec.architectures):
            return spec.name
    known = sorted(a for spec in DRAFTS.values() for a in spec.architectures)
    raise ConfigError(
        f"{Path(draft_dir) / 'config.json'}: architectures={architectures}, expected one of {known}"
    )


def load_draft(draft_dir: str | Path, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> nn.Module:
    """A saved draft (training output or export) of any algorithm, on the target's embedding and LM head.

    Dtype: the draft runs in the dtype of the head it shares (the target's: bfloat16 for the Qwen3 and
    Gemma presets), as vLLM and SGLang run drafts. Its own weights, saved in float32 (or what
    `train.precision` left), are cast; the shared embedding and head are used as they are, never copied
    (a float32 copy of a 150k-token embedding and head would cost GBs beside a bf16 target).

    Device: the head's. On a CPU in float32, its products of 1 to 3 rows (a step of Eagle3's chain, a
    short block) are computed as the target's are, W @ x.T where that pays (`models/cpu_products.py`):
    a draft's weights stream from memory at every round as the target's do.
    """
    model = DRAFTS[draft_algo(draft_dir)].load(Path(draft_dir), embed_weight, head_weight)
    model = model.to(device=head_weight.device, dtype=head_weight.dtype)
    multiply_rows_first(model)
    return model


def set_num_draft_tokens(drafter: nn.Module, n: int, key: str = "num_draft_tokens") -> None:
    """Draft `n` tokens a round instead of the draft's own count, as vLLM's `num_speculative_tokens`.

    What pays on a given machine depends on how a target forward's cost grows with the tokens it verifies
    (bench/verify_cost.py times it; CPUs differ widely), not only on the draft. Eagle3's chain is a
    loop, so any length runs. DFlash and DSpark then run the shorter block vLLM runs for n speculative
    tokens ([anchor, n masks]; n slots), at most the block they were trained with (B - 1 drafts; B).
    `key` names the setting in the error.
    """
    limit = getattr(drafter, "max_draft_tokens", None)  # a drafter of one's own: its count is free
    if n < 1 or (limit is not None and n > limit):
        bound = "at least 1" if limit is None else f"1 to {limit} (its block)"
        raise ConfigError(f"{key}={n}: a {type(drafter).__name__} drafts {bound} tokens a round")
    drafter.num_draft_tokens = n
