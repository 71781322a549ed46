"""Feature encodings: sizes, exact bit packing, error bounds on realistic and real features, and the
cache format reading each encoding back by what the manifest and shards record."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from deepspec.models.errors import CacheMismatchError, ConfigError, DataError
from deepspec.tasks.cache.encoding import ENCODINGS, GroupInt, Rotated, get_encoding
from deepspec.tasks.cache.format import (
    MANIFEST_FILE,
    CacheDataset,
    CacheManifest,
    ShardWriter,
    decode_features,
    encode_features,
    iter_samples,
    open_fs,
    read_manifest,
    shard_name,
    validate_manifest,
    write_manifest,
    write_shard,
)

NAMES = list(ENCODINGS)
STORIES_LAYERS = [0, 2, 4]  # the stories260k preset's; layer 4 is its last, so the feature is final
QUANTIZED = [n for n in NAMES if n != "bf16"]

# Relative errors per token row, about 1.4x what was measured: (mean, max) of ||decoded - x|| / ||x||,
# then (mean, max) of the same over the "bulk", each row without its 1% largest-magnitude features
# (the row norm hides what a few outliers do to the other features of their group).
BOUNDS = {
    # normal activations with a few outlier channels and one large token (`activations` below)
    "synthetic": {
        "bf16": (0.003, 0.005, 0.003, 0.003),
        "fp8": (0.025, 0.05, 0.04, 0.045),
        "int8": (0.025, 0.03, 0.15, 0.33),
        "int6": (0.09, 0.11, 0.5, 0.75),
        "int4": (0.17, 0.33, 0.8, 0.95),  # a group holding an outlier keeps little else
        "int4_outliers": (0.03, 0.1, 0.14, 0.16),
        "int4_rot": (0.075, 0.125, 0.4, 0.78),  # the rotation spreads an outlier over its group
        "int4_mixed": (0.008, 0.025, 0.035, 0.04),  # one layer: the teacher's, int6_rot + outliers
    },
    # stories260k's residual stream after layers 0, 2 and 4 (192 features a token), as STORIES_LAYERS
    "stories260k": {
        "bf16": (0.003, 0.004, 0.003, 0.004),
        "fp8": (0.035, 0.045, 0.04, 0.05),
        "int8": (0.013, 0.02, 0.015, 0.03),
        "int6": (0.055, 0.085, 0.06, 0.13),
        "int4": (0.21, 0.31, 0.24, 0.45),
        "int4_outliers": (0.135, 0.19, 0.155, 0.21),
        "int4_rot": (0.13, 0.17, 0.145, 0.21),
        "int4_mixed": (0.065, 0.085, 0.075, 0.1),  # layers 0 and 2 int4_rot, layer 4 int6_rot + outliers
    },
}


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def activations(tokens: int = 256, dim: int = 768, seed: int = 0) -> torch.Tensor:
    """Normal features with what real residual streams show: a few channels 20-100x the rest, and one
    token (an attention sink) whose features are all large."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen)
    channels = torch.randperm(dim, generator=gen)[:6]
    x[:, channels] *= torch.linspace(20, 100, 6)
    x[0] *= 50
    return x


