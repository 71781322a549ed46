"""The cache stage against a real S3 server (`rclone serve s3` on 127.0.0.1) and the real stories260k
target: write and read back, resume after the server dies mid-build, a corrupted shard, another target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.stories import STORIES, stories_overrides, write_answers

from deepspec.models.errors import CacheMismatchError, DataError
from deepspec.models.target import load_tokenizer
from deepspec.tasks.cache import stage as cache
from deepspec.tasks.cache.format import (
    expected_manifest_fields,
    iter_samples,
    open_fs,
    read_manifest,
    shard_name,
    validate_manifest,
)
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths

SHARDS = 3  # five stories, two per shard
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
CREDENTIALS = {"key": "DEEPSPEC_TEST_S3_KEY", "secret": "DEEPSPEC_TEST_S3_SECRET"}  # what the references read


@pytest.fixture(scope="module", autouse=True)
def s3_credentials(s3_server):
    """The S3 keys in the environment, where the configs' references (`${oc.env:..}`) read them."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CREDENTIALS["key"], s3_server.key)
        env.setenv(CREDENTIALS["secret"], s3_server.secret)
        yield


def make_cfg(assets_dir: Path, run_dir: Path, url: str, tracking_uri: str, storage_options=None, *extra):
    overrides = stories_overrides(
        assets_dir, run_dir, f"storage.url={url}", f"tracking.uri={tracking_uri}", *extra
    )
    for key, value in (storage_options or {}).items():  # as a user would pass them: secrets by reference
        value = f"${{oc.env:{CREDENTIALS[key]}}}" if key in CREDENTIALS else value
        overrides.append(f"+storage.storage_options.{key}={hydra_value(value)}")
    if not run_paths(compose(overrides)).answers.is_file():
        write_answers(overrides)
    return compose(overrides)


def hydra_value(value) -> str:
    """A value in Hydra's override grammar: {key:value,...} for dicts, quoted strings."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if isinstance(value, str) else str(value)


def s3_cfg(assets_dir, tmp: Path, server, prefix: str, tracking_uri: str, *extra):
    return make_cfg(assets_dir, tmp, f"s3://deepspec/{prefix}", tracking_uri, server.storage_options, *extra)


def served_dir(server, cfg) -> Path:
    """Where the S3 server keeps the cache of `cfg`, as files."""
    return server.root / run_paths(cfg).cache_url.removeprefix("s3://")


def samples_by_id(url: str, storage_options=None) -> dict[str, dict]:
    return {s["sample_id"]: s for s in iter_samples(url, storage_options, verify=True)}


@pytest.fixture(scope="module")
def s3_built(assets_dir, s3_server, tmp_path_factory, tracking_uri):
    """One cache built on S3 (and the same one on the local disk), shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("s3-cache")
    cfg = s3_cfg(assets_dir, tmp, s3_server, "built", tracking_uri)
    result = cache.build_cache(cfg)
    local = make_cfg(assets_dir, tmp, str(tmp / "local-cache"), tracking_uri)
    cache.build_cache(local)
    return cfg, result, local


def test_written_to_s3_reads_back_as_a_local_build(s3_built, s3_server):
    cfg, result, local = s3_built
    url = run_paths(cfg).cache_url
    assert result.skipped is False and result.shards_built == SHARDS
    assert result.url == url and url.startswith("s3://deepspec/built/stories260k-bf16-")
    assert result.samples == len(STORIES)
    served = served_dir(s3_server, cfg)  # what the server stored, as files
    assert {shard_name(k) for k in range(SHARDS)} | {"manifest.json", "build.json"} <= {
        p.name for p in served.iterdir()
    }
    manifest = read_manifest(url, s3_server.storage_options)
    assert [s["name"] for s in manifest.shards] == [shard_name(k) for k in range(SHARDS)]
    assert manifest.num_bytes == sum((served / shard_name(k)).stat().st_size for k in range(SHARDS))

    remote = samples_by_id(url, s3_server.storage_options)
    here = samples_by_id(run_paths(local).cache_url)
    assert sorted(remote) == sorted(here) == [f"story-{i}" for i in range(len(STORIES))]
    for sample_id, sample in remote.items():
        assert sample["input_ids"].tolist() == here[sample_id]["input_ids"].tolist()
        assert sample["loss_mask"].tolist() == here[sample_id]["loss_mask"].tolist()
        torch.testing.assert_close(sample["features"], here[sample_id]["features"], rtol=2**-7, atol=1e-4)


