"""The release step's rule and its folder: promote only a draft better by the margin on the same protocol,
swap `current` atomically keeping `previous`, and the released draft training may start from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deepspec.models.errors import ConfigError
from deepspec.tasks.config import compose
from deepspec.tasks.paths import ReleasePaths, release_paths
from deepspec.tasks.release import decide, promote, protocol
from deepspec.tasks.train.warm_start import init_hash, initial_draft

PROTOCOL = protocol(compose(["target=stories260k", "eval=demo"]))


def candidate(tau: float, sha: str = "b" * 64, **changes) -> dict:
    return {"tau": tau, "protocol": {**PROTOCOL, **changes}, "weights_sha256": sha}


RELEASED = candidate(1.50, sha="a" * 64)


def test_the_first_draft_is_released():
    promoted, reason = decide(candidate(1.10), None, margin=0.02)
    assert promoted and "no draft released yet" in reason


@pytest.mark.parametrize(
    ("tau", "margin", "promoted"),
    [(1.53, 0.02, True), (1.52, 0.02, False), (1.51, 0.02, False), (1.40, 0.0, False), (1.5001, 0.0, True)],
)
def test_promoted_only_when_better_by_more_than_the_margin(tau, margin, promoted):
    decision, reason = decide(candidate(tau), RELEASED, margin)
    assert decision is promoted, reason
    assert f"{tau:.4f}" in reason and "1.5000" in reason and str(margin) in reason


def test_refused_with_both_taus_and_the_margin():
    _, reason = decide(candidate(1.51), RELEASED, margin=0.02)
    assert reason == (
        "macro tau 1.5100 does not beat the released 1.5000 by more than the margin 0.02 "
        "(it needed above 1.5200); the release stays"
    )


def test_another_protocol_is_refused_naming_what_differs():
    other = compose(["target=stories260k", "eval=demo", "eval.max_new_tokens=64", "eval.temperature=1"])
    better = {**candidate(3.0), "protocol": protocol(other)}
    promoted, reason = decide(better, RELEASED, margin=0.02)
    assert not promoted
    assert "eval.max_new_tokens: 32 -> 64" in reason and "eval.temperature: 0.0 -> 1.0" in reason
    assert "eval.max_samples" not in reason  # only what differs
    promoted, reason = decide(candidate(3.0, algo="eagle3"), RELEASED, margin=0.02)
    assert not promoted and "algo: 'dflash' -> 'eagle3'" in reason


def test_the_released_draft_itself_is_not_released_again():
    promoted, reason = decide(candidate(9.0, sha="a" * 64), RELEASED, margin=0.0)
    assert not promoted and "is the released one" in reason


def _draft(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(marker)
    (folder / "config.json").write_text("{}")
    (folder / "_DONE.json").write_text("{}")  # a stage record: not part of a release
    return folder


def test_promotion_swaps_current_and_keeps_previous(tmp_path):
    where = ReleasePaths(tmp_path / "release")
    names = []
    for n in range(3):
        export, draft = _draft(tmp_path / f"e{n}", f"export {n}"), _draft(tmp_path / f"d{n}", f"draft {n}")
        names.append(promote(where, export, draft, candidate(1.0 + n, sha=f"{n}" * 64)).name)
        assert json.loads(where.record.read_text())["tau"] == 1.0 + n
        assert (where.export / "model.safetensors").read_text() == f"export {n}"
        assert (where.draft / "model.safetensors").read_text() == f"draft {n}"
        assert not (where.export / "_DONE.json").exists()
    assert len(set(names)) == 3
    assert os.readlink(where.current) == names[2] and os.readlink(where.previous) == names[1]  # relative
    assert sorted(p.name for p in where.root.iterdir() if not p.name.startswith(".")) == sorted(
        ["current", "previous", names[1], names[2]]
    )  # the oldest went


def test_training_starts_from_the_released_draft_only_when_asked(tmp_path):
    release = tmp_path / "release"
    base = ["target=stories260k", f"release.dir={release}"]
    scratch, released = compose(base), compose([*base, "release.init=released"])
    assert initial_draft(released) is None and init_hash(released) == []  # nothing released yet
    where = release_paths(released)
    promote(where, _draft(tmp_path / "e", "e"), _draft(tmp_path / "d", "weights"), candidate(1.0))
    assert initial_draft(released) == where.draft.resolve() != where.draft
    assert init_hash(released)[0]["init_sha256"] != "" and initial_draft(scratch) is None
    with pytest.raises(ConfigError, match="release.init=released trains on from the draft released"):
        compose(["release.init=released"])
