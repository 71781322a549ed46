"""The table the pipeline ends with: the figures each stage measured, and where the run is."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.tasks import tracking
from deepspec.tasks.config import run_path
from deepspec.tasks.files import atomic_write_text


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def summary_rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    prompts, regen, cache = results["prompts"], results["regenerate"], results["cache"]
    train, evaluation, export = results["train"], results["evaluate"], results["export"]
    final = train.get("final_metrics", {})
    tokens = cache.get("tokens") or 0
    rows = [
        ("prompts", f"{_num(prompts.get('rows'))} rows ({_num(prompts.get('heldout'))} held out)"),
        (
            "regenerate",
            f"{_num(regen.get('rows'))} answers, {_num(regen.get('output_tokens'))} tokens, "
            f"{_num(regen.get('tokens_per_s'), 1)} tokens/s",
        ),
        (
            "cache",
            f"{_num(cache.get('samples'))} samples, {_num(tokens)} tokens, "
            f"{_num(cache.get('bytes', 0) / max(1, tokens), 0)} bytes/token",
        ),
        (
            "train",
            f"{_num(train.get('optimizer_steps'))} steps, loss {_num(final.get('train/loss'), 3)}, "
            f"slot-0 accuracy {_num(final.get('train/acc_slot0'), 3)}",
        ),
    ]
    source = "built-in prompts" if evaluation.get("builtin_eval") else evaluation.get("data_dir")
    rows.append(
        ("evaluate", f"block {evaluation.get('block_size')}, T={evaluation.get('temperature')}, {source}")
    )
    for name, figures in [*evaluation["benchmarks"].items(), ("overall", evaluation["overall"])]:
        acceptance = " ".join(f"{a:.2f}" for a in figures.get("acceptance", []))
        rows.append(
            (
                f"  {name}",
                f"tau {_num(figures.get('tau'))}  speedup {_num(figures.get('speedup'))}x  "
                f"greedy match {_num(figures.get('greedy_match'))}  per-position [{acceptance}]",
            )
        )
    rows.append(("export", str(export.get("path"))))
    return rows


def summarize(cfg: DictConfig, results: dict[str, dict]) -> dict[str, Any]:
    rows = summary_rows(results)
    rows += [("run directory", str(run_path(cfg).resolve())),
             ("mlflow", f"{tracking.tracking_uri(cfg)} run {tracking.run_id(cfg)}")]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
    path = run_path(cfg, "summary.txt")
    atomic_write_text(path, table + "\n")
    tracking.log_artifact(cfg, path)
    print(f"\nDeepSpec run summary\n{table}\n")
    return {"table": table, "results": results}


@task(name="summary", cache_policy=NO_CACHE)
def summary_task(cfg: DictConfig, results: dict[str, dict]) -> dict[str, Any]:
    return summarize(cfg, results)
