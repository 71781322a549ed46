"""Prefect flows: the whole pipeline, and one flow per stage so a failed stage can be re-run alone.

Flows take Hydra overrides (plain strings) rather than a config object, so deployments and the UI can
pass them as parameters; each flow composes the config once and only sequences tasks. Every task checks
its own outputs first and skips work that is already done and valid.

The cache stage is a subflow of its own, `deepspec-cache-build`: one `plan_cache` task, one
`build_shard` task per missing shard on the task runner `storage.task_runner` selects (threads here, or a
Dask cluster spanning machines), then `finalize_cache`.
"""

from __future__ import annotations

from omegaconf import DictConfig
from prefect import flow, unmapped
from prefect.futures import wait

from deepspec.tasks.cache import (
    build_shard_task,
    cache_task_runner,
    finalize_cache_task,
    plan_cache_task,
)
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate import evaluate_task
from deepspec.tasks.export import export_task
from deepspec.tasks.prompts import prompts_task
from deepspec.tasks.regenerate import regenerate_task
from deepspec.tasks.summary import summary_task
from deepspec.tasks.train import train_task


# Takes the composed config, not overrides: it runs only as a subflow of `pipeline` and `cache_flow`.
@flow(name="deepspec-cache-build", validate_parameters=False)
def cache_build_flow(cfg: DictConfig) -> dict:
    """plan -> one build_shard task per missing shard, all submitted at once -> manifest."""
    plan = plan_cache_task(cfg)
    shards = build_shard_task.map(unmapped(cfg), plan.missing)
    wait(shards)  # every shard finishes (and commits) before a failure is raised
    for shard in shards:
        shard.result()
    return finalize_cache_task(cfg, plan)


def build_cache_stage(cfg: DictConfig) -> dict:
    """The cache stage: `cache_build_flow` on the task runner the storage config asks for."""
    return cache_build_flow.with_options(task_runner=cache_task_runner(cfg))(cfg)


@flow(name="deepspec-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """prompts -> regenerate -> cache -> train -> evaluate -> export, then a summary of the figures."""
    cfg = compose(overrides, config_name)
    results = {
        "prompts": prompts_task(cfg),
        "regenerate": regenerate_task(cfg),
        "cache": build_cache_stage(cfg),
        "train": train_task(cfg),
        "evaluate": evaluate_task(cfg),
        "export": export_task(cfg),
    }
    return summary_task(cfg, results)


@flow(name="deepspec-prompts")
def prompts_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return prompts_task(compose(overrides, config_name))


@flow(name="deepspec-regenerate")
def regenerate_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return regenerate_task(compose(overrides, config_name))


@flow(name="deepspec-cache")
def cache_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return build_cache_stage(compose(overrides, config_name))


@flow(name="deepspec-train")
def train_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return train_task(compose(overrides, config_name))


@flow(name="deepspec-evaluate")
def evaluate_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return evaluate_task(compose(overrides, config_name))


@flow(name="deepspec-export")
def export_flow(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    return export_task(compose(overrides, config_name))


STAGE_FLOWS = {
    "prompts": prompts_flow,
    "regenerate": regenerate_flow,
    "cache": cache_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "export": export_flow,
}
