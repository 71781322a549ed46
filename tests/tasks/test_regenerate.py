"""The regenerate stage with the real stories260k target: order, multi-turn, shards committed exactly
once across kills and restarts, the HTTP backend's retries and failures, skip."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.openai_server import LocalOpenAIServer

from deepspec.models.errors import ConfigError, DataError
from deepspec.models.target import load_target
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate.stage import regenerate

torch.set_num_threads(2)

OPENINGS = [
    {"id": "s0", "conversations": [{"role": "user", "content": "Once upon a time, there was a little dog"}]},
    {"id": "s1", "conversations": [{"role": "user", "content": "Lily went to the park with her mom."}]},
    {
        "id": "s2",
        "conversations": [
            {"role": "user", "content": "Tom had a big red ball."},
            {"role": "user", "content": "One day, the ball"},
        ],
    },
    {"id": "s3", "conversations": [{"role": "user", "content": "The sun was shining and the birds sang."}]},
    {"id": "s4", "conversations": [{"role": "user", "content": "Sue saw a cat in the tree."}]},
]
WORDS = "dog cat ball tree park sun bird girl boy mom dad cake toy box car fish".split()


def _compose(tmp_path: Path, assets_dir: Path, tracking_uri: str, source: Path, *extra: str):
    return compose(
        [
            "target=stories260k",
            f"target.path={assets_dir}/models/stories260k",
            f"run_dir={tmp_path / 'run'}",
            "regen.max_new_tokens=8",
            "regen.batch_size=2",
            "regen.shard_size=3",
            f"prompts.source={source}",
            f"tracking.uri={tracking_uri}",
            *extra,
        ]
    )


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in OPENINGS))
    return path


@pytest.fixture
def cfg(tmp_path, assets_dir, tracking_uri, source):
    cfg = _compose(tmp_path, assets_dir, tracking_uri, source)
    prepare_prompts(cfg)
    return cfg


def _answers(cfg) -> Path:
    return run_paths(cfg).answers


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_in_order_multi_turn_then_skip(cfg):
    info = regenerate(cfg)
    rows = _rows(_answers(cfg))
    assert [r["id"] for r in rows] == [o["id"] for o in OPENINGS]
    assert info.rows == 5 and info.failed == 0 and info.skipped is False
    assert info.output_tokens == sum(r["completion_tokens"] for r in rows)
    for row, opening in zip(rows, OPENINGS, strict=True):
        roles = [t["role"] for t in row["conversations"]]
        assert roles == ["user", "assistant"] * len(opening["conversations"])
        assert [t["content"] for t in row["conversations"][::2]] == [
            t["content"] for t in opening["conversations"]
        ]
        assert row["finish_reason"] in ("stop", "length")
        assert row["truncated"] == (row["finish_reason"] == "length")
        assert 1 <= row["completion_tokens"] <= 8 * len(opening["conversations"])
        assert row["prompt_tokens"] > 0
        assert all(t["content"] for t in row["conversations"][1::2])
    # the second turn of s2 is prompted with the first answer: its prompt is longer than the first's
    shards = run_paths(cfg).answers_dir / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert regenerate(cfg).skipped is True


def test_a_torn_log_is_carried_over_batch_by_batch_with_the_same_answers(cfg, caplog):
    regenerate(cfg)
    reference = _answers(cfg).read_text(encoding="utf-8")
    regen_dir = run_paths(cfg).answers_dir
    # Shard 0 was in flight: its log has the first batch (s0, s1) and half a line of the next one.
    lines = (regen_dir / "shards" / "part-00000.jsonl").read_text().splitlines(keepends=True)
    (regen_dir / "shards" / "part-00000.jsonl").unlink()
    (regen_dir / "shards" / "part-00000.log.jsonl").write_text("".join(lines[:2]) + lines[2][:20])
    (regen_dir / "_DONE.json").unlink()
    _answers(cfg).unlink()
    with caplog.at_level(logging.INFO, logger="deepspec.tasks.regenerate.stage"):
        info = regenerate(cfg)
    assert "1 shards to answer" in caplog.text
    assert info.skipped is False
    assert _answers(cfg).read_text(encoding="utf-8") == reference  # the same seeds per batch


def test_greedy_is_deterministic(tmp_path, assets_dir, tracking_uri, source):
    greedy = _compose(tmp_path, assets_dir, tracking_uri, source, "regen.temperature=0")
    prepare_prompts(greedy)
    regenerate(greedy)
    first = _answers(greedy).read_text()
    (_answers(greedy).parent / "_DONE.json").unlink()
    regenerate(greedy)
    assert _answers(greedy).read_text() == first


def test_another_config_starts_over(cfg, tmp_path, assets_dir, tracking_uri, source):
    regenerate(cfg)
    first = _answers(cfg).read_bytes()
    # other sampling: other answers, in a folder of their own beside the first ones, which stay
    longer = _compose(tmp_path, assets_dir, tracking_uri, source, "regen.max_new_tokens=12")
    assert run_paths(longer).answers_dir != run_paths(cfg).answers_dir
    info = regenerate(longer)
    assert info.skipped is False and info.rows == 5
    assert max(r["completion_tokens"] for r in _rows(_answers(longer))) > 8
    assert _answers(cfg).read_bytes() == first and regenerate(cfg).skipped is True
    # another shard layout for the same answers: the same folder, whose committed shards are discarded
    reshard = _compose(tmp_path, assets_dir, tracking_uri, source, "regen.shard_size=2")
    assert run_paths(reshard).answers_dir == run_paths(cfg).answers_dir
    info = regenerate(reshard)
    assert info.skipped is False and info.rows == 5
    shards = run_paths(reshard).answers_dir / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [f"part-0000{k}.jsonl" for k in range(3)]
    assert [r["id"] for r in _rows(_answers(reshard))] == [o["id"] for o in OPENINGS]


def test_unknown_backend_and_openai_without_endpoints_are_refused(tmp_path, assets_dir, tracking_uri, source):
    """Refused while composing, before the stage runs."""
    with pytest.raises(
        ConfigError, match=r"regen\.backend='tgi': expected one of \['hf', 'vllm', 'openai', 'file'\]"
    ):
        _compose(tmp_path, assets_dir, tracking_uri, source, "regen.backend=tgi")
    with pytest.raises(ConfigError, match=r"regen\.backend=openai needs regen\.endpoints"):
        _compose(tmp_path, assets_dir, tracking_uri, source, "regen=openai")


def test_file_backend_reads_answers_written_before_and_fails_on_a_missing_one(
    cfg, tmp_path, assets_dir, tracking_uri, source
):
    """regen=file takes another run's answers.jsonl as it is; a prompt it lacks fails the stage by name,
    and another file's content is another answers folder."""
    regenerate(cfg)
    written = _answers(cfg)
    given = _compose(
        tmp_path, assets_dir, tracking_uri, source, "regen=file", f"regen.answers_file={written}",
        f"run_dir={tmp_path / 'other'}",
    )  # fmt: skip
    prepare_prompts(given)
    info = regenerate(given)
    assert info.backend == "file" and info.rows == 5 and info.failed == 0
    assert _rows(_answers(given)) == _rows(written)  # conversations, finish reasons and token counts
    # rows without the optional counts: counted with the target's tokenizer; one prompt missing
    rows = [{"id": r["id"], "conversations": r["conversations"]} for r in _rows(written)[1:]]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = _compose(
        tmp_path, assets_dir, tracking_uri, source, "regen=file", f"regen.answers_file={partial}",
        f"run_dir={tmp_path / 'short'}",
    )  # fmt: skip
    prepare_prompts(short)
    assert run_paths(short).answers_dir != run_paths(given).answers_dir
    with pytest.raises(DataError, match="1 prompts failed"):
        regenerate(short)
    errors = _rows(run_paths(short).answers_dir / "errors.jsonl")
    assert [e["id"] for e in errors] == ["s0"] and "no row with this prompt" in errors[0]["error"]
    got = {r["id"]: r for r in _rows(run_paths(short).answers_dir / "shards" / "part-00001.jsonl")}
    assert got["s4"]["completion_tokens"] > 0 and got["s4"]["prompt_tokens"] > 0
    with pytest.raises(ConfigError, match=r"regen\.backend=file needs regen\.answers_file"):
        _compose(tmp_path, assets_dir, tracking_uri, source, "regen.backend=file")


