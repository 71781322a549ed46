"""A prompts source that grows under the same settings, as a scheduled retraining finds it: the prompts
stage reads it again, the regenerate stage asks the target only about the new prompts (and gives the
answers a fresh run would), and the cache stage builds only the shards the new rows fall in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspec.tasks.cache import stage as cache
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate.backends import HFBackend
from deepspec.tasks.regenerate.stage import regenerate

pytestmark = pytest.mark.usefixtures("one_thread")

OPENINGS = [
    "Once upon a time, there was a little dog",
    "Lily went to the park with her mom.",
    "Tom had a big red ball.",
    "The sun was shining and the birds sang.",
    "Sue saw a cat in the tree.",
    "Ben and his dad went to the lake.",
    "A little bird lived in a nest.",
    "Mia had a new doll.",
    "The frog jumped into the pond.",
]


def write_source(path: Path, count: int) -> None:
    rows = [
        {"id": f"s{i}", "conversations": [{"role": "user", "content": t}]} for i, t in enumerate(OPENINGS)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))


@pytest.fixture
def answered(monkeypatch) -> list[str]:
    """The ids of the prompts the target is asked to answer."""
    ids: list[str] = []
    real = HFBackend.answer

    def counting(self, rows, first_index, emit):
        ids.extend(row["id"] for row in rows)
        return real(self, rows, first_index, emit)

    monkeypatch.setattr(HFBackend, "answer", counting)
    return ids


def stories(assets_dir: Path, run_dir: Path, source: Path, tracking_uri: str, *extra: str):
    return compose(
        [
            "target=stories260k", f"target.path={assets_dir}/models/stories260k", f"run_dir={run_dir}",
            f"prompts.source={source}", "regen.max_new_tokens=8", "regen.shard_size=4",
            "storage.samples_per_shard=2", f"tracking.uri={tracking_uri}", *extra,
        ]
    )  # fmt: skip


def cycle(cfg):
    """The three data stages, as the pipeline runs them."""
    return prepare_prompts(cfg), regenerate(cfg), cache.build_cache(cfg)


def test_a_grown_source_is_answered_and_cached_only_where_it_is_new(
    assets_dir, tmp_path, tracking_uri, answered
):
    source = tmp_path / "prompts.jsonl"
    write_source(source, 6)
    cfg = stories(assets_dir, tmp_path / "run", source, tracking_uri, "regen.batch_size=2")
    _, _, built = cycle(cfg)
    assert answered == [f"s{i}" for i in range(6)] and built.shards_built == 3
    before = run_paths(cfg).answers.read_text().splitlines()

    answered.clear()
    write_source(source, 9)  # three rows appended: the last answers shard grows, a new one starts
    prompts, regen, built = cycle(cfg)
    assert prompts.skipped is False and prompts.rows == 9 and regen.rows == 9
    assert answered == ["s6", "s7", "s8"]  # whole hf batches: s4 and s5 filled one before
    assert run_paths(cfg).answers.read_text().splitlines()[:6] == before
    assert built.shards_built == 2 and built.samples == 9  # shard-00003 (s6, s7), shard-00004 (s8)

    answered.clear()
    again = cycle(cfg)
    assert all(result.skipped for result in again) and answered == []

    # what a run that had all nine prompts from the start answers: the same, byte for byte
    fresh = stories(assets_dir, tmp_path / "fresh", source, tracking_uri, "regen.batch_size=2")
    prepare_prompts(fresh)
    regenerate(fresh)
    assert run_paths(fresh).answers.read_bytes() == run_paths(cfg).answers.read_bytes()


def test_held_out_answers_that_move_are_kept_too(assets_dir, tmp_path, tracking_uri, answered):
    """Held-out prompts are answered after the training ones, so new training rows move them into other
    shards: their answers go with them, and again only the new prompts are asked for (one a batch: hf
    answers a batch holding a new prompt whole, so that its seeds line up)."""
    source = tmp_path / "prompts.jsonl"
    write_source(source, 6)
    heldout = ["prompts.heldout_fraction=0.4", "regen.batch_size=1"]
    cfg = stories(assets_dir, tmp_path / "run", source, tracking_uri, *heldout)
    first = cycle(cfg)
    assert first[0].heldout > 0 and sorted(answered) == [f"s{i}" for i in range(6)]

    answered.clear()
    write_source(source, 9)
    prompts, regen, built = cycle(cfg)
    assert sorted(answered) == ["s6", "s7", "s8"] and regen.rows == 9
    held = [
        json.loads(line).get("heldout") is True for line in run_paths(cfg).answers.read_text().splitlines()
    ]
    assert sum(held) == prompts.heldout

    def rebuilt(old: int, new: int) -> int:  # full shards of 2 before the growth stay
        return 0 if new == old else -(-new // 2) - old // 2

    expected = rebuilt(first[0].rows, prompts.rows) + rebuilt(first[0].heldout, prompts.heldout)
    assert built.shards_built == expected < built.shards
