"""Prefect flows: the whole pipeline, and one flow per stage so a failed stage can be re-run alone.

Flows take Hydra overrides (plain strings) rather than a config object, so deployments and the UI can
pass them as parameters; each flow composes the config once and only sequences tasks. Every task checks
its own outputs first and skips work that is already done and valid.
"""

from __future__ import annotations

from prefect import flow

from deepspec.tasks.cache import cache_task
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate import evaluate_task
from deepspec.tasks.export import export_task
from deepspec.tasks.prompts import prompts_task
from deepspec.tasks.regenerate import regenerate_task
from deepspec.tasks.summary import summary_task
from deepspec.tasks.train import train_task


@flow(name="deepspec-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """prompts -> regenerate -> cache -> train -> evaluate -> export, then a summary of the figures."""
    cfg = compose(overrides, config_name)
    results = {
        "prompts": prompts_task(cfg),
        "regenerate": regenerate_task(cfg),
        "cache": cache_task(cfg),
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
    return cache_task(compose(overrides, config_name))


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