def errors(name: str, x: torch.Tensor, layer_ids=None) -> tuple[float, float, float, float]:
    """(mean, max) relative error of the rows, then of the rows without their 1% largest features."""
    enc = get_encoding(name, layer_ids)
    err = enc.decode(enc.encode(x), x.shape[0], x.shape[1]) - x
    bulk = torch.ones_like(x, dtype=torch.bool)
    bulk.scatter_(1, x.abs().topk(max(1, x.shape[1] // 100), dim=1).indices, False)
    rows = err.norm(dim=1) / x.norm(dim=1)
    rest = (err * bulk).norm(dim=1) / (x * bulk).norm(dim=1)
    return rows.mean().item(), rows.max().item(), rest.mean().item(), rest.max().item()


def check_bounds(name: str, measured: tuple[float, ...], bounds: tuple[float, ...]) -> None:
    labels = ("mean", "max", "bulk mean", "bulk max")
    over = [f"{k} {m:.4f} > {b}" for k, m, b in zip(labels, measured, bounds, strict=True) if m > b]
    assert not over, f"{name}: " + ", ".join(over)


def test_bytes_per_token_for_qwen3_4b_features():
    dim, layer_ids = 5 * 2560, [1, 9, 17, 25, 33]
    sizes = {name: get_encoding(name, layer_ids).bytes_per_token(dim) for name in NAMES}
    assert sizes == {
        "bf16": 25_600,
        "fp8": 12_804,  # a byte a feature and a float32 scale a token
        "int8": 13_200,  # 200 groups of 64 bytes and a bf16 scale
        "int6": 10_000,  # 200 groups of 48 bytes and a scale
        "int4": 6_800,  # 200 groups of 32 bytes and a scale
        "int4_outliers": 7_200,  # int4, plus 100 features (uint16 index, bf16 value) kept apart
        "int4_rot": 6_800,  # int4's bytes
        "int4_mixed": 4 * 1_360 + 2_000 + 20 * 4,  # 4 layers int4_rot; layer 33 int6_rot + 20 outliers
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 192), (3, 100), (1, 64), (0, 128)])
def test_encoded_size_shape_and_dtype(name, shape):
    enc = get_encoding(name)
    x = torch.randn(*shape) * 3
    before = x.clone()
    buf = enc.encode(x)
    assert torch.equal(x, before), "encode must not modify its input"
    assert len(buf) == shape[0] * enc.bytes_per_token(shape[1])
    for dtype in (torch.float32, torch.bfloat16):
        y = enc.decode(buf, shape[0], shape[1], dtype)
        assert y.shape == shape and y.dtype == dtype and y.is_contiguous()


def test_bf16_is_exact_to_bfloat16():
    x = activations()
    enc = get_encoding("bf16")
    buf = enc.encode(x)
    assert torch.equal(enc.decode(buf, *x.shape), x.bfloat16().float())
    assert torch.equal(enc.decode(buf, *x.shape, torch.bfloat16), x.bfloat16())
    # the wrappers the cache format kept: bf16 can infer the width
    assert buf == encode_features(x) and torch.equal(decode_features(buf, x.shape[0]), x.bfloat16().float())
    assert torch.equal(decode_features(encode_features(x, "int4"), 256, encoding="int4", feature_dim=768),
                       get_encoding("int4").decode(get_encoding("int4").encode(x), 256, 768))  # fmt: skip


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 7, 8])
def test_integer_codes_pack_and_unpack_exactly(bits):
    """Rows made of every code times a bf16 scale, the most negative code present, decode exactly."""
    enc = GroupInt(bits)
    qmax = 1 << (bits - 1)
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(-qmax, qmax, (7, 4, 64), generator=gen)
    codes[..., 0] = -qmax  # sets each group's scale to exactly its bf16 value below
    scale = (torch.rand(7, 4, 1, generator=gen) * 10 + 0.01).bfloat16().float()
    x = (codes * scale).reshape(7, 256)
    assert torch.equal(enc.decode(enc.encode(x), 7, 256), x)


@pytest.mark.parametrize("name", QUANTIZED)
def test_zero_rows_and_groups_stay_zero(name):
    x = torch.zeros(3, 192)
    x[1, 100:] = torch.randn(92)
    y = get_encoding(name).decode(get_encoding(name).encode(x), 3, 192)
    assert torch.equal(y[0], torch.zeros(192)) and torch.equal(y[1, :64], torch.zeros(64))


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_encodings_refuse_non_finite_features(name):
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        get_encoding(name).encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_decode_checks_the_buffer_size(name):
    enc = get_encoding(name)
    buf = enc.encode(torch.randn(4, 128))
    with pytest.raises(ValueError, match="take"):
        enc.decode(buf[:-1], 4, 128)
    with pytest.raises(ValueError, match="take"):
        enc.decode(buf, 5, 128)


def test_unknown_encoding_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"storage.encoding='int3'.*'bf16'.*'int4'"):
        get_encoding("int3")
    fs, root = open_fs(str(tmp_path))
    with pytest.raises(ConfigError, match="fp8"):
        ShardWriter(fs, root, shard_name(0), encoding="float8")


@pytest.mark.parametrize("name", NAMES)
def test_error_on_activations_with_outlier_channels(name):
    check_bounds(name, errors(name, activations()), BOUNDS["synthetic"][name])


def test_padding_a_partial_group_costs_no_accuracy():
    x = activations(dim=700)  # 10 groups of 64 and one of 60, padded with zeros
    for name in ("int8", "int4"):
        check_bounds(name, errors(name, x), BOUNDS["synthetic"][name])


def test_keeping_outliers_apart_helps_int4():
    x = activations()
    plain, kept = errors("int4", x), errors("int4_outliers", x)
    assert kept[0] < 0.5 * plain[0] and kept[2] < 0.5 * plain[2]
    # the largest features of each row come back as bfloat16, whatever the rest does
    enc = get_encoding("int4_outliers")
    y = enc.decode(enc.encode(x), *x.shape)
    top = x.abs().topk(6, dim=1).indices
    assert torch.equal(y.gather(1, top), x.gather(1, top).bfloat16().float())