def test_resume_after_the_server_is_killed_mid_build(assets_dir, s3_server, tmp_path, tracking_uri):
    cfg = s3_cfg(assets_dir, tmp_path, s3_server, "resume", tracking_uri)
    plan = cache.plan_cache(cfg)
    assert plan.missing == list(range(SHARDS)) and not plan.skipped
    cache.build_shard(cfg, 0)
    served = served_dir(s3_server, cfg)
    first = (served / shard_name(0)).stat().st_mtime_ns

    s3_server.stop()
    try:
        with pytest.raises(
            DataError, match=r"shard-00001\.arrow was not committed .*run the cache stage again"
        ):
            cache.build_shard(cfg, 1)
    finally:
        s3_server.start()  # same directory, same port

    result = cache.build_cache(cfg)
    assert result.shards_built == SHARDS - 1 and result.samples == len(STORIES)
    assert (served / shard_name(0)).stat().st_mtime_ns == first  # the committed shard was kept
    url = run_paths(cfg).cache_url
    manifest = read_manifest(url, s3_server.storage_options)
    names = [s["name"] for s in manifest.shards]
    assert names == [shard_name(k) for k in range(SHARDS)]
    ids = [s["sample_id"] for s in iter_samples(url, s3_server.storage_options, verify=True)]
    assert sorted(ids) == [f"story-{i}" for i in range(len(STORIES))]  # each sample once
    assert not [p.name for p in served.iterdir() if p.name.startswith(".tmp-")]


def test_a_corrupted_shard_is_named(s3_built, s3_server):
    cfg, _, _ = s3_built
    fs, root = open_fs(run_paths(cfg).cache_url, s3_server.storage_options)
    copy = "s3://deepspec/corrupt"
    for path in fs.ls(root):  # a copy of the built cache, through S3, so other tests keep theirs
        fs.copy(path, f"deepspec/corrupt/{Path(path).name}")
    victim = s3_server.root / "deepspec" / "corrupt" / shard_name(1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the features, behind the server's back
    victim.write_bytes(bytes(data))

    assert len(list(iter_samples(copy, s3_server.storage_options))) == len(STORIES)  # it still parses
    with pytest.raises(DataError, match=r"cache shard s3://deepspec/corrupt/shard-00001\.arrow is corrupt"):
        list(iter_samples(copy, s3_server.storage_options, verify=True))


def test_a_manifest_from_another_target_is_refused(s3_built, s3_server, assets_dir, tmp_path, tracking_uri):
    """Other layers get a cache of their own; a manifest checked against another target's or other
    layers' fields is refused, naming the field."""
    cfg, _, _ = s3_built
    run_dir, url = Path(cfg.run_dir), run_paths(cfg).cache_url
    other_layers = s3_cfg(assets_dir, run_dir, s3_server, "built", tracking_uri, "target.layer_ids=[1,2]")
    plan = cache.plan_cache(other_layers)
    assert plan.url != url and plan.missing == list(range(SHARDS))
    manifest = read_manifest(url, s3_server.storage_options)
    expected = expected_manifest_fields(other_layers, load_tokenizer(other_layers.target.path))
    with pytest.raises(CacheMismatchError, match=r"layer_ids \[0, 2, 4\]; this config asks for \[1, 2\]"):
        validate_manifest(manifest, expected)

    (tmp_path / "other-target").symlink_to(assets_dir / "models" / "stories260k")
    other = s3_cfg(
        assets_dir, run_dir, s3_server, "built", tracking_uri, f"target.path={tmp_path / 'other-target'}"
    )
    expected = expected_manifest_fields(other, load_tokenizer(other.target.path))
    with pytest.raises(CacheMismatchError, match=r"target_id '.*stories260k'; this config asks for '.*other"):
        validate_manifest(manifest, expected)
