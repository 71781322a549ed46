"""Deployments as a user runs them: `deployments/prefect.yaml`'s recipe typed as written against a real
Prefect server on 127.0.0.1 (pools, `prefect deploy --all`, a process worker), and flow runs created
through the API as the UI's Run, Cancel buttons do, on the tiny real model stories260k.

A flow run cancelled from the API, or whose process is killed outright (a dead worker, a forced
cancel), must leave no torchrun rank behind, and no lock that would stop the next launch."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from support.prefect_worker import deployed_worker, flow_run_process, processes_with, wait_for

from deepspec.models.errors import DeepSpecError
from deepspec.tasks.paths import run_paths
from deepspec.tasks.processes import exclusive
from deepspec.tasks.train.stage import LOCK_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STAGES = ("prompts", "regenerate", "cache", "train", "evaluation", "export")  # their artifacts' key prefixes


@pytest.fixture(scope="module")
def worker(prefect_server, s3_server, tmp_path_factory):
    """The recipe's worker; S3 credentials reach its flow runs as a user's would: from the environment."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path_factory.mktemp("prefect-home")
    credentials = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    with deployed_worker(PREFECT_API_URL.value(), home, credentials) as process:
        yield home / "worker.log"
        assert process.poll() is None, "the worker died during the tests"


def stories(assets_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A whole pipeline in about a minute: 12 prompts, a one-layer DFlash draft, one evaluation prompt."""
    return [
        "target=stories260k", f"target.path={assets_dir / 'models' / 'stories260k'}", f"run_dir={run_dir}",
        "prompts.source=builtin", "prompts.max_samples=12", "regen.max_new_tokens=32",
        "storage.samples_per_shard=4", "train=cpu_demo", "train.epochs=2", "algo.num_layers=1",
        "algo.block_size=4", "eval=demo", "eval.benchmarks=[gsm8k,humaneval,mt-bench]", "eval.max_samples=1",
        "eval.max_new_tokens=16", *extra,
    ]  # fmt: skip


def run_deployment(name: str, parameters: dict) -> str:
    """A flow run of deployment `name` (flow/deployment), as the UI's Run button creates it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return str(client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id)


def flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def final(flow_run_id: str, worker_log: Path, timeout_s: float = 600):
    """The flow run once its state is final (its worker's log in the failure message otherwise)."""
    try:
        return wait_for(lambda: (run := flow_run(flow_run_id)).state.is_final() and run, timeout_s,
                        f"flow run {flow_run_id} to end", every_s=1)  # fmt: skip
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- worker log ---\n{worker_log.read_text()[-4000:]}") from None


@pytest.fixture(scope="module")
def demo_run(worker, assets_dir, tmp_path_factory):
    """The demo deployment run from the API with stories260k overrides, as a user would from the UI."""
    run_dir = tmp_path_factory.mktemp("deployed")
    flow_run_id = run_deployment("deepspec-pipeline/demo", {"overrides": stories(assets_dir, run_dir)})
    return {"id": flow_run_id, "dir": run_dir, "run": final(flow_run_id, worker)}


def test_a_deployment_run_from_the_api_completes(demo_run, worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    run, run_dir = demo_run["run"], demo_run["dir"]
    assert run.state.is_completed(), f"{run.state}\n{worker.read_text()[-4000:]}"
    assert (run_dir / "export" / "dflash" / "config.json").is_file()
    results = json.loads((run_dir / "eval" / "dflash" / "results.json").read_text())
    assert results["macro"]["tau"] >= 1.0
    # every stage shows its figures on the flow run's page (the regenerate and cache stages on their
    # subflows' pages), and the MLflow run names the flow run
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
        runs = [run.id, *(child.id for child in children)]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs))
        )
    keys = {a.key for a in artifacts}
    assert {f"{stage}-dflash" for stage in STAGES} <= keys, keys
    evaluation = next(a for a in artifacts if a.key == "evaluation-dflash")
    assert (
        "| macro |" in evaluation.data
        and "report.html" in evaluation.data
        and "MLflow run" in evaluation.data
    )
    record = json.loads((run_dir / "mlflow_run-dflash.json").read_text())
    import mlflow

    tags = mlflow.MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == demo_run["id"]


def test_parameters_are_checked_before_a_run_starts(worker):
    from prefect.exceptions import PrefectHTTPStatusError

    # the deployment's schema (list[str]) rejects the run at creation, as the UI's form does
    with pytest.raises(PrefectHTTPStatusError):
        run_deployment("deepspec-pipeline/pipeline", {"overrides": "target=stories260k"})
    # a value the config rejects fails the run at once, naming it, before any stage runs
    run = final(run_deployment("deepspec-train/train", {"overrides": ["algo=nope"]}), worker, 180)
    assert run.state.is_failed()
    assert "algo" in run.state.message or "nope" in run.state.message, run.state.message


def ranks_of(run_dir: Path) -> list[int]:
    return processes_with(str(run_dir / "train" / "dflash" / "launch.yaml"))


def start_training(assets_dir: Path, demo_dir: Path, run_dir: Path, worker_log: Path) -> str:
    """A long training flow run on the demo run's data (its cache, so the demo's config): time to stop
    it while the ranks work. Returns its id once its ranks run."""
    overrides = stories(assets_dir, run_dir, f"data_dir={demo_dir / 'data'}", "train.epochs=400")
    flow_run_id = run_deployment("deepspec-train/train", {"config_name": "demo", "overrides": overrides})

    def ranks_or_end():
        if flow_run(flow_run_id).state.is_final():
            raise AssertionError(f"the training run ended early:\n{worker_log.read_text()[-4000:]}")
        return ranks_of(run_dir)

    wait_for(ranks_or_end, 300, "the training ranks to start", every_s=1)
    return flow_run_id


