"""No secret leaves a run: the stories260k pipeline with its cache on a real S3 server whose key comes from
the environment (`${oc.env:..}`) and whose secret from a real Prefect Secret block (`${prefect_secret:..}`),
with a fake OpenAI key in the environment too; then every output of the run is searched for the three
planted values: every file under the run and data directories (the MLflow SQLite store, launch.yaml, the
drafts, records), the MLflow artifacts, the objects on the S3 server, the Prefect flow runs' and task runs'
records (parameters included), the flow runs' logs and artifacts, and the captured stdout and stderr (the
torchrun ranks' too). The run succeeding proves the references were read, by the flow's threads and by
the ranks: the S3 server refuses any other key."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from support.s3 import S3Server

from deepspec.flows.pipeline import pipeline
from deepspec.tasks.paths import run_paths

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY_ENV = "DEEPSPEC_TEST_S3_KEY"


def files_under(root: Path, since: float = 0.0) -> dict[str, bytes]:
    """{path: bytes} of every file under `root` (changed since `since`), binary files included."""
    if not root.is_dir():
        return {}
    return {
        str(path): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since
    }


def leaks(planted: dict[str, str], outputs: dict[str, bytes | str]) -> list[str]:
    """'<planted name> in <output>' for every planted value found in an output (as bytes, so a value
    inside a binary file or an SQLite page counts); the values themselves are never shown."""
    found = []
    for where, data in outputs.items():
        blob = data.encode() if isinstance(data, str) else data
        found += [f"{name} in {where}" for name, value in planted.items() if value.encode() in blob]
    return found


def test_the_search_finds_a_planted_value_in_files_and_databases(tmp_path):
    """The search below can fail: a value in an SQLite row and in a binary file is found."""
    value = f"planted-{uuid.uuid4().hex}"
    with sqlite3.connect(tmp_path / "store.db") as db:
        db.execute("create table params (key text, value text)")
        db.execute("insert into params values ('storage.storage_options.secret', ?)", (value,))
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "weights.bin").write_bytes(b"\x00\xff" + value.encode() + b"\x00")
    found = leaks({"secret": value}, files_under(tmp_path))
    assert found == [f"secret in {tmp_path / 'nested' / 'weights.bin'}", f"secret in {tmp_path / 'store.db'}"]


def prefect_records(flow_run_id) -> dict[str, str]:
    """What the Prefect server holds of a flow run and its subflows: {what: JSON} of each flow run (its
    parameters included), task run, log line and artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are sent in batches: all of them on the server before reading
    records: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs, todo = {}, [flow_run_id]
        while todo:  # the flow run, then its subflows' runs, at any depth
            run_id = todo.pop()
            runs[run_id] = client.read_flow_run(run_id)
            parent = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            todo += [r.id for r in client.read_flow_runs(flow_run_filter=parent) if r.id not in runs]
        ids = list(runs)
        records |= {f"flow run {r.name} ({r.id})": r.model_dump_json() for r in runs.values()}
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )
        records |= {f"task run {t.name} ({t.id})": t.model_dump_json() for t in tasks}
        logs, offset = [], 0
        while batch := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset
        ):
            logs, offset = logs + batch, offset + len(batch)
        records |= {f"log {i} ({log.name})": log.model_dump_json() for i, log in enumerate(logs)}
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        records |= {f"artifact {a.key} ({a.id})": a.model_dump_json() for a in artifacts}
    records["counts"] = (
        f"{len(runs)} flow runs, {len(tasks)} task runs, {len(logs)} logs, {len(artifacts)} artifacts"
    )
    return records


