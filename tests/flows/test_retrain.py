"""Scheduled retraining on stories260k: two cycles of the `retrain` flow (what the weekly deployment
runs) through a real Prefect server and MLflow store. The first finds nothing released and releases its
draft; then the prompts source grows, and the second answers and caches only the new prompts, trains on
from the released draft, and - its margin out of reach - keeps the first release, saying why."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from deepspec.flows.pipeline import retrain
from deepspec.models.drafts import DRAFTS
from deepspec.tasks.config import compose
from deepspec.tasks.paths import release_paths, run_paths
from deepspec.tasks.prompts import BUILTIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Work:
    """What the stages did, not what they skipped: prompts the target answered, cache shards built,
    training launches."""

    def __init__(self, patch: pytest.MonkeyPatch):
        import deepspec.tasks.cache.stage as cache
        import deepspec.tasks.train.stage as train
        from deepspec.tasks.regenerate.backends import HFBackend

        self.answered: list[str] = []
        self.shards: list[int] = []
        self.launches = 0
        answer, build_shard, launch = HFBackend.answer, cache.build_shard, train.launch_ranks

        def answering(backend, rows, first_index, emit):
            self.answered += [row["id"] for row in rows]
            return answer(backend, rows, first_index, emit)

        def building(cfg, index, **kwargs):
            self.shards.append(index)
            return build_shard(cfg, index, **kwargs)

        def launching(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)

        patch.setattr(HFBackend, "answer", answering)
        patch.setattr(cache, "build_shard", building)
        patch.setattr(train, "launch_ranks", launching)

    def take(self) -> dict:
        done = {"answered": self.answered, "shards": self.shards, "launches": self.launches}
        self.answered, self.shards, self.launches = [], [], 0
        return done


@pytest.fixture(scope="module")
def cycles(assets_dir, prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    prompts = BUILTIN.read_text(encoding="utf-8").splitlines(keepends=True)
    source = root / "prompts.jsonl"
    source.write_text("".join(prompts[:12]))
    overrides = [
        "target=stories260k", f"target.path={assets_dir / 'models' / 'stories260k'}",
        f"run_dir={root / 'run'}", f"prompts.source={source}", "regen.max_new_tokens=32",
        "regen.batch_size=4", "storage.samples_per_shard=4", "train=cpu_demo", "train.epochs=6",
        "algo.num_layers=1", "algo.block_size=4", "eval=demo",
        "eval.benchmarks=[gsm8k,humaneval,mt-bench]", "eval.max_samples=1", "eval.max_new_tokens=16",
        f"release.dir={root / 'release'}", "release.init=released",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        work = Work(patch)
        first = retrain(overrides=overrides)  # the default margin; nothing is released yet
        done = {"first": work.take()}
        paths = run_paths(compose(overrides))
        results = json.loads((paths.eval_dir / "results.json").read_text())
        released = {
            "export": sha256(paths.export_dir / "model.safetensors"),
            "tau": results["macro"]["tau"],
            "at": time.time() * 1000,
        }
        source.write_text("".join(prompts[:16]))  # the week's new prompts
        second = retrain(overrides=[*overrides, "release.margin=100"])
        done["second"] = work.take()
    return {"first": first, "second": second, "work": done, "overrides": overrides, "released": released}


def test_the_first_cycle_releases_its_draft(cycles):
    first, work = cycles["first"], cycles["work"]["first"]
    assert first.promoted and first.released_tau is None and "no draft released yet" in first.reason
    assert len(work["answered"]) == 12 and work["shards"] == [0, 1, 2] and work["launches"] == 1
    cfg = compose(cycles["overrides"])
    where = release_paths(cfg)
    assert DRAFTS["dflash"].validate_export(where.export) == []
    record = json.loads(where.record.read_text())
    assert record["tau"] == first.candidate_tau == cycles["released"]["tau"]
    assert (
        record["model_version"] == first.model_version and record["protocol"]["eval"]["max_new_tokens"] == 16
    )
    assert sha256(where.export / "model.safetensors") == cycles["released"]["export"]


def test_the_second_cycle_answers_caches_and_trains_only_on_what_is_new(cycles):
    work = cycles["work"]["second"]
    new = [json.loads(line)["id"] for line in BUILTIN.read_text().splitlines()[12:16]]
    assert work["answered"] == new  # the twelve answers of the first cycle are kept
    assert work["shards"] == [3]  # shards 0-2 hold the same rows as before
    assert work["launches"] == 1
    cfg = compose([*cycles["overrides"], "release.margin=100"])
    assert json.loads((Path(run_paths(cfg).cache_url) / "manifest.json").read_text())["num_samples"] == 16


def test_the_second_cycle_trains_on_from_the_released_draft(cycles):
    """Its first logged loss is far below the first cycle's, which started from scratch."""
    from mlflow.tracking import MlflowClient

    run_dir = Path(compose(cycles["overrides"]).run_dir)
    record = json.loads((run_dir / "mlflow_run-dflash.json").read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "train/loss")
    history = sorted(history, key=lambda m: (m.timestamp, m.step))
    split = cycles["released"]["at"]
    scratch = next(m.value for m in history if m.timestamp < split)
    warm = next(m.value for m in history if m.timestamp > split)
    print(f"first logged train/loss: from scratch {scratch:.3f}, from the released draft {warm:.3f}")
    assert warm < scratch - 0.5, (scratch, warm)


