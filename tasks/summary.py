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
from deepspec.tasks.results import PipelineResult, ServingFigures


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _rates(values: list[float | None]) -> str:
    return "[" + " ".join("-" if v is None else f"{v:.2f}" for v in values) + "]"


def _eval_row(f) -> str:
    """tau, #propose (drafts + the target's token), verify rate, speedup, accept@k, conditional rate."""
    greedy = "" if getattr(f, "greedy_match", None) is None else f"  greedy match {_num(f.greedy_match)}"
    return (
        f"tau {_num(f.tau)}  #propose {_num(f.propose)}+1  verify {_num(f.verify_rate)}  "
        f"speedup {_num(f.speedup)}x{greedy}  accept@k {_rates(f.accept_at)}  "
        f"conditional {_rates(f.conditional_acceptance)}"
    )


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
            + (f", {_num(cache.heldout_samples)} held out" if cache.heldout_samples else "")
            if cache.mode == "cached"
            else "none (storage.mode=online: the target ran inside training)",
        ),
        (
            "train",
            f"{_num(r.train.optimizer_steps)} steps, loss {_num(final.get('train/loss'), 3)}, "
            f"slot-0 accuracy {_num(final.get('train/acc_slot0'), 3)}"
            + (
                f"; best validation at step {r.train.best['step']} ({r.train.best['metric']} "
                f"{_num(r.train.best['value'], 3)})"
                if r.train.best
                else ""
            ),
        ),
    ]
    source = "built-in prompts" if evaluation.builtin_eval else evaluation.data_dir
    drafts = f"{evaluation.num_draft_tokens} drafts a round"
    rows.append(("evaluate", f"{drafts}, T={evaluation.temperature}, {source}"))
    groups = [
        *evaluation.benchmarks.items(),
        *((f"{domain} (macro)", f) for domain, f in evaluation.domains.items()),
        ("macro", evaluation.macro),
        ("pooled (micro)", evaluation.pooled),
    ]
    for name, figures in groups:
        rows.append((f"  {name}", _eval_row(figures)))
        confidence = getattr(figures, "confidence", None)
        if confidence is not None and name.startswith("pooled"):
            rows.append(
                (
                    "    confidence",
                    f"mean c_k {_rates(confidence.mean)}  "
                    f"predicted prefix {_rates(confidence.predicted_prefix)}  "
                    f"observed {_rates(confidence.observed_prefix)}  "
                    f"{_num(figures.stopped_early)} rounds stopped early",
                )
            )
    if evaluation.serving is not None:
        rows.append(("  serving (sim.)", _serving_row(evaluation.serving)))
    rows.append(("export", r.export.path))
    return rows


def _serving_row(serving: ServingFigures) -> str:
    """The best policy at each simulated concurrency, and its tokens/s over plain decoding's (the report
    has every policy)."""
    cells = []
    for row in serving.rows:
        name, _ = serving.best(row)
        gain = "" if name == "plain" else f" {_num(serving.best_over_plain(row))}x"
        cells.append(f"{row['concurrency']}: {name}{gain}")
    return "best policy by concurrent requests: " + ", ".join(cells)


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
