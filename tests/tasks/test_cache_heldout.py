"""Held-out samples, from the prompts to the streams: the regenerate stage answers the held-out prompts
after the others, the cache keeps their answers in shards of their own, no training stream (cached or
online, any rank, any epoch) ever yields one, and a validation stream yields exactly them. A run that
holds nothing out keeps every key, digest and manifest it had before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.stories import STORIES, answer_rows, build_cache_untracked, stories_overrides, write_answers

from deepspec.models.errors import DataError
from deepspec.models.target import load_tokenizer
from deepspec.tasks.cache.format import MANIFEST_FILE, read_manifest
from deepspec.tasks.cache.loader import open_stream, supervised_token_counts
from deepspec.tasks.config import compose, config_hash
from deepspec.tasks.files import sha256_file
from deepspec.tasks.paths import answers_key, cache_key, prompts_key, run_paths
from deepspec.tasks.regenerate.stage import load_prompts
from deepspec.tasks.train.stage import VALIDATION_KEYS, train_hash

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [*STORIES, ("The sun came up", " and the birds began to sing. Sue woke up and smiled.")]
HELDOUT = {"story-1", "story-4"}  # of story-0 .. story-5


def test_holding_nothing_out_keeps_every_key():
    """The folder names of a run holding nothing out, as they were before held-out prompts were
    answered: its prompts, answers, cache and draft are found again."""
    cfg = compose(
        ["target=stories260k", "target.path=stories260k", "run_dir=/runs/x", "prompts.source=builtin"]
    )
    assert (prompts_key(cfg), answers_key(cfg), cache_key(cfg), train_hash(cfg)) == (
        "builtin-e75aedd21daf",
        "stories260k-244687976473",
        "stories260k-bf16-7bff0c3c0f7d",
        "72312279a6118077",
    )
    train = {k: v for k, v in dict(cfg.train).items() if k not in VALIDATION_KEYS}
    assert train_hash(cfg) == config_hash(cfg.target, cfg.storage, cfg.algo, train)
    validating = compose(["prompts.heldout_fraction=0.1", "train.eval_every_steps=5"])
    assert train_hash(validating) != train_hash(compose(["prompts.heldout_fraction=0.1"]))


def test_regenerate_answers_the_held_out_prompts_after_the_others(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])
    paths = run_paths(cfg)
    paths.prompts_dir.mkdir(parents=True)
    rows = [{"id": r["id"], "conversations": r["conversations"][:1]} for r in answer_rows(PAIRS)]
    paths.prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    paths.heldout.write_text("")  # what the prompts stage writes when nothing is held out
    prompts, sha = load_prompts(cfg)
    assert sha == sha256_file(paths.prompts) and not any("heldout" in r for r in prompts)
    paths.heldout.write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    prompts, with_heldout = load_prompts(cfg)
    assert [r["id"] for r in prompts] == [r["id"] for r in rows] and with_heldout != sha
    assert [r.get("heldout", False) for r in prompts] == [False] * 4 + [True] * 2


@pytest.fixture(scope="module")
def heldout_run(assets_dir, tmp_path_factory):
    """stories260k answers, two of six to held-out prompts, cached two samples a shard."""
    overrides = stories_overrides(
        assets_dir, tmp_path_factory.mktemp("heldout"), "prompts.heldout_fraction=0.3"
    )
    write_answers(overrides, PAIRS, heldout=HELDOUT)
    return overrides, build_cache_untracked(overrides)


def test_the_cache_keeps_held_out_samples_in_shards_of_their_own(heldout_run):
    overrides, result = heldout_run
    manifest = read_manifest(run_paths(compose(overrides)).cache_url)
    assert [s["name"] for s in manifest.shards] == ["shard-00000.arrow", "shard-00001.arrow"]
    assert [s["name"] for s in manifest.heldout_shards] == ["heldout-00000.arrow"]
    assert (manifest.num_samples, manifest.heldout_samples) == (4, 2)
    assert (result.samples, result.heldout_samples) == (4, 2)


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_no_training_stream_yields_a_held_out_sample(heldout_run, mode):
    overrides, _ = heldout_run
    cfg = compose([*overrides, f"storage.mode={mode}"])
    seen: list[str] = []
    for rank in range(2):
        with open_stream(cfg, rank=rank, world_size=2, epochs=3) as stream:
            assert (stream.num_samples, stream.samples_per_epoch) == (4, 2)  # training samples only
            seen += [s["sample_id"] for s in stream]
    assert sorted(seen) == sorted(["story-0", "story-2", "story-3", "story-5"] * 3)
    with open_stream(cfg, heldout=True) as heldout:
        assert heldout.num_samples == 2
        samples = heldout.samples(range(heldout.num_samples))
    assert {s["sample_id"] for s in samples} == HELDOUT
    width = read_manifest(run_paths(cfg).cache_url).feature_dim
    assert all(s["features"].shape == (s["num_tokens"], width) for s in samples)


def test_supervised_token_counts_leave_the_held_out_samples_out(heldout_run):
    overrides, _ = heldout_run
    cfg = compose(overrides)
    tokenizer = load_tokenizer(cfg.target.path)
    expected = torch.zeros(512, dtype=torch.long)
    with open_stream(cfg, epochs=1) as stream:
        for s in stream:
            expected += torch.bincount(s["input_ids"][s["loss_mask"]], minlength=512)
    assert torch.equal(supervised_token_counts(cfg, tokenizer, 512), expected)
    online = compose([*overrides, "storage.mode=online"])
    assert torch.equal(supervised_token_counts(online, tokenizer, 512), expected)


def test_a_cache_holding_nothing_out_writes_the_manifest_it_did(assets_dir, tmp_path):
    overrides = stories_overrides(assets_dir, tmp_path)
    write_answers(overrides, PAIRS)
    build_cache_untracked(overrides)
    url = run_paths(compose(overrides)).cache_url
    assert "heldout_shards" not in json.loads((Path(url) / MANIFEST_FILE).read_text())
    assert [s["name"] for s in read_manifest(url).shards] == [f"shard-0000{k}.arrow" for k in range(3)]
    with pytest.raises(DataError, match="holds no held-out samples"):
        open_stream(compose(overrides), heldout=True)
