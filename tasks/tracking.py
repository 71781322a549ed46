"""MLflow tracking: every stage of a run and algorithm logs to one MLflow run.

The run id is kept in `<run_dir>/mlflow_run-<algo>.json`, so a stage re-run alone joins the same run,
and the algorithms trained in one run directory each have theirs (their parameters differ). The client
is used explicitly with that id (not MLflow's thread-local active run), so Prefect threads and training
subprocesses can all log to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from deepspec.tasks import secrets
from deepspec.tasks.paths import run_paths


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def run_id(cfg: DictConfig) -> str:
    """The run's MLflow run id, created (with the resolved config logged) on first use."""
    record = run_paths(cfg).mlflow_record
    uri = tracking_uri(cfg)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == uri:
            return saved["run_id"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:  # the default store keeps its artifacts beside it, not in ./mlruns of whatever the cwd is
        location = None if cfg.tracking.uri else (Path(cfg.run_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=f"{Path(cfg.run_dir).name}/{cfg.algo.name}")
    flat = _flatten(secrets.redacted_params(cfg))  # references, never their values
    params = [Param(key, str(value)[:6000]) for key, value in flat.items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}))
    return run.info.run_id


@contextmanager
def tracked(cfg: DictConfig) -> Iterator[str]:
    """The run for the length of a flow: RUNNING while it runs, then FINISHED, or FAILED when the flow
    raises (a re-run sets it RUNNING again). Tagged with the Prefect flow run it belongs to, when there
    is one, so the MLflow run links back to the Prefect UI."""
    client, rid = MlflowClient(tracking_uri(cfg)), run_id(cfg)
    client.update_run(rid, status="RUNNING")
    from prefect.runtime import flow_run

    if flow_run.id:
        client.set_tag(rid, "prefect.flow_run_id", str(flow_run.id))
    if flow_run.ui_url:  # None without a UI (PREFECT_UI_URL unset)
        client.set_tag(rid, "prefect.flow_run_url", str(flow_run.ui_url))
    try:
        yield rid
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")


def log_metrics(cfg: DictConfig, metrics: dict[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
    MlflowClient(tracking_uri(cfg)).log_batch(run_id(cfg), metrics=batch)


def log_artifact(cfg: DictConfig, path: Path, artifact_path: str | None = None) -> None:
    MlflowClient(tracking_uri(cfg)).log_artifact(run_id(cfg), str(path), artifact_path)


def register_model_version(cfg: DictConfig, artifact_path: str, tags: dict[str, str]) -> str:
    """The run's artifact at `artifact_path` (an export) as a new version of the registered model
    `deepspec-<target>-<algo>` in MLflow's model registry, tagged; returns the version number."""
    from mlflow.exceptions import MlflowException

    client, rid = MlflowClient(tracking_uri(cfg)), run_id(cfg)
    name = model_name(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DeepSpec drafts, exported for serving engines")
    source = f"{client.get_run(rid).info.artifact_uri}/{artifact_path}"
    return str(client.create_model_version(name, source, run_id=rid, tags=tags).version)


def model_name(cfg: DictConfig) -> str:
    """The registered model every export of this target and algorithm is a version of."""
    return f"deepspec-{cfg.target.name}-{cfg.algo.name}"


def model_version_of(cfg: DictConfig, weights_sha256: str) -> str | None:
    """The newest version this run registered of the draft with these weights (None: none)."""
    client = MlflowClient(tracking_uri(cfg))
    query = f"name = '{model_name(cfg)}' and run_id = '{run_id(cfg)}'"
    found = [v for v in client.search_model_versions(query) if v.tags.get("weights_sha256") == weights_sha256]
    return str(max(found, key=lambda v: int(v.version)).version) if found else None


def set_model_alias(cfg: DictConfig, alias: str, version: str) -> None:
    """Point the registered model's `alias` at `version`, moving it from the version it named."""
    MlflowClient(tracking_uri(cfg)).set_registered_model_alias(model_name(cfg), alias, version)


def tag_model_version(cfg: DictConfig, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient(tracking_uri(cfg))
    for key, value in tags.items():
        client.set_model_version_tag(model_name(cfg), version, key, value)


def set_tags(cfg: DictConfig, tags: dict[str, str]) -> None:
    client = MlflowClient(tracking_uri(cfg))
    for key, value in tags.items():
        client.set_tag(run_id(cfg), key, value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}
