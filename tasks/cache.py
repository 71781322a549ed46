"""Cache stage: run the target once over every regenerated answer and store its features for training.

    deepspec cache target=stories260k target.path=../shared/assets/models/stories260k

Reads `<run_dir>/regen/answers.jsonl`, renders each conversation to token ids and a loss mask, and
writes shards of `samples_per_shard` rows (row i goes to shard i // samples_per_shard) to
`storage.url` in the format of `target_cache.py`. The build is resumable: committed shards are kept,
so a killed build loses only the shards it was writing, and `manifest.json` is written last. Before
any shard, `build.json` records what the cache is for, so a resumed build never mixes shards of two
configurations. A complete cache that matches the config is skipped without loading the target; a
cache made for another target, tokenizer, layer set, rendering or answers file raises
CacheMismatchError instead of being overwritten.

Within a shard, samples are run in batches sorted by length (right padding, attention mask) and
stored in that order, so memory holds one batch of features, never a whole shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm
from transformers import AutoConfig

from deepspec.models.chat import render_conversation
from deepspec.models.errors import CacheMismatchError, ConfigError, DataError
from deepspec.models.target import (
    capture_features,
    check_layer_ids,
    load_target,
    load_tokenizer,
    resolve_source,
)
from deepspec.tasks import tracking
from deepspec.tasks.config import run_path
from deepspec.tasks.target_cache import (
    BUILD_FILE,
    MANIFEST_FILE,
    CacheManifest,
    ShardWriter,
    check_fields,
    committed_shards,
    expected_manifest_fields,
    load_manifest,
    open_fs,
    remove_stale_temp_files,
    shard_name,
    validate_manifest,
    write_json_atomic,
    write_manifest,
)

__all__ = ["build_cache", "cache_task", "expected_manifest_fields"]

log = logging.getLogger(__name__)

# Padded tokens per target forward. Sorting by length keeps padding small; this bounds activation memory.
TOKENS_PER_BATCH = 16384


def answers_path(cfg: DictConfig) -> Path:
    return run_path(cfg, "regen", "answers.jsonl")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Rows {id, conversations: [{role, content}, ...]}; DataError naming the line and field otherwise."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the regenerate stage first")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            turns = row.get("conversations") if isinstance(row, dict) else None
            if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in turns
            ):
                raise DataError(
                    f"{path}:{lineno}: field 'conversations' must be a list of {{role, content}} strings"
                )
            rows.append({"id": str(row.get("id", f"line-{lineno}")), "line": lineno, "conversations": turns})
    return rows


def build_fields(cfg: DictConfig, tokenizer, source_sha256: str) -> dict[str, Any]:
    """Everything a committed shard depends on: the target identity plus rendering, layout and input."""
    return {
        **expected_manifest_fields(cfg, tokenizer),
        "render": {
            "use_chat_template": bool(cfg.target.use_chat_template),
            "chat_template_kwargs": OmegaConf.to_container(cfg.target.chat_template_kwargs, resolve=True),
            "system_prompt": cfg.target.system_prompt,
            "max_length": int(cfg.storage.max_length),
        },
        "samples_per_shard": int(cfg.storage.samples_per_shard),
        "source_sha256": source_sha256,
    }


def _check_build_record(fs, root: str, url: str, expected: dict[str, Any]) -> None:
    """Committed shards without a manifest: they must come from a build with the same `build.json`."""
    try:
        with fs.open(f"{root}/{BUILD_FILE}", "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CacheMismatchError(
            f"cache at {url} holds committed shards but no {BUILD_FILE} saying how they were made; "
            "delete it or point storage.url elsewhere"
        ) from None
    check_fields(record, expected, url)


def _render(cfg: DictConfig, tokenizer, row: dict[str, Any]):
    kwargs = OmegaConf.to_container(cfg.target.chat_template_kwargs, resolve=True) or None
    return render_conversation(
        tokenizer,
        row["conversations"],
        use_chat_template=bool(cfg.target.use_chat_template),
        chat_template_kwargs=kwargs,
        system_prompt=cfg.target.system_prompt,
        max_length=int(cfg.storage.max_length),
    )


def _batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index), cut so rows * longest <= the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= tokens_per_batch:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _write_shard(fs, root, name, samples, model, layer_ids, pad_id, tokens_per_batch) -> dict[str, Any]:
    """Run the target over one shard's samples and commit the shard."""
    device = next(model.parameters()).device
    with ShardWriter(fs, root, name) as writer:
        for batch in _batches([len(s["input_ids"]) for s in samples], tokens_per_batch):
            width = len(samples[batch[0]]["input_ids"])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(samples[i]["input_ids"])
                ids[row, :n] = torch.tensor(samples[i]["input_ids"], dtype=torch.long)
                attention[row, :n] = 1
            features = capture_features(model, ids.to(device), layer_ids, attention.to(device))
            features = features.to(dtype=torch.bfloat16, device="cpu")
            for row, i in enumerate(batch):
                s = samples[i]
                n = len(s["input_ids"])
                writer.add(s["sample_id"], s["input_ids"], s["loss_mask"], features[row, :n])
    return writer.info


