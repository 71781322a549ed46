"""The regenerate stage as Prefect tasks on a real Prefect server: one task run per missing shard of
prompts, a progress artifact, and a shard with failed prompts that alone runs again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.openai_server import LocalOpenAIServer
from support.prefect import subflow_task_runs

from deepspec.flows.pipeline import regenerate_flow
from deepspec.models.errors import DataError
from deepspec.models.target import load_target

pytestmark = pytest.mark.integration

OPENINGS = [
    "Once upon a time, there was a little dog",
    "Lily went to the park with her mom.",
    "Tom had a big red ball.",
    "The sun was shining and the birds sang.",
    "Sue saw a cat in the tree.",
]


def _overrides(assets_dir: Path, tmp_path: Path, tracking_uri: str, *extra: str) -> list[str]:
    source = tmp_path / "openings.jsonl"
    rows = [
        {"id": f"o{i}", "conversations": [{"role": "user", "content": t}]} for i, t in enumerate(OPENINGS)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "target=stories260k",
        f"target.path={assets_dir / 'models' / 'stories260k'}",
        f"run_dir={tmp_path / 'run'}",
        f"prompts.source={source}",
        "regen.max_new_tokens=8",
        "regen.shard_size=2",  # five prompts: three shards
        f"tracking.uri={tracking_uri}",
        *extra,
    ]


def shard_runs(parent_flow_run_id) -> dict[str, str]:
    return subflow_task_runs(parent_flow_run_id, "deepspec-regenerate-shards", "regenerate-shard")


def progress(key: str = "regenerate-progress") -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return float(artifacts[0].data)


def test_each_missing_shard_is_one_task_run(assets_dir, prefect_server, tracking_uri, tmp_path):
    from deepspec.tasks.config import compose
    from deepspec.tasks.paths import run_paths
    from deepspec.tasks.prompts import prepare_prompts

    args = _overrides(assets_dir, tmp_path, tracking_uri)
    prepare_prompts(compose(args))
    state = regenerate_flow(overrides=args, return_state=True)
    assert state.result().rows == 5
    assert shard_runs(state.state_details.flow_run_id) == {
        f"regenerate-shard-{k}": "COMPLETED" for k in range(3)
    }
    assert progress() == 100.0

    regen = run_paths(compose(args)).answers_dir  # lose shard 1: the next run has one shard task
    (regen / "shards" / "part-00001.jsonl").unlink()
    (regen / "_DONE.json").unlink()
    state = regenerate_flow(overrides=args, return_state=True)
    assert state.result().rows == 5
    assert shard_runs(state.state_details.flow_run_id) == {"regenerate-shard-1": "COMPLETED"}
    ids = [json.loads(line)["id"] for line in (regen / "answers.jsonl").read_text().splitlines()]
    assert ids == [f"o{i}" for i in range(5)]


def test_a_shard_with_failed_prompts_runs_again_alone(assets_dir, prefect_server, tracking_uri, tmp_path):
    from deepspec.tasks.config import compose
    from deepspec.tasks.prompts import prepare_prompts

    model, tokenizer = load_target(str(assets_dir / "models" / "stories260k"), None, None, "float32")
    with LocalOpenAIServer(model, tokenizer) as server:
        args = _overrides(
            assets_dir,
            tmp_path,
            tracking_uri,
            "regen=vllm",
            f"regen.endpoints=[{server.url}]",
            "regen.max_retries=1",
        )
        prepare_prompts(compose(args))
        server.fail_marker = ("birds sang", 400)  # prompt o3, in shard 1
        state = regenerate_flow(overrides=args, return_state=True)
        assert state.is_failed()
        with pytest.raises(DataError, match="1 prompts failed"):
            state.result()
        assert shard_runs(state.state_details.flow_run_id) == {
            f"regenerate-shard-{k}": "COMPLETED" for k in range(3)
        }
        server.fail_marker = None
        state = regenerate_flow(overrides=args, return_state=True)
        assert state.result().rows == 5 and state.result().failed == 0
        assert shard_runs(state.state_details.flow_run_id) == {"regenerate-shard-1": "COMPLETED"}
