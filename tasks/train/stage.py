"""Stage `train`: a DFlash, Eagle3 or DSpark draft, trained by the recipe under torchrun.

    deepspec train target=stories260k target.path=../shared/assets/models/stories260k algo=eagle3

The stage decides and launches; the recipe trains (`recipe.py`, the torchrun target of every rank). A
draft for this configuration and data that exists with the weights its record names is kept
(`check_done`): the data are identified by the cache's shard checksums, or in online mode by the answers
file's. Otherwise the stage writes `train/<algo>/launch.yaml`, keeps checkpoints saved for the same
configuration and data (others are removed: they would resume the wrong run), and launches
`train.nproc_per_node` ranks on this machine. For several nodes it prints the torchrun command to run on
each instead. Output: `<run_dir>/train/<algo>/draft/` (`config.json`, `model.safetensors`), then
`_DONE.json`, which rank 0 writes last (`mark_trained`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.models.drafts import draft_algo, draft_spec
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.teacher import tail_start
from deepspec.tasks import files, tracking
from deepspec.tasks.cache.format import read_manifest
from deepspec.tasks.config import config_hash
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import TrainResult, from_record, to_record

log = logging.getLogger(__name__)
STALE_LOCK_S = 15 * 60  # an op build takes minutes (DeepSpeed's CPU Adam: about 4 on 2 cores)
WEIGHTS_FILE = "model.safetensors"


def train_hash(cfg: DictConfig) -> str:
    """What a draft depends on besides its data."""
    return config_hash(cfg.target, cfg.storage, cfg.algo, cfg.train)


def data_fingerprint(cfg: DictConfig) -> str:
    """Identity of the data the draft learns from: the checksums of the cache's committed shards, or in
    online mode the answers file the target runs over."""
    paths = run_paths(cfg)
    if cfg.storage.mode == "online":
        if not paths.answers.is_file():
            raise DeepSpecError(f"{paths.answers} does not exist: run the regenerate stage first")
        return "answers-" + files.sha256_file(paths.answers)[:16]
    manifest = read_manifest(paths.cache_url, dict(cfg.storage.storage_options))
    checksums = "".join(shard["sha256"] for shard in manifest.shards)
    return hashlib.sha256(checksums.encode()).hexdigest()[:16]


def check_done(cfg: DictConfig) -> TrainResult | None:
    """The training record if a draft for this config and data exists with the weights recorded."""
    paths = run_paths(cfg)
    record = files.read_done(paths.train_dir, train_hash(cfg))
    weights = paths.draft_dir / WEIGHTS_FILE
    if record is None or not weights.is_file():
        return None
    if record.get("data_fingerprint") != data_fingerprint(cfg):
        log.info("the training data changed since %s was trained; retraining", weights)
        return None
    if files.sha256_file(weights) != record.get("weights_sha256"):
        log.warning("%s does not match its training record; retraining", weights)
        return None
    return from_record(TrainResult, record)


def trained_draft(cfg: DictConfig, stage: str) -> Path:
    """The weights file of the draft this run trained for `algo.name`, checked to be that algorithm's:
    what evaluation and export start from (`stage` names who asks, in the errors)."""
    directory = run_paths(cfg).draft_dir
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DeepSpecError(f"{stage}: no trained draft at {weights}; run `deepspec train` first")
    found = draft_algo(directory)
    if found != cfg.algo.name:
        raise ConfigError(
            f"{stage}: the draft at {directory} is a {found} draft, but algo={cfg.algo.name}; "
            f"train again or {stage} with algo={found}"
        )
    return weights


def mark_trained(cfg: DictConfig, *, optimizer_steps: int, final_metrics: dict[str, float]) -> TrainResult:
    """The completion record of a draft just written (rank 0, last)."""
    paths = run_paths(cfg)
    result = TrainResult(
        draft_dir=str(paths.draft_dir),
        optimizer_steps=optimizer_steps,
        weights_sha256=files.sha256_file(paths.draft_dir / WEIGHTS_FILE),
        data_fingerprint=data_fingerprint(cfg),
        final_metrics=final_metrics,
    )
    files.mark_done(paths.train_dir, train_hash(cfg), **to_record(result))
    return result


def check_teacher(cfg: DictConfig) -> None:
    """Fail here, not in every rank, when the algorithm's teacher cannot be had from this cache."""
    if not draft_spec(str(cfg.algo.name)).needs_teacher:
        return
    from transformers import AutoConfig

    from deepspec.models.target import resolve_source

    text = AutoConfig.from_pretrained(resolve_source(cfg.target.path, cfg.target.gguf_file)).get_text_config()
    try:
        tail_start(list(cfg.target.layer_ids), text, online=cfg.storage.mode == "online")
    except ConfigError as err:
        raise ConfigError(f"algo={cfg.algo.name}: {err}") from err