@pytest.fixture(scope="module")
def stories_model(assets_dir):
    from deepspec.models.target import load_target

    return load_target(str(assets_dir / "models" / "stories260k"))


@pytest.fixture(scope="module")
def stories_features(stories_model) -> torch.Tensor:
    """Real features: stories260k's residual stream after layers 0, 2 and 4 over a few story texts."""
    from deepspec.models.target import capture_features

    model, tokenizer = stories_model
    texts = [
        "Once upon a time, there was a little dog named Max. Max loved to play with his toys in the sun.",
        "Lily went to the park and saw a big red ball. She was very happy and ran to get it.",
        "Tom had a small boat that he took to the lake every day. One day, the wind was strong.",
    ]
    with torch.no_grad():
        rows = [
            capture_features(model, tokenizer(t, return_tensors="pt").input_ids, STORIES_LAYERS)[0]
            for t in texts
        ]
    return torch.cat(rows).float()


@pytest.mark.parametrize("name", NAMES)
def test_error_on_real_stories260k_features(name, stories_features):
    check_bounds(name, errors(name, stories_features, STORIES_LAYERS), BOUNDS["stories260k"][name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_a_gpu_decodes_what_the_cpu_decodes(name):
    """Training decodes on its own device: the same numbers there as on the CPU."""
    enc = get_encoding(name, [1, 9, 17])
    x = activations(300, 3 * 256)
    buf = enc.encode(x)
    on_gpu = enc.decode(buf, *x.shape, device="cuda")
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), enc.decode(buf, *x.shape), rtol=1e-6, atol=1e-6)


def test_the_rotation_is_a_fixed_orthonormal_map():
    rot = get_encoding("int4_rot")
    m = rot.matrix
    assert torch.allclose(m @ m.t(), torch.eye(64), atol=1e-6)
    assert set((m * 8).abs().round().unique().tolist()) == {1.0}  # signs times a Hadamard matrix
    # the sign pattern is part of the format: pinned here, as every cache written with it needs it
    # (the bits of sha256("deepspec-rotation-64-0"), 1 -> +1, 0 -> -1; the Hadamard's first column is 1s)
    assert (m[:, 0] * 8).round().long().tolist()[:12] == [1, 1, -1, 1, 1, -1, -1, -1, -1, 1, -1, 1]
    exact = Rotated(get_encoding("bf16"))  # the rotation alone loses only bf16 rounding
    x = activations(dim=200)
    assert torch.allclose(exact.decode(exact.encode(x), 256, 200), x, rtol=0.02, atol=0.02 * x.abs().max())


def test_the_rotation_helps_int4_on_real_features(stories_features):
    plain, rotated = errors("int4", stories_features), errors("int4_rot", stories_features)
    assert rotated[0] < 0.75 * plain[0] and rotated[2] < 0.75 * plain[2]


def test_int4_mixed_encodes_the_teachers_layer_apart():
    layer_ids = [1, 9, 5]  # the teacher reads the deepest, layer 9: the middle block
    x = activations(dim=3 * 128)
    enc = get_encoding("int4_mixed", layer_ids)
    buf = enc.encode(x)
    rest = get_encoding("int4_rot")
    teacher = get_encoding("int4_mixed")  # one layer: the teacher's encoding alone
    assert len(buf) == 256 * (2 * rest.bytes_per_token(128) + teacher.bytes_per_token(128))
    y = enc.decode(buf, 256, 384)
    blocks = [x[:, j * 128 : (j + 1) * 128] for j in range(3)]
    assert torch.equal(y[:, 128:256], teacher.decode(teacher.encode(blocks[1]), 256, 128))
    for j in (0, 2):
        assert torch.equal(y[:, j * 128 : (j + 1) * 128], rest.decode(rest.encode(blocks[j]), 256, 128))
    with pytest.raises(ValueError, match=r"385 features do not split into 3 layers"):
        enc.encode(activations(dim=385))


def test_int4_mixed_keeps_the_teacher_of_stories260k(stories_model, stories_features):
    """The teacher recomputed from the decoded last layer (here the final normalised state, read by the
    LM head directly) against the target's own distribution: int4_mixed loses far less than the other
    encodings under a quarter of upstream's bytes."""
    model, _ = stories_model
    head = model.lm_head.weight.detach()
    final = stories_features[:, 128:]
    truth = torch.log_softmax(final @ head.t(), -1)

    def kl(name: str) -> float:
        enc = get_encoding(name, STORIES_LAYERS)
        decoded = enc.decode(enc.encode(stories_features), *stories_features.shape)[:, 128:]
        logp = torch.log_softmax(decoded @ head.t(), -1)
        return float((truth.exp() * (truth - logp)).sum(-1).mean())

    mixed = kl("int4_mixed")
    assert mixed < 0.3 * kl("int4_outliers") and mixed < 0.3 * kl("int4_rot") and mixed < 0.005


