"""The cache stage on the real stories260k target: features, resume, skip and mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.stories import STORIES, stories_overrides, write_answers

from deepspec.models.chat import render_conversation
from deepspec.models.errors import CacheMismatchError, DataError
from deepspec.models.target import capture_features, load_target
from deepspec.tasks.cache import stage as cache
from deepspec.tasks.cache.format import iter_samples, read_manifest, shard_name
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def load_count(monkeypatch) -> list[int]:
    """Counts the target loads the stage makes."""
    calls = []

    def counting_load(*args, **kwargs):
        calls.append(1)
        return load_target(*args, **kwargs)

    monkeypatch.setattr(cache, "load_target", counting_load)
    return calls


def make_cfg(assets: Path, tmp: Path, tracking_uri: str, *extra: str):
    overrides = stories_overrides(assets, tmp, f"tracking.uri={tracking_uri}", *extra)
    if not run_paths(compose(overrides)).answers.is_file():
        write_answers(overrides)
    return compose(overrides)


@pytest.fixture(scope="module")
def built(assets_dir, tmp_path_factory, tracking_uri):
    """One complete build, shared by the tests that only read it."""
    cfg = make_cfg(assets_dir, tmp_path_factory.mktemp("cache"), tracking_uri)
    return cfg, cache.build_cache(cfg)


def test_build_stores_the_targets_features(built):
    cfg, result = built
    url = run_paths(cfg).cache_url
    assert result.skipped is False and result.url == url and url.startswith(f"{cfg.data_dir}/cache/")
    assert result.samples == len(STORIES) and result.shards == result.shards_built == 3
    manifest = read_manifest(url)
    assert manifest.layer_ids == [0, 2, 4] and manifest.hidden_size == 64
    assert [s["name"] for s in manifest.shards] == [shard_name(k) for k in range(3)]
    assert result.tokens == manifest.num_tokens and result.bytes == manifest.num_bytes

    model, tokenizer = load_target(cfg.target.path)
    samples = {s["sample_id"]: s for s in iter_samples(url, verify=True)}
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


def test_int4_mixed_build_encodes_the_teachers_layer_apart(assets_dir, tmp_path, tracking_uri):
    """The cache stage passes the layer ids to the writer, so layer 4 (the teacher's) is stored at
    int6 with outliers and layers 0 and 2 at int4, each shard recording the ids it was split by."""
    cfg = make_cfg(assets_dir, tmp_path, tracking_uri, "storage.encoding=int4_mixed")
    cache.build_cache(cfg)
    url = run_paths(cfg).cache_url
    assert read_manifest(url).encoding == "int4_mixed" and "-int4_mixed-" in url
    model, _ = load_target(cfg.target.path)
    errors = []
    for sample in iter_samples(url, verify=True):
        want = capture_features(model, sample["input_ids"][None], [0, 2, 4])[0]
        err = (sample["features"] - want).norm(dim=0).reshape(3, 64).norm(dim=1)
        errors.append(err / want.norm(dim=0).reshape(3, 64).norm(dim=1))
    per_layer = torch.stack(errors).mean(0)
    assert per_layer[2] < 0.04 and (per_layer[:2] < 0.15).all(), per_layer
    assert per_layer[2] < 0.5 * per_layer[:2].min(), per_layer


def test_second_build_skips_without_loading_the_target(built, load_count):
    cfg, _ = built
    result = cache.build_cache(cfg)
    assert result.skipped is True and result.shards_built == 0 and load_count == []


def test_other_layer_ids_build_a_cache_of_their_own(assets_dir, tracking_uri, built):
    """Caches are addressed by what they hold: other layers go beside the first cache, which stays."""
    cfg, _ = built
    first = run_paths(cfg).cache_url
    manifest = (Path(first) / "manifest.json").read_bytes()
    other = make_cfg(assets_dir, Path(cfg.run_dir), tracking_uri, "target.layer_ids=[1,2]")
    assert run_paths(other).cache_url != first
    assert cache.build_cache(other).shards_built == 3
    assert read_manifest(run_paths(other).cache_url).layer_ids == [1, 2]
    assert (Path(first) / "manifest.json").read_bytes() == manifest
    assert cache.build_cache(cfg).skipped


def test_answers_that_changed_rebuild_only_the_shards_whose_rows_changed(
    assets_dir, tmp_path, tracking_uri, load_count
):
    """The same settings over answers that changed since the build (a prompts source that grew, a row
    answered again): the shards whose rows are unchanged are kept as built, only the others are built
    again, and the manifest covers every row. Nothing of the old rows is mixed in."""
    cfg = make_cfg(assets_dir, tmp_path, tracking_uri)
    cache.build_cache(cfg)
    root = Path(run_paths(cfg).cache_url)

    def mtimes() -> list[int]:
        return [(root / shard_name(k)).stat().st_mtime_ns for k in range(3)]

    built = mtimes()
    overrides = stories_overrides(assets_dir, tmp_path, f"tracking.uri={tracking_uri}")
    grown = [*STORIES, ("The frog sat by the pond", " and jumped in. Splash!")]
    write_answers(overrides, grown)  # one row appended: it joins the last shard
    result = cache.build_cache(cfg)
    assert result.shards_built == 1 and result.samples == len(grown) and load_count == [1, 1]
    regrown = mtimes()
    assert regrown[:2] == built[:2] and regrown[2] != built[2]

    write_answers(overrides, [(p, a.replace("Max", "Rex")) for p, a in grown])  # story-0, in shard 0
    assert cache.build_cache(cfg).shards_built == 1
    changed = mtimes()
    assert changed[0] != regrown[0] and changed[1:] == regrown[1:]
    model, tokenizer = load_target(cfg.target.path)
    story = next(s for s in iter_samples(str(root), verify=True) if s["sample_id"] == "story-0")
    assert "Rex" in tokenizer.decode(story["input_ids"].tolist()) and cache.build_cache(cfg).skipped

    # answers that changed under a cache built with another tokenizer: refused, nothing removed
    build = json.loads((root / "build.json").read_text())
    (root / "build.json").write_text(json.dumps({**build, "tokenizer_sha256": "another"}))
    write_answers(overrides, STORIES)
    with pytest.raises(CacheMismatchError, match="tokenizer_sha256 'another'"):
        cache.build_cache(cfg)
    assert mtimes() == changed and (root / "manifest.json").is_file()


def test_resume_rebuilds_only_the_missing_shard(assets_dir, tmp_path, tracking_uri, load_count):
    cfg = make_cfg(assets_dir, tmp_path, tracking_uri)
    cache.build_cache(cfg)
    root = Path(run_paths(cfg).cache_url)
    before = {k: (root / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    first_bytes = (root / shard_name(1)).read_bytes()
    for name in (shard_name(1), shard_name(1) + ".committed", "manifest.json"):
        (root / name).unlink()

    result = cache.build_cache(cfg)
    assert result.shards_built == 1 and load_count == [1, 1]
    after = {k: (root / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert (root / shard_name(1)).read_bytes() == first_bytes  # deterministic: the same bytes again
    assert read_manifest(str(root)).num_samples == len(STORIES)


def test_a_malformed_answer_is_named_by_line(assets_dir, tmp_path, tracking_uri, load_count):
    cfg = make_cfg(assets_dir, tmp_path, tracking_uri)
    with run_paths(cfg).answers.open("a") as f:
        f.write(json.dumps({"id": "bad", "conversations": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"answers\.jsonl:6: field 'conversations'"):
        cache.build_cache(cfg)
    assert load_count == []
