"""The target cache format: bf16 round trips, atomic commits, checksums, manifests and the dataset."""

from __future__ import annotations

import pickle
import uuid

import pytest
import torch

from deepspec.models.errors import CacheMismatchError, DataError
from deepspec.tasks.cache.format import (
    CacheDataset,
    CacheManifest,
    ShardWriter,
    committed_shards,
    iter_samples,
    open_fs,
    read_manifest,
    remove_stale_temp_files,
    shard_name,
    validate_manifest,
    write_manifest,
    write_shard,
)

DIM = 12  # 3 layers x hidden 4


def make_samples(count: int, start: int = 0, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(start, start + count):
        n = 3 + 5 * (i % 3)  # lengths 3, 8, 13: the mask spans byte boundaries
        samples.append(
            {
                "sample_id": f"s{i}",
                "input_ids": torch.randint(0, 50_000, (n,), generator=gen).tolist(),
                "loss_mask": torch.randint(0, 2, (n,), generator=gen).tolist(),
                "features": torch.randn(n, DIM, generator=gen) * 10,
            }
        )
    return samples


def write_cache(url: str, sizes: list[int]) -> tuple[list[dict], CacheManifest]:
    """Shards of the given sizes plus a manifest, as the cache stage would leave them."""
    fs, root = open_fs(url)
    samples, shards = [], []
    for k, size in enumerate(sizes):
        part = make_samples(size, start=len(samples), seed=k)
        shards.append(write_shard(fs, root, shard_name(k), part))
        samples += part
    manifest = CacheManifest(
        target_id="tiny",
        target_revision=None,
        tokenizer_sha256="t" * 16,
        chat_template_sha256="c" * 16,
        layer_ids=[0, 1, 2],
        hidden_size=DIM // 3,
        shards=shards,
        num_samples=len(samples),
        num_tokens=sum(s["tokens"] for s in shards),
        num_bytes=sum(s["bytes"] for s in shards),
    )
    write_manifest(fs, root, manifest)
    return samples, manifest


@pytest.fixture(params=["local", "file", "memory"])
def cache_url(request, tmp_path) -> str:
    if request.param == "memory":
        url = f"memory://cache-{uuid.uuid4().hex}"
        yield url
        fs, root = open_fs(url)
        fs.rm(root, recursive=True)
    elif request.param == "file":
        yield f"file://{tmp_path}/cache"
    else:
        yield str(tmp_path / "cache")


def test_round_trip_keeps_ids_masks_and_bf16_features(cache_url):
    samples, manifest = write_cache(cache_url, [2, 2, 1])
    read = list(iter_samples(cache_url, verify=True))
    assert [r["sample_id"] for r in read] == [s["sample_id"] for s in samples]
    for want, got in zip(samples, read, strict=True):
        assert got["input_ids"].dtype == torch.int64
        assert got["input_ids"].tolist() == want["input_ids"]
        assert got["loss_mask"].dtype == torch.bool
        assert got["loss_mask"].long().tolist() == want["loss_mask"]
        assert got["num_tokens"] == len(want["input_ids"])
        assert got["features"].dtype == torch.float32
        torch.testing.assert_close(got["features"], want["features"].bfloat16().float(), rtol=0, atol=0)
        torch.testing.assert_close(got["features"], want["features"], rtol=2**-8, atol=1e-6)
    again = read_manifest(cache_url)
    assert again == manifest and again.url == cache_url
    assert manifest.feature_dim == DIM


def test_features_can_stay_bfloat16(tmp_path):
    samples, _ = write_cache(str(tmp_path), [1])
    (got,) = iter_samples(str(tmp_path), features_dtype=torch.bfloat16)
    assert got["features"].dtype == torch.bfloat16
    assert torch.equal(got["features"], samples[0]["features"].bfloat16())


def test_only_shards_with_a_marker_are_committed(tmp_path, caplog):
    fs, root = open_fs(str(tmp_path))
    write_shard(fs, root, shard_name(0), make_samples(2))
    # a writer killed mid-shard leaves only its temporary file
    killed = ShardWriter(fs, root, shard_name(1))
    for s in make_samples(2):
        killed.add(**s)
    killed._file.flush()
    # a shard renamed into place whose marker was never written (killed between the two steps)
    (tmp_path / shard_name(2)).write_bytes((tmp_path / shard_name(0)).read_bytes())
    # a marker left under its temporary name: on S3 a rename is a copy then a delete of the original
    marker = (tmp_path / (shard_name(0) + ".committed")).read_text()
    (tmp_path / f".tmp-0123abcd-{shard_name(3)}.committed").write_text(marker)
    assert list(committed_shards(fs, root)) == [shard_name(0)]
    assert "marker present" not in caplog.text  # a temporary marker is no shard's, missing or not
    assert remove_stale_temp_files(fs, root) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        shard_name(0),
        shard_name(0) + ".committed",
        shard_name(2),
    ]