def build_cache(cfg: DictConfig, *, tokens_per_batch: int = TOKENS_PER_BATCH) -> dict[str, Any]:
    """Build (or finish, or validate and skip) the target cache at `cfg.storage.url`."""
    per_shard = int(cfg.storage.samples_per_shard)
    if per_shard < 1:
        raise ConfigError(f"storage.samples_per_shard={per_shard}: need at least 1")
    url = str(cfg.storage.url)
    storage_options = OmegaConf.to_container(cfg.storage.storage_options, resolve=True)
    fs, root = open_fs(url, storage_options)
    source = answers_path(cfg)
    rows = read_answers(source)
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
    expected = build_fields(cfg, tokenizer, _sha256_file(source))
    names = [shard_name(k) for k in range((len(rows) + per_shard - 1) // per_shard)]

    manifest = load_manifest(fs, root, url)
    committed = committed_shards(fs, root)
    if manifest is not None:
        validate_manifest(manifest, expected)
    elif committed:
        _check_build_record(fs, root, url, expected)
    else:  # nothing kept from an earlier build: this build decides what the cache is for
        write_json_atomic(fs, f"{root}/{BUILD_FILE}", expected)
    missing = [k for k, name in enumerate(names) if name not in committed]
    if manifest is not None and not missing and [s["name"] for s in manifest.shards] == names:
        log.info("target cache at %s is complete and matches the config; skipping", url)
        _log_metrics(cfg, manifest)
        return _summary(manifest, skipped=True, built=0)

    if manifest is not None:  # incomplete after all: it must not claim completeness while we rebuild
        write_json_atomic(fs, f"{root}/{BUILD_FILE}", expected)
        fs.rm(f"{root}/{MANIFEST_FILE}")
    remove_stale_temp_files(fs, root)
    _build_missing(cfg, fs, root, rows, names, missing, tokenizer, tokens_per_batch)

    committed = committed_shards(fs, root)
    absent = [n for n in names if n not in committed]
    if absent:
        raise DataError(f"cache at {url}: shards {absent} vanished while building; run the cache stage again")
    shards = [committed[n] for n in names]
    manifest = CacheManifest(
        **expected,  # the build fields are manifest fields
        hidden_size=_hidden_size(cfg),
        shards=shards,
        num_samples=sum(s["samples"] for s in shards),
        num_tokens=sum(s["tokens"] for s in shards),
        num_bytes=sum(s["bytes"] for s in shards),
        url=url,
    )
    write_manifest(fs, root, manifest)
    log.info("target cache at %s: %d samples, %d tokens", url, manifest.num_samples, manifest.num_tokens)
    _log_metrics(cfg, manifest)
    return _summary(manifest, skipped=False, built=len(missing))


def _build_missing(cfg, fs, root, rows, names, missing, tokenizer, tokens_per_batch) -> None:
    """Render the missing shards' conversations, run the target over them and commit each shard."""
    if not missing:
        return
    model, _ = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, cfg.target.dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    layer_ids = check_layer_ids(list(cfg.target.layer_ids), model.config.num_hidden_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_shard = int(cfg.storage.samples_per_shard)
    dropped = 0
    for k in tqdm(missing, desc="cache shards", unit="shard"):
        samples = []
        for row in rows[k * per_shard : (k + 1) * per_shard]:
            try:
                rendered = _render(cfg, tokenizer, row)
            except DataError as err:
                raise DataError(f"{answers_path(cfg)}:{row['line']} (id {row['id']}): {err}") from err
            if not any(rendered.loss_mask):  # nothing to learn (e.g. the answer was cut by max_length)
                dropped += 1
                continue
            samples.append(
                {"sample_id": row["id"], "input_ids": rendered.input_ids, "loss_mask": rendered.loss_mask}
            )
        _write_shard(fs, root, names[k], samples, model, layer_ids, pad_id, tokens_per_batch)
    if dropped:
        log.warning("dropped %d conversations with no supervised tokens after rendering", dropped)


def _hidden_size(cfg: DictConfig) -> int:
    """The target's hidden size, from its config alone (a complete set of shards needs no model)."""
    source = resolve_source(cfg.target.path, cfg.target.gguf_file)
    config = AutoConfig.from_pretrained(source, revision=cfg.target.revision)
    return int(config.get_text_config().hidden_size)


def _summary(manifest: CacheManifest, *, skipped: bool, built: int) -> dict[str, Any]:
    return {
        "skipped": skipped,
        "url": manifest.url,
        "samples": manifest.num_samples,
        "tokens": manifest.num_tokens,
        "bytes": manifest.num_bytes,
        "shards": len(manifest.shards),
        "shards_built": built,
    }


def _log_metrics(cfg: DictConfig, manifest: CacheManifest) -> None:
    tracking.log_metrics(
        cfg,
        {
            "cache/samples": manifest.num_samples,
            "cache/tokens": manifest.num_tokens,
            "cache/bytes": manifest.num_bytes,
            "cache/bytes_per_token": manifest.num_bytes / max(1, manifest.num_tokens),
        },
    )


@task(name="cache", cache_policy=NO_CACHE)  # stages validate their own outputs
def cache_task(cfg: DictConfig) -> dict[str, Any]:
    return build_cache(cfg)
