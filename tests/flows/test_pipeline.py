"""The whole pipeline on the tiny real model stories260k, through a real Prefect server, a real MLflow
store, the fsspec cache and DeepSpeed ranks under torchrun; then re-runs that must skip finished stages."""

from __future__ import annotations

import json
import shutil

import pytest

from deepspec.flows.pipeline import cache_flow, evaluate_flow, export_flow, pipeline, train_flow
from deepspec.models.errors import CacheMismatchError
from deepspec.tasks.config import compose
from deepspec.tasks.export import validate_dflash_export

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(assets_dir, prefect_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    overrides = [
        "target=stories260k",
        f"target.path={assets_dir / 'models' / 'stories260k'}",
        f"run_dir={run_dir}",
        "prompts.source=builtin",
        "prompts.max_samples=12",
        "regen.max_new_tokens=32",
        "storage.samples_per_shard=4",
        "algo.num_layers=1",
        "algo.block_size=4",
        "train=cpu_demo",
        "train.epochs=8",
        "eval=demo",
        "eval.max_samples=1",
        "eval.max_new_tokens=16",
    ]
    summary = pipeline(overrides=overrides)
    return {"dir": run_dir, "overrides": overrides, "summary": summary}


def test_every_stage_leaves_validated_outputs(run):
    d = run["dir"]
    assert len((d / "prompts" / "prompts.jsonl").read_text().splitlines()) == 12
    assert len((d / "regen" / "answers.jsonl").read_text().splitlines()) == 12
    manifest = json.loads((d / "cache" / "manifest.json").read_text())
    assert manifest["layer_ids"] == [0, 2, 4] and manifest["num_samples"] == 12
    assert validate_dflash_export(d / "export" / "dflash") == []
    assert "tau" in run["summary"]["table"] and "mlflow" in run["summary"]["table"]


def test_greedy_speculative_output_equals_target_output(run):
    results = json.loads((run["dir"] / "eval" / "results.json").read_text())
    assert results["temperature"] == 0.0 and results["builtin_eval"] is True
    assert results["overall"]["greedy_match"] == 1.0
    assert 1.0 <= results["overall"]["tau"] <= results["block_size"] + 1
    assert set(results["benchmarks"]) == set(compose().eval.benchmarks)


def test_all_stages_log_to_one_mlflow_run(run):
    from mlflow.tracking import MlflowClient

    record = json.loads((run["dir"] / "mlflow_run.json").read_text())
    run_data = MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data
    metrics = run_data.metrics
    stage_keys = ["prompts/rows", "regen/output_tokens", "cache/bytes_per_token", "train/loss"]
    for key in [*stage_keys, "eval/overall/tau"]:
        assert key in metrics, key


def test_flow_run_is_recorded_by_the_prefect_server(run):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        names = {client.read_flow(r.flow_id).name: r.state.type.value for r in runs}
    assert names.get("deepspec-pipeline") == "COMPLETED"


def test_rerun_skips_finished_stages(run):
    draft = run["dir"] / "train" / "draft" / "model.safetensors"
    before = draft.stat().st_mtime_ns
    summary = pipeline(overrides=run["overrides"])
    results = summary["results"]
    for stage in ("prompts", "regenerate", "cache", "train", "export"):
        assert results[stage].get("skipped") is True, stage
    assert draft.stat().st_mtime_ns == before


def test_a_stage_reruns_alone(run):
    shutil.rmtree(run["dir"] / "export")
    record = export_flow(overrides=run["overrides"])
    assert record.get("skipped") is not True
    assert validate_dflash_export(run["dir"] / "export" / "dflash") == []


def test_cache_for_other_layers_is_refused(run):
    with pytest.raises(CacheMismatchError, match="layer_ids"):
        cache_flow(overrides=[*run["overrides"], "target.layer_ids=[1,3]"])


def test_two_deepspeed_ranks_train_from_the_same_cache(run, tmp_path):
    overrides = [
        *run["overrides"],
        f"run_dir={tmp_path}",
        f"storage.url={run['dir'] / 'cache'}",
        "train.nproc_per_node=2",
        "train.threads_per_rank=1",
        "train.micro_batch=2",
        "train.global_batch=8",
        "train.epochs=2",
    ]
    record = train_flow(overrides=overrides)
    assert record["optimizer_steps"] >= 1
    assert (tmp_path / "train" / "draft" / "model.safetensors").is_file()


def test_cache_stage_ran_one_task_per_shard(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    def named(name: str) -> FlowFilter:
        return FlowFilter(name=FlowFilterName(any_=[name]))

    with get_client(sync_client=True) as client:
        first = client.read_flow_runs(
            flow_filter=named("deepspec-pipeline"), sort=FlowRunSort.START_TIME_ASC
        )[0]
        children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id]))
        (build,) = client.read_flow_runs(flow_run_filter=children, flow_filter=named("deepspec-cache-build"))
        in_build = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[build.id]))
        runs = {r.name: r.state.type.value for r in client.read_task_runs(task_run_filter=in_build)}
    shard_runs = {name: state for name, state in runs.items() if name.startswith("build_shard")}
    assert shard_runs == {f"build_shard-{k}": "COMPLETED" for k in range(3)}  # 12 samples, 4 per shard
    assert sum(name.startswith(("plan_cache", "finalize_cache")) for name in runs) == 2


