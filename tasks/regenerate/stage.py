"""Stage `regenerate`: the target writes its own answers to the prompts.

    deepspec regenerate                                            # the embedded SmolLM2 target, in process
    deepspec regenerate regen=vllm regen.replicas=8                # DeepSpec launches 8 vLLM servers
    deepspec regenerate regen=vllm regen.endpoints=[http://gpu1:8000/v1,http://gpu2:8000/v1]
    deepspec regenerate regen=file regen.answers_file=runs/other/data/answers/KEY/answers.jsonl
    OPENAI_API_KEY=... deepspec regenerate regen=openai regen.endpoints=[https://host/v1] regen.model=NAME

A draft model must learn the target's distribution, so the assistant turns it trains on are sampled
from the target itself, with the target preset's sampling settings (`regen.temperature` and
`regen.max_new_tokens` override them; temperature 0 is greedy). Backends: `backends.py`.

The stage runs in three steps, each a plain function with a thin Prefect task beside it, so the flow
runs one task per shard of prompts and a failed shard re-runs alone:

    plan_regen(cfg)                  which shards are missing; starts over if the config changed, keeps
                                     the answers to unchanged prompts if only the prompts did
    regen_shard(cfg, k, endpoints)   answers shard k (prompt rows k*shard_size ...) and commits it
    finalize_regen(cfg, plan, res)   `answers.jsonl` in input order from the committed shards, last

`regenerate(cfg)` runs them in sequence in this process (launching vLLM servers when asked).

Exactly once. A shard's finished rows are appended, each in one write, to `shards/part-K.log.jsonl` as
they come; when the shard is done its answers are written in input order to `shards/part-K.jsonl` through
a temporary file and a rename (the commit), and the log is removed. A re-run keeps committed shards and
the complete lines of a log (for the `hf` backend, whole batches only, so that seeds line up), and asks
only for the rest: killing the run at any moment loses no finished answer and duplicates none.

Failures. A row whose requests fail for good (`backends.HTTPBackend`) is committed to
`shards/part-K.errors.jsonl` and asked for again by the next run; the stage ends with `errors.jsonl`
listing them all and fails when there are more than `regen.allow_failures`.

Output: `answers.jsonl` in the answers folder (`<data_dir>/answers/<target>-<key>/`, named by the
prompts, the target and its sampling; `tasks/paths.py`), one record a line in input order (fields in
backends.py), then `_DONE.json`. The held-out prompts (`heldout.jsonl`, `prompts.heldout_fraction`) are
answered too, after the others, their records marked `"heldout": true`: the cache stores them apart and
training only validates on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from deepspec.models.errors import ConfigError, DataError
from deepspec.models.target import load_tokenizer, resolve_source
from deepspec.tasks import artifacts, tracking
from deepspec.tasks.config import config_hash
from deepspec.tasks.files import (
    atomic_write_text,
    clear_done,
    mark_done,
    read_done,
    read_jsonl,
    read_once,
    write_jsonl_atomic,
)
from deepspec.tasks.paths import answers_key, rendering, run_paths, sampling
from deepspec.tasks.prompts import prompt_key
from deepspec.tasks.regenerate.backends import (
    FileBackend,
    HFBackend,
    HTTPBackend,
    HTTPSettings,
    Rendering,
    Sampling,
)
from deepspec.tasks.results import RegenResult, from_record, to_record

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
SHARDS_DIR = "shards"


@dataclass
class RegenPlan:
    rows: int
    shard_size: int
    num_shards: int
    missing: list[int]  # shards to run: not committed yet, or committed with failed rows
    digest: str
    done: dict[str, Any] | None = None  # the stage record when everything is already answered
    artifact_id: str | None = None  # the Prefect progress artifact, when planned inside a flow


# ----------------------------------------------------------------------------------------------------
# Settings


def sampling_of(cfg: DictConfig) -> Sampling:
    return Sampling(**sampling(cfg))


def rendering_of(cfg: DictConfig) -> Rendering:
    return Rendering(**rendering(cfg))


def answers_digest(cfg: DictConfig, prompts_sha256: str) -> str:
    """What the committed shards depend on: what the answers depend on (`paths.answers_key`), the shard
    layout, and the prompts' bytes."""
    return config_hash(answers_key(cfg), int(cfg.regen.shard_size), prompts_sha256)


