"""The target cache format: Arrow IPC shards of token ids, loss masks and target features, plus a manifest.

A cache lives at any fsspec URL (a local path, file://, memory://, s3://bucket/prefix):

    <url>/build.json                       what the build is for, written before the first shard
    <url>/shard-00000.arrow                 one Arrow IPC file, one record batch per sample
    <url>/shard-00000.arrow.committed       {samples, tokens, bytes, sha256}: the shard is complete
    <url>/heldout-00000.arrow               the held-out samples (validation only), in shards of their own
    <url>/manifest.json                     written last: the cache is complete

Columns per sample: `sample_id` (string), `input_ids` (list<int32>), `loss_mask` (binary: the 0/1 mask
packed 8 per byte, little bit order), `num_tokens` (int32) and `features` (large_binary: the
[num_tokens, len(layer_ids) * hidden] matrix in the cache's encoding, `storage.encoding`: one of
`encoding.ENCODINGS`). The manifest and each shard's schema metadata record the encoding and
feature width, and each shard the layer ids (int4_mixed encodes the teacher's layer apart); readers
decode by them, so a cache reads the same whatever the encoding. One record batch per sample lets a
reader fetch one sample without reading the rest of the shard.

A shard is written under a temporary name, renamed, then given its `.committed` marker. On object
stores a rename is a copy, so only the marker says a shard is whole; every backend follows the same
rule, so a killed build loses only the shards it was writing. No Prefect, MLflow or Hydra here: training
reads caches through this module alone.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem

from deepspec.models.errors import CacheMismatchError, DataError
from deepspec.tasks.cache.encoding import ENCODINGS, Encoding, get_encoding
from deepspec.tasks.secrets import resolve_options

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
MARKER_SUFFIX = ".committed"
TMP_PREFIX = ".tmp-"
HELDOUT_PREFIX = "heldout-"
_HASH_CHUNK_BYTES = 8 << 20

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.binary()),
        ("num_tokens", pa.int32()),
        ("features", pa.large_binary()),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def heldout_shard_name(index: int) -> str:
    """A shard of held-out samples: training's streams never read these, validation reads only them."""
    return f"{HELDOUT_PREFIX}{index:05d}.arrow"


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a cache URL. Secret references in the options (`${oc.env:..}`,
    `${prefect_secret:..}`) are read here, for the filesystem only (`tasks/secrets.py`)."""
    fs, root = fsspec.core.url_to_fs(url, **resolve_options(storage_options))
    return fs, root.rstrip("/") or "/"


def _join(root: str, name: str) -> str:
    return posixpath.join(root, name)


# ----------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class CacheManifest:
    target_id: str
    target_revision: str | None
    tokenizer_sha256: str
    chat_template_sha256: str
    layer_ids: list[int]
    hidden_size: int
    encoding: str = "bf16"
    format_version: int = FORMAT_VERSION
    render: dict[str, Any] = field(default_factory=dict)  # how conversations became token ids
    samples_per_shard: int = 0
    source_sha256: str = ""  # of the answers file the samples came from
    shards: list[dict[str, Any]] = field(default_factory=list)  # {name, samples, tokens, bytes, sha256}
    heldout_shards: list[dict[str, Any]] = field(default_factory=list)  # the same, of held-out samples
    num_samples: int = 0  # the num_* fields count the training shards, what training reads
    num_tokens: int = 0
    num_bytes: int = 0
    url: str | None = field(default=None, compare=False)  # where it was read from; not saved

    @property
    def feature_dim(self) -> int:
        return len(self.layer_ids) * self.hidden_size

    @property
    def heldout_samples(self) -> int:
        return sum(s["samples"] for s in self.heldout_shards)

    def with_shards(
        self,
        shards: list[dict[str, Any]],
        url: str | None = None,
        heldout_shards: list[dict[str, Any]] | None = None,
    ) -> CacheManifest:
        """This manifest over training `shards` and `heldout_shards` (each {name, samples, tokens, bytes,
        sha256}), the training shards' totals summed."""
        return replace(
            self,
            shards=list(shards),
            heldout_shards=list(heldout_shards or []),
            num_samples=sum(s["samples"] for s in shards),
            num_tokens=sum(s["tokens"] for s in shards),
            num_bytes=sum(s["bytes"] for s in shards),
            url=url,
        )

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("url")
        if not record["heldout_shards"]:  # a cache holding nothing out reads as it did before there were any
            record.pop("heldout_shards")
        record["feature_dim"] = self.feature_dim  # derived; recorded for readers of the JSON
        return json.dumps(record, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, url: str) -> CacheManifest:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{url}/{MANIFEST_FILE}: not valid JSON ({err})") from err
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheMismatchError(
                f"cache at {url} has format_version {version!r}; this DeepSpec reads {FORMAT_VERSION}: "
                "rebuild it (delete the cache or choose another storage.url)"
            )
        known = {f.name for f in fields(cls)} - {"url"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - record.keys())
        if missing:
            raise DataError(f"{url}/{MANIFEST_FILE}: missing fields {missing}")
        manifest = cls(**{k: v for k, v in record.items() if k in known}, url=url)
        if record.get("feature_dim", manifest.feature_dim) != manifest.feature_dim:
            raise DataError(
                f"{url}/{MANIFEST_FILE}: feature_dim {record['feature_dim']} is not len(layer_ids) x "
                f"hidden_size = {manifest.feature_dim}"
            )
        return manifest


