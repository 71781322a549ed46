"""Cache stage: run the target once over every regenerated answer and store its features for training.

    deepspec cache target=stories260k target.path=../shared/assets/models/stories260k

Reads the run's `answers.jsonl`, renders each conversation to token ids and a loss mask
(`answers.py`), and writes shards of `samples_per_shard` rows (training row i goes to shard i //
samples_per_shard; the answers to held-out prompts go to `heldout-K` shards of their own, after them, so
training streams never meet them and validation reads only them) to the run's cache URL, a folder of
`storage.url` named by what the cache holds (`tasks/paths.py`), in the format of `format.py`. The build
is three steps, each a plain function with a thin Prefect task beside it, so the flow can run one task
per shard on any task runner:

    plan_cache(cfg)          what is there and what is missing; writes `build.json` before any shard
    build_shard(cfg, k)      renders shard k, runs the target over it, commits it (any process, any machine)
    finalize_cache(cfg, p)   assembles `manifest.json` from the committed shards, last

`build_cache(cfg)` runs them in sequence in this process. The build is resumable: committed shards are
kept, so a killed build loses only the shards it was writing. `build.json` records what the cache is for,
so a resumed build never mixes shards of two configurations, and every shard task checks it before
writing. A complete cache that matches the config is skipped without loading the target. Caches for
other layers or encodings get folders of their own; one whose tokenizer or rendering changed under the
same name raises CacheMismatchError instead of being overwritten. Answers that changed under it (a
prompts source that grew) rebuild only the shards whose rows changed: `build.json` records a digest of
each shard's rows.

Each process running shard tasks loads the target once and keeps it (`target_replica`) for the shards
that follow; `finalize_cache` and `build_cache` drop it. Within a shard, samples are run in batches
sorted by length (right padding, attention mask) and stored in that order, so memory holds one batch of
features, never a whole shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm
from transformers import AutoConfig

from deepspec.models.errors import CacheMismatchError, ConfigError, DataError, DeepSpecError
from deepspec.models.target import (
    capture_batches,
    check_layer_ids,
    load_target,
    load_tokenizer,
    resolve_source,
)
from deepspec.tasks import artifacts, tracking
from deepspec.tasks.cache.answers import read_answers, render, render_options
from deepspec.tasks.cache.format import (
    BUILD_FILE,
    HELDOUT_PREFIX,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    CacheManifest,
    ShardWriter,
    check_fields,
    committed_shards,
    expected_manifest_fields,
    heldout_shard_name,
    load_manifest,
    open_fs,
    remove_stale_temp_files,
    shard_name,
    validate_manifest,
    write_json_atomic,
    write_manifest,
)
from deepspec.tasks.files import read_once
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import CacheResult

log = logging.getLogger(__name__)

SHARD_INPUTS = "shard_inputs"  # in build.json: each shard's `rows_digest`
# Padded tokens per target forward. Sorting by length keeps padding small; this bounds activation memory.
TOKENS_PER_BATCH = 16384


# Per-process state kept between shard tasks: the parsed answers file and one target replica. Shard
# tasks of one process may run in threads at once, so both are filled under a lock.
_replica_lock = threading.Lock()
_replica: dict[str, Any] = {}


def load_answers(cfg: DictConfig) -> tuple[list[dict[str, Any]], str]:
    """The answers file's rows and sha256, parsed once per process while the file stays unchanged."""
    path = run_paths(cfg).answers
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the regenerate stage first")
    return read_once(path, read_answers)


def target_replica(cfg: DictConfig):
    """This process's target model and tokenizer: loaded by its first shard task, kept for the next."""
    t = cfg.target
    key = (str(t.path), t.gguf_file, t.revision, str(t.dtype))
    with _replica_lock:
        if _replica.get("key") != key:
            _replica.clear()  # one target per process: drop another before loading this one
            model, tokenizer = load_target(t.path, t.gguf_file, t.revision, t.dtype)
            if torch.cuda.is_available():
                model.to("cuda")
            _replica.update(key=key, model=model, tokenizer=tokenizer)
        return _replica["model"], _replica["tokenizer"]


def release_target_replica() -> None:
    """Free this process's target replica (the build is over; training needs the memory)."""
    with _replica_lock:
        held = bool(_replica)
        _replica.clear()
    if held and torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_fields(cfg: DictConfig, tokenizer, source_sha256: str) -> dict[str, Any]:
    """Everything a committed shard depends on: the target identity plus rendering, layout and input."""
    return {
        **expected_manifest_fields(cfg, tokenizer),
        "render": render_options(cfg),
        "samples_per_shard": int(cfg.storage.samples_per_shard),
        "source_sha256": source_sha256,
    }