@pytest.fixture
def planted(s3_server, prefect_server, tmp_path, monkeypatch):
    """An S3 server of its own whose key and secret are planted values; the key in the environment, the
    secret in a Prefect Secret block on the test server; a fake OpenAI key in the environment."""
    from prefect.blocks.system import Secret

    values = {
        "s3 key": f"AKIA{uuid.uuid4().hex[:16].upper()}",
        "s3 secret": f"planted-s3-secret-{uuid.uuid4().hex}",
        "openai key": f"sk-planted-{uuid.uuid4().hex}",
    }
    block = f"deepspec-test-s3-{uuid.uuid4().hex[:8]}"
    Secret(value=values["s3 secret"]).save(block)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):  # only the references
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, values["s3 key"])
    monkeypatch.setenv("OPENAI_API_KEY", values["openai key"])
    (tmp_path / "s3" / "deepspec").mkdir(parents=True)
    server = S3Server(s3_server.binary, tmp_path / "s3", tmp_path / "rclone.log")
    server.key, server.secret = values["s3 key"], values["s3 secret"]
    server.start()
    try:
        yield {"values": values, "block": block, "server": server}
    finally:
        server.stop()


def test_no_output_of_a_run_holds_a_secret(planted, assets_dir, tmp_path, capfd, caplog):
    from mlflow.tracking import MlflowClient

    from deepspec.tasks.config import compose

    run_dir, server = tmp_path / "run", planted["server"]
    overrides = [
        "target=stories260k", f"target.path={assets_dir / 'models' / 'stories260k'}", f"run_dir={run_dir}",
        "prompts.source=builtin", "prompts.max_samples=12", "regen.max_new_tokens=16",
        "storage=s3", "storage.url=s3://deepspec/secrets", "storage.samples_per_shard=4",
        f"+storage.storage_options.endpoint_url={server.endpoint_url}",
        f"+storage.storage_options.key=${{oc.env:{KEY_ENV}}}",
        f"+storage.storage_options.secret=${{prefect_secret:{planted['block']}}}",
        "train=cpu_demo", "train.epochs=2", "algo.num_layers=1", "algo.block_size=4",
        "eval=demo", "eval.benchmarks=[gsm8k,humaneval,mt-bench]", "eval.max_samples=1",
        "eval.max_new_tokens=8",
    ]  # fmt: skip
    state = pipeline(overrides=overrides, return_state=True)  # searched whether it completed or not
    cfg = compose(overrides)
    record = json.loads((run_dir / "mlflow_run-dflash.json").read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    prefect = prefect_records(state.state_details.flow_run_id)
    captured = capfd.readouterr()
    outputs = {
        **files_under(run_dir),  # the MLflow store, launch.yaml, drafts, exports, records, data_dir
        **files_under(Path(cfg.data_dir)),
        **files_under(artifacts),
        **files_under(server.root),  # the cache's objects
        **prefect,
        "stdout": captured.out,
        "stderr": captured.err,
        "log records": caplog.text,
    }
    found = leaks(planted["values"], outputs)
    assert found == [], f"planted secrets found ({prefect['counts']}): {found}"
    assert state.is_completed(), state.message
    summary = state.result(raise_on_failure=False)
    assert summary.cache.shards_built == 3 and summary.train.optimizer_steps >= 1  # S3 took the keys

    # what was searched holds the references, where the config went: the search looked in the right places
    block_ref = f"${{prefect_secret:{planted['block']}}}"
    assert run.data.params["storage.storage_options.secret"] == block_ref
    assert run.data.params["storage.storage_options.key"] == f"${{oc.env:{KEY_ENV}}}"
    assert f"\\{block_ref}" in (run_paths(cfg).train_dir / "launch.yaml").read_text()
    flow_runs = [text for what, text in prefect.items() if what.startswith("flow run ")]
    assert any(block_ref in text for text in flow_runs), "the flow run's parameters hold the reference"
    assert any(what.startswith("log ") for what in prefect) and any(
        w.startswith("artifact ") for w in prefect
    )
    assert any(str(artifacts) in path for path in outputs) and any(".arrow" in path for path in outputs)
    assert captured.err  # the stages' and ranks' output was captured
