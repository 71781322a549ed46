"""The whole pipeline on the tiny real model stories260k, through a real Prefect server, a real MLflow
store, the fsspec cache and DeepSpeed ranks under torchrun; then the other algorithms in the same run,
which reuse its prompts, answers and cache, and re-runs that must skip finished stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deepspec.flows.pipeline import cache_flow, evaluate_flow, export_flow, pipeline, train_flow
from deepspec.models.drafts import DRAFTS
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# each algorithm small enough for a CPU; DSpark from a cache of layers 0..2, so its teacher runs the
# target's layers 3 and 4 on layer 2 (DFlash and Eagle3 share the cache of layers 0, 2, 4)
ALGOS = {
    "dflash": ["algo.num_layers=1", "algo.block_size=4"],
    "eagle3": ["algo=eagle3", "algo.ttt_steps=3", "algo.draft_vocab_size=128", "train.epochs=4"],
    "dspark": ["algo=dspark", "algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=32",
               "train.epochs=4", "target.layer_ids=[0,1,2]"],
}  # fmt: skip


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
        "train=cpu_demo",
        "train.epochs=8",
        "eval=demo",
        "eval.max_samples=1",
        "eval.max_new_tokens=16",
    ]
    summary = pipeline(overrides=[*overrides, *ALGOS["dflash"]])
    return {
        "dir": run_dir,
        "base": overrides,
        "overrides": [*overrides, *ALGOS["dflash"]],
        "summary": summary,
    }


class Work:
    """Counts the work the stages do, not what they skip: prompts loaded, shards answered, cache shards
    built, training launches, targets loaded to evaluate, exports written."""

    def __init__(self, monkeypatch):
        import deepspec.tasks.cache.stage as cache
        import deepspec.tasks.evaluate.stage as evaluate
        import deepspec.tasks.export as export
        import deepspec.tasks.prompts as prompts
        import deepspec.tasks.regenerate.stage as regenerate
        import deepspec.tasks.train.stage as train

        self.calls: dict[str, int] = {}
        for name, module, function in [
            ("prompts", prompts, "load_conversations"),
            ("regenerate", regenerate, "regen_shard"),
            ("cache", cache, "build_shard"),
            ("train", train, "launch_ranks"),
            ("evaluate", evaluate, "load_target"),
            ("export", export, "write_export"),
        ]:
            monkeypatch.setattr(module, function, self._counted(name, getattr(module, function)))

    def _counted(self, name, function):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        calls, self.calls = self.calls, {}
        return calls


@pytest.fixture(scope="module")
def all_algos(run):
    """Eagle3 and DSpark through the whole pipeline in the same run directory, then DFlash again, with
    the work each did counted."""
    with pytest.MonkeyPatch.context() as patch:
        work = Work(patch)
        summaries, done = {}, {}
        for algo in ("eagle3", "dspark"):
            summaries[algo] = pipeline(overrides=[*run["base"], *ALGOS[algo]])
            done[algo] = work.take()
        again = pipeline(overrides=run["overrides"])
        done["dflash again"] = work.take()
    return {"summaries": summaries, "again": again, "work": done}


def test_every_stage_leaves_validated_outputs(run):
    paths = run_paths(compose(run["overrides"]))
    assert paths.prompts_dir.parent == run["dir"] / "data" / "prompts"
    assert len(paths.prompts.read_text().splitlines()) == 12
    assert len(paths.answers.read_text().splitlines()) == 12
    manifest = json.loads((Path(paths.cache_url) / "manifest.json").read_text())
    assert manifest["layer_ids"] == [0, 2, 4] and manifest["num_samples"] == 12
    assert paths.export_dir == run["dir"] / "export" / "dflash"
    assert DRAFTS["dflash"].validate_export(paths.export_dir) == []
    assert "tau" in run["summary"].table and "mlflow" in run["summary"].table
    assert "best policy by concurrent requests: 1: " in run["summary"].table


def test_greedy_speculative_output_equals_target_output(run):
    results = run["summary"].evaluate
    assert results.temperature == 0.0 and results.builtin_eval is True
    assert results.pooled.greedy_match == 1.0
    assert 1.0 <= results.pooled.tau <= results.num_draft_tokens + 1
    assert set(results.benchmarks) == set(compose().eval.benchmarks)
    on_disk = json.loads((run["dir"] / "eval" / "dflash" / "results.json").read_text())
    assert on_disk["pooled"]["tau"] == results.pooled.tau


def test_all_stages_log_to_the_runs_mlflow_run(run):
    from mlflow.tracking import MlflowClient

    record = json.loads((run["dir"] / "mlflow_run-dflash.json").read_text())
    run_data = MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data
    metrics = run_data.metrics
    stage_keys = [
        "prompts/rows",
        "regen/output_tokens",
        "cache/bytes_per_token",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/samples_per_s",
        "train/peak_memory_mb",
        "train/acc_slot0",
    ]
    for key in [*stage_keys, "eval/pooled/tau"]:
        assert key in metrics, key
    assert run_data.params["algo.name"] == "dflash"
    client = MlflowClient(record["tracking_uri"])
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"train", "eval", "export"} <= artifacts  # the draft, the evaluation, the export
    assert "train/draft/model.safetensors" in {
        a.path for a in client.list_artifacts(record["run_id"], "train/draft")
    }
    versions = client.search_model_versions("name='deepspec-stories260k-dflash'")
    mine = [v for v in versions if v.run_id == record["run_id"]]
    tau = json.loads((run["dir"] / "eval" / "dflash" / "results.json").read_text())["macro"]["tau"]
    assert mine and all(v.tags["tau"] == f"{tau:.4f}" and v.source.endswith("export/dflash") for v in mine)
    info = client.get_run(record["run_id"]).info
    assert info.status == "FINISHED" and info.end_time is not None  # ended with its flow
    assert run_data.tags["prefect.flow_run_url"].endswith(run_data.tags["prefect.flow_run_id"])


def test_flow_run_is_recorded_by_the_prefect_server(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        named = FlowFilter(name=FlowFilterName(any_=["deepspec-pipeline"]))
        first = client.read_flow_runs(flow_filter=named, sort=FlowRunSort.START_TIME_ASC)[0]
    assert first.state.type.value == "COMPLETED"


def test_the_flow_run_shows_the_evaluation_tables(run):
    """The evaluate task's markdown artifact (the Prefect UI's Artifacts tab) holds the report's tables;
    MLflow holds the report files."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-dflash"]))
        )
    tau = json.loads((run["dir"] / "eval" / "dflash" / "results.json").read_text())["pooled"]["tau"]
    assert artifacts and artifacts[0].type == "markdown" and f"| {tau:.2f} |" in artifacts[0].data
    record = json.loads((run["dir"] / "mlflow_run-dflash.json").read_text())
    files = MlflowClient(record["tracking_uri"]).list_artifacts(record["run_id"], "eval")
    assert {"eval/report.md", "eval/report.html"} <= {f.path for f in files}