def validate_manifest(manifest: CacheManifest, expected: dict[str, Any]) -> None:
    """Raise CacheMismatchError listing every field of `expected` the manifest disagrees with."""
    record = asdict(manifest)
    check_fields(record, expected, manifest.url or "the cache")


def check_fields(record: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise CacheMismatchError naming each field whose value in `record` differs from `expected`."""
    problems = []
    for key, want in expected.items():
        have = record.get(key)
        if _plain(have) != _plain(want):
            problems.append(f"{key} {_plain(have)!r}; this config asks for {_plain(want)!r}")
    if problems:
        raise CacheMismatchError(
            f"cache at {where} was written for "
            + "; and for ".join(problems)
            + ". Delete it or point storage.url elsewhere to build a new one."
        )


def target_id(target_cfg) -> str:
    """What names the target in a manifest: its hub id or directory, with the GGUF file if any."""
    path = str(target_cfg.path)
    return path if not target_cfg.gguf_file else posixpath.join(path, str(target_cfg.gguf_file))


def expected_manifest_fields(cfg, tokenizer) -> dict[str, Any]:
    """The manifest fields a config requires of a cache, for `validate_manifest` (build and training)."""
    from deepspec.models.target import fingerprint  # imports transformers, which readers never need

    get_encoding(cfg.storage.encoding)  # ConfigError listing the choices
    return {
        "format_version": FORMAT_VERSION,
        "target_id": target_id(cfg.target),
        "target_revision": cfg.target.revision,
        **fingerprint(tokenizer),
        "layer_ids": [int(i) for i in cfg.target.layer_ids],
        "encoding": str(cfg.storage.encoding),
    }


def _plain(value: Any) -> Any:
    """Lists and dicts as JSON would store them, so OmegaConf containers and tuples compare equal."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _read_json(fs, path: str) -> Any | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def write_json_atomic(fs, path: str, obj: Any) -> None:
    """Write JSON through a temporary name and rename it into place."""
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True)
    parent = posixpath.dirname(path)
    tmp = _join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}")
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(text.encode("utf-8"))
    fs.mv(tmp, path)


def load_manifest(fs, root: str, url: str) -> CacheManifest | None:
    """The manifest at `root`, or None when the cache is absent or incomplete."""
    path = _join(root, MANIFEST_FILE)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    return CacheManifest.from_json(text, url)


