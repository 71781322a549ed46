"""What a stage shows on its flow run's page in the Prefect UI: a markdown artifact with the stage's
figures (its result record, one row a field) and where its MLflow run is, so the flow run points at the
MLflow run as the MLflow run's tags (`prefect.flow_run_id`, `prefect.flow_run_url`) point back.

    publish(cfg, "train", result)   # in a stage's @task wrapper, after the stage returned

The key is `<stage>-<algo>` (`prompts-dflash`, ...), so the UI's artifact page keeps each stage's history
across runs. Outside a flow run (a stage called as a plain function) nothing is published.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from deepspec.tasks import tracking
from deepspec.tasks.results import to_record

log = logging.getLogger(__name__)


def mlflow_run_url(cfg: DictConfig) -> str | None:
    """The MLflow UI's page of the run, when the tracking store is a server (http/https)."""
    uri = tracking.tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(tracking.run_id(cfg))
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def mlflow_line(cfg: DictConfig) -> str:
    """Where the MLflow run is: a link to a server's page, or the command that opens a local store."""
    url = mlflow_run_url(cfg)
    if url is not None:
        return f"MLflow run: [{tracking.run_id(cfg)}]({url})"
    uri = tracking.tracking_uri(cfg)
    return f"MLflow run `{tracking.run_id(cfg)}` in `{uri}` (`mlflow ui --backend-store-uri {uri}`)"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "-"
    return str(value).replace("|", "\\|") if value not in (None, "") else "-"


def stage_markdown(cfg: DictConfig, stage: str, result: Any) -> str:
    """The stage's result as a two-column table, whether it ran or was skipped, and the MLflow run."""
    record = to_record(result)
    done = "skipped: its outputs were already valid" if getattr(result, "skipped", False) else "ran"
    rows = "\n".join(f"| {key} | {_cell(value)} |" for key, value in record.items())
    return (
        f"### {stage} ({cfg.algo.name} on {cfg.target.name}): {done}\n\n"
        f"| field | value |\n|---|---|\n{rows}\n\n{mlflow_line(cfg)}\n"
    )


def publish(
    cfg: DictConfig, stage: str, result: Any, markdown: str | None = None, description: str | None = None
) -> None:
    """A markdown artifact `<stage>-<algo>` on the current flow run (`markdown`, or the result's table
    with the MLflow run), and a link artifact to the MLflow run's page when there is one."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    key = f"{stage}-{cfg.algo.name}"
    create_markdown_artifact(
        markdown=markdown or stage_markdown(cfg, stage, result),
        key=key,
        description=description or f"{stage} of {cfg.target.name} ({cfg.algo.name})",
    )
    url = mlflow_run_url(cfg)
    if url is not None:
        create_link_artifact(link=url, link_text="MLflow run", key=f"mlflow-{cfg.algo.name}")
