"""The regenerate stage against a real vLLM server (SmolLM2-135M-Instruct on the CPU build): the `vllm`
backend's token-id requests, and a server killed mid-run, after which a re-run leaves every prompt
answered exactly once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from deepspec.models.errors import DataError
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate.stage import regenerate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).parents[2]


def _cfg(tmp_path: Path, assets_dir: Path, tracking_uri: str, pool, *extra: str):
    cfg = compose(
        [
            "target=smollm2_135m",
            f"target.path={REPO / '.cache' / 'models' / 'smollm2_135m_instruct'}",
            f"run_dir={tmp_path / 'run'}",
            f"prompts.source={assets_dir / 'prompts' / 'train_prompts_mix_tiny256.jsonl'}",
            "prompts.max_samples=12",
            "regen=vllm",
            f"regen.endpoints=[{pool.endpoints[0]}]",
            "regen.max_new_tokens=24",
            "regen.shard_size=4",
            "regen.concurrency=4",
            "regen.parallel_shards=1",
            f"tracking.uri={tracking_uri}",
            *extra,
        ]
    )
    prepare_prompts(cfg)
    return cfg


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _wait_serving(pool, timeout_s: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{pool.endpoints[0]}/models", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("the vLLM replica did not come back")


def test_server_killed_mid_run_then_rerun_answers_every_prompt_exactly_once(
    tmp_path, assets_dir, tracking_uri, vllm_pool
):
    cfg = _cfg(tmp_path, assets_dir, tracking_uri, vllm_pool, "regen.max_retries=1")
    paths = run_paths(cfg)
    prompts = _rows(paths.prompts)
    shards = paths.answers_dir / "shards"

    def kill_after_first_commit() -> None:
        deadline = time.monotonic() + 600
        while not (shards / "part-00000.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        vllm_pool.kill_replica(0)  # the supervisor brings it back, on the same port, in a minute or so

    killer = threading.Thread(target=kill_after_first_commit)
    killer.start()
    with pytest.raises(DataError, match="prompts failed"):  # one retry is not enough to outlast a restart
        regenerate(cfg)
    killer.join()
    first_shard = (shards / "part-00000.jsonl").read_bytes()
    errors = _rows(paths.answers_dir / "errors.jsonl")
    assert errors and all("ConnectError" in e["error"] or "HTTP" in e["error"] for e in errors)

    _wait_serving(vllm_pool)
    info = regenerate(cfg)
    assert info.failed == 0 and info.rows == len(prompts) == 12
    rows = _rows(paths.answers)
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]  # every prompt, once, in input order
    assert (shards / "part-00000.jsonl").read_bytes() == first_shard  # committed answers were kept
    assert not (paths.answers_dir / "errors.jsonl").exists()
    for row in rows:
        assert [t["role"] for t in row["conversations"]][-1] == "assistant"
        assert row["conversations"][-1]["content"].strip()
        answers = sum(t["role"] == "assistant" for t in row["conversations"])
        assert 1 <= row["completion_tokens"] <= 24 * answers  # multi-turn rows: up to 24 an answer
        assert row["finish_reason"] in ("stop", "length")


def test_greedy_answers_over_vllm_match_in_process_transformers(
    tmp_path, assets_dir, tracking_uri, vllm_pool
):
    """The same token ids in, the same greedy tokens out: vLLM renders nothing itself."""
    cfg = _cfg(tmp_path, assets_dir, tracking_uri, vllm_pool, "regen.temperature=0", "prompts.max_samples=4")
    regenerate(cfg)
    hf = compose(
        [
            "target=smollm2_135m",
            f"target.path={REPO / '.cache' / 'models' / 'smollm2_135m_instruct'}",
            f"run_dir={tmp_path / 'hf'}",
            f"prompts.source={assets_dir / 'prompts' / 'train_prompts_mix_tiny256.jsonl'}",
            "prompts.max_samples=4",
            "regen.max_new_tokens=24",
            "regen.temperature=0",
            f"tracking.uri={tracking_uri}",
        ]
    )
    prepare_prompts(hf)
    regenerate(hf)
    got, want = _rows(run_paths(cfg).answers), _rows(run_paths(hf).answers)
    # float32 on both sides; a near-tie between two logits may still flip on another kernel, so most, not all
    same = sum(g["conversations"] == w["conversations"] for g, w in zip(got, want, strict=True))
    assert same >= 3, [
        (g["conversations"][-1], w["conversations"][-1]) for g, w in zip(got, want, strict=True)
    ]