def test_online_mode_trains_without_a_cache(run, tmp_path):
    shutil.copytree(run["dir"] / "regen", tmp_path / "regen")
    overrides = [*run["overrides"], f"run_dir={tmp_path}", "storage.mode=online", "train.epochs=1"]
    assert cache_flow(overrides=overrides)["mode"] == "online"
    assert not (tmp_path / "cache").exists()
    record = train_flow(overrides=overrides)
    assert record["cache_fingerprint"].startswith("answers-")
    assert (tmp_path / "train" / "draft" / "model.safetensors").is_file()


def test_eagle3_trains_evaluates_and_exports_from_the_same_cache(run, tmp_path):
    """Eagle3 on the pipeline's cache: its layers 0, 2, 4 are Eagle3's three, and layer 4, the target's
    last, is recorded normalised, so the teacher is the cached feature through the LM head."""
    from deepspec.models.drafts.eagle3 import validate_eagle3_export

    overrides = [
        *run["overrides"],
        f"run_dir={tmp_path}",
        f"storage.url={run['dir'] / 'cache'}",
        "algo=eagle3",
        "algo.block_size=3",
        "algo.draft_vocab_size=128",
        "train.epochs=4",
    ]
    record = train_flow(overrides=overrides)
    assert record["optimizer_steps"] >= 1 and record["final_metrics"]["train/loss"] > 0
    results = evaluate_flow(overrides=overrides)
    assert results["algo"] == "eagle3" and results["block_size"] == 3
    assert results["overall"]["greedy_match"] == 1.0
    assert export_flow(overrides=overrides)["architecture"] == "LlamaForCausalLMEagle3"
    assert validate_eagle3_export(tmp_path / "export" / "eagle3") == []


def test_dspark_recomputes_its_teacher_from_a_cache_of_earlier_layers(run, tmp_path):
    """DSpark from a cache of layers 0..2: the teacher runs the target's layers 3 and 4 on layer 2."""
    from deepspec.models.drafts.dspark import validate_dspark_export

    shutil.copytree(run["dir"] / "regen", tmp_path / "regen")
    overrides = [
        *run["overrides"],
        f"run_dir={tmp_path}",
        "target.layer_ids=[0,1,2]",
        "algo=dspark",
        "algo.markov_rank=32",
        "train.epochs=4",
    ]
    assert cache_flow(overrides=overrides)["samples"] == 12
    record = train_flow(overrides=overrides)
    assert record["final_metrics"]["train/l1"] > 0 and "train/expected_tau_accept" in record["final_metrics"]
    results = evaluate_flow(overrides=overrides)
    assert results["algo"] == "dspark" and results["overall"]["greedy_match"] == 1.0
    assert export_flow(overrides=overrides)["architecture"] == "Qwen3DSparkModel"
    assert validate_dspark_export(tmp_path / "export" / "dspark") == []
