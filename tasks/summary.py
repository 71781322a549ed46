"""The table the pipeline ends with: the figures each stage measured, and where the run is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.tasks import tracking
from deepspec.tasks.files import atomic_write_text
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import PipelineResult


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def summary_rows(r: PipelineResult) -> list[tuple[str, str]]:
    final, cache, evaluation = r.train.final_metrics, r.cache, r.evaluate
    tokens = cache.tokens or 0
    rows = [
        ("prompts", f"{_num(r.prompts.rows)} rows ({_num(r.prompts.heldout)} held out)"),
        (
            "regenerate",
            f"{_num(r.regenerate.rows)} answers, {_num(r.regenerate.output_tokens)} tokens, "
            f"{_num(r.regenerate.tokens_per_s, 1)} tokens/s",
        ),
        (
            "cache",
            f"{_num(cache.samples)} samples, {_num(tokens)} tokens, "
            f"{_num(cache.bytes / max(1, tokens), 0)} bytes/token"
            if cache.mode == "cached"
            else "none (storage.mode=online: the target ran inside training)",
        ),
        (
            "train",
            f"{_num(r.train.optimizer_steps)} steps, loss {_num(final.get('train/loss'), 3)}, "
            f"slot-0 accuracy {_num(final.get('train/acc_slot0'), 3)}",
        ),
    ]
    source = "built-in prompts" if evaluation.builtin_eval else evaluation.data_dir
    drafts = f"{evaluation.num_draft_tokens} drafts a round"
    rows.append(("evaluate", f"{drafts}, T={evaluation.temperature}, {source}"))
    for name, figures in [*evaluation.benchmarks.items(), ("overall", evaluation.overall)]:
        acceptance = " ".join(f"{a:.2f}" for a in figures.acceptance)
        rows.append(
            (
                f"  {name}",
                f"tau {_num(figures.tau)}  speedup {_num(figures.speedup)}x  "
                f"greedy match {_num(figures.greedy_match)}  per-position [{acceptance}]",
            )
        )
    rows.append(("export", r.export.path))
    return rows


def summarize(cfg: DictConfig, results: PipelineResult) -> PipelineResult:
    paths = run_paths(cfg)
    rows = summary_rows(results)
    rows += [
        ("run directory", str(Path(paths.run_dir).resolve())),
        ("data directory", str(Path(paths.data_dir).resolve())),
        ("mlflow", f"{tracking.tracking_uri(cfg)} run {tracking.run_id(cfg)}"),
    ]
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
    atomic_write_text(paths.summary, table + "\n")
    tracking.log_artifact(cfg, paths.summary)
    print(f"\nDeepSpec run summary ({cfg.algo.name})\n{table}\n")
    return replace(results, table=table)


@task(name="summary", cache_policy=NO_CACHE)
def summary_task(cfg: DictConfig, results: PipelineResult) -> PipelineResult:
    return summarize(cfg, results)
