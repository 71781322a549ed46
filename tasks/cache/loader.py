"""Training's sample streams: the target cache read shard by shard (`CacheStream`), or the target run
inside training (`OnlineStream`), both resumable at the exact next unseen sample.

    stream = open_stream(cfg, rank=rank, world_size=world, tokenizer=tokenizer, epochs=cfg.train.epochs)
    for sample in stream: ...               # {sample_id, input_ids, loss_mask, features, num_tokens}
    client_state["loader"] = stream.state_dict()   # {epoch, consumed}; load_state_dict resumes there

Order. Each epoch every rank computes the same global order from `seed + epoch`: the shards in a random
order, then their samples through a shuffle buffer of `shuffle_buffer` entries (each step emits a random
entry of the buffer and refills it with the next sample). The buffer holds sample *indices*, so ranks
agree on the order without reading each other's samples, and reads stay within the few shards the buffer
spans. Rank r of w takes positions r, r + w, r + 2w, ... of that order; every rank gets
ceil(N / w) samples, the last ranks wrapping round to the start, so DeepSpeed ranks stay in lockstep.

Position. A stream counts the samples its consumer has taken (not those prefetched): `state_dict()` is
{epoch, consumed}, and a new stream given it by `load_state_dict` yields exactly the sequence the old one
would have yielded next. Ranks consume in lockstep, so one rank's state (rank 0's, the one DeepSpeed keeps
in a checkpoint) resumes every rank.

Reading happens in a background thread a bounded queue ahead of the consumer; its exceptions are raised
in the consumer. Training decodes features in its own thread, on its own device (`decode_device`): a
thread decoding beside it would wait for the GIL at every torch call. `verify=True` hashes each shard
the first time the stream opens it, and a corrupt shard raises DataError naming it.

Online mode (`storage.mode: online`) needs no storage: the stream renders the run's answers exactly as
the cache stage does (`answers.py`) and runs the target over a few upcoming samples at a time through
the same forward-and-capture function (`models.target.capture_batches`: batches sorted by length,
features rounded to bfloat16 as the cache stores them), so both modes train on the same numbers. With
`final_hidden=True` its samples also carry the target's final (normalised) hidden state,
`final_hidden` [T, d], from the same forward: the teacher of Eagle3 and DSpark (`models/teacher.py`
recomputes it from the cache in cached mode).

Held out. Neither stream ever yields a held-out sample (the answers to `heldout.jsonl`: the cache keeps
them in shards of their own, online mode skips their answers rows), so `samples_per_epoch` counts
training samples only. A stream opened with `heldout=True` holds only those, for validation, which
takes them by index (`samples(items)`) rather than by iterating.

`supervised_token_counts` counts the supervised tokens of the whole training set without reading
features (Eagle3's reduced draft vocabulary).
"""

from __future__ import annotations

import logging
import math
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from deepspec.models.errors import ConfigError, DataError
from deepspec.models.target import capture_batches, check_layer_ids, load_target, load_tokenizer
from deepspec.tasks.cache.answers import read_answers, render, render_options
from deepspec.tasks.cache.format import (
    SCHEMA,
    CacheDataset,
    expected_manifest_fields,
    open_fs,
    read_manifest,
    verify_shard,
)
from deepspec.tasks.paths import run_paths

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1024  # sample indices; a buffer spans about this many samples' worth of shards
PREFETCH = 16  # samples read ahead of the consumer
ONLINE_TOKENS_PER_BATCH = 8192  # padded tokens per target forward in online mode
ONLINE_LOOKAHEAD = 32  # samples rendered and run together, sorted by length, in online mode
NO_HELDOUT = (
    "validation (train.eval_every_steps) needs held-out prompts: set prompts.heldout_fraction > 0 and run "
    "the prompts, regenerate and cache stages again"
)


# ----------------------------------------------------------------------------------------------------
# Order and position