# ----------------------------------------------------------------------------------------------------
# Files


def stage_dir(cfg: DictConfig) -> Path:
    return run_paths(cfg).answers_dir


def _shard_paths(cfg: DictConfig, k: int) -> tuple[Path, Path, Path]:
    """Committed answers, committed failures, and the log of rows finished since the last commit."""
    d = stage_dir(cfg) / SHARDS_DIR
    return d / f"part-{k:05d}.jsonl", d / f"part-{k:05d}.errors.jsonl", d / f"part-{k:05d}.log.jsonl"


def complete_rows(path: Path) -> list[dict]:
    """Rows of the complete lines of a JSONL file, stopping at a partial or unreadable line."""
    rows: list[dict] = []
    if not path.is_file():
        return rows
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def load_prompts(cfg: DictConfig) -> tuple[list[dict], str]:
    """The prompts to answer and their sha256: the prompts file's rows, then the held-out file's, marked
    `heldout` (training's validation reads their answers; training never does). Each file is read once
    per process while it stays unchanged. With nothing held out the sha256 is the prompts file's alone,
    as it was before held-out prompts were answered, so such runs keep their answers."""
    paths = run_paths(cfg)
    if not paths.prompts.is_file():
        raise DataError(f"{paths.prompts}: no such file; run the prompts stage first (deepspec prompts)")
    rows, sha = read_once(paths.prompts, _prompt_rows)
    if not paths.heldout.is_file() or paths.heldout.stat().st_size == 0:
        return rows, sha
    heldout, heldout_sha = read_once(paths.heldout, _heldout_rows)
    return [*rows, *heldout], hashlib.sha256(f"{sha} {heldout_sha}".encode()).hexdigest()


