"""The regenerate stage with the real stories260k target: order, multi-turn, resume, skip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from deepspec.models.errors import ConfigError
from deepspec.tasks.config import compose
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate import regenerate

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
]


@pytest.fixture
def cfg(tmp_path, assets_dir, tracking_uri):
    source = tmp_path / "stories.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in OPENINGS))
    cfg = compose(
        [
            "target=stories260k",
            f"target.path={assets_dir}/models/stories260k",
            f"run_dir={tmp_path / 'run'}",
            "regen.max_new_tokens=8",
            "regen.batch_size=2",
            f"prompts.source={source}",
            f"tracking.uri={tracking_uri}",
        ]
    )
    prepare_prompts(cfg)
    return cfg


def _answers(cfg) -> Path:
    return Path(cfg.run_dir) / "regen" / "answers.jsonl"


def test_answers_in_order_then_resume_gives_the_same_rows(cfg, caplog):
    info = regenerate(cfg)
    path = _answers(cfg)
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert info["rows"] == 4 and info["skipped"] is False
    assert info["output_tokens"] == sum(r["completion_tokens"] for r in rows)
    for row, opening in zip(rows, OPENINGS, strict=True):
        roles = [t["role"] for t in row["conversations"]]
        assert roles == ["user", "assistant"] * len(opening["conversations"])
        assert [t["content"] for t in row["conversations"][::2]] == [
            t["content"] for t in opening["conversations"]
        ]
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["completion_tokens"] <= 8 * len(opening["conversations"])
        assert all(t["content"] for t in row["conversations"][1::2])
    assert regenerate(cfg)["skipped"] is True

    # A crash in the middle of the fourth line: the whole first batch (s0, s1) is kept, s2 and s3 redone.
    (path.parent / "_DONE.json").unlink()
    cut = len("".join(text.splitlines(keepends=True)[:3])) + 10
    path.write_bytes(text.encode()[:cut])
    with caplog.at_level(logging.INFO, logger="deepspec.tasks.regenerate"):
        resumed = regenerate(cfg)
    assert "resuming after 2 answers" in caplog.text
    assert resumed["skipped"] is False
    assert path.read_text(encoding="utf-8") == text  # same seeds per batch: the same answers


def test_greedy_is_deterministic(cfg):
    greedy = compose([f"{k}={v}" for k, v in _overrides(cfg).items()] + ["regen.temperature=0"])
    regenerate(greedy)
    first = _answers(greedy).read_text()
    (_answers(greedy).parent / "_DONE.json").unlink()
    _answers(greedy).unlink()
    regenerate(greedy)
    assert _answers(greedy).read_text() == first


def test_other_backends_are_not_available_yet(cfg):
    vllm = compose([f"{k}={v}" for k, v in _overrides(cfg).items()] + ["regen=vllm"])
    with pytest.raises(ConfigError, match=r"regen\.backend='vllm'.*available: hf"):
        regenerate(vllm)


def _overrides(cfg) -> dict[str, str]:
    return {
        "target": "stories260k",
        "target.path": cfg.target.path,
        "run_dir": cfg.run_dir,
        "regen.max_new_tokens": "8",
        "prompts.source": cfg.prompts.source,
        "tracking.uri": cfg.tracking.uri,
    }