def _read_build_record(fs, root: str) -> dict[str, Any] | None:
    try:
        with fs.open(f"{root}/{BUILD_FILE}", "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def _storage(cfg: DictConfig):
    url = run_paths(cfg).cache_url
    fs, root = open_fs(url, OmegaConf.to_container(cfg.storage.storage_options, resolve=True))
    return url, fs, root


def shard_rows(rows: list[dict[str, Any]], per_shard: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every shard's name and answers rows, in build order: the training rows `per_shard` a shard, in
    answers order (`shard-K`), then the held-out rows the same way (`heldout-K`)."""
    shards = []
    for name_of, heldout in ((shard_name, False), (heldout_shard_name, True)):
        part = [row for row in rows if row["heldout"] is heldout]
        shards += [
            (name_of(k), part[start : start + per_shard])
            for k, start in enumerate(range(0, len(part), per_shard))
        ]
    return shards


def _write_shard(
    fs, root, name, samples, model, layer_ids, pad_id, tokens_per_batch, encoding
) -> dict[str, Any]:
    """Run the target over one shard's samples and commit the shard, its features in `encoding`.
    Samples are stored in the order the target ran them (longest first), one batch in memory at a time."""
    with ShardWriter(fs, root, name, encoding=encoding, layer_ids=layer_ids) as writer:
        sequences = [s["input_ids"] for s in samples]
        for batch in capture_batches(
            model, sequences, layer_ids, pad_id=pad_id, tokens_per_batch=tokens_per_batch
        ):
            for i, features in zip(batch.indices, batch.features, strict=True):
                s = samples[i]
                writer.add(s["sample_id"], s["input_ids"], s["loss_mask"], features)
    return writer.info


# ----------------------------------------------------------------------------------------------------
# The three steps of a build


@dataclass
class CachePlan:
    """What a build has to do at `url`: the shards it is made of and which of them are missing."""

    url: str
    shards: list[str]  # every shard's name, in order
    missing: list[int] = field(default_factory=list)  # indices of the shards to build
    skipped: bool = False  # a complete manifest matches the config: nothing to build
    build: dict[str, Any] = field(default_factory=dict)  # the fields of build.json, repeated in the manifest


def plan_cache(cfg: DictConfig) -> CachePlan:
    """Validate what the run's cache URL holds against the config and list the shards still to build.

    Reads the answers and the tokenizer, never the model. Before any shard exists it writes
    `build.json`; it removes an incomplete manifest and the temporary files of killed writers (one build
    per cache at a time), so shard tasks only ever add shards.
    """
    if cfg.storage.mode == "online":  # training runs the target itself
        return CachePlan(url=run_paths(cfg).cache_url, shards=[], skipped=True)
    per_shard = int(cfg.storage.samples_per_shard)
    url, fs, root = _storage(cfg)
    rows, source_sha256 = load_answers(cfg)
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
    expected = build_fields(cfg, tokenizer, source_sha256)
    shards = shard_rows(rows, per_shard)
    names = [name for name, _ in shards]
    build_record = {**expected, SHARD_INPUTS: {name: rows_digest(part) for name, part in shards}}

    manifest = load_manifest(fs, root, url)
    committed = committed_shards(fs, root)
    kept = _keep_unchanged_shards(fs, root, url, build_record, committed) if manifest or committed else None
    if kept is not None:  # the answers changed (grew): the manifest is gone, the changed shards too
        manifest, committed = None, kept
    if manifest is not None:
        validate_manifest(manifest, expected)
    elif committed:  # shards without a manifest must come from a build with the same build.json
        record = _read_build_record(fs, root)
        if record is None:
            raise CacheMismatchError(
                f"cache at {url} holds committed shards but no {BUILD_FILE} saying how they were made; "
                "delete it or point storage.url elsewhere"
            )
        check_fields(record, expected, url)
    else:  # nothing kept from an earlier build: this build decides what the cache is for
        write_json_atomic(fs, f"{root}/{BUILD_FILE}", build_record)
    missing = [k for k, name in enumerate(names) if name not in committed]
    made = [s["name"] for s in [*manifest.shards, *manifest.heldout_shards]] if manifest is not None else []
    if manifest is not None and not missing and made == names:
        log.info("target cache at %s is complete and matches the config; skipping", url)
        return CachePlan(url=url, shards=names, skipped=True, build=expected)

    if manifest is not None:  # incomplete after all: it must not claim completeness while we rebuild
        write_json_atomic(fs, f"{root}/{BUILD_FILE}", build_record)
        fs.rm(f"{root}/{MANIFEST_FILE}")
    remove_stale_temp_files(fs, root)
    log.info("target cache at %s: %d of %d shards to build", url, len(missing), len(names))
    return CachePlan(url=url, shards=names, missing=missing, build=expected)


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """What a shard's bytes depend on besides the build fields: its answers rows (not their line numbers,
    which move when rows are added before them)."""
    kept = [{"id": r["id"], "heldout": r["heldout"], "conversations": r["conversations"]} for r in rows]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _keep_unchanged_shards(
    fs, root: str, url: str, record: dict[str, Any], committed: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]] | None:
    """When only the answers changed since the build (`source_sha256`; a source that grew), uncommit the
    shards whose rows changed (the manifest first, so the cache never claims them) and record the new
    rows; shards of unchanged rows are kept, since they would be built with the same bytes. Returns the
    committed shards left, or None when the answers did not change. Any other change is refused."""
    built = _read_build_record(fs, root)
    if built is None or built.get("source_sha256") == record["source_sha256"]:
        if built is not None and SHARD_INPUTS not in built:  # built before shards recorded their rows
            write_json_atomic(fs, f"{root}/{BUILD_FILE}", {**built, SHARD_INPUTS: record[SHARD_INPUTS]})
        return None
    if SHARD_INPUTS not in built:
        return None  # which rows its shards hold is not known: `check_fields` refuses the change
    check_fields(built, {k: v for k, v in record.items() if k not in ("source_sha256", SHARD_INPUTS)}, url)
    before, now = built[SHARD_INPUTS], record[SHARD_INPUTS]
    changed = [name for name in committed if before.get(name) is None or before[name] != now.get(name)]
    if fs.exists(f"{root}/{MANIFEST_FILE}"):
        fs.rm(f"{root}/{MANIFEST_FILE}")
    for name in changed:
        fs.rm(f"{root}/{name}{MARKER_SUFFIX}")  # the marker first: without it the shard is not committed
        fs.rm(f"{root}/{name}")
    write_json_atomic(fs, f"{root}/{BUILD_FILE}", record)
    log.info("target cache at %s: the answers changed; %d of %d built shards keep their rows",
             url, len(committed) - len(changed), len(committed))  # fmt: skip
    return {name: info for name, info in committed.items() if name not in changed}


def build_shard(cfg: DictConfig, index: int, *, tokens_per_batch: int = TOKENS_PER_BATCH) -> dict[str, Any]:
    """Render shard `index`, run the target over it and commit it; returns its marker info.

    Runs in any process that reads the answers file and reaches `storage.url`, after `plan_cache`.
    The process keeps its target replica for its next shard. A rebuilt shard has the same bytes.
    """
    per_shard = int(cfg.storage.samples_per_shard)
    url, fs, root = _storage(cfg)
    rows, source_sha256 = load_answers(cfg)
    answers = run_paths(cfg).answers
    shards = shard_rows(rows, per_shard)
    if not 0 <= index < len(shards):
        raise ValueError(f"shard {index} does not exist: {answers} makes {len(shards)} shards")
    name, shard = shards[index]
    model, tokenizer = target_replica(cfg)
    layer_ids = check_layer_ids(list(cfg.target.layer_ids), model.config.num_hidden_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        record = _read_build_record(fs, root)
        if record is None:
            raise DataError(f"cache at {url} has no {BUILD_FILE}: plan the build first (run the cache stage)")
        check_fields(record, build_fields(cfg, tokenizer, source_sha256), url)
        samples, dropped, options = [], 0, render_options(cfg)
        for row in shard:
            input_ids, loss_mask = render(tokenizer, row, options, answers)
            if not any(loss_mask):  # nothing to learn (e.g. the answer was cut by max_length)
                dropped += 1
                continue
            samples.append({"sample_id": row["id"], "input_ids": input_ids, "loss_mask": loss_mask})
        encoding = str(cfg.storage.encoding)
        info = _write_shard(fs, root, name, samples, model, layer_ids, pad_id, tokens_per_batch, encoding)
    except DeepSpecError:
        raise
    except Exception as err:  # storage unreachable or failing, out of memory, ...: say what is kept
        raise DataError(
            f"cache shard {url}/{name} was not committed ({type(err).__name__}: {err}); the shards "
            "committed so far are kept: run the cache stage again to build the rest"
        ) from err
    if dropped:
        log.warning("%s: dropped %d conversations with no supervised tokens after rendering", name, dropped)
    log.info("committed %s/%s: %d samples, %d tokens", url, name, info["samples"], info["tokens"])
    return info


def finalize_cache(cfg: DictConfig, plan: CachePlan) -> CacheResult:
    """Write `manifest.json` from the committed shards (last: the cache is complete), log the figures.
    Also frees this process's target replica."""
    release_target_replica()
    if cfg.storage.mode == "online":
        log.info("storage.mode=online: no cache to build; training computes the target's features")
        return CacheResult(mode="online", url=None, skipped=True)
    url, fs, root = _storage(cfg)
    if plan.skipped:
        manifest = load_manifest(fs, root, url)
        if manifest is None:
            raise DataError(
                f"cache at {url}: {MANIFEST_FILE} vanished after planning; run the cache stage again"
            )
        _log_metrics(cfg, manifest)
        return _summary(manifest, skipped=True, built=0)
    committed = committed_shards(fs, root)
    absent = [n for n in plan.shards if n not in committed]
    if absent:
        raise DataError(f"cache at {url}: shards {absent} are not committed; run the cache stage again")
    # the build fields are manifest fields
    manifest = CacheManifest(**plan.build, hidden_size=_hidden_size(cfg))
    train = [committed[n] for n in plan.shards if not n.startswith(HELDOUT_PREFIX)]
    heldout = [committed[n] for n in plan.shards if n.startswith(HELDOUT_PREFIX)]
    manifest = manifest.with_shards(train, url, heldout)
    write_manifest(fs, root, manifest)
    log.info(
        "target cache at %s: %d samples, %d tokens; %d held-out samples",
        url, manifest.num_samples, manifest.num_tokens, manifest.heldout_samples,
    )  # fmt: skip
    _log_metrics(cfg, manifest)
    return _summary(manifest, skipped=False, built=len(plan.missing))


def build_cache(cfg: DictConfig, *, tokens_per_batch: int = TOKENS_PER_BATCH) -> CacheResult:
    """Build (or finish, or validate and skip) the run's target cache, in this process."""
    plan = plan_cache(cfg)
    try:
        for k in tqdm(plan.missing, desc="cache shards", unit="shard", disable=not plan.missing):
            build_shard(cfg, k, tokens_per_batch=tokens_per_batch)
    finally:
        release_target_replica()
    return finalize_cache(cfg, plan)


def _hidden_size(cfg: DictConfig) -> int:
    """The target's hidden size, from its config alone (a complete set of shards needs no model)."""
    source = resolve_source(cfg.target.path, cfg.target.gguf_file)
    config = AutoConfig.from_pretrained(source, revision=cfg.target.revision)
    return int(config.get_text_config().hidden_size)


def _summary(manifest: CacheManifest, *, skipped: bool, built: int) -> CacheResult:
    return CacheResult(
        mode="cached",
        url=manifest.url,
        samples=manifest.num_samples,
        tokens=manifest.num_tokens,
        bytes=manifest.num_bytes,
        shards=len(manifest.shards) + len(manifest.heldout_shards),
        shards_built=built,
        heldout_samples=manifest.heldout_samples,
        skipped=skipped,
    )


def _log_metrics(cfg: DictConfig, manifest: CacheManifest) -> None:
    tracking.log_metrics(
        cfg,
        {
            "cache/samples": manifest.num_samples,
            "cache/tokens": manifest.num_tokens,
            "cache/bytes": manifest.num_bytes,
            "cache/bytes_per_token": manifest.num_bytes / max(1, manifest.num_tokens),
            **({"cache/heldout_samples": manifest.heldout_samples} if manifest.heldout_shards else {}),
        },
    )


def cache_task_runner(cfg: DictConfig):
    """The Prefect task runner for shard tasks, from `storage.task_runner`, `build_workers`, `dask_address`.

    thread: `build_workers` threads in this process, sharing its one target replica. dask: the Dask
    cluster at `dask_address` (each worker process keeps its own replica), or without an address a local
    cluster of `build_workers` single-threaded worker processes.
    """
    workers, address = int(cfg.storage.build_workers), cfg.storage.dask_address
    if cfg.storage.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ConfigError(
            "storage.task_runner=dask needs the prefect-dask package: pip install deepspec[dask]"
        ) from err
    if address:
        return DaskTaskRunner(address=str(address))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})


# Thin Prefect tasks. No result caching: every step validates what storage holds itself.


@task(name="plan_cache", cache_policy=NO_CACHE)
def plan_cache_task(cfg: DictConfig) -> CachePlan:
    return plan_cache(cfg)


@task(
    name="build_shard",
    task_run_name="build_shard-{index}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
)
def build_shard_task(cfg: DictConfig, index: int) -> dict[str, Any]:
    return build_shard(cfg, index)


@task(name="finalize_cache", cache_policy=NO_CACHE)
def finalize_cache_task(cfg: DictConfig, plan: CachePlan) -> CacheResult:
    result = finalize_cache(cfg, plan)
    artifacts.publish(cfg, "cache", result)
    return result
