"""Where every stage reads and writes, from the config alone (`run_paths(cfg)`).

The data a target makes from the prompts lives under `data_dir`, each stage's output in a folder named
for what produced it: a readable stem and a hash of exactly the settings that output depends on. Runs
that differ only in algorithm, training or evaluation settings therefore find their data already made,
and runs that differ in data settings keep theirs side by side instead of overwriting each other:

    <data_dir>/prompts/<source>-<key>/        prompts.jsonl, heldout.jsonl, rejects.jsonl   key: prompts.*
    <data_dir>/answers/<target>-<key>/        answers.jsonl, errors.jsonl, shards/, servers/
                                              key: the prompts' key, the target, its rendering and sampling
    <storage.url>/<target>-<encoding>-<key>/  the target cache (manifest.json, shards)
                                              key: the answers' key, captured layers, encoding, max length

What a run trains, evaluates and exports sits in the run directory, one folder per algorithm, so the
three algorithms trained one after another in one run keep their outputs side by side:

    <run_dir>/train/<algo>/                   draft/ (the last step), best/ (the best validation),
                                              checkpoints/, launch.yaml
    <run_dir>/eval/<algo>/                    results.json
    <run_dir>/export/<algo>/                  the draft in the engines' layout
    <run_dir>/mlflow_run-<algo>.json          the MLflow run every stage of this run and algorithm logs to
    <run_dir>/summary-<algo>.txt              the pipeline's closing table

`data_dir` defaults to `<run_dir>/data`; point several runs at one data directory to share it.

The retrain flow releases a better draft into `release.dir` (`release_paths(cfg)`; `tasks/release.py`):

    <release.dir>/current/                    a symlink to the released draft's folder, holding export/ (what
                                              servers load), draft/ (the trained draft) and release.json
    <release.dir>/previous/                   the release it replaced
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deepspec.tasks.config import config_hash
from deepspec.tasks.files import read_once


def _stem(text: str) -> str:
    """A folder-safe readable name: the last path or hub-id part, without its file suffix."""
    last = re.split(r"[/\\]", str(text).rstrip("/\\"))[-1] or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(last).stem or last)


def target_identity(cfg: DictConfig) -> dict[str, Any]:
    """The target as a producer of answers and features: which weights, at which precision."""
    t = cfg.target
    return {"path": t.path, "gguf_file": t.gguf_file, "revision": t.revision, "dtype": t.dtype}


def rendering(cfg: DictConfig) -> dict[str, Any]:
    """How a conversation becomes the target's token ids: the `render_conversation` / `render_prompt`
    keyword arguments every stage passes (regeneration, cache, online training, evaluation)."""
    t = cfg.target
    return {
        "use_chat_template": bool(t.use_chat_template),
        "chat_template_kwargs": OmegaConf.to_container(t.chat_template_kwargs, resolve=True),
        "system_prompt": t.system_prompt,
    }


def sampling(cfg: DictConfig) -> dict[str, Any]:
    """How the target samples its answers: regen.* where set (compose fills the nulls from the target)."""
    r, t = cfg.regen, cfg.target
    return {
        "max_new_tokens": int(r.max_new_tokens),
        "temperature": float(r.temperature),
        "top_p": float(t.top_p),
        "top_k": int(t.top_k),
    }


def _unparsed(path: Path) -> None:
    return None


def _file_digest(path: str) -> str | None:
    """A file's sha256 (hashed once while it stays unchanged: `read_once`), or None when it is missing:
    the stage that reads it names the problem."""
    p = Path(path)
    return read_once(p, _unparsed)[1] if p.is_file() else None


def prompts_key(cfg: DictConfig) -> str:
    return f"{_stem(cfg.prompts.source)}-{config_hash(cfg.prompts)[:12]}"


def answers_key(cfg: DictConfig, prompts: str | None = None) -> str:
    """Answers depend on the prompts (`prompts`: their key, when the caller has it), the target, how
    prompts are rendered, and how the target samples (throughput settings such as endpoints, replicas
    and concurrency do not count)."""
    r = cfg.regen
    identity = {
        "prompts": prompts or prompts_key(cfg),
        "target": target_identity(cfg),
        "render": rendering(cfg),
        "sampling": sampling(cfg),
        "backend": r.backend,
        "api": r.api,
        "model": r.model,
        "extra_body": r.extra_body,
        "seed": r.seed,
        "batch_size": r.batch_size if r.backend == "hf" else None,  # it sets the hf seeds
        "answers_file": _file_digest(r.answers_file) if r.backend == "file" else None,  # by content
    }
    if float(cfg.prompts.heldout_fraction) > 0:
        # the held-out prompts are answered too (for validation): answers made before they were keep
        # their own folder, and a run holding nothing out keeps its key
        identity["heldout_answered"] = True
    return f"{_stem(cfg.target.name)}-{config_hash(identity)[:12]}"


def cache_key(cfg: DictConfig, answers: str | None = None) -> str:
    """A cache depends on the answers (`answers`: their key, when the caller has it) and on which
    features of the target it stores, and how."""
    s = cfg.storage
    identity = {
        "answers": answers or answers_key(cfg),
        "target": target_identity(cfg),
        "layer_ids": list(cfg.target.layer_ids),
        "encoding": s.encoding,
        "max_length": s.max_length,
        "samples_per_shard": s.samples_per_shard,
    }
    return f"{_stem(cfg.target.name)}-{s.encoding}-{config_hash(identity)[:12]}"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run and algorithm. Build it with `run_paths(cfg)`."""

    run_dir: Path
    data_dir: Path
    algo: str
    prompts_dir: Path
    answers_dir: Path
    cache_url: str  # an fsspec URL: a local path, file://, s3://...

    @property
    def prompts(self) -> Path:
        return self.prompts_dir / "prompts.jsonl"

    @property
    def heldout(self) -> Path:
        return self.prompts_dir / "heldout.jsonl"

    @property
    def rejects(self) -> Path:
        return self.prompts_dir / "rejects.jsonl"

    @property
    def answers(self) -> Path:
        return self.answers_dir / "answers.jsonl"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train" / self.algo

    @property
    def draft_dir(self) -> Path:
        return self.train_dir / "draft"

    @property
    def best_dir(self) -> Path:
        """The draft of the best validation step (`train.eval_every_steps`), beside the last."""
        return self.train_dir / "best"

    @property
    def checkpoints(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval" / self.algo

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export" / self.algo

    @property
    def mlflow_record(self) -> Path:
        return self.run_dir / f"mlflow_run-{self.algo}.json"

    @property
    def summary(self) -> Path:
        return self.run_dir / f"summary-{self.algo}.txt"


@dataclass(frozen=True)
class ReleasePaths:
    """The release location of the retrain flow. Build it with `release_paths(cfg)`."""

    root: Path

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def export(self) -> Path:
        return self.current / "export"

    @property
    def draft(self) -> Path:
        return self.current / "draft"

    @property
    def record(self) -> Path:
        return self.current / "release.json"


def release_paths(cfg: DictConfig) -> ReleasePaths | None:
    """Where the retrain flow releases drafts, or None when `release.dir` is unset."""
    return None if cfg.release.dir is None else ReleasePaths(Path(cfg.release.dir))


def run_paths(cfg: DictConfig) -> RunPaths:
    data_dir = Path(cfg.data_dir)
    prompts = prompts_key(cfg)
    answers = answers_key(cfg, prompts)
    return RunPaths(
        run_dir=Path(cfg.run_dir),
        data_dir=data_dir,
        algo=str(cfg.algo.name),
        prompts_dir=data_dir / "prompts" / prompts,
        answers_dir=data_dir / "answers" / answers,
        cache_url=f"{str(cfg.storage.url).rstrip('/')}/{cache_key(cfg, answers)}",
    )