def _prompt_rows(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def _heldout_rows(path: Path) -> list[dict]:
    return [{**row, "heldout": True} for _, row in read_jsonl(path)]


# A terminal progress bar over all rows, when shard tasks run in the process that planned them.
_bar: dict[str, tqdm] = {}


# ----------------------------------------------------------------------------------------------------
# The three steps


def plan_regen(cfg: DictConfig) -> RegenPlan:
    """Which shards still need answers. A run for another configuration or other prompts is discarded."""
    prompts, prompts_sha = load_prompts(cfg)
    if not prompts:
        raise DataError(f"{run_paths(cfg).prompts} holds no prompts")
    digest = answers_digest(cfg, prompts_sha)
    size = int(cfg.regen.shard_size)
    plan = RegenPlan(len(prompts), size, -(-len(prompts) // size), [], digest)
    out = stage_dir(cfg)

    done = read_done(out, digest)
    if (
        done
        and done.get("prompts") == len(prompts)
        and len(complete_rows(run_paths(cfg).answers)) == done.get("rows")
    ):
        log.info("regenerate: %s already holds %d answers; skipping", run_paths(cfg).answers, done["rows"])
        plan.done = done
        return plan
    clear_done(out)

    plan_file = out / PLAN_FILE
    previous = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    layout = config_hash(answers_key(cfg), size)  # the digest less the prompts
    if previous is not None and previous.get("digest") != digest:
        if previous.get("layout") == layout:
            kept = _keep_answers(cfg, prompts, size)
            log.info("regenerate: the prompts changed; %d answers to unchanged prompts kept", kept)
        else:
            log.info("regenerate: the answers in %s are for another configuration; starting over", out)
            shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    plan_record = {"digest": digest, "layout": layout, "rows": len(prompts), "shard_size": size}
    atomic_write_text(plan_file, json.dumps(plan_record))

    answered = 0
    for k in range(plan.num_shards):
        part, errors, _ = _shard_paths(cfg, k)
        if part.is_file() and not errors.is_file():
            answered += min(size, len(prompts) - k * size)
        else:
            plan.missing.append(k)
    log.info(
        "regenerate: %d prompts in %d shards of %d; %d shards to answer (backend %s)",
        len(prompts),
        plan.num_shards,
        size,
        len(plan.missing),
        cfg.regen.backend,
    )
    if plan.missing:
        _bar["bar"] = tqdm(total=len(prompts), initial=answered, unit="row", desc="regenerate")
    return plan


def _keep_answers(cfg: DictConfig, prompts: list[dict], size: int) -> int:
    """After the prompts changed under the same settings (a source that grew): a committed shard whose
    answers are for exactly its rows now stays committed; any other shard is uncommitted, the answers it
    still has to its rows (same id and turns) carried into its log, so that `regen_shard` asks only for
    the rest (for `hf` whole batches: its seeds follow the positions, so rows appended after the earlier
    ones keep the answers a fresh run would give them). Returns the answers kept."""
    shards = stage_dir(cfg) / SHARDS_DIR
    rows_now = {row["id"]: row for row in prompts}

    def same(answer: dict) -> bool:
        row = rows_now.get(answer["id"])
        return (
            row is not None
            and bool(row.get("heldout")) == bool(answer.get("heldout"))
            and prompt_key(row["conversations"]) == prompt_key(answer["conversations"])
        )

    answered: dict[str, dict] = {}  # every answer on disk (committed or logged) to a prompt still there
    for path in sorted(shards.glob("part-*.jsonl")):
        if not path.name.endswith(".errors.jsonl"):
            answered.update({a["id"]: a for a in complete_rows(path) if "error" not in a and same(a)})
    num_shards = -(-len(prompts) // size)
    for k in range(num_shards):
        rows = prompts[k * size : (k + 1) * size]
        part, errors, log_path = _shard_paths(cfg, k)
        committed = complete_rows(part)
        if not errors.is_file() and [a["id"] for a in committed] == [r["id"] for r in rows]:
            if all(a["id"] in answered for a in committed):
                continue  # its rows and their answers as they were
        carried = [answered[r["id"]] for r in rows if r["id"] in answered]
        write_jsonl_atomic(log_path, carried)  # before the commit goes, so no answer is ever lost
        part.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)
    for path in shards.glob("part-*.jsonl"):  # shards past the prompts' end
        if int(path.name[len("part-") :].split(".")[0]) >= num_shards:
            path.unlink()
    return sum(row["id"] in answered for row in prompts)


@dataclass
class ShardResult:
    """One shard's commit: rows answered and failed, and, when it asked the backend, its new tokens and
    when it began and ended (the stage's tokens/s spans all shards)."""

    shard: int
    rows: int
    failed: int
    new_tokens: int = 0
    began: float | None = None
    ended: float | None = None


def regen_shard(cfg: DictConfig, k: int, endpoints: list[str] | None = None) -> ShardResult:
    """Answer the rows of shard `k` that no earlier run finished, then commit the shard."""
    prompts, prompts_sha = load_prompts(cfg)
    plan_file = stage_dir(cfg) / PLAN_FILE
    planned = json.loads(plan_file.read_text())["digest"] if plan_file.is_file() else None
    if planned != answers_digest(cfg, prompts_sha):
        raise DataError(f"{plan_file}: planned for another configuration or prompts; run plan_regen first")
    size = int(cfg.regen.shard_size)
    first = k * size
    rows = prompts[first : first + size]
    if not rows:
        raise DataError(f"regenerate: shard {k} is past the {len(prompts)} prompts")
    part, errors_path, log_path = _shard_paths(cfg, k)
    if part.is_file() and not errors_path.is_file():
        return ShardResult(shard=k, rows=len(rows), failed=0)

    ids = {r["id"] for r in rows}
    answered = {r["id"]: r for r in complete_rows(part)}
    answered.update({r["id"]: r for r in complete_rows(log_path) if "error" not in r and r.get("id") in ids})
    unit = "batch" if cfg.regen.backend == "hf" else "row"  # hf seeds whole batches; see HFBackend
    todo_runs = _todo_runs(rows, answered, unit, int(cfg.regen.batch_size))
    # The log keeps exactly the answers carried over, so a torn line or a stale part batch goes now.
    write_jsonl_atomic(log_path, rows_in_order(rows, answered))
    bar = _bar.get("bar")
    if bar is not None and answered:
        bar.update(len(answered))  # the plan counted only shards committed without failures
    backend = _backend(cfg, endpoints) if todo_runs else None

    failures: dict[str, dict] = {}
    new_tokens = 0
    began = time.time()
    with log_path.open("a", encoding="utf-8") as logf:

        def emit(records: list[dict]) -> None:
            nonlocal new_tokens
            logf.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            logf.flush()
            os.fsync(logf.fileno())
            for r in records:
                if "error" in r:
                    failures[r["id"]] = r
                else:
                    answered[r["id"]] = r
                    new_tokens += r["completion_tokens"]
            if bar is not None:
                bar.update(sum("error" not in r for r in records))

        for offset, run in todo_runs:
            backend.answer(run, first + offset, emit)  # type: ignore[union-attr]
    ended = time.time()

    write_jsonl_atomic(part, rows_in_order(rows, answered))  # the commit
    if failures:
        write_jsonl_atomic(errors_path, [failures[r["id"]] for r in rows if r["id"] in failures])
    else:
        errors_path.unlink(missing_ok=True)
    log_path.unlink()
    missing = [r["id"] for r in rows if r["id"] not in answered and r["id"] not in failures]
    if missing:  # a backend that skipped a row is a bug; never commit a gap silently
        raise DataError(f"regenerate: shard {k}: no answer and no error for rows {missing[:5]}")
    log.info(
        "regenerate: shard %d committed: %d answers, %d failed", k, len(rows) - len(failures), len(failures)
    )
    return ShardResult(
        shard=k, rows=len(rows) - len(failures), failed=len(failures), new_tokens=new_tokens, began=began,
        ended=ended,
    )  # fmt: skip


def finalize_regen(cfg: DictConfig, plan: RegenPlan, results: list[ShardResult] | None = None) -> RegenResult:
    """`answers.jsonl` and `errors.jsonl` from the committed shards, then `_DONE.json`; the counts."""
    bar = _bar.pop("bar", None)
    if bar is not None:
        bar.close()
    if plan.done is not None:
        return from_record(RegenResult, plan.done, skipped=True)
    answers_file = run_paths(cfg).answers
    prompts, _ = load_prompts(cfg)
    answers: list[dict] = []
    failed: list[dict] = []
    for k in range(plan.num_shards):
        part, errors_path, _ = _shard_paths(cfg, k)
        if not part.is_file():
            raise DataError(f"regenerate: shard {k} ({part}) was never committed; run the stage again")
        answers += complete_rows(part)
        failed += complete_rows(errors_path)
    expected = [r["id"] for r in prompts]
    got = [r["id"] for r in answers]
    failed_ids = {r["id"] for r in failed}
    if got != [i for i in expected if i not in failed_ids] or len(got) + len(failed_ids) != len(expected):
        raise DataError(f"regenerate: the committed shards in {stage_dir(cfg) / SHARDS_DIR} do not cover the "
                        "prompts exactly once; delete that folder and run the stage again")  # fmt: skip
    write_jsonl_atomic(answers_file, answers)
    errors_file = stage_dir(cfg) / "errors.jsonl"
    if failed:
        write_jsonl_atomic(errors_file, failed)
    else:
        errors_file.unlink(missing_ok=True)

    timed = [r for r in results or [] if r.began is not None]
    wall = max((r.ended for r in timed), default=0.0) - min((r.began for r in timed), default=0.0)
    new_tokens = sum(r.new_tokens for r in timed)
    result = RegenResult(
        path=str(answers_file),
        prompts=len(prompts),
        rows=len(answers),
        failed=len(failed),
        output_tokens=sum(r["completion_tokens"] for r in answers),
        truncated=sum(bool(r.get("truncated")) for r in answers),
        tokens_per_s=new_tokens / wall if wall > 0 else 0.0,  # of this run's answers; kept for re-runs
        backend=str(cfg.regen.backend),
    )
    tracking.log_metrics(
        cfg,
        {
            "regen/rows": result.rows,
            "regen/failed": result.failed,
            "regen/output_tokens": result.output_tokens,
            "regen/tokens_per_s": result.tokens_per_s,
            "regen/truncated": result.truncated,
        },
    )
    if len(failed) > int(cfg.regen.allow_failures):
        raise DataError(
            f"regenerate: {len(failed)} prompts failed (listed with the reason in {errors_file}); run the "
            f"stage again to retry them, or allow them with regen.allow_failures={len(failed)}"
        )
    mark_done(stage_dir(cfg), plan.digest, **to_record(result))
    log.info(
        "regenerate: %d answers, %d tokens (%d cut at max_new_tokens), %d failed, %.1f tokens/s -> %s",
        result.rows,
        result.output_tokens,
        result.truncated,
        result.failed,
        result.tokens_per_s,
        answers_file,
    )
    return result


def regenerate(cfg: DictConfig) -> RegenResult:
    """The whole stage in this process: plan, every missing shard in turn, finalize."""
    plan = plan_regen(cfg)
    results = []
    if plan.missing:
        try:
            with serving(cfg) as endpoints:
                results = [regen_shard(cfg, k, endpoints) for k in plan.missing]
        except BaseException:
            bar = _bar.pop("bar", None)
            if bar is not None:
                bar.close()
            raise
    return finalize_regen(cfg, plan, results)


def rows_in_order(rows: list[dict], answered: dict[str, dict]) -> list[dict]:
    return [answered[r["id"]] for r in rows if r["id"] in answered]


def _todo_runs(
    rows: list[dict], answered: dict[str, dict], unit: str, batch_size: int
) -> list[tuple[int, list]]:
    """(offset in the shard, rows) to answer. By row: all unanswered rows as one run. By batch: each
    batch of `batch_size` (aligned to the shard start) with a row unanswered, whole, its answers dropped."""
    if unit == "row":
        todo = [r for r in rows if r["id"] not in answered]
        return [(0, todo)] if todo else []
    runs = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        if any(r["id"] not in answered for r in batch):
            for r in batch:
                answered.pop(r["id"], None)
            runs.append((start, batch))
    return runs


# ----------------------------------------------------------------------------------------------------
# Backends and servers


def _backend(cfg: DictConfig, endpoints: list[str] | None):
    if cfg.regen.backend == "file":
        tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
        return FileBackend(str(cfg.regen.answers_file), tokenizer, rendering_of(cfg))
    if cfg.regen.backend == "hf":
        from deepspec.tasks.cache.stage import (
            target_replica,  # one target per process, shared with the cache stage
        )

        model, tokenizer = target_replica(cfg)
        return HFBackend(
            model,
            tokenizer,
            sampling_of(cfg),
            rendering_of(cfg),
            int(cfg.regen.batch_size),
            int(cfg.regen.seed),
        )
    if not endpoints:
        raise ConfigError(
            f"regen.backend={cfg.regen.backend}: no endpoints (regen.endpoints, or launched servers)"
        )
    api = str(cfg.regen.api)
    key_env = cfg.regen.api_key_env
    settings = HTTPSettings(
        endpoints=list(endpoints),
        api=api,
        model=cfg.regen.model,
        concurrency=max(1, -(-int(cfg.regen.concurrency) // int(cfg.regen.parallel_shards))),
        max_retries=int(cfg.regen.max_retries),
        timeout_s=float(cfg.regen.request_timeout_s),
        api_key=os.environ.get(key_env) if key_env else None,
        extra_body=OmegaConf.to_container(cfg.regen.extra_body, resolve=True) or {},
    )
    tokenizer = None
    if api == "completions":
        tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
    return HTTPBackend(settings, sampling_of(cfg), rendering_of(cfg), tokenizer)


@contextlib.contextmanager
def serving(cfg: DictConfig) -> Iterator[list[str] | None]:
    """The endpoints the shards send requests to: none for `hf`, `regen.endpoints` when given, else
    `regen.replicas` vLLM servers launched here and supervised until the block ends."""
    if cfg.regen.backend in ("hf", "file"):
        yield None
        return
    if cfg.regen.endpoints:
        yield [str(e) for e in cfg.regen.endpoints]
        return
    from deepspec.tasks.vllm_server import VLLMServerPool

    gpus = cfg.regen.gpus_per_replica
    gpus = (1 if torch.cuda.is_available() else 0) if gpus is None else int(gpus)
    replicas = cfg.regen.replicas
    if replicas is None:
        replicas = max(1, torch.cuda.device_count() // gpus) if gpus else 1
    model = resolve_source(cfg.target.path, cfg.target.gguf_file)  # vLLM reads the dequantized copy
    with VLLMServerPool(
        model=model,
        replicas=int(replicas),
        gpus_per_replica=gpus,
        python=cfg.regen.vllm_python,
        seed=int(cfg.regen.seed),
        dtype=str(cfg.regen.server_dtype or cfg.target.dtype),
        max_model_len=cfg.regen.max_model_len,
        extra_args=[str(a) for a in cfg.regen.server_args],
        log_dir=stage_dir(cfg) / "servers",
    ) as pool:
        yield pool.endpoints


# ----------------------------------------------------------------------------------------------------
# Prefect tasks


@task(name="plan-regenerate", cache_policy=NO_CACHE)
def plan_regen_task(cfg: DictConfig) -> RegenPlan:
    plan = plan_regen(cfg)
    if plan.missing:
        from prefect.artifacts import create_progress_artifact

        done = plan.num_shards - len(plan.missing)
        plan.artifact_id = str(
            create_progress_artifact(
                progress=100.0 * done / plan.num_shards,
                key="regenerate-progress",
                description=f"regenerate: committed shards of {plan.num_shards}",
            )
        )
    return plan


@task(
    name="regenerate-shard",
    task_run_name="regenerate-shard-{k}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
)
def regen_shard_task(cfg: DictConfig, k: int, endpoints: list[str] | None, plan: RegenPlan) -> ShardResult:
    result = regen_shard(cfg, k, endpoints)
    if plan.artifact_id:
        from prefect.artifacts import update_progress_artifact

        committed = sum(
            _shard_paths(cfg, j)[0].is_file() and not _shard_paths(cfg, j)[1].is_file()
            for j in range(plan.num_shards)
        )
        update_progress_artifact(plan.artifact_id, progress=100.0 * committed / plan.num_shards)
    return result


@task(name="finalize-regenerate", cache_policy=NO_CACHE)
def finalize_regen_task(cfg: DictConfig, plan: RegenPlan, results: list[ShardResult]) -> RegenResult:
    result = finalize_regen(cfg, plan, results)
    artifacts.publish(cfg, "regenerate", result)
    return result


def regen_task_runner(cfg: DictConfig):
    """`regen.parallel_shards` shard tasks at once, in threads of this process; one for `hf`, whose
    batches share the process's one model and its global torch seed."""
    from prefect.task_runners import ThreadPoolTaskRunner

    workers = int(cfg.regen.parallel_shards)
    if cfg.regen.backend == "hf" and workers > 1:
        log.warning("regenerate: regen.parallel_shards=%d ignored by hf; one shard at a time", workers)
        workers = 1
    return ThreadPoolTaskRunner(max_workers=workers)