def test_the_algorithms_share_the_runs_data(run, all_algos):
    """Trained one after another in one run directory, the three algorithms make the prompts and answers
    once, and a cache once per set of captured layers; each keeps its own draft, evaluation and export.
    Counted calls, not timing: skipped stages do no work."""
    work = all_algos["work"]
    # Eagle3 reads DFlash's layers 0, 2, 4: nothing of the data is made again
    assert work["eagle3"] == {"train": 1, "evaluate": 1, "export": 1}
    # DSpark captures layers 0, 1, 2: a cache of its own (12 samples, 4 a shard), beside the first
    assert work["dspark"] == {"cache": 3, "train": 1, "evaluate": 1, "export": 1}
    assert work["dflash again"] == {}  # every stage finished and valid: nothing redone
    data = run["dir"] / "data"
    assert len(list((data / "prompts").iterdir())) == 1 and len(list((data / "answers").iterdir())) == 1
    assert len(list((data / "cache").iterdir())) == 2
    for stage in ("train", "eval", "export"):
        assert sorted(p.name for p in (run["dir"] / stage).iterdir()) == ["dflash", "dspark", "eagle3"]
    for algo in DRAFTS:
        assert (run["dir"] / f"mlflow_run-{algo}.json").is_file(), algo
    again = all_algos["again"]
    for stage in ("prompts", "regenerate", "cache", "train", "evaluate", "export"):
        assert getattr(again, stage).skipped is True, stage


def test_eagle3_trains_evaluates_and_exports_from_the_same_cache(run, all_algos):
    """Eagle3 on the pipeline's cache: its layers 0, 2, 4 are Eagle3's three, and layer 4, the target's
    last, is recorded normalised, so the teacher is the cached feature through the LM head."""
    result = all_algos["summaries"]["eagle3"]
    assert result.cache.skipped and result.cache.url == run["summary"].cache.url
    assert result.train.optimizer_steps >= 1 and result.train.final_metrics["train/loss"] > 0
    final = result.train.final_metrics
    assert final["train/grad_norm"] > 0 and final["train/tokens_per_s"] > final["train/samples_per_s"] > 0
    assert 50 < final["train/peak_memory_mb"] < 24_000  # a rank's resident set: torch alone is ~200 MB
    assert result.evaluate.algo == "eagle3" and result.evaluate.num_draft_tokens == 3
    assert result.evaluate.pooled.greedy_match == 1.0
    assert result.export.architecture == "LlamaForCausalLMEagle3"
    assert DRAFTS["eagle3"].validate_export(run["dir"] / "export" / "eagle3") == []