# ----------------------------------------------------------------------------------------------------
# Killed for real: a subprocess running `deepspec regenerate`, SIGKILLed mid-run, then re-run.


@pytest.mark.integration
def test_killed_at_any_moment_then_rerun_gives_exactly_the_uninterrupted_answers(
    tmp_path, assets_dir, tracking_uri
):
    source = tmp_path / "many.jsonl"
    rows = [
        {"id": f"p{i:03d}", "conversations": [{"role": "user", "content": f"The {a} and the {b} went out."}]}
        for i, (a, b) in enumerate((a, b) for a in WORDS for b in WORDS[:5])
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "target=stories260k",
        f"target.path={assets_dir}/models/stories260k",
        "regen.max_new_tokens=48",
        "regen.batch_size=4",
        "regen.shard_size=16",
        f"prompts.source={source}",
        f"tracking.uri={tracking_uri}",
    ]
    reference = compose([*overrides, f"run_dir={tmp_path / 'reference'}"])
    prepare_prompts(reference)
    regenerate(reference)
    expected = _answers(reference).read_text(encoding="utf-8")

    run_dir = tmp_path / "killed"
    stage = "import sys; from deepspec.tasks.config import compose; "
    stage += "from deepspec.tasks.regenerate.stage import regenerate; regenerate(compose(sys.argv[1:]))"
    cli = [sys.executable, "-c", stage, *overrides, f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prompts = compose([*overrides, f"run_dir={run_dir}"])
    prepare_prompts(prompts)
    shards = run_paths(prompts).answers_dir / "shards"
    kills = 0
    for wait_for in ("part-00000.log.jsonl", "part-00001.jsonl", "part-00003.log.jsonl"):
        proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not (shards / wait_for).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs finished before they could be killed; give them more work"
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _answers(prompts).read_text(encoding="utf-8") == expected
    assert not list(shards.glob("*.log.jsonl")) and not list(shards.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------
# HTTP backends, against a local OpenAI-compatible server over the same real model


@pytest.fixture(scope="module")
def local_server(assets_dir):
    model, tokenizer = load_target(str(assets_dir / "models" / "stories260k"), None, None, "float32")
    with LocalOpenAIServer(model, tokenizer, name="stories260k", context=512) as server:
        yield server


def _http(tmp_path, assets_dir, tracking_uri, source, server, *extra):
    cfg = _compose(
        tmp_path,
        assets_dir,
        tracking_uri,
        source,
        "regen.backend=vllm",
        f"regen.endpoints=[{server.url}]",
        "regen.temperature=0",
        "regen.concurrency=3",
        "regen.max_retries=3",
        *extra,
    )
    prepare_prompts(cfg)
    return cfg


def test_token_id_requests_match_in_process_greedy_answers(
    tmp_path, assets_dir, tracking_uri, source, local_server
):
    cfg = _http(tmp_path, assets_dir, tracking_uri, source, local_server)
    regenerate(cfg)
    hf = _compose(tmp_path / "hf", assets_dir, tracking_uri, source, "regen.temperature=0")
    prepare_prompts(hf)
    regenerate(hf)
    http_rows, hf_rows = _rows(_answers(cfg)), _rows(_answers(hf))
    assert [r["conversations"] for r in http_rows] == [r["conversations"] for r in hf_rows]
    assert [r["completion_tokens"] for r in http_rows] == [r["completion_tokens"] for r in hf_rows]
    first = next(r for r in local_server.requests if r["path"] == "/v1/completions")["body"]
    assert isinstance(first["prompt"], list) and first["stop_token_ids"] and first["temperature"] == 0


def test_transient_errors_and_a_dead_replica_are_retried(
    tmp_path, assets_dir, tracking_uri, source, local_server, caplog
):
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    both = f"regen.endpoints=[{local_server.url},{dead}]"
    cfg = _http(tmp_path, assets_dir, tracking_uri, source, local_server, both)
    local_server.fail_next = [503, 429, 500]
    with caplog.at_level(logging.INFO, logger="deepspec.tasks.regenerate.backends"):
        info = regenerate(cfg)
    assert info.rows == 5 and info.failed == 0
    assert "HTTP 503" in caplog.text and "ConnectError" in caplog.text


def test_failed_rows_go_to_the_errors_file_and_are_retried_next_run(
    tmp_path, assets_dir, tracking_uri, source, local_server, monkeypatch, caplog
):
    monkeypatch.setenv("DEEPSPEC_TEST_KEY", "sk-secret-do-not-log")
    cfg = _http(
        tmp_path, assets_dir, tracking_uri, source, local_server, "regen.api_key_env=DEEPSPEC_TEST_KEY"
    )
    local_server.fail_marker = ("red ball", 400)  # row s2, a permanent error
    local_server.requests.clear()
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(DataError, match="1 prompts failed"):
            regenerate(cfg)
    finally:
        local_server.fail_marker = None
    regen_dir = run_paths(cfg).answers_dir
    errors = _rows(regen_dir / "errors.jsonl")
    assert [e["id"] for e in errors] == ["s2"] and "HTTP 400" in errors[0]["error"]
    assert [r["id"] for r in _rows(_answers(cfg))] == ["s0", "s1", "s3", "s4"]
    assert all(r["headers"]["Authorization"] == "Bearer sk-secret-do-not-log" for r in local_server.requests)
    assert "sk-secret" not in caplog.text

    local_server.requests.clear()
    info = regenerate(cfg)  # only s2 is asked again
    assert info.rows == 5 and info.failed == 0
    assert len(local_server.requests) == 2  # s2's two turns
    assert [r["id"] for r in _rows(_answers(cfg))] == [o["id"] for o in OPENINGS]
    assert not (regen_dir / "errors.jsonl").exists()


def test_chat_api_sends_messages(tmp_path, assets_dir, tracking_uri, source, local_server):
    cfg = _http(tmp_path, assets_dir, tracking_uri, source, local_server, "regen.api=chat")
    local_server.requests.clear()
    info = regenerate(cfg)
    assert info.rows == 5
    second_turn = [r["body"] for r in local_server.requests if len(r["body"].get("messages", [])) == 3]
    assert second_turn and second_turn[0]["messages"][1]["role"] == "assistant"
