"""Training's sample streams: order, rank sharding, prefetch errors, checksums, exact resume, online mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from support.stories import STORIES, build_cache_untracked, stories_overrides, write_answers

from deepspec.models.errors import ConfigError, DataError
from deepspec.tasks.cache.format import (
    CacheManifest,
    iter_samples,
    open_fs,
    shard_name,
    write_manifest,
    write_shard,
)
from deepspec.tasks.cache.loader import CacheStream, RankOrder, open_stream, samples_per_second
from deepspec.tasks.config import compose

DIM = 8  # 2 layers x hidden 4
SIZES = [5, 3, 6, 4]  # shards of unequal size: 18 samples


def write_cache(url: str, sizes: list[int] = SIZES, encoding: str = "bf16") -> None:
    fs, root = open_fs(url)
    gen = torch.Generator().manual_seed(0)
    shards, count = [], 0
    for k, size in enumerate(sizes):
        part = []
        for i in range(count, count + size):
            n = 2 + i % 5
            part.append(
                {
                    "sample_id": f"s{i}",
                    "input_ids": list(range(i, i + n)),
                    "loss_mask": [1] * n,
                    "features": torch.randn(n, DIM, generator=gen),
                }
            )
        shards.append(write_shard(fs, root, shard_name(k), part, encoding=encoding, layer_ids=[0, 1]))
        count += size
    write_manifest(
        fs,
        root,
        CacheManifest(
            target_id="tiny",
            target_revision=None,
            tokenizer_sha256="t" * 16,
            chat_template_sha256="c" * 16,
            layer_ids=[0, 1],
            hidden_size=DIM // 2,
            encoding=encoding,
            shards=shards,
            num_samples=count,
            num_tokens=sum(s["tokens"] for s in shards),
            num_bytes=sum(s["bytes"] for s in shards),
        ),
    )


@pytest.fixture
def cache_url(tmp_path) -> str:
    url = str(tmp_path / "cache")
    write_cache(url)
    return url


def ids(samples) -> list[str]:
    return [s["sample_id"] for s in samples]


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


# ----------------------------------------------------------------------------------------------------
# Order


def test_every_epoch_is_a_permutation_that_changes_with_the_epoch():
    order = RankOrder(SIZES, seed=3, shuffle_buffer=4)
    first, second = order.epoch_order(0), order.epoch_order(1)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(sum(SIZES)))
    assert first.tolist() != second.tolist()
    assert first.tolist() == RankOrder(SIZES, seed=3, shuffle_buffer=4).epoch_order(0).tolist()


def test_the_shuffle_buffer_bounds_how_far_ahead_reads_go():
    sizes = [10] * 20
    buffer = 8
    order = RankOrder(sizes, seed=1, shuffle_buffer=buffer).epoch_order(0)
    rng = np.random.default_rng(1)
    groups = rng.permutation(len(sizes))  # the shard order the stream read in
    stream_pos = {
        item: p for p, item in enumerate(np.concatenate([np.arange(g * 10, g * 10 + 10) for g in groups]))
    }
    # the item emitted at position p was among the first p + buffer items of the shard stream
    assert all(stream_pos[item] < p + buffer for p, item in enumerate(order.tolist()))
    # and items do move: the buffer shuffles within shards too
    assert [stream_pos[i] for i in order.tolist()] != list(range(len(order)))


@pytest.mark.parametrize("world", [1, 2, 4, 5])
def test_ranks_split_each_epoch_and_stay_in_lockstep(world):
    orders = [RankOrder(SIZES, rank=r, world_size=world, seed=0, shuffle_buffer=4) for r in range(world)]
    parts = [o.rank_items(2).tolist() for o in orders]
    total = sum(SIZES)
    assert {len(p) for p in parts} == {-(-total // world)}  # ceil: every rank the same count
    seen = [i for p in parts for i in p]
    assert set(seen) == set(range(total))  # nothing dropped
    assert len(seen) - total < world  # at most world - 1 wrapped repeats
    # rank r takes every world-th position of the shared order
    shared = orders[0].epoch_order(2).tolist()
    assert parts[world - 1][0] == shared[world - 1]


def test_a_bad_rank_or_an_empty_cache_is_refused():
    with pytest.raises(ConfigError, match="rank 2"):
        RankOrder(SIZES, rank=2, world_size=2)
    with pytest.raises(DataError, match="empty"):
        RankOrder([0, 0])


# ----------------------------------------------------------------------------------------------------
# Cached stream


def test_stream_yields_the_cache_samples(cache_url):
    want = {s["sample_id"]: s for s in iter_samples(cache_url)}
    with CacheStream(cache_url, epochs=1, shuffle_buffer=4) as stream:
        got = list(stream)
    assert sorted(ids(got)) == sorted(want) and len(stream) == len(want)
    for s in got:
        ref = want[s["sample_id"]]
        assert torch.equal(s["input_ids"], ref["input_ids"]) and s["input_ids"].dtype == torch.int64
        assert torch.equal(s["loss_mask"], ref["loss_mask"]) and s["loss_mask"].dtype == torch.bool
        assert torch.equal(s["features"], ref["features"]) and s["features"].dtype == torch.float32
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["consumed"] == 0


def test_two_ranks_read_disjoint_halves(cache_url):
    streams = [CacheStream(cache_url, rank=r, world_size=2, epochs=1, seed=5) for r in range(2)]
    halves = [ids(s) for s in streams]
    assert len(halves[0]) == len(halves[1]) == sum(SIZES) // 2
    assert not set(halves[0]) & set(halves[1])


@pytest.mark.parametrize("k", [0, 1, 7, 17, 18, 25])  # within, at and across the epoch boundary (18)
def test_resume_yields_exactly_the_remaining_sequence(cache_url, k):
    kwargs = {"rank": 1, "world_size": 2, "seed": 2, "epochs": 4, "shuffle_buffer": 3, "prefetch": 4}
    uninterrupted = ids(CacheStream(cache_url, **kwargs))
    assert len(uninterrupted) == 4 * 9

    first = CacheStream(cache_url, **kwargs)
    it = iter(first)
    seen = ids(take(it, k))
    # what a DeepSpeed checkpoint does with client_state: torch.save, then torch.load in a new process
    buf = io.BytesIO()
    torch.save({"micro_step": 3, "loader": first.state_dict()}, buf)
    first.close()
    buf.seek(0)
    client_state = torch.load(buf, weights_only=True)

    resumed = CacheStream(cache_url, **kwargs)
    resumed.load_state_dict(client_state["loader"])
    assert resumed.state_dict() == client_state["loader"]
    assert seen + ids(resumed) == uninterrupted


def test_training_resumes_at_the_checkpointed_micro_step(cache_url):
    """The recipe's loop: micro-batches from the stream, its state in client_state; a crash after the
    checkpoint at micro-step 5 resumes with the same micro-batches and anchors as a run that never stopped."""
    from deepspec.models.drafts.dflash import sample_anchors
    from deepspec.tasks.train.schedule import anchor_generator, loader_state_at, micro_batch_size

    micro_batch, epochs = 4, 3  # 9 samples per rank per epoch: every epoch ends with a short micro-batch
    per_step = 3  # ceil(9 / 4) micro-steps per epoch

    def run(start_micro: int, client_state: dict | None, stop_at: int | None = None):
        stream = CacheStream(cache_url, rank=1, world_size=2, seed=4, epochs=epochs, prefetch=2)
        if client_state is not None:
            stream.load_state_dict(client_state["loader"])
            assert stream.state_dict() == {**client_state["loader"]}
        it, steps, saved = iter(stream), [], None
        for micro in range(start_micro, epochs * per_step):
            batch = [next(it) for _ in range(micro_batch_size(micro, stream.samples_per_epoch, micro_batch))]
            gen = anchor_generator(4, micro, 1, 2)
            steps.append([(s["sample_id"], sample_anchors(s["loss_mask"], 2, gen).tolist()) for s in batch])
            if micro + 1 == stop_at:
                saved = {"micro_step": micro + 1, "loader": stream.state_dict()}
                break
        stream.close()
        return steps, saved

    uninterrupted, _ = run(0, None)
    before, saved = run(0, None, stop_at=5)
    buf = io.BytesIO()
    torch.save(saved, buf)  # as DeepSpeed keeps client_state
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    assert restored["loader"] == saved["loader"]
    assert {k: restored["loader"][k] for k in ("epoch", "consumed")} == loader_state_at(
        5, per_step, micro_batch
    )
    after, _ = run(restored["micro_step"], restored)
    assert before + after == uninterrupted
    assert [len(b) for b in uninterrupted[:3]] == [4, 4, 1]


def test_state_counts_what_was_taken_not_what_was_prefetched(cache_url):
    stream = CacheStream(cache_url, prefetch=8)
    it = iter(stream)
    next(it)
    assert stream.state_dict()["consumed"] == 1
    take(it, sum(SIZES))  # across the boundary into epoch 1
    assert (stream.state_dict()["epoch"], stream.state_dict()["consumed"]) == (1, 1)
    stream.close()


def test_resume_refuses_another_world_size(cache_url):
    state = CacheStream(cache_url, world_size=2).state_dict()
    with pytest.raises(ConfigError, match="world_size=2"):
        CacheStream(cache_url, world_size=3).load_state_dict(state)


def test_a_corrupt_shard_is_named_when_verifying(cache_url):
    path = Path(cache_url) / shard_name(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard_name(2)} is corrupt"):
        list(CacheStream(cache_url, epochs=1, verify=True))


def test_a_reader_error_is_raised_in_the_consumer(cache_url):
    stream = CacheStream(cache_url, epochs=1)
    (Path(cache_url) / shard_name(1)).unlink()  # gone after the stream opened: the reader thread finds out
    with pytest.raises(DataError, match=rf"{shard_name(1)} is missing"):
        list(stream)


@pytest.mark.parametrize("encoding", ["bf16", "int4_mixed"])
def test_decoding_in_the_consumer_gives_the_same_samples(tmp_path, monkeypatch, encoding):
    """With decode_device the prefetch thread only reads and the thread that takes a sample decodes it
    (training: on its GPU): the same samples in the same order, and the same resume position."""
    import threading

    from deepspec.tasks.cache.encoding import BF16, TeacherMixed

    url = str(tmp_path / "cache")
    write_cache(url, encoding=encoding)
    kind = BF16 if encoding == "bf16" else TeacherMixed
    threads: list[str] = []
    decode = kind.decode

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(kind, "decode", recording)
    kwargs = {"seed": 3, "epochs": 2, "shuffle_buffer": 4, "prefetch": 4}
    want = list(CacheStream(url, **kwargs))
    assert set(threads) == {"deepspec-prefetch"}
    threads.clear()
    stream = CacheStream(url, decode_device="cpu", **kwargs)
    it = iter(stream)
    got = take(it, 7)
    state = stream.state_dict()
    got += list(it)
    assert set(threads) == {threading.current_thread().name}
    assert ids(got) == ids(want) and len(got) == 2 * sum(SIZES)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["input_ids"], b["input_ids"])
    resumed = CacheStream(url, decode_device="cpu", **kwargs)
    resumed.load_state_dict(state)
    assert ids(resumed) == ids(want)[7:]


def test_a_sample_that_fails_to_decode_is_named(tmp_path):
    from deepspec.tasks.cache.format import CacheDataset

    url = str(tmp_path / "cache")
    write_cache(url, encoding="int4_mixed")
    encoded = CacheDataset(url, keep_encoded=True)[0]["features"]
    assert torch.equal(encoded.decode(), next(iter_samples(url))["features"])
    encoded.data = encoded.data[:-1]  # a sample whose bytes were cut short
    with pytest.raises(DataError, match=rf"{shard_name(0)}: sample 0 is unreadable .*take"):
        encoded.decode(device="cpu")


def test_samples_per_second_measures_the_stream(cache_url):
    result = samples_per_second(CacheStream(cache_url), 10, warmup=2)
    assert result["samples"] == 10 and result["samples_per_s"] > 0 and result["tokens_per_s"] > 0


# ----------------------------------------------------------------------------------------------------
# Mode


def test_mode_is_checked_when_composing():
    assert compose().storage.mode == "cached" and compose(["storage.mode=online"]).storage.mode == "online"
    with pytest.raises(ConfigError, match="storage.mode='disk': expected one of"):
        compose(["storage.mode=disk"])


# ----------------------------------------------------------------------------------------------------
# Online mode on the real stories260k target


@pytest.fixture(scope="module")
def stories_run(assets_dir, tmp_path_factory, one_thread):
    """A run directory with answers and the cache built from them by the cache stage."""
    overrides = stories_overrides(assets_dir, tmp_path_factory.mktemp("online"))
    write_answers(overrides)
    build_cache_untracked(overrides)  # this test is about features, not MLflow metrics
    return overrides


def test_online_samples_equal_cached_samples(stories_run):
    cached_cfg = compose(stories_run)
    online_cfg = compose([*stories_run, "storage.mode=online"])
    cached = {s["sample_id"]: s for s in open_stream(cached_cfg, epochs=1)}
    online_stream = open_stream(online_cfg, epochs=1)
    online_stream.lookahead = 3  # windows of several lengths, padded in batches
    online = {s["sample_id"]: s for s in online_stream}
    assert sorted(online) == sorted(cached) == [f"story-{i}" for i in range(len(STORIES))]
    for key, c in cached.items():
        o = online[key]
        assert torch.equal(o["input_ids"], c["input_ids"]) and o["input_ids"].dtype == torch.int64
        assert torch.equal(o["loss_mask"], c["loss_mask"]) and o["loss_mask"].dtype == torch.bool
        assert o["features"].dtype == torch.float32 and o["num_tokens"] == c["num_tokens"]
        torch.testing.assert_close(o["features"], c["features"], rtol=2**-7, atol=1e-4)


def test_online_stream_resumes_exactly(stories_run):
    cfg = compose([*stories_run, "storage.mode=online"])
    uninterrupted = ids(open_stream(cfg, world_size=2, rank=0, epochs=3))
    first = open_stream(cfg, world_size=2, rank=0, epochs=3)
    seen = ids(take(iter(first), 4))
    resumed = open_stream(cfg, world_size=2, rank=0, epochs=3)
    resumed.load_state_dict(first.state_dict())
    assert seen + ids(resumed) == uninterrupted and len(uninterrupted) == 9