# ----------------------------------------------------------------------------------------------------
# The cache format with each encoding


def _samples(count: int, dim: int = 192, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = 5 + 7 * i
        out.append(
            {
                "sample_id": f"s{i}",
                "input_ids": torch.randint(0, 150_000, (n,), generator=gen).tolist(),
                "loss_mask": torch.randint(0, 2, (n,), generator=gen).tolist(),
                "features": activations(n, dim, seed=seed + i),
            }
        )
    return out


def _write_cache(url: str, encoding: str, samples: list[dict]) -> CacheManifest:
    fs, root = open_fs(url)
    shards = [
        write_shard(fs, root, shard_name(0), samples[:2], encoding=encoding, layer_ids=STORIES_LAYERS),
        write_shard(fs, root, shard_name(1), samples[2:], encoding=encoding, layer_ids=STORIES_LAYERS),
    ]
    manifest = CacheManifest(
        target_id="tiny",
        target_revision=None,
        tokenizer_sha256="t" * 16,
        chat_template_sha256="c" * 16,
        layer_ids=STORIES_LAYERS,
        hidden_size=64,
        encoding=encoding,
        shards=shards,
        num_samples=len(samples),
        num_tokens=sum(s["tokens"] for s in shards),
        num_bytes=sum(s["bytes"] for s in shards),
    )
    write_manifest(fs, root, manifest)
    return manifest


@pytest.mark.parametrize("name", NAMES)
def test_cache_reads_back_each_encoding(name, tmp_path):
    url = str(tmp_path / "cache")
    samples = _samples(3)
    manifest = _write_cache(url, name, samples)
    record = json.loads((tmp_path / "cache" / MANIFEST_FILE).read_text())
    assert record["encoding"] == name and record["feature_dim"] == 192
    assert read_manifest(url) == manifest
    enc = get_encoding(name, STORIES_LAYERS)
    dataset = CacheDataset(url, expected={"encoding": name})
    metadata = pa.ipc.open_file(str(tmp_path / "cache" / shard_name(0))).schema.metadata
    assert json.loads(metadata[b"deepspec.layer_ids"]) == STORIES_LAYERS  # how int4_mixed splits a row
    for want, got, item in zip(samples, iter_samples(url, verify=True), dataset, strict=True):
        assert got["input_ids"].tolist() == want["input_ids"]
        assert got["loss_mask"].long().tolist() == want["loss_mask"]
        x = want["features"]
        assert torch.equal(got["features"], enc.decode(enc.encode(x), *x.shape))
        assert torch.equal(item["features"], got["features"])
    # committed shards without a manifest decode by their own record
    fs, root = open_fs(url)
    fs.rm(f"{root}/{MANIFEST_FILE}")
    assert len(list(iter_samples(url, shard_names=[shard_name(0), shard_name(1)]))) == 3


def test_a_cache_of_another_encoding_is_refused_naming_the_field(tmp_path):
    url = str(tmp_path / "cache")
    _write_cache(url, "int4", _samples(3))
    with pytest.raises(CacheMismatchError, match="encoding 'int4'; this config asks for 'bf16'"):
        CacheDataset(url, expected={"encoding": "bf16"})
    with pytest.raises(CacheMismatchError, match="encoding"):
        validate_manifest(read_manifest(url), {"encoding": "fp8", "layer_ids": [0, 2, 4]})


def test_a_shard_disagreeing_with_its_manifest_is_named(tmp_path):
    url = str(tmp_path / "cache")
    manifest = _write_cache(url, "int4", _samples(3))
    fs, root = open_fs(url)
    write_shard(fs, root, shard_name(1), _samples(1), encoding="fp8")  # replaced by another build
    with pytest.raises(DataError, match=r"shard-00001.arrow was written with encoding 'fp8'.*'int4'"):
        list(iter_samples(url))
    manifest.encoding = "int9"
    write_manifest(fs, root, manifest)
    with pytest.raises(DataError, match="shard-00000.arrow was written with encoding 'int4'"):
        CacheDataset(url)[0]


def test_manifest_feature_dim_must_agree_with_its_geometry(tmp_path):
    url = str(tmp_path / "cache")
    _write_cache(url, "bf16", _samples(3))
    path = tmp_path / "cache" / MANIFEST_FILE
    record = json.loads(path.read_text())
    record["feature_dim"] = 191
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="feature_dim 191"):
        read_manifest(url)