def test_the_second_cycle_keeps_the_release_and_says_why(cycles):
    first, second = cycles["first"], cycles["second"]
    assert not second.promoted and second.margin == 100.0
    assert second.released_tau == first.candidate_tau
    for figure in (f"{second.candidate_tau:.4f}", f"{first.candidate_tau:.4f}", "margin 100.0"):
        assert figure in second.reason, second.reason
    cfg = compose([*cycles["overrides"], "release.margin=100"])
    where = release_paths(cfg)
    assert second.release == first.release == str(where.current.resolve())  # the same release folder
    assert sha256(where.export / "model.safetensors") == cycles["released"]["export"]
    assert sha256(run_paths(cfg).export_dir / "model.safetensors") != cycles["released"]["export"]
    assert not where.previous.exists()  # nothing was replaced
    decision = json.loads((run_paths(cfg).run_dir / "release-dflash.json").read_text())
    assert decision["promoted"] is False and decision["reason"] == second.reason


def test_the_registered_models_release_alias_stays_on_the_first_version(cycles):
    from mlflow.tracking import MlflowClient

    cfg = compose(cycles["overrides"])
    record = json.loads((Path(cfg.run_dir) / "mlflow_run-dflash.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    first, second = cycles["first"].model_version, cycles["second"].model_version
    assert first is not None and second is not None and int(second) > int(first)
    assert str(client.get_model_version_by_alias("deepspec-stories260k-dflash", "release").version) == first
    refused = client.get_model_version("deepspec-stories260k-dflash", second)
    assert refused.tags["release"] == "refused: " + cycles["second"].reason
    metrics = client.get_run(record["run_id"]).data.metrics
    assert (
        metrics["release/promoted"] == 0.0
        and metrics["release/released_tau"] == cycles["first"].candidate_tau
    )


def test_each_decision_is_an_artifact_of_its_flow_run(cycles):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["release-dflash"]))
        )
    texts = [a.data for a in sorted(artifacts, key=lambda a: a.created)]
    assert (
        len(texts) >= 2
        and "| decision | promoted |" in texts[-2]
        and "| decision | kept the release |" in texts[-1]
    )
    assert cycles["second"].reason in texts[-1]


def test_the_weekly_deployment_runs_this_flow_into_a_release_dir():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "qwen3-4b-dflash-retrain")
    assert deployment["entrypoint"] == "flows/pipeline.py:retrain" and deployment["schedules"]
    cfg = compose(deployment["parameters"]["overrides"])
    assert cfg.release.dir and cfg.release.margin > 0 and os.path.isabs(cfg.prompts.source)
