"""The cache stage on the real stories260k target: features, resume, skip and mismatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deepspec.models.chat import render_conversation
from deepspec.models.errors import CacheMismatchError, DataError
from deepspec.models.target import capture_features, load_target
from deepspec.tasks.cache import stage as cache
from deepspec.tasks.cache.format import iter_samples, read_manifest, shard_name
from deepspec.tasks.config import compose

STORIES = [
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("The cat sat on the mat", "."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]


@pytest.fixture(scope="module")
def assets() -> Path:
    path = Path(
        os.environ.get("DEEPSPEC_ASSETS", Path(__file__).resolve().parents[2].parent / "shared" / "assets")
    )
    if not (path / "models" / "stories260k" / "config.json").is_file():
        pytest.skip(f"offline assets not found at {path} (set DEEPSPEC_ASSETS to the shared/assets folder)")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 260K-parameter model: threads cost more than they save
    yield
    torch.set_num_threads(before)


@pytest.fixture
def load_count(monkeypatch) -> list[int]:
    """Counts the target loads the stage makes."""
    calls = []

    def counting_load(*args, **kwargs):
        calls.append(1)
        return load_target(*args, **kwargs)

    monkeypatch.setattr(cache, "load_target", counting_load)
    return calls


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> Path:
    """One MLflow store for the module: creating an SQLite store takes seconds, a run in it does not."""
    return tmp_path_factory.mktemp("mlflow") / "m.db"


def make_cfg(assets: Path, tmp: Path, db: Path, *extra: str):
    return compose(
        [
            "target=stories260k",
            f"target.path={assets}/models/stories260k",
            f"run_dir={tmp}",
            "storage.samples_per_shard=2",
            f"tracking.uri=sqlite:///{db}",
            *extra,
        ]
    )


def write_answers(tmp: Path) -> None:
    (tmp / "regen").mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": f"story-{i}",
            "conversations": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
        }
        for i, (p, a) in enumerate(STORIES)
    ]
    (tmp / "regen" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory, tracking_db):
    """One complete build, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("cache")
    write_answers(tmp)
    cfg = make_cfg(assets, tmp, tracking_db)
    return cfg, cache.build_cache(cfg)


def test_build_stores_the_targets_features(built):
    cfg, result = built
    assert result["skipped"] is False
    assert result["samples"] == len(STORIES) and result["shards"] == result["shards_built"] == 3
    manifest = read_manifest(cfg.storage.url)
    assert manifest.layer_ids == [0, 2, 4] and manifest.hidden_size == 64
    assert [s["name"] for s in manifest.shards] == [shard_name(k) for k in range(3)]
    assert result["tokens"] == manifest.num_tokens and result["bytes"] == manifest.num_bytes

    model, tokenizer = load_target(cfg.target.path)
    samples = {s["sample_id"]: s for s in iter_samples(cfg.storage.url, verify=True)}
    assert sorted(samples) == [f"story-{i}" for i in range(len(STORIES))]
    for i, (prompt, answer) in enumerate(STORIES):
        sample = samples[f"story-{i}"]
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rendered = render_conversation(tokenizer, turns, use_chat_template=False, max_length=4096)
        assert sample["input_ids"].tolist() == rendered.input_ids
        assert sample["loss_mask"].long().tolist() == rendered.loss_mask
        want = capture_features(model, sample["input_ids"][None], [0, 2, 4])[0]
        assert sample["features"].shape == (len(rendered.input_ids), 3 * 64)
        torch.testing.assert_close(sample["features"], want, rtol=2**-7, atol=1e-4)


def test_int4_mixed_build_encodes_the_teachers_layer_apart(assets, tmp_path, tracking_db):
    """The cache stage passes the layer ids to the writer, so layer 4 (the teacher's) is stored at
    int6 with outliers and layers 0 and 2 at int4, each shard recording the ids it was split by."""
    write_answers(tmp_path)
    cfg = make_cfg(assets, tmp_path, tracking_db, "storage.encoding=int4_mixed")
    cache.build_cache(cfg)
    assert read_manifest(cfg.storage.url).encoding == "int4_mixed"
    model, _ = load_target(cfg.target.path)
    errors = []
    for sample in iter_samples(cfg.storage.url, verify=True):
        want = capture_features(model, sample["input_ids"][None], [0, 2, 4])[0]
        err = (sample["features"] - want).norm(dim=0).reshape(3, 64).norm(dim=1)
        errors.append(err / want.norm(dim=0).reshape(3, 64).norm(dim=1))
    per_layer = torch.stack(errors).mean(0)
    assert per_layer[2] < 0.04 and (per_layer[:2] < 0.15).all(), per_layer
    assert per_layer[2] < 0.5 * per_layer[:2].min(), per_layer


def test_second_build_skips_without_loading_the_target(built, load_count):
    cfg, _ = built
    result = cache.build_cache(cfg)
    assert result["skipped"] is True and result["shards_built"] == 0 and load_count == []


def test_other_layer_ids_raise_naming_the_field(assets, tracking_db, built, load_count):
    cfg, _ = built
    other = make_cfg(assets, Path(cfg.run_dir), tracking_db, "target.layer_ids=[1,2]")
    with pytest.raises(CacheMismatchError, match=r"layer_ids \[0, 2, 4\]; this config asks for \[1, 2\]"):
        cache.build_cache(other)
    assert load_count == []


def test_resume_rebuilds_only_the_missing_shard(assets, tmp_path, tracking_db, load_count):
    write_answers(tmp_path)
    cfg = make_cfg(assets, tmp_path, tracking_db)
    cache.build_cache(cfg)
    root = Path(cfg.storage.url)
    before = {k: (root / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    first_bytes = (root / shard_name(1)).read_bytes()
    for name in (shard_name(1), shard_name(1) + ".committed", "manifest.json"):
        (root / name).unlink()
    # a changed layer set must not mix with the shards already committed, manifest or not
    with pytest.raises(CacheMismatchError, match="layer_ids"):
        cache.build_cache(make_cfg(assets, tmp_path, tracking_db, "target.layer_ids=[1]"))

    result = cache.build_cache(cfg)
    assert result["shards_built"] == 1 and load_count == [1, 1]
    after = {k: (root / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert (root / shard_name(1)).read_bytes() == first_bytes  # deterministic: the same bytes again
    assert read_manifest(str(root)).num_samples == len(STORIES)


def test_a_malformed_answer_is_named_by_line(assets, tmp_path, tracking_db, load_count):
    write_answers(tmp_path)
    with (tmp_path / "regen" / "answers.jsonl").open("a") as f:
        f.write(json.dumps({"id": "bad", "conversations": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"answers\.jsonl:6: field 'conversations'"):
        cache.build_cache(make_cfg(assets, tmp_path, tracking_db))
    assert load_count == []