def test_a_failing_writer_leaves_nothing(tmp_path):
    fs, root = open_fs(str(tmp_path))
    with pytest.raises(ValueError, match="token count"):
        with ShardWriter(fs, root, shard_name(0)) as writer:
            writer.add("ok", [1, 2], [0, 1], torch.zeros(2, DIM))
            writer.add("bad", [1, 2, 3], [0, 1], torch.zeros(3, DIM))
    assert list(tmp_path.iterdir()) == []


def test_empty_shard_commits(tmp_path):
    fs, root = open_fs(str(tmp_path))
    info = write_shard(fs, root, shard_name(0), [])
    assert info["samples"] == 0 and committed_shards(fs, root)[shard_name(0)] == info
    assert list(iter_samples(str(tmp_path), shard_names=[shard_name(0)], verify=True)) == []


def test_verify_names_the_shard_with_a_flipped_byte(tmp_path):
    write_cache(str(tmp_path), [2, 2])
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.arrow is corrupt"):
        list(iter_samples(str(tmp_path), verify=True))
    assert len(list(iter_samples(str(tmp_path), shard_names=[shard_name(0)], verify=True))) == 2


def test_validate_manifest_names_each_differing_field(tmp_path):
    _, manifest = write_cache(str(tmp_path), [1])
    manifest = read_manifest(str(tmp_path))
    validate_manifest(manifest, {"layer_ids": (0, 1, 2), "target_id": "tiny"})
    with pytest.raises(CacheMismatchError) as err:
        validate_manifest(manifest, {"layer_ids": [1, 2], "target_id": "tiny", "tokenizer_sha256": "x"})
    message = str(err.value)
    assert str(tmp_path) in message
    assert "layer_ids [0, 1, 2]; this config asks for [1, 2]" in message
    assert "tokenizer_sha256" in message and "target_id" not in message


def test_missing_manifest_and_other_format_version(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path / "nothing"))
    write_cache(str(tmp_path), [1])
    text = (tmp_path / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CacheMismatchError, match="format_version 99"):
        read_manifest(str(tmp_path))


def test_cache_dataset_length_order_and_pickling(cache_url):
    samples, manifest = write_cache(cache_url, [2, 0, 3, 1])
    dataset = CacheDataset(cache_url, max_open_shards=1, expected={"layer_ids": [0, 1, 2]})
    assert len(dataset) == 6
    assert [dataset[i]["sample_id"] for i in range(6)] == [s["sample_id"] for s in samples]
    assert [dataset[i]["sample_id"] for i in (5, 0, 3)] == ["s5", "s0", "s3"]  # jumps between shards
    assert dataset[-1]["sample_id"] == "s5"
    torch.testing.assert_close(dataset[4]["features"], samples[4]["features"].bfloat16().float())
    with pytest.raises(IndexError):
        dataset[6]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[2]["sample_id"] == "s2"
    dataset.close()
    with pytest.raises(CacheMismatchError, match="layer_ids"):
        CacheDataset(cache_url, expected={"layer_ids": [3]})
