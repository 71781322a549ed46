"""Prefect flows: the whole pipeline, and one flow per stage so a failed stage can be re-run alone.

Flows take Hydra overrides (plain strings) rather than a config object, so deployments and the UI can
pass them as parameters; each flow composes the config once and only sequences tasks. Every task checks
its own outputs first and skips work that is already done and valid.

The regenerate and cache stages are subflows of their own, one task per shard, so that a failed shard
re-runs alone: `deepspec-regenerate-shards` (plan, one `regenerate-shard` task per missing shard of
prompts, `regen.parallel_shards` at a time, against the servers `serving` provides, then finalize) and
`deepspec-cache-build` (plan, one `build_shard` task per missing shard on the task runner
`storage.task_runner` selects: threads here, or a Dask cluster spanning machines, then finalize).

`retrain` is the pipeline, then the release step (`tasks/release.py`): what a schedule runs, releasing
the new draft into `release.dir` only when it beats the released one.

Every flow holds the run's MLflow run open while it runs and ends it FINISHED or FAILED with the flow,
tagged with the Prefect flow run's id and URL (`tracking.tracked`).
"""

from __future__ import annotations

from omegaconf import DictConfig
from prefect import flow, unmapped
from prefect.futures import wait

from deepspec.models.errors import ConfigError
from deepspec.tasks import tracking
from deepspec.tasks.cache.stage import (
    build_shard_task,
    cache_task_runner,
    finalize_cache_task,
    plan_cache_task,
)
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.stage import evaluate_task
from deepspec.tasks.export import export_task
from deepspec.tasks.prompts import prompts_task
from deepspec.tasks.regenerate.stage import (
    finalize_regen_task,
    plan_regen_task,
    regen_shard_task,
    regen_task_runner,
    serving,
)
from deepspec.tasks.release import release_task
from deepspec.tasks.results import (
    CacheResult,
    EvalResult,
    ExportResult,
    PipelineResult,
    PromptsResult,
    RegenResult,
    ReleaseResult,
    TrainResult,
)
from deepspec.tasks.summary import summary_task
from deepspec.tasks.train.stage import train_task


# Subflows take the composed config, not overrides: they run only inside the flows below.
@flow(name="deepspec-regenerate-shards", validate_parameters=False)
def regen_shards_flow(cfg: DictConfig) -> RegenResult:
    """plan -> one regenerate-shard task per missing shard (servers up meanwhile) -> answers.jsonl."""
    plan = plan_regen_task(cfg)
    results = []
    if plan.missing:
        with serving(cfg) as endpoints:
            shards = regen_shard_task.map(unmapped(cfg), plan.missing, unmapped(endpoints), unmapped(plan))
            wait(shards)  # every shard finishes (and commits) before a failure is raised
            results = [shard.result() for shard in shards]
    return finalize_regen_task(cfg, plan, results)


def regenerate_stage(cfg: DictConfig) -> RegenResult:
    return regen_shards_flow.with_options(task_runner=regen_task_runner(cfg))(cfg)


@flow(name="deepspec-cache-build", validate_parameters=False)
def cache_build_flow(cfg: DictConfig) -> CacheResult:
    """plan -> one build_shard task per missing shard, all submitted at once -> manifest."""
    plan = plan_cache_task(cfg)
    shards = build_shard_task.map(unmapped(cfg), plan.missing)
    wait(shards)  # every shard finishes (and commits) before a failure is raised
    for shard in shards:
        shard.result()
    return finalize_cache_task(cfg, plan)


def build_cache_stage(cfg: DictConfig) -> CacheResult:
    """The cache stage: `cache_build_flow` on the task runner the storage config asks for."""
    return cache_build_flow.with_options(task_runner=cache_task_runner(cfg))(cfg)


def _stages(cfg: DictConfig) -> PipelineResult:
    return PipelineResult(
        prompts=prompts_task(cfg),
        regenerate=regenerate_stage(cfg),
        cache=build_cache_stage(cfg),
        train=train_task(cfg),
        evaluate=evaluate_task(cfg),
        export=export_task(cfg),
    )


@flow(name="deepspec-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, config_name: str = "config") -> PipelineResult:
    """prompts -> regenerate -> cache -> train -> evaluate -> export, then a summary of the figures.
    The config is composed and checked first, so a bad value fails before any stage runs."""
    cfg = compose(overrides, config_name)
    with tracking.tracked(cfg):
        return summary_task(cfg, _stages(cfg))


@flow(name="deepspec-retrain", log_prints=True)
def retrain(overrides: list[str] | None = None, config_name: str = "config") -> ReleaseResult:
    """What a schedule runs: the pipeline (only what is new is answered and cached; training runs again
    when the data or the released draft it starts from changed), then the release step, which promotes
    the export into `release.dir` only when its macro tau beats the released draft's by the margin."""
    cfg = compose(overrides, config_name)
    if cfg.release.dir is None:
        raise ConfigError("retrain releases into release.dir, which is null: set release.dir=PATH")
    with tracking.tracked(cfg):
        summary_task(cfg, _stages(cfg))
        return release_task(cfg)


def _tracked(stage, cfg: DictConfig):
    """A stage flow's one stage, inside the run's MLflow lifecycle (`tracking.tracked`)."""
    with tracking.tracked(cfg):
        return stage(cfg)


@flow(name="deepspec-prompts")
def prompts_flow(overrides: list[str] | None = None, config_name: str = "config") -> PromptsResult:
    return _tracked(prompts_task, compose(overrides, config_name))


@flow(name="deepspec-regenerate")
def regenerate_flow(overrides: list[str] | None = None, config_name: str = "config") -> RegenResult:
    return _tracked(regenerate_stage, compose(overrides, config_name))


@flow(name="deepspec-cache")
def cache_flow(overrides: list[str] | None = None, config_name: str = "config") -> CacheResult:
    return _tracked(build_cache_stage, compose(overrides, config_name))


@flow(name="deepspec-train")
def train_flow(overrides: list[str] | None = None, config_name: str = "config") -> TrainResult:
    return _tracked(train_task, compose(overrides, config_name))


@flow(name="deepspec-evaluate")
def evaluate_flow(overrides: list[str] | None = None, config_name: str = "config") -> EvalResult:
    return _tracked(evaluate_task, compose(overrides, config_name))


@flow(name="deepspec-export")
def export_flow(overrides: list[str] | None = None, config_name: str = "config") -> ExportResult:
    return _tracked(export_task, compose(overrides, config_name))


STAGE_FLOWS = {
    "prompts": prompts_flow,
    "regenerate": regenerate_flow,
    "cache": cache_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "export": export_flow,
}