def assert_nothing_left(run_dir: Path) -> None:
    """No rank of the run alive a few seconds on, and its training folder free for the next launch."""
    try:
        wait_for(lambda: not ranks_of(run_dir), 20, "the ranks to exit")
    except AssertionError:
        left = ranks_of(run_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"ranks {left} outlived their flow run") from None
    wait_for(lambda: lock_free(run_dir / "train" / "dflash" / LOCK_FILE), 20, "the launch lock to be free")


def lock_free(lock: Path) -> bool:
    """Whether a launch could take the lock now (a killed process lets go once the kernel has torn it
    down, which for a large process takes a moment after its children are gone)."""
    try:
        with exclusive(lock, "the next training"):
            return True
    except DeepSpecError:
        return False


def test_a_run_cancelled_from_the_api_leaves_no_rank(demo_run, worker, assets_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    flow_run_id = start_training(assets_dir, demo_run["dir"], tmp_path, worker)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)  # the UI's Cancel
    assert final(flow_run_id, worker, 120).state.is_cancelled()
    assert_nothing_left(tmp_path)


def test_a_killed_flow_process_leaves_no_rank(demo_run, worker, assets_dir, tmp_path):
    flow_run_id = start_training(assets_dir, demo_run["dir"], tmp_path, worker)
    pid = wait_for(lambda: flow_run_process(flow_run_id), 30, "the flow run's process")
    assert pid not in ranks_of(tmp_path)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # what a dead worker or a forced cancel does: no cleanup runs
    assert_nothing_left(tmp_path)
    assert time.monotonic() - started < 20
    assert final(flow_run_id, worker, 120).state.is_final()


def test_a_failed_cache_build_retried_from_the_ui_builds_only_what_is_missing(
    demo_run, worker, assets_dir, s3_server, tmp_path
):
    """The S3 server stops after a few shards: the run fails; the UI's Retry (the same flow run set back
    to Scheduled) builds only the shards that were not committed, and every sample is there once."""
    import threading

    from fsspec.implementations.local import LocalFileSystem
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled
    from support.prefect import subflow_runs_task_states

    from deepspec.tasks.cache.format import committed_shards, iter_samples, read_manifest
    from deepspec.tasks.config import compose

    overrides = stories(
        assets_dir, tmp_path, f"data_dir={demo_run['dir'] / 'data'}", "storage=s3", "storage.url=s3://deepspec/retried",
        "storage.samples_per_shard=2", f"+storage.storage_options.endpoint_url={s3_server.endpoint_url}",
        "+storage.storage_options.config_kwargs.retries.max_attempts=1",
        "+storage.storage_options.config_kwargs.connect_timeout=2",
    )  # fmt: skip
    cfg = compose(overrides, "demo")
    served = s3_server.root / run_paths(cfg).cache_url.removeprefix("s3://")
    answers = next((demo_run["dir"] / "data" / "answers").glob("*/answers.jsonl"))
    samples = len(answers.read_text().splitlines())
    shards = -(-samples // 2)  # two samples a shard

    def committed() -> dict[str, int]:
        """{shard: modification time} of the shards the stage counts as committed (marker written)."""
        if not served.is_dir():
            return {}
        return {
            name: (served / name).stat().st_mtime_ns
            for name in committed_shards(LocalFileSystem(), str(served))
        }

    def stop_after_two() -> None:  # stop S3 as soon as two shards are committed
        wait_for(lambda: len(committed()) >= 2, 300, "two committed shards", every_s=0.01)
        s3_server.stop()

    stopper = threading.Thread(target=stop_after_two, daemon=True)
    stopper.start()
    flow_run_id = run_deployment("deepspec-cache/cache", {"config_name": "demo", "overrides": overrides})
    try:
        failed = final(flow_run_id, worker, 300)
    finally:
        stopper.join(timeout=300)
        s3_server.start()  # same directory, same port
    assert failed.state.is_failed(), failed.state
    before = committed()
    assert 2 <= len(before) < shards, f"{len(before)} of {shards} shards committed before the failure"

    with get_client(sync_client=True) as client:  # the UI's Retry
        client.set_flow_run_state(flow_run_id, Scheduled(name="AwaitingRetry"), force=True)
    retried = final(flow_run_id, worker, 300)
    assert retried.state.is_completed(), retried.state
    assert retried.run_count == 2

    after = committed()
    assert len(after) == shards
    assert {name: after[name] for name in before} == before  # shards committed before were kept as they were
    # the retry built only the missing ones. (A first-attempt task may fail after its shard was committed:
    # on S3 a rename is a copy then a delete, and the server can stop between the marker's two.)
    builds = subflow_runs_task_states(flow_run_id, "deepspec-cache-build", "build_shard")
    assert len(builds) == 2, builds
    assert sum(state == "COMPLETED" for state in builds[-1].values()) == shards - len(before), builds
    url = run_paths(cfg).cache_url
    options = s3_server.storage_options
    assert len(read_manifest(url, options).shards) == shards
    ids = [sample["sample_id"] for sample in iter_samples(url, options, verify=True)]
    assert len(ids) == len(set(ids)) == samples  # nothing lost, nothing twice
    print(f"retried cache build: {len(before)} of {shards} shards committed before S3 stopped, "
          f"{shards - len(before)} built by the retry; build_shard runs per attempt: {builds}")  # fmt: skip


def test_the_readme_gives_the_commands_these_tests_run():
    from support.prefect_worker import REPO, recipe_commands

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for argv in recipe_commands():
        assert " ".join(argv) in readme, (
            f"README.md lacks `{' '.join(argv)}` (deployments/prefect.yaml's recipe)"
        )