def train(cfg: DictConfig) -> TrainResult:
    """Train the draft unless a valid one for this config and data exists; returns the training record."""
    check_teacher(cfg)
    done = check_done(cfg)
    paths = run_paths(cfg)
    if done is not None:
        log.info("train: a valid draft for this config is at %s; skipping", paths.draft_dir)
        done.skipped = True
        return done
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    files.clear_done(paths.train_dir)
    _discard_foreign_checkpoints(cfg)
    launch = paths.train_dir / "launch.yaml"
    OmegaConf.save(cfg, launch)
    tracking.run_id(cfg)  # create the MLflow run before ranks race to
    if cfg.train.nnodes > 1:
        raise ConfigError(
            f"train.nnodes={cfg.train.nnodes}: start every node yourself with\n  torchrun --nnodes "
            f"{cfg.train.nnodes} --nproc_per_node {cfg.train.nproc_per_node} --rdzv_backend c10d "
            f"--rdzv_endpoint HEAD_NODE:29500 -m deepspec.tasks.train.recipe {launch}"
        )
    launch_ranks(launch, int(cfg.train.nproc_per_node))
    record = check_done(cfg)
    if record is None:
        raise DeepSpecError(f"training exited cleanly but left no valid draft in {paths.draft_dir}")
    tracking.log_artifact(cfg, paths.draft_dir, "train")  # the draft, as trained: train/draft/
    return record


def launch_ranks(launch: Path, nproc_per_node: int) -> None:
    """`nproc_per_node` ranks of the recipe on this machine under torchrun; returns when all are done."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc_per_node}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "deepspec.tasks.train.recipe", str(launch),
    ]  # fmt: skip
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", accelerator)}
    for lock, age_s in stale_build_locks():
        log.warning(
            "%s is %.0f minutes old: a torch extension build (DeepSpeed compiles its ops on first use) "
            "killed midway leaves it, and every later build waits on it forever. If no build is running, "
            "delete it.", lock, age_s / 60,
        )  # fmt: skip
    log.info("launching %s", " ".join(command))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise DeepSpecError(f"training failed (exit {result.returncode}); the ranks' output is above")


def stale_build_locks(max_age_s: float = STALE_LOCK_S) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) of torch extension builds older than `max_age_s`. Torch's folders:
    with $TORCH_EXTENSIONS_DIR, DIR/<op>/lock, else <cache>/torch_extensions/<python>_<device>/<op>/lock."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now, stale = time.time(), []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # its build just finished
            continue
        if age > max_age_s:
            stale.append((lock, age))
    return stale


def _discard_foreign_checkpoints(cfg: DictConfig) -> None:
    """Checkpoints resume only the configuration and data they were saved with; others are removed."""
    ckpt_dir = run_paths(cfg).checkpoints
    owner = ckpt_dir / "owner.json"
    identity = {"train_hash": train_hash(cfg), "data": data_fingerprint(cfg)}
    if ckpt_dir.exists() and (not owner.is_file() or json.loads(owner.read_text()) != identity):
        log.warning("discarding %s: saved for another configuration or other data", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(owner, json.dumps(identity))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@task(name="train", cache_policy=NO_CACHE)  # stages validate their own outputs
def train_task(cfg: DictConfig) -> TrainResult:
    return train(cfg)
