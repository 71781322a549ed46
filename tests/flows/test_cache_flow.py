"""The cache stage as Prefect tasks on a real Prefect server: one `build_shard` task run per missing shard,
on threads or on a Dask cluster, and the task runner chosen by the storage config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.prefect import subflow_task_runs
from support.stories import STORIES, stories_overrides, write_answers

from deepspec.flows.pipeline import cache_flow
from deepspec.models.errors import ConfigError
from deepspec.tasks.cache.format import read_manifest, shard_name
from deepspec.tasks.cache.stage import cache_task_runner
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths


def overrides(assets_dir: Path, run_dir: Path, tracking_uri: str, *extra: str) -> list[str]:
    """A stories260k run with its answers written: five stories, two a shard, so three shards."""
    args = stories_overrides(assets_dir, run_dir, f"tracking.uri={tracking_uri}", *extra)
    write_answers(args)
    return args


def build_shard_runs(parent_flow_run_id) -> dict[str, str]:
    return subflow_task_runs(parent_flow_run_id, "deepspec-cache-build", "build_shard")


@pytest.mark.integration
def test_each_missing_shard_is_one_task_run(assets_dir, prefect_server, tracking_uri, tmp_path):
    args = overrides(assets_dir, tmp_path, tracking_uri, "storage.build_workers=2")
    state = cache_flow(overrides=args, return_state=True)
    assert state.result().shards_built == 3
    runs = build_shard_runs(state.state_details.flow_run_id)
    assert runs == {f"build_shard-{k}": "COMPLETED" for k in range(3)}

    root = Path(run_paths(compose(args)).cache_url)  # lose one shard: the next run has one shard task
    for name in (shard_name(1), shard_name(1) + ".committed", "manifest.json"):
        (root / name).unlink()
    state = cache_flow(overrides=args, return_state=True)
    assert state.result().shards_built == 1
    assert build_shard_runs(state.state_details.flow_run_id) == {"build_shard-1": "COMPLETED"}
    assert read_manifest(str(root)).num_samples == len(STORIES)


@pytest.mark.integration
def test_shard_tasks_run_on_a_dask_cluster(assets_dir, prefect_server, tracking_uri, tmp_path):
    pytest.importorskip("prefect_dask", reason="storage.task_runner=dask needs pip install deepspec[dask]")
    from distributed import LocalCluster

    # An in-process cluster stands in for `dask scheduler` + `dask worker` on other machines.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        args = overrides(
            assets_dir,
            tmp_path,
            tracking_uri,
            "storage.task_runner=dask",
            f"storage.dask_address={cluster.scheduler_address}",
        )
        state = cache_flow(overrides=args, return_state=True)
    assert state.result().shards_built == 3
    assert build_shard_runs(state.state_details.flow_run_id) == {
        f"build_shard-{k}": "COMPLETED" for k in range(3)
    }


def test_task_runner_follows_the_storage_config(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = cache_task_runner(compose(["storage.build_workers=3"]))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    with pytest.raises(ConfigError, match="storage.task_runner='ray': expected one of"):
        compose(["storage.task_runner=ray"])
    with pytest.raises(ConfigError, match="needs storage.task_runner=dask"):
        compose(["storage.dask_address=tcp://10.0.0.1:8786"])
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if the [dask] extra were not installed
    with pytest.raises(ConfigError, match=r"pip install deepspec\[dask\]"):
        cache_task_runner(compose(["storage.task_runner=dask"]))
