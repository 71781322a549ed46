"""Stage `export`: the trained draft in the layout serving engines load, validated before it is marked done.

    deepspec export target=stories260k target.path=../shared/assets/models/stories260k algo=eagle3

Each algorithm's module writes and validates its own layout (`DraftSpec.export`, `.validate_export`):
DFlash's `DFlashDraftModel`, Eagle3's `LlamaForCausalLMEagle3` for vLLM and SGLang, DSpark's
`Qwen3DSparkModel`. The export is loaded on the target's embedding and LM head,
written to `<run_dir>/export/<algo>/`, checked, then `_DONE.json` records the draft it came from; a
re-run with the same draft and a still-valid export skips. The draft is the one `export.draft` names:
`best` (default), the best validation step's (`train/<algo>/best/`) when training validated, else the
last (`train/<algo>/draft/`); `last` always the last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.models.drafts import draft_spec
from deepspec.models.drafts.spec import DraftSpec
from deepspec.models.errors import DeepSpecError
from deepspec.tasks import artifacts, files, tracking
from deepspec.tasks.evaluate.stage import RESULTS_FILE, STS_FILE
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import ExportResult, from_record, to_record
from deepspec.tasks.train.stage import train_hash, trained_draft

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> ExportResult:
    weights, out = trained_draft(cfg, "export"), run_paths(cfg).export_dir
    spec, source = draft_spec(cfg.algo.name), weights.parent
    fingerprint = files.sha256_file(weights)
    done = files.read_done(out, train_hash(cfg))
    if done and done.get("weights_sha256") == fingerprint and not spec.validate_export(out):
        log.info("export: %s is up to date; skipping", out)
        return from_record(ExportResult, done, skipped=True)
    files.clear_done(out)
    architecture = write_export(cfg, spec, source, out)
    problems = spec.validate_export(out)
    if problems:
        raise DeepSpecError(f"export to {out} is not loadable:\n  " + "\n  ".join(problems))
    result = ExportResult(
        path=str(out), architecture=architecture, weights_sha256=fingerprint, source=str(source)
    )
    files.mark_done(out, train_hash(cfg), **to_record(result))
    tracking.set_tags(cfg, {"export.path": str(out.resolve())})
    register(cfg, out, result)
    return result


def register(cfg: DictConfig, out: Path, result: ExportResult) -> None:
    """The export as an MLflow artifact and a model version, tagged with the evaluation's macro tau and
    speedup when the evaluate stage has run (the pipeline runs it first)."""
    tracking.log_artifact(cfg, out, "export")  # export/<algo>/
    tags = {
        "architecture": result.architecture,
        "weights_sha256": result.weights_sha256,
        "draft": Path(result.source).name,  # best (the best validation's) or draft (the last)
    }
    evaluation = run_paths(cfg).eval_dir / RESULTS_FILE
    if evaluation.is_file():
        macro = json.loads(evaluation.read_text(encoding="utf-8"))["macro"]
        tags.update({key: f"{macro[key]:.4f}" for key in ("tau", "speedup") if macro.get(key) is not None})
    version = tracking.register_model_version(cfg, f"export/{out.name}", tags)
    log.info("export: registered as version %s of deepspec-%s-%s", version, cfg.target.name, cfg.algo.name)


def write_export(cfg: DictConfig, spec: DraftSpec, source: Path, out: Path) -> str:
    """The draft at `source`, on the target's embedding and LM head, written to `out` in its engines'
    layout; returns the architecture."""
    from transformers import AutoConfig

    from deepspec.models.target import load_embedding_and_head, resolve_source

    t = cfg.target
    embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
    target_config = AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file), revision=t.revision)
    out.mkdir(parents=True, exist_ok=True)
    architecture = spec.export(spec.load(source, embed, head), out, target_config)
    calibration = source / STS_FILE  # DSpark's fitted temperatures: no engine reads them yet
    if calibration.is_file():
        files.atomic_write_text(out / STS_FILE, calibration.read_text(encoding="utf-8"))
    return architecture


@task(name="export", cache_policy=NO_CACHE)  # stages validate their own outputs
def export_task(cfg: DictConfig) -> ExportResult:
    result = export(cfg)
    artifacts.publish(cfg, "export", result)
    return result
