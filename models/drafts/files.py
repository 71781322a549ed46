"""A draft on disk, for every algorithm: `config.json` and `model.safetensors`, written atomically, read
back with errors that name the file, and checked against the layout an engine loads.

Each draft module states its own layout (which config fields, which tensors of which shape); writing,
reading and the checks that compare a directory with a layout are here, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from deepspec.models.errors import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

Shapes = dict[str, tuple[int, ...]]


def write_draft_files(out_dir: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """`model.safetensors`, then `config.json`, each through a temporary file and a rename."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses two names for one memory (a tied target's LM head is its embedding)
        tensors[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    tmp_config = out_dir / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_config.replace(out_dir / CONFIG_FILE)


def read_config(draft_dir: Path) -> dict:
    path = Path(draft_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the draft's config ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def read_weights(draft_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(draft_dir) / WEIGHTS_FILE))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], draft_dir: Path, *, shared: Iterable[str]):
    """Load `state` into `model`; ConfigError naming the file when a weight is missing or unknown.
    Names starting with a `shared` prefix (the target's embedding and head) may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(shared))]
    if missing or unexpected:
        raise ConfigError(
            f"{Path(draft_dir) / WEIGHTS_FILE}: missing weights {missing}, unexpected {unexpected}"
        )
    return model.eval()


def read_export(path: Path) -> tuple[dict | None, Shapes, list[str]]:
    """The config and tensor shapes of the draft at `path`, or None and the reason it cannot be read."""
    config_file, weights_file = Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE
    absent = [f.name for f in (config_file, weights_file) if not f.is_file()]
    if absent:
        return None, {}, [f"{path}: missing {' and '.join(absent)}"]
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        return None, {}, [f"{CONFIG_FILE}: not JSON ({err})"]
    with safe_open(str(weights_file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes, []


def missing_fields(config: dict, fields: Iterable[str], why: str = "") -> list[str]:
    return [f"{CONFIG_FILE}: missing field '{k}'{why}" for k in fields if k not in config]


def tensor_problems(
    shapes: Shapes, expected: dict[str, tuple[int, ...] | None], *, may_have: Iterable[str] = ()
) -> list[str]:
    """Tensors an engine needs but the file lacks, has in another shape (None: any shape), or has and the
    engine would refuse (`may_have`: names it ignores)."""
    problems = [f"{WEIGHTS_FILE}: missing tensor '{k}'" for k in expected if k not in shapes]
    problems += [
        f"{WEIGHTS_FILE}: '{k}' has shape {list(shapes[k])}, expected {list(shape)}"
        for k, shape in expected.items()
        if shape is not None and k in shapes and shapes[k] != tuple(shape)
    ]
    allowed = set(may_have)
    problems += [
        f"{WEIGHTS_FILE}: unexpected tensor '{k}'"
        for k in sorted(shapes)
        if k not in expected and k not in allowed
    ]
    return problems
