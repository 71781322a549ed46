"""Export stage: the trained draft in the layout serving engines load, validated before it is marked done.

- dflash: `DFlashDraftModel`: `config.json` carries `block_size` and `dflash_config` (`mask_token_id`,
  `target_layer_ids`, 0-based: engines read hidden state `id + 1`); `model.safetensors` holds only the
  draft's own weights (the engine shares the target's embedding and LM head).
- eagle3: `LlamaForCausalLMEagle3` as vLLM and SGLang load it (`eagle3.save_eagle3_export`): `fc`,
  `midlayer.*`, `norm`, `lm_head` (the target's with the full vocabulary), `d2t`/`t2d`, and each engine's
  aux-layer convention in `config.json`.
- dspark: `Qwen3DSparkModel`/`Gemma4DSparkModel` as upstream's `from_pretrained` loads it
  (`dspark.save_dspark`): the target's `config.json` overlaid with the draft's, and the target's
  embedding and LM head in the weights, which that loader would otherwise leave random.

    deepspec export target=stories260k target.path=../shared/assets/models/stories260k algo=eagle3
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import safe_open

from deepspec.models.drafts import draft_algo
from deepspec.models.drafts.dflash import ARCHITECTURE, WEIGHTS_FILE
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.tasks import files, tracking
from deepspec.tasks.config import run_path
from deepspec.tasks.train.stage import draft_dir, train_hash, weights_sha256

log = logging.getLogger(__name__)

REQUIRED_CONFIG = ("architectures", "block_size", "hidden_size", "num_hidden_layers", "vocab_size")
REQUIRED_DFLASH = ("mask_token_id", "target_layer_ids")


def export_dir(cfg: DictConfig) -> Path:
    return run_path(cfg, "export", cfg.algo.name)


def validate_dflash_export(path: Path) -> list[str]:
    """Problems that would stop an engine from loading the draft at `path`; empty when it is loadable."""
    problems: list[str] = []
    config_file, weights_file = path / "config.json", path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        return [f"{path} needs config.json and {WEIGHTS_FILE}"]
    config = json.loads(config_file.read_text())
    problems += [f"config.json: missing field '{k}'" for k in REQUIRED_CONFIG if k not in config]
    dflash = config.get("dflash_config", {})
    problems += [
        f"config.json: missing field 'dflash_config.{k}'" for k in REQUIRED_DFLASH if k not in dflash
    ]
    if config.get("architectures") != [ARCHITECTURE]:
        problems.append(
            f"config.json: architectures={config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    with safe_open(str(weights_file), framework="pt") as f:
        keys = set(f.keys())
    needed = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(config.get("num_hidden_layers", 0)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            needed.add(f"layers.{i}.self_attn.{name}.weight")
        for name in ("gate_proj", "up_proj", "down_proj"):
            needed.add(f"layers.{i}.mlp.{name}.weight")
        needed |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
    problems += [f"{WEIGHTS_FILE}: missing tensor '{k}'" for k in sorted(needed - keys)]
    problems += [
        f"{WEIGHTS_FILE}: holds the target's '{k}'" for k in keys if k.startswith(("embed_tokens", "lm_head"))
    ]
    return problems


def validate_export(algo: str, path: Path) -> list[str]:
    """The validator of `algo`'s export layout: the problems that would stop an engine loading it."""
    if algo == "eagle3":
        from deepspec.models.drafts.eagle3 import validate_eagle3_export

        return validate_eagle3_export(path)
    if algo == "dspark":
        from deepspec.models.drafts.dspark import validate_dspark_export

        return validate_dspark_export(path)
    return validate_dflash_export(path)


def _write_export(cfg: DictConfig, algo: str, source: Path, out: Path) -> str:
    """Write the export of the draft at `source` into `out`; returns its architecture."""
    if algo == "dflash":  # the trained files are already the engines' layout
        for name in ("config.json", WEIGHTS_FILE):
            shutil.copyfile(source / name, out / f".{name}.tmp")
            (out / f".{name}.tmp").replace(out / name)
        return ARCHITECTURE
    from transformers import AutoConfig

    from deepspec.models.drafts import load_draft
    from deepspec.models.target import load_embedding_and_head, resolve_source

    t = cfg.target
    embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
    target_config = AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file), revision=t.revision)
    model = load_draft(source, embed, head)
    if algo == "eagle3":
        from deepspec.models.drafts.eagle3 import ARCHITECTURE as EAGLE3
        from deepspec.models.drafts.eagle3 import save_eagle3_export

        save_eagle3_export(model, out, target_config)
        return EAGLE3
    from deepspec.models.drafts.dspark import save_dspark

    save_dspark(model, out, include_target_weights=True, target_config=target_config.to_dict())
    return model.cfg.architecture


def export(cfg: DictConfig) -> dict:
    source = draft_dir(cfg)
    if not (source / WEIGHTS_FILE).is_file():
        raise DeepSpecError(f"export: no trained draft at {source}; run `deepspec train` first")
    algo = draft_algo(source)
    if algo != cfg.algo.name:
        raise ConfigError(f"export: the draft at {source} is a {algo} draft, but algo={cfg.algo.name}")
    out = export_dir(cfg)
    fingerprint = weights_sha256(source / WEIGHTS_FILE)
    done = files.read_done(out, train_hash(cfg))
    if done and done.get("weights_sha256") == fingerprint and not validate_export(algo, out):
        log.info("export: %s is up to date; skipping", out)
        return {**done, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    files.clear_done(out)
    architecture = _write_export(cfg, algo, source, out)
    problems = validate_export(algo, out)
    if problems:
        raise DeepSpecError(f"export to {out} is not loadable:\n  " + "\n  ".join(problems))
    record = {"path": str(out), "architecture": architecture, "weights_sha256": fingerprint}
    files.mark_done(out, train_hash(cfg), **record)
    tracking.set_tags(cfg, {"export.path": str(out.resolve())})
    return record


@task(name="export", cache_policy=NO_CACHE)  # stages validate their own outputs
def export_task(cfg: DictConfig) -> dict:
    return export(cfg)
