"""A run on the tiny real target stories260k, as most stage tests set it up: its overrides, answers
written where the regenerate stage would leave them, and the cache built from them, so the cache and
training stages can run alone."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths

# (prompt, answer) pairs in stories260k's own words; the third answer is one token
STORIES = [
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("The cat sat on the mat", "."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]


def stories_overrides(assets_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """stories260k from the offline assets, in `run_dir`, two samples a cache shard."""
    return [
        "target=stories260k",
        f"target.path={Path(assets_dir) / 'models' / 'stories260k'}",
        f"run_dir={run_dir}",
        "storage.samples_per_shard=2",
        *extra,
    ]


def answer_rows(pairs: Sequence[tuple[str, str]] = STORIES) -> list[dict]:
    return [
        {
            "id": f"story-{i}",
            "conversations": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
        }
        for i, (p, a) in enumerate(pairs)
    ]


def write_answers(
    overrides: list[str], pairs: Sequence[tuple[str, str]] = STORIES, heldout: Collection[str] = ()
) -> Path:
    """The answers file of the run `overrides` describe, as the regenerate stage would write it; the rows
    whose ids are in `heldout` marked as answers to held-out prompts."""
    path = run_paths(compose(overrides)).answers
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "heldout": True} if r["id"] in heldout else r for r in answer_rows(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_cache_untracked(overrides: list[str]):
    """The cache stage on the run's answers, its MLflow metrics left out: the tests that call it are about
    the data, and a stage test has no run to log to. Returns the stage's CacheResult."""
    import pytest

    from deepspec.tasks.cache.stage import build_cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("deepspec.tasks.tracking.log_metrics", lambda *args, **kwargs: None)
        return build_cache(compose(overrides))