def write_manifest(fs, root: str, manifest: CacheManifest) -> None:
    write_json_atomic(fs, _join(root, MANIFEST_FILE), manifest.to_json())


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> CacheManifest:
    """The manifest of a complete cache; DataError when there is none."""
    fs, root = open_fs(url, storage_options)
    manifest = load_manifest(fs, root, url)
    if manifest is None:
        raise DataError(
            f"no {MANIFEST_FILE} at {url}: the target cache is missing or incomplete; run the cache stage"
        )
    return manifest


# ----------------------------------------------------------------------------------------------------
# Writing shards


class _HashingSink:
    """A write-only file wrapper that counts and hashes the bytes going through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self._f.write(view)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True  # the underlying file is closed by ShardWriter


def _as_int_list(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def encode_features(
    features: torch.Tensor, encoding: str = "bf16", layer_ids: Sequence[int] | None = None
) -> bytes:
    """[T, D] floats of the captured `layer_ids` as the bytes of `encoding` (see `encoding.py`)."""
    return get_encoding(encoding, layer_ids).encode(features)


def decode_features(
    buf,
    num_tokens: int,
    dtype: torch.dtype = torch.float32,
    *,
    encoding: str = "bf16",
    feature_dim: int | None = None,
    layer_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """The bytes of `encoding` as a [T, D] tensor of `dtype`; bf16 alone can infer D from the size."""
    if feature_dim is None:
        if encoding != "bf16":
            raise ValueError(f"decoding {encoding} features needs their feature_dim")
        feature_dim = len(buf) // (2 * num_tokens) if num_tokens else 0
    return get_encoding(encoding, layer_ids).decode(buf, num_tokens, feature_dim, dtype)


class ShardWriter:
    """Streams samples into one shard and commits it: temporary name, rename, then `.committed` marker.

    with ShardWriter(fs, root, "shard-00000.arrow", encoding="int4", layer_ids=[1, 9, 17]) as w:
        w.add("id-1", input_ids, loss_mask, features)   # features [T, D], on any device
    info = w.info                                        # set by the commit on a clean exit

    `encoding` is one of `encoding.ENCODINGS` (ConfigError otherwise); the build passes
    `storage.encoding`, which the manifest records, and `target.layer_ids`, which the shard records
    (`int4_mixed` encodes the teacher's layer apart; without ids the row counts as one layer).
    """

    def __init__(
        self, fs, root: str, name: str, *, encoding: str = "bf16", layer_ids: Sequence[int] | None = None
    ):
        self.fs, self.root, self.name = fs, root, name
        self.layer_ids = None if layer_ids is None else [int(i) for i in layer_ids]
        self.encoding: Encoding = get_encoding(encoding, self.layer_ids)
        self.path = _join(root, name)
        self.tmp_path = _join(root, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")
        self.samples = 0
        self.tokens = 0
        self.feature_dim: int | None = None
        self.info: dict[str, Any] | None = None
        self._file = None
        self._sink: _HashingSink | None = None
        self._writer: pa.RecordBatchFileWriter | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _open(self, feature_dim: int) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.feature_dim = feature_dim
        self._file = self.fs.open(self.tmp_path, "wb")
        self._sink = _HashingSink(self._file)
        metadata = {
            "deepspec.format_version": str(FORMAT_VERSION),
            "deepspec.encoding": self.encoding.name,
            "deepspec.feature_dim": str(feature_dim),
            "deepspec.loss_mask": "packbits-little",
        }
        if self.layer_ids is not None:
            metadata["deepspec.layer_ids"] = json.dumps(self.layer_ids)
        self._schema = SCHEMA.with_metadata(metadata)
        self._writer = pa.ipc.new_file(self._sink, self._schema)

    def add(self, sample_id: str, input_ids, loss_mask, features: torch.Tensor) -> None:
        ids = _as_int_list(input_ids).astype(np.int32, copy=False).reshape(-1)
        mask = _as_int_list(loss_mask).astype(bool, copy=False).reshape(-1)
        if features.dim() != 2 or not len(ids) == len(mask) == features.shape[0]:
            raise ValueError(
                f"sample {sample_id!r}: input_ids ({len(ids)}), loss_mask ({len(mask)}) and features "
                f"{tuple(features.shape)} must agree on the token count, features being [T, D]"
            )
        if self._writer is None:
            self._open(int(features.shape[1]))
        elif features.shape[1] != self.feature_dim:
            raise ValueError(f"sample {sample_id!r}: feature width {features.shape[1]} != {self.feature_dim}")
        batch = pa.record_batch(
            [
                pa.array([str(sample_id)], pa.string()),
                pa.array([ids], pa.list_(pa.int32())),
                pa.array([np.packbits(mask, bitorder="little").tobytes()], pa.binary()),
                pa.array([len(ids)], pa.int32()),
                pa.array([self.encoding.encode(features)], pa.large_binary()),
            ],
            schema=self._schema,
        )
        self._writer.write_batch(batch)
        self.samples += 1
        self.tokens += len(ids)

    def commit(self) -> dict[str, Any]:
        if self._writer is None:  # an empty shard is still a committed shard
            self._open(0)
        self._writer.close()
        self._file.close()
        self.fs.mv(self.tmp_path, self.path)
        self.info = {
            "name": self.name,
            "samples": self.samples,
            "tokens": self.tokens,
            "bytes": self._sink.size,
            "sha256": self._sink.sha256.hexdigest(),
        }
        write_json_atomic(self.fs, self.path + MARKER_SUFFIX, self.info)
        return self.info

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
            if self.fs.exists(self.tmp_path):
                self.fs.rm(self.tmp_path)
        except OSError as err:  # the build is failing already; a stray temp file is harmless
            log.warning("could not remove %s: %s", self.tmp_path, err)


def write_shard(
    fs,
    root: str,
    name: str,
    samples: Iterable[dict[str, Any]],
    *,
    encoding: str = "bf16",
    layer_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write and commit a shard of dicts {sample_id, input_ids, loss_mask, features}; its marker info."""
    with ShardWriter(fs, root, name, encoding=encoding, layer_ids=layer_ids) as writer:
        for s in samples:
            writer.add(s["sample_id"], s["input_ids"], s["loss_mask"], s["features"])
    return writer.info


def list_files(fs, root: str) -> dict[str, int]:
    """Names and sizes of the files directly under `root` (empty when it does not exist)."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries if e["type"] == "file"}


def committed_shards(fs, root: str) -> dict[str, dict[str, Any]]:
    """Marker info of every committed shard: a marker whose shard exists with the recorded size."""
    files = list_files(fs, root)
    out = {}
    # a marker still under its temporary name is being written, or its rename was cut short: no shard's
    markers = (n for n in files if n.endswith(MARKER_SUFFIX) and not n.startswith(TMP_PREFIX))
    for marker in sorted(markers):
        name = marker[: -len(MARKER_SUFFIX)]
        info = _read_json(fs, _join(root, marker))
        if info is None:
            continue
        if files.get(name) != info.get("bytes"):
            log.warning("%s: marker present but shard missing or resized; treating it as uncommitted", name)
            continue
        out[name] = {"name": name, **{k: info[k] for k in ("samples", "tokens", "bytes", "sha256")}}
    return out


def remove_stale_temp_files(fs, root: str) -> int:
    """Delete temporary files left by killed writers (one writer per cache at a time)."""
    stale = [n for n in list_files(fs, root) if n.startswith(TMP_PREFIX)]
    for name in stale:
        fs.rm(_join(root, name))
    if stale:
        log.info("removed %d unfinished temporary files under %s", len(stale), root)
    return len(stale)


# ----------------------------------------------------------------------------------------------------
# Reading


def verify_shard(fs, root: str, info: dict[str, Any], url: str) -> None:
    """Hash a shard's bytes; DataError naming the shard when they differ from what was written."""
    path = _join(root, info["name"])
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    if digest.hexdigest() != info["sha256"] or size != info["bytes"]:
        raise DataError(
            f"cache shard {url}/{info['name']} is corrupt: sha256 {digest.hexdigest()[:16]}... over {size} "
            f"bytes, but {info['sha256'][:16]}... over {info['bytes']} bytes were written; delete it and "
            f"its {MARKER_SUFFIX} marker, then run the cache stage again"
        )


class _OpenShard:
    """One shard file, decoded by the encoding and feature width its schema metadata records.

    `encoding`, from the manifest when there is one, must agree with the shard's own record.
    """

    def __init__(self, fs, root: str, name: str, url: str, encoding: str | None = None):
        path = _join(root, name)
        self.name = name
        try:
            if isinstance(fs, LocalFileSystem):
                self._source = pa.memory_map(path, "r")
            else:
                self._source = fs.open(path, "rb")
            self.reader = pa.ipc.open_file(self._source)
        except FileNotFoundError as err:
            raise DataError(f"cache shard {url}/{name} is missing; run the cache stage again") from err
        except pa.ArrowException as err:
            raise DataError(f"cache shard {url}/{name} is not a readable Arrow file ({err})") from err
        self.url = url
        try:
            meta = {k.decode(): v.decode() for k, v in (self.reader.schema.metadata or {}).items()}
            own, self.feature_dim = meta["deepspec.encoding"], int(meta["deepspec.feature_dim"])
            layer_ids = json.loads(meta["deepspec.layer_ids"]) if "deepspec.layer_ids" in meta else None
        except (KeyError, ValueError) as err:
            self.close()
            raise DataError(f"cache shard {url}/{name}: no DeepSpec encoding in its schema metadata") from err
        problem = None
        if encoding is not None and own != encoding:
            problem = f"was written with encoding {own!r}, but the manifest says {encoding!r}"
        elif own not in ENCODINGS:
            problem = f"uses encoding {own!r}, which this DeepSpec cannot read (it reads {list(ENCODINGS)})"
        if problem:
            self.close()
            raise DataError(f"cache shard {url}/{name} {problem}; rebuild the cache")
        self.encoding = get_encoding(own, layer_ids)

    def __len__(self) -> int:
        return self.reader.num_record_batches

    def sample(self, i: int, features_dtype: torch.dtype, encoded: bool = False) -> dict[str, Any]:
        """Sample i; with `encoded`, its features stay as stored (`EncodedFeatures`) for the consumer."""
        where = f"cache shard {self.url}/{self.name}: sample {i}"
        try:
            batch = self.reader.get_batch(i)
            return _decode(batch, features_dtype, self.encoding, self.feature_dim, where if encoded else None)
        except (pa.ArrowException, ValueError) as err:
            raise DataError(f"{where} is unreadable ({err})") from err

    def close(self) -> None:
        self._source.close()


@dataclass
class EncodedFeatures:
    """A sample's features as the cache stores them, decoded by whoever uses them, on their device: a
    training rank decodes on its GPU, so the bytes cross to it compressed and no CPU thread decodes."""

    data: torch.Tensor  # uint8, this sample's own copy (the shard's memory may be closed meanwhile)
    num_tokens: int
    feature_dim: int
    encoding: Encoding
    where: str  # "cache shard URL/NAME: sample I", for errors

    def decode(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        try:
            return self.encoding.decode(self.data, self.num_tokens, self.feature_dim, dtype, device)
        except ValueError as err:
            raise DataError(f"{self.where} is unreadable ({err})") from err


def _decode(
    batch: pa.RecordBatch,
    features_dtype: torch.dtype,
    encoding: Encoding,
    feature_dim: int,
    keep_encoded_as: str | None = None,
) -> dict[str, Any]:
    """A record batch as a sample; its features decoded, or kept as `EncodedFeatures` named by
    `keep_encoded_as`."""
    num_tokens = batch.column("num_tokens")[0].as_py()
    ids = batch.column("input_ids")[0].values.to_numpy(zero_copy_only=False)
    packed = np.frombuffer(batch.column("loss_mask")[0].as_buffer(), dtype=np.uint8)
    mask = np.unpackbits(packed, count=num_tokens, bitorder="little").astype(bool)
    stored = batch.column("features")[0].as_buffer()
    if keep_encoded_as is None:
        features = encoding.decode(stored, num_tokens, feature_dim, features_dtype)
    else:
        data = torch.from_numpy(np.frombuffer(stored, dtype=np.uint8).copy())  # decode takes it as it is
        features = EncodedFeatures(data, num_tokens, feature_dim, encoding, keep_encoded_as)
    return {
        "sample_id": batch.column("sample_id")[0].as_py(),
        "input_ids": torch.from_numpy(ids.astype(np.int64)),
        "loss_mask": torch.from_numpy(mask),
        "features": features,
        "num_tokens": num_tokens,
    }


def iter_samples(
    url: str,
    storage_options: dict[str, Any] | None = None,
    shard_names: Sequence[str] | None = None,
    verify: bool = False,
    features_dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, Any]]:
    """Samples in cache order: dicts {sample_id, input_ids, loss_mask, features, num_tokens}.

    input_ids is int64 [T], loss_mask bool [T], features [T, D] of `features_dtype`, decoded from the
    cache's encoding (float32 holds any of them exactly).

    Without `shard_names` the manifest's shards are read (the cache must be complete); with them, any
    committed shards. `verify` hashes each shard first and raises DataError naming a corrupt one.
    """
    fs, root = open_fs(url, storage_options)
    if shard_names is None:
        manifest = read_manifest(url, storage_options)
        records = {s["name"]: s for s in manifest.shards}
        shard_names = list(records)
    else:
        manifest = load_manifest(fs, root, url)
        records = {s["name"]: s for s in manifest.shards} if manifest else committed_shards(fs, root)
    encoding = manifest.encoding if manifest else None  # else each shard's own record
    for name in shard_names:
        if verify:
            if name not in records:
                raise DataError(f"cache shard {url}/{name} is not committed; run the cache stage again")
            verify_shard(fs, root, records[name], url)
        shard = _OpenShard(fs, root, name, url, encoding)
        try:
            for i in range(len(shard)):
                yield shard.sample(i, features_dtype)
        finally:
            shard.close()


class CacheDataset:
    """Map-style dataset over every training sample of a complete cache, in manifest order, or with
    `heldout` over its held-out samples instead.

    Shards open lazily; the `max_open_shards` most recently used stay open. Safe to pickle into
    DataLoader workers: each process opens its own files.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        expected: dict[str, Any] | None = None,
        features_dtype: torch.dtype = torch.float32,
        max_open_shards: int = 4,
        keep_encoded: bool = False,
        heldout: bool = False,
    ):
        self.url = url
        self.keep_encoded = keep_encoded  # samples carry `EncodedFeatures`, for the consumer to decode
        self.storage_options = dict(storage_options or {})
        self.manifest = read_manifest(url, self.storage_options)
        if expected:
            validate_manifest(self.manifest, expected)
        self.features_dtype = features_dtype
        self.max_open_shards = max(1, max_open_shards)
        self.shards = self.manifest.heldout_shards if heldout else self.manifest.shards
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard["samples"])
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._fs = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample {index} out of range for a cache of {n} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._shard(shard).sample(index - self._starts[shard], self.features_dtype, self.keep_encoded)

    def _shard(self, k: int) -> _OpenShard:
        if self._pid != os.getpid():  # a forked worker must not share file offsets with its parent
            self._open, self._fs, self._pid = OrderedDict(), None, os.getpid()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if self._fs is None:
            self._fs = open_fs(self.url, self.storage_options)
        fs, root = self._fs
        shard = _OpenShard(fs, root, self.shards[k]["name"], self.url, self.manifest.encoding)
        self._open[k] = shard
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)[1].close()
        return shard

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"], state["_fs"] = OrderedDict(), None
        return state