def test_dspark_recomputes_its_teacher_from_a_cache_of_earlier_layers(run, all_algos):
    """DSpark from a cache of layers 0..2: the teacher runs the target's layers 3 and 4 on layer 2."""
    result = all_algos["summaries"]["dspark"]
    assert result.cache.samples == 12 and result.cache.url != run["summary"].cache.url
    assert (
        result.train.final_metrics["train/l1"] > 0
        and "train/expected_tau_accept" in result.train.final_metrics
    )
    assert result.evaluate.algo == "dspark" and result.evaluate.pooled.greedy_match == 1.0
    assert result.export.architecture == "Qwen3DSparkModel"
    assert DRAFTS["dspark"].validate_export(run["dir"] / "export" / "dspark") == []


def test_a_stage_reruns_alone(run, all_algos):
    shutil.rmtree(run["dir"] / "export" / "dflash")
    record = export_flow(overrides=run["overrides"])
    assert record.skipped is False
    assert DRAFTS["dflash"].validate_export(run["dir"] / "export" / "dflash") == []


def test_a_failed_stage_flow_ends_its_mlflow_run_failed(run, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = [*run["overrides"], f"run_dir={tmp_path}"]  # a run with nothing trained yet
    with pytest.raises(DeepSpecError, match="no trained draft"):
        evaluate_flow(overrides=overrides)
    record = json.loads((tmp_path / "mlflow_run-dflash.json").read_text())
    assert MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status == "FAILED"


def test_a_bad_configuration_fails_before_the_first_stage(run, monkeypatch, tmp_path):
    """Eagle3 with five target layers, and a batch no rank count divides: both named at once, by the
    flow and by the CLI, before any stage has run."""
    from deepspec.flows.cli import main

    work = Work(monkeypatch)
    bad = [*run["base"], f"run_dir={tmp_path}", "algo=eagle3", "target.layer_ids=[0,1,2,3,4]",
           "train.global_batch=7"]  # fmt: skip
    with pytest.raises(ConfigError, match="2 problems") as err:
        pipeline(overrides=bad)
    assert "Eagle3 fuses exactly 3" in str(err.value) and "train.global_batch=7" in str(err.value)
    assert main(["pipeline", *bad]) == 2
    assert work.take() == {} and not any(tmp_path.iterdir())


def test_two_deepspeed_ranks_train_from_the_same_data(run, tmp_path):
    """A run of its own naming the first run's data directory: no data is made again."""
    overrides = [
        *run["overrides"],
        f"run_dir={tmp_path}",
        f"data_dir={run['dir'] / 'data'}",
        "train.nproc_per_node=2",
        "train.threads_per_rank=1",
        "train.micro_batch=2",
        "train.global_batch=8",
        "train.epochs=2",
    ]
    record = train_flow(overrides=overrides)
    assert record.optimizer_steps >= 1
    assert (tmp_path / "train" / "dflash" / "draft" / "model.safetensors").is_file()


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
    overrides = [
        *run["overrides"],
        f"run_dir={tmp_path}",
        f"data_dir={run['dir'] / 'data'}",
        "storage.mode=online",
        "train.epochs=1",
    ]
    assert cache_flow(overrides=overrides).mode == "online"
    record = train_flow(overrides=overrides)
    assert record.data_fingerprint.startswith("answers-")
    assert (tmp_path / "train" / "dflash" / "draft" / "model.safetensors").is_file()
    assert len(list((run["dir"] / "data" / "cache").iterdir())) == 2  # no cache was made


def test_a_real_mlflow_server_holds_the_whole_run(run, tmp_path):
    """The pipeline against `mlflow server` on 127.0.0.1 (its data from the module's run): everything a
    user compares runs by, read back through the server."""
    from mlflow.tracking import MlflowClient
    from support.mlflow_server import mlflow_server

    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow") as uri:
        overrides = [*run["overrides"], f"run_dir={tmp_path / 'run'}", f"data_dir={run['dir'] / 'data'}",
                     f"tracking.uri={uri}"]  # fmt: skip
        summary = pipeline(overrides=overrides)
        client = MlflowClient(uri)
        record = json.loads((tmp_path / "run" / "mlflow_run-dflash.json").read_text())
        assert record["tracking_uri"] == uri
        got = client.get_run(record["run_id"])
        assert got.info.status == "FINISHED" and got.data.params["algo.name"] == "dflash"
        for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/acc_slot0",
                    "train/expected_tau", "eval/macro/tau", "eval/pooled/accept_at_0"):  # fmt: skip
            assert key in got.data.metrics, key
        assert len(client.get_metric_history(record["run_id"], "train/loss")) >= 2  # a curve, not a point
        assert "prefect.flow_run_id" in got.data.tags
        files = {a.path for a in client.list_artifacts(record["run_id"], "eval")}
        assert {"eval/results.json", "eval/report.html"} <= files
        assert client.list_artifacts(record["run_id"], "export/dflash")
        (version,) = client.search_model_versions("name='deepspec-stories260k-dflash'")
        assert version.run_id == record["run_id"]
        assert version.tags["tau"] == f"{summary.evaluate.macro.tau:.4f}"