class RankOrder:
    """Which items a rank reads each epoch, in which order; items are indices over groups laid end to end.

    Every rank builds the same global order from `seed + epoch` (groups shuffled, then items through a
    shuffle buffer of `shuffle_buffer` entries; None: the whole epoch) and takes every `world_size`-th
    position from `rank`, wrapping round so that each rank gets `per_rank` = ceil(N / world_size) items.
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int | None = SHUFFLE_BUFFER,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of {world_size} ranks")
        self.group_sizes = [int(n) for n in group_sizes]
        self.starts = np.concatenate([[0], np.cumsum(self.group_sizes, dtype=np.int64)])
        self.num_items = int(self.starts[-1])
        if self.num_items == 0:
            raise DataError("no samples to train on: the data set is empty")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = self.num_items if shuffle_buffer is None else max(1, int(shuffle_buffer))
        self.per_rank = math.ceil(self.num_items / world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch `epoch`, the same on every rank."""
        rng = np.random.default_rng(self.seed + epoch)
        groups = rng.permutation(len(self.group_sizes))
        items = np.concatenate(
            [np.arange(self.starts[g], self.starts[g + 1], dtype=np.int64) for g in groups]
        ).tolist()
        size = min(self.shuffle_buffer, len(items))
        buffer, out = items[:size], []
        for item, pick in zip(items[size:], rng.integers(0, size, len(items) - size).tolist(), strict=True):
            out.append(buffer[pick])
            buffer[pick] = item
        rng.shuffle(buffer)
        out.extend(buffer)
        return np.asarray(out, dtype=np.int64)

    def rank_items(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's items of epoch `epoch`, from its position `start` on."""
        positions = self.rank + self.world_size * np.arange(start, self.per_rank, dtype=np.int64)
        return self.epoch_order(epoch)[positions % self.num_items]

    def items_from(self, epoch: int, start: int, epochs: int | None) -> Iterator[int]:
        """This rank's items from (epoch, start) to the end of epoch `epochs - 1` (None: forever)."""
        while epochs is None or epoch < epochs:
            yield from self.rank_items(epoch, start).tolist()
            epoch, start = epoch + 1, 0


class _Position:
    """Epoch and samples consumed in it by this rank; state_dict/load_state_dict of both streams."""

    def __init__(self, order: RankOrder, epochs: int | None):
        self.order, self.epochs = order, epochs
        self.epoch, self.consumed = 0, 0

    def advance(self) -> None:
        self.consumed += 1
        if self.consumed == self.order.per_rank:
            self.epoch, self.consumed = self.epoch + 1, 0

    def finished(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            # what the position means; checked on load
            "num_samples": self.order.num_items,
            "world_size": self.order.world_size,
            "seed": self.order.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        o = self.order
        for key, have in (("num_samples", o.num_items), ("world_size", o.world_size), ("seed", o.seed)):
            if key in state and int(state[key]) != have:
                raise ConfigError(
                    f"cannot resume the sample stream: it was saved with {key}={state[key]}, this run has "
                    f"{have}; resume with the same data, ranks and train.seed, or clear the checkpoints"
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or not 0 <= consumed < o.per_rank:
            raise ConfigError(f"sample stream state {state} is out of range ({o.per_rank} samples per epoch)")
        self.epoch, self.consumed = epoch, consumed


# ----------------------------------------------------------------------------------------------------
# Prefetching


_END = object()


class _Prefetcher:
    """Runs an iterator in a daemon thread, at most `depth` items ahead; its exception re-raised on get."""

    def __init__(self, source: Callable[[], Iterator[Any]], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="deepspec-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source) -> None:
        it = None
        try:
            it = source()
            for item in it:
                if not self._put((True, item)):
                    return
            self._put((True, _END))
        except BaseException as err:  # handed to the consumer, raised there
            self._put((False, err))
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()

    def get(self) -> Any:
        while True:
            try:
                ok, item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError(
                        "this sample iterator was closed: the stream was reset or closed"
                    ) from None
        if not ok:
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _consume(
    position: _Position, fetcher: _Prefetcher, finish: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """The prefetched samples, each `finish`ed in the consumer's thread, advancing `position` as the
    consumer takes each one."""
    try:
        while not position.finished():
            sample = fetcher.get()
            if sample is _END:
                return
            sample = finish(sample)
            position.advance()
            yield sample
    finally:
        fetcher.close()


class _Streaming:
    """What both streams share: length, position state, iteration through the prefetcher, closing.

    Subclasses set `self._position` and `self.prefetch` and implement `_read(items) -> samples`.
    """

    _position: _Position
    prefetch: int
    _prefetcher: _Prefetcher | None = None

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch (the same on every rank)."""
        return self._position.order.per_rank

    @property
    def num_samples(self) -> int:
        """Samples in the data set (all ranks together)."""
        return self._position.order.num_items

    def __len__(self) -> int:
        return self.samples_per_epoch

    def state_dict(self) -> dict[str, int]:
        return self._position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._close_prefetcher()  # an iterator still open would continue from the old position
        self._position.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The samples after the current position; reading starts now. A new iterator replaces the last."""
        self._close_prefetcher()
        p = self._position
        epoch, start = p.epoch, p.consumed
        self._prefetcher = _Prefetcher(
            lambda: self._read(p.order.items_from(epoch, start, p.epochs)), self.prefetch
        )
        return _consume(p, self._prefetcher, self._finish)

    def _read(self, items: Iterable[int]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def samples(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """The samples at `items` (indices into the data set, 0 .. num_samples - 1), in that order, their
        features where training would have them; reads in this thread, not moving the position."""
        return [self._finish(sample) for sample in self._read(items)]

    def _finish(self, sample: dict[str, Any]) -> dict[str, Any]:
        """What the consumer's thread does to a sample it takes: nothing, unless a stream says."""
        return sample

    def _close_prefetcher(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        self._close_prefetcher()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Cached mode


class CacheStream(_Streaming):
    """This rank's samples of a complete target cache, epoch after epoch (see the module docstring).

    `epochs` bounds the iteration (None: forever); `expected` manifest fields are validated on open.
    `heldout` streams the cache's held-out shards instead of its training shards.
    With `decode_device` the prefetch thread only reads, and features are decoded as the consumer takes
    each sample, on that device: training's GPU, or the CPU in the training thread itself. A decoding
    thread beside training competes with it for the GIL at every torch call, and at Qwen3-4B's width one
    CPU thread decodes only 5,000-50,000 tokens/s (`bench/cache_throughput.py`).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epochs: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        prefetch: int = PREFETCH,
        verify: bool = False,
        expected: dict[str, Any] | None = None,
        features_dtype: torch.dtype = torch.float32,
        decode_device: torch.device | str | None = None,
        heldout: bool = False,
    ):
        self.url = url
        self.features_dtype, self.decode_device = features_dtype, decode_device
        self.storage_options = dict(storage_options or {})
        self.verify = verify
        self.prefetch = prefetch
        manifest = read_manifest(url, self.storage_options)
        shards = manifest.heldout_shards if heldout else manifest.shards
        sizes = [int(s["samples"]) for s in shards]
        if heldout and not sum(sizes):
            raise DataError(f"the target cache at {url} holds no held-out samples: {NO_HELDOUT}")
        smallest = max(1, min((n for n in sizes if n), default=1))
        self._dataset = CacheDataset(
            url,
            self.storage_options,
            expected=expected,
            features_dtype=features_dtype,
            max_open_shards=min(64, shuffle_buffer // smallest + 2),  # the shards a buffer spans
            keep_encoded=decode_device is not None,
            heldout=heldout,
        )
        self._position = _Position(
            RankOrder(sizes, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer),
            epochs,
        )
        self._shard_of = np.repeat(np.arange(len(shards)), sizes)
        self._verified: set[int] = set()

    @property
    def manifest(self):
        return self._dataset.manifest

    def _read(self, items: Iterable[int]) -> Iterator[dict[str, Any]]:
        fs = root = None
        for item in items:
            shard = int(self._shard_of[item])
            if self.verify and shard not in self._verified:
                if fs is None:
                    fs, root = open_fs(self.url, self.storage_options)
                verify_shard(fs, root, self._dataset.shards[shard], self.url)
                self._verified.add(shard)
            yield self._dataset[item]

    def _finish(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.decode_device is None:
            return sample
        return {**sample, "features": sample["features"].decode(self.features_dtype, self.decode_device)}

    def close(self) -> None:
        super().close()
        self._dataset.close()


# ----------------------------------------------------------------------------------------------------
# Online mode


class OnlineStream(_Streaming):
    """This rank's samples computed by the target during training, in the dicts `CacheStream` yields.

    `answers` is the regenerated answers file; `model` the target (on the device to run it on),
    `render` the `render_conversation` keyword arguments (`answers.render_options`). Conversations
    without a supervised token are dropped, as the cache stage drops them. The rows are the training
    answers, or with `heldout` the held-out ones.
    """

    def __init__(
        self,
        answers: Path,
        tokenizer,
        model,
        layer_ids: Sequence[int],
        render: dict[str, Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epochs: int | None = None,
        prefetch: int = PREFETCH,
        tokens_per_batch: int = ONLINE_TOKENS_PER_BATCH,
        lookahead: int = ONLINE_LOOKAHEAD,
        features_dtype: torch.dtype = torch.float32,
        final_hidden: bool = False,
        heldout: bool = False,
    ):
        self.final_hidden = final_hidden
        self.answers = Path(answers)
        self.tokenizer, self.model = tokenizer, model
        self.layer_ids = check_layer_ids(list(layer_ids), model.config.num_hidden_layers)
        self.render = dict(render)
        self.prefetch, self.tokens_per_batch, self.lookahead = prefetch, tokens_per_batch, max(1, lookahead)
        self.features_dtype = features_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = [row for row in read_answers(self.answers) if row["heldout"] is heldout]
        if heldout and not rows:
            raise DataError(f"{self.answers} holds no answers to held-out prompts: {NO_HELDOUT}")
        self._rows = [row for row in rows if any(self._render(row)[1])]
        if len(self._rows) < len(rows):
            log.warning(
                "dropped %d conversations with no supervised tokens after rendering",
                len(rows) - len(self._rows),
            )
        self._position = _Position(
            RankOrder([len(self._rows)], rank=rank, world_size=world_size, seed=seed, shuffle_buffer=None),
            epochs,
        )

    def _render(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        return render(self.tokenizer, row, self.render, self.answers)

    def _read(self, items: Iterable[int]) -> Iterator[dict[str, Any]]:
        window: list[int] = []
        for item in items:
            window.append(item)
            if len(window) == self.lookahead:
                yield from self._run(window)
                window = []
        if window:
            yield from self._run(window)

    def _run(self, items: list[int]) -> list[dict[str, Any]]:
        rows = [self._rows[i] for i in items]
        rendered = [self._render(row) for row in rows]
        out: list[dict[str, Any] | None] = [None] * len(items)
        batches = capture_batches(
            self.model,
            [ids for ids, _ in rendered],
            self.layer_ids,
            pad_id=self.pad_id,
            tokens_per_batch=self.tokens_per_batch,
            final_hidden=self.final_hidden,
        )
        for batch in batches:
            for j, i in enumerate(batch.indices):
                ids, mask = rendered[i]
                out[i] = {
                    "sample_id": rows[i]["id"],
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "loss_mask": torch.tensor(mask, dtype=torch.bool),
                    "features": batch.features[j].to(self.features_dtype),
                    "num_tokens": len(ids),
                }
                if batch.final_hidden is not None:
                    out[i]["final_hidden"] = batch.final_hidden[j].to(self.features_dtype)
        return out


# ----------------------------------------------------------------------------------------------------
# From a config


def open_stream(
    cfg: DictConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    tokenizer=None,
    epochs: int | None = None,
    device: torch.device | str | None = None,
    verify: bool = False,
    final_hidden: bool = False,
    heldout: bool = False,
    target=None,
) -> CacheStream | OnlineStream:
    """The stream `storage.mode` asks for: the run's cache (validated against the config) or
    the target run online over the regenerated answers. `device` is where features come to be: the
    target runs there (online), or the cache's bytes are decoded there as training takes each sample
    (cached; None: in the prefetch thread, on the CPU). `final_hidden` adds the target's final hidden
    state to online samples; the cache does not hold it. `heldout`: the held-out samples instead of the
    training ones (validation). `target`: the target model online mode runs, when one is loaded already
    (another stream's), instead of loading it again."""
    t = cfg.target
    if tokenizer is None:
        tokenizer = load_tokenizer(t.path, t.gguf_file, t.revision)
    if cfg.storage.mode == "cached":
        return CacheStream(
            run_paths(cfg).cache_url,
            OmegaConf.to_container(cfg.storage.storage_options, resolve=True),
            rank=rank,
            world_size=world_size,
            seed=int(cfg.train.seed),
            epochs=epochs,
            verify=verify,
            expected=expected_manifest_fields(cfg, tokenizer),
            decode_device=device,
            heldout=heldout,
        )
    model = target
    if model is None:
        model, _ = load_target(t.path, t.gguf_file, t.revision, t.dtype)
        if device is not None:
            model.to(device)
    return OnlineStream(
        run_paths(cfg).answers,
        tokenizer,
        model,
        list(t.layer_ids),
        render_options(cfg),
        rank=rank,
        world_size=world_size,
        seed=int(cfg.train.seed),
        epochs=epochs,
        final_hidden=final_hidden,
        heldout=heldout,
    )


def supervised_token_counts(cfg: DictConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """How often each token id is supervised over the whole training data: [vocab_size] int64.

    Cached mode reads only the `input_ids` and `loss_mask` columns of the cache's shards; online mode
    renders the answers as `OnlineStream` does. Every rank computes the same counts.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)

    def add(ids, mask) -> None:
        supervised = torch.as_tensor(np.asarray(ids, dtype=np.int64)[np.asarray(mask, dtype=bool)])
        counts.add_(torch.bincount(supervised, minlength=vocab_size)[:vocab_size])

    if cfg.storage.mode == "online":
        answers, options = run_paths(cfg).answers, render_options(cfg)
        for row in read_answers(answers):
            if not row["heldout"]:  # as the cache, which keeps them apart
                add(*render(tokenizer, row, options, answers))
        return counts
    url = run_paths(cfg).cache_url
    options = OmegaConf.to_container(cfg.storage.storage_options, resolve=True)
    fs, root = open_fs(url, options)
    columns = ["input_ids", "loss_mask", "num_tokens"]
    only = pa.ipc.IpcReadOptions(included_fields=[SCHEMA.get_field_index(c) for c in columns])
    for shard in read_manifest(url, options).shards:
        with fs.open(posixpath.join(root, shard["name"]), "rb") as f:
            reader = pa.ipc.open_file(f, options=only)  # the feature column is never read
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                n = batch.column("num_tokens")[0].as_py()
                packed = np.frombuffer(batch.column("loss_mask")[0].as_buffer(), dtype=np.uint8)
                mask = np.unpackbits(packed, count=n, bitorder="little")  # as the cache writes it
                add(batch.column("input_ids")[0].values.to_numpy(zero_copy_only=False), mask)
    return counts


# ----------------------------------------------------------------------------------------------------
# Measuring


def samples_per_second(stream: Iterable[dict[str, Any]], count: int, *, warmup: int = 0) -> dict[str, float]:
    """Time taking `count` samples from `stream` (after `warmup` untimed ones): samples/s and tokens/s."""
    it = iter(stream)
    for _ in range(warmup):
        next(it)
    tokens, taken = 0, 0
    start = time.perf_counter()
    for sample in it:
        tokens += int(sample["num_tokens"])
        taken += 1
        if taken == count:
            break
    elapsed = max(time.perf_counter() - start, 1e-9)
    if hasattr(it, "close"):
        it.close()
    return {
        "samples": taken,
        "seconds": elapsed,
        "samples_per_s": taken / elapsed,
        "tokens_per_s": tokens / elapsed,
    }
