"""Stage `train`: a DFlash, Eagle3 or DSpark draft, trained by the recipe under torchrun.

    deepspec train target=stories260k target.path=../shared/assets/models/stories260k algo=eagle3

The stage decides and launches; the recipe trains (`recipe.py`, the torchrun target of every rank). A
draft for this configuration and data that exists with the weights its record names is kept
(`check_done`): the data are identified by the cache's shard checksums, or in online mode by the answers
file's. Otherwise the stage writes `train/<algo>/launch.yaml`, keeps checkpoints saved for the same
configuration and data (others are removed: they would resume the wrong run), and launches
`train.nproc_per_node` ranks on this machine. One launch at a time holds `train/<algo>/` (a lock that
torchrun holds too), and torchrun and its ranks die with the process that launched them, however it ends
(`tasks/processes.py`): a killed flow never leaves ranks writing into a folder a re-run uses. For
several nodes it prints the torchrun command to run on each instead. Output:
`<run_dir>/train/<algo>/draft/` (`config.json`, `model.safetensors`), with validation
(`train.eval_every_steps`) also `best/`, the draft of the best validation step, then `_DONE.json`, which
rank 0 writes last (`mark_trained`). Evaluation and export take the draft `export.draft` names
(`trained_draft`): `best` when validation ran, else the last.
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
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.models.drafts import draft_algo, draft_spec
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.teacher import tail_start
from deepspec.tasks import artifacts, files, secrets, tracking
from deepspec.tasks.cache.format import read_manifest
from deepspec.tasks.config import config_hash
from deepspec.tasks.paths import run_paths
from deepspec.tasks.processes import LAUNCHER_PID_ENV, die_with_parent, exclusive
from deepspec.tasks.results import TrainResult, from_record, to_record
from deepspec.tasks.train.validation import read_best
from deepspec.tasks.train.warm_start import init_hash

log = logging.getLogger(__name__)
STALE_LOCK_S = 15 * 60  # an op build takes minutes (DeepSpeed's CPU Adam: about 4 on 2 cores)
WEIGHTS_FILE = "model.safetensors"
LOCK_FILE = ".launch.lock"


VALIDATION_KEYS = ("eval_every_steps", "eval_samples")


def train_hash(cfg: DictConfig) -> str:
    """What a draft depends on besides its data. The validation settings count only when validation
    runs (it adds best/), so a run without it keeps the hash it had before validation existed; the
    released weights it starts from count with `release.init=released` (`warm_start.py`)."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    if not train["eval_every_steps"]:
        train = {key: value for key, value in train.items() if key not in VALIDATION_KEYS}
    return config_hash(cfg.target, cfg.storage, cfg.algo, train, *init_hash(cfg))


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
    best = record.get("best")
    best_weights = paths.best_dir / WEIGHTS_FILE
    if best and (not best_weights.is_file() or files.sha256_file(best_weights) != best["weights_sha256"]):
        log.warning("%s is missing or does not match its training record; retraining", best_weights)
        return None
    return from_record(TrainResult, record)


def trained_draft(cfg: DictConfig, stage: str) -> Path:
    """The weights file of the draft this run trained for `algo.name`, checked to be that algorithm's:
    what evaluation and export start from (`stage` names who asks, in the errors). `export.draft=best`
    takes the best validation step's draft when the training record has one, else the last."""
    paths = run_paths(cfg)
    directory = paths.draft_dir
    best = _training_record(paths.train_dir).get("best") if cfg.export.draft == "best" else None
    if best:
        directory = paths.best_dir
        log.info("%s: the draft of the best validation, step %d (%s %.4f): %s", stage, best["step"],
                 best["metric"], best["value"], directory)  # fmt: skip
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


def _training_record(train_dir: Path) -> dict:
    """The training stage's completion record as written, whatever configuration made it ({} if none)."""
    path = train_dir / files.DONE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def mark_trained(
    cfg: DictConfig,
    *,
    optimizer_steps: int,
    final_metrics: dict[str, float],
    best: dict[str, Any] | None = None,
) -> TrainResult:
    """The completion record of a draft just written (rank 0, last); `best` the {step, metric, value} of
    the draft validation kept in best/, checked to be the one there."""
    paths = run_paths(cfg)
    if best is not None:
        kept = read_best(paths.best_dir)
        if kept is None or kept["step"] != best["step"]:
            raise DeepSpecError(
                f"{paths.best_dir} does not hold the best validation's draft (step {best['step']}) but "
                f"{kept}; train again (delete {paths.checkpoints} to start over)"
            )
        best = {**best, "weights_sha256": files.sha256_file(paths.best_dir / WEIGHTS_FILE)}
    result = TrainResult(
        draft_dir=str(paths.draft_dir),
        optimizer_steps=optimizer_steps,
        weights_sha256=files.sha256_file(paths.draft_dir / WEIGHTS_FILE),
        data_fingerprint=data_fingerprint(cfg),
        final_metrics=final_metrics,
        best=best,
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
    launch = paths.train_dir / "launch.yaml"
    if cfg.train.nnodes > 1:
        raise ConfigError(
            f"train.nnodes={cfg.train.nnodes}: start every node yourself with\n  torchrun --nnodes "
            f"{cfg.train.nnodes} --nproc_per_node {cfg.train.nproc_per_node} --rdzv_backend c10d "
            f"--rdzv_endpoint HEAD_NODE:29500 -m deepspec.tasks.train.recipe {launch}"
        )
    # one launch at a time in this folder: its ranks own the checkpoints (the lock lives as long as they do)
    with exclusive(paths.train_dir / LOCK_FILE, f"training of {paths.train_dir}") as lock:
        files.clear_done(paths.train_dir)
        _discard_foreign_checkpoints(cfg)
        secrets.save_config(cfg, launch)  # secret references stay references: the ranks resolve them
        tracking.run_id(cfg)  # create the MLflow run before ranks race to
        launch_ranks(launch, int(cfg.train.nproc_per_node), lock_fd=lock)
    record = check_done(cfg)
    if record is None:
        raise DeepSpecError(f"training exited cleanly but left no valid draft in {paths.draft_dir}")
    tracking.log_artifact(cfg, paths.draft_dir, "train")  # the draft, as trained: train/draft/
    if record.best:
        tracking.log_artifact(cfg, paths.best_dir, "train")  # the best validation's: train/best/
    return record


def launch_ranks(launch: Path, nproc_per_node: int, lock_fd: int | None = None) -> None:
    """`nproc_per_node` ranks of the recipe on this machine under torchrun; returns when all are done.
    torchrun dies with this process and each rank with torchrun (`processes.die_with_parent`), however
    this process ends; torchrun also holds the folder's lock (`lock_fd`) for as long as it lives."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc_per_node}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "deepspec.tasks.train.recipe", str(launch),
    ]  # fmt: skip
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        **os.environ,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", accelerator),
        LAUNCHER_PID_ENV: str(os.getpid()),
        **secrets.child_env(),  # the Prefect API, for ranks reading ${prefect_secret:..} storage options
    }
    for lock, age_s in stale_build_locks():
        log.warning(
            "%s is %.0f minutes old: a torch extension build (DeepSpeed compiles its ops on first use) "
            "killed midway leaves it, and every later build waits on it forever. If no build is running, "
            "delete it.", lock, age_s / 60,
        )  # fmt: skip
    log.info("launching %s", " ".join(command))
    fds = () if lock_fd is None else (lock_fd,)
    result = subprocess.run(command, env=env, preexec_fn=die_with_parent, pass_fds=fds)
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
    result = train(cfg)
    artifacts.publish(cfg, "train", result)
    return result
