"""Target-cache throughput per feature encoding: write and read rates (local disk and, with --s3, a real
S3 server), encode and decode rates at Qwen3-4B's width, and the loader's rate against training's.

    .venv/bin/python bench/cache_throughput.py                      # stories260k, local disk: ~4 min
    .venv/bin/python bench/cache_throughput.py --s3                 # + `rclone serve s3`: ~5 min
    .venv/bin/python bench/cache_throughput.py --prompts 48 --repeats 1 --train-steps 10   # a quick check: ~2 min
    .venv/bin/python bench/cache_throughput.py --target smollm2 --s3   # SmolLM2 (`make assets`): ~6 min
    .venv/bin/python bench/cache_throughput.py --repeats 5 --encodings int4 int4_mixed

1. Write and read. The real stages (`prepare_prompts`, `regenerate`, `build_cache`) build the bf16 cache;
   it is read once into memory (bf16 features, what the cache stage hands the writer), so that writing
   is timed without the target: `write_shard` per shard into the bf16 cache's shard sizes, commit
   markers included, for every encoding; then a full sequential read (`iter_samples`) and one epoch
   through training's loader (`CacheStream`: shuffled across shards, a prefetch thread). Locally and,
   with --s3, over `rclone serve s3` on 127.0.0.1 (`tests/support/s3.py`, over a temporary directory,
   stopped at the end). Median of `--repeats`, run round robin over the encodings so that a burst of
   load hits all of them alike.
2. Encode and decode. Tokens/s of each encoding at Qwen3-4B's width (its preset's layers x hidden), one
   torch thread, on normal features with outlier channels: what one CPU thread decodes (training
   decodes on its own device, in its own thread) and what encoding costs the cache stage.
3. Loader against training. `CacheStream` samples/s over each encoding's local cache of section 1 (the
   same samples, shards and encoding the cache stage writes) against the samples/s of real DFlash
   micro-steps (the train recipe's: the draft's `training_loss` from the draft registry, then clipping
   and an optimizer step) on a plain torch AdamW instead of a DeepSpeed engine, fed from memory and fed
   by the loader, its features decoded in the training thread as training decodes them, or in the
   prefetch thread.

The tables go to stdout, progress to stderr, every figure to the results JSON
(bench/results/cache_throughput-<target>-<date>.json). Runtimes are for an otherwise idle 2-core
machine; the load average is recorded with the results, since other work slows every timing here.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch
from common import (
    REFERENCE,
    add_data_args,
    begin,
    build_caches,
    chosen_encodings,
    draft_overrides,
    mb,
    prepare_data,
    read_samples,
    s3_server,
    say,
    shard_chunks,
    work_dir,
    write_cache,
    write_results,
)
from transformers import AutoConfig

from deepspec.models.drafts import draft_spec
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.target import load_embedding_and_head, load_tokenizer, mask_token_id, resolve_source
from deepspec.tasks.cache.encoding import get_encoding
from deepspec.tasks.cache.format import iter_samples
from deepspec.tasks.cache.loader import PREFETCH, CacheStream, samples_per_second
from deepspec.tasks.config import algo_settings, compose
from deepspec.tasks.train.schedule import anchor_generator

# ----------------------------------------------------------------------------------------------------
# 1. Write and read


def read_sequential(url: str, options) -> dict[str, float]:
    """Every sample in cache order, decoded to float32 (`iter_samples`)."""
    began = time.perf_counter()
    n = sum(1 for _ in iter_samples(url, options))
    return {"seconds": time.perf_counter() - began, "samples": n}


def read_stream(url: str, options) -> dict[str, float]:
    """One epoch through training's loader: shuffled across shards, read and decoded in its thread."""
    with CacheStream(url, options, seed=0, epochs=1, prefetch=PREFETCH) as stream:
        return samples_per_second(stream, len(stream))


def throughput(where: str, base_url: str, options, samples, template, encodings, repeats: int) -> dict:
    """Write, read and stream every encoding `repeats` times, round robin; the medians. Each encoding's
    cache is left complete at `<base_url>/<encoding>`."""
    chunks = shard_chunks(samples, [int(s["samples"]) for s in template.shards])
    runs: dict[str, dict[str, list]] = {name: {"write": [], "read": [], "loader": []} for name in encodings}
    for _ in range(repeats):
        for name in encodings:
            url = f"{base_url}/{name}"
            runs[name]["write"].append(write_cache(url, options, chunks, name, template))
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
        f"\n== 1. Write and read throughput: {result['samples']} samples, {result['tokens']:,} tokens, "
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


# ----------------------------------------------------------------------------------------------------
# 2. Encode and decode


def codec_rates(encodings: list[str], tokens: int = 1024, threads: int = 1) -> dict[str, Any]:
    """Encode and decode tokens/s of each encoding at Qwen3-4B's width, on normal features with outlier
    channels: what one CPU thread decodes (training decodes on its own device, in its own thread), and
    what encoding costs the cache stage beside the target's forward."""
    qwen = compose(["target=qwen3_4b"]).target
    layers, hidden = list(qwen.layer_ids), int(qwen.hidden_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden * len(layers), generator=gen)
    x[:, torch.randperm(x.shape[1], generator=gen)[:40]] *= 100  # outlier channels, as real streams have
    out = {}
    for name in encodings:
        enc = get_encoding(name, layers)
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
    return {
        "tokens": tokens,
        "threads": threads,
        "layer_ids": layers,
        "hidden_size": hidden,
        "encodings": out,
    }


def print_codec_rates(result: dict[str, Any]) -> None:
    print(
        f"\n== 2. Encode and decode at Qwen3-4B's width ({len(result['layer_ids'])} x {result['hidden_size']:,} "
        f"features), {result['tokens']:,} tokens of normal features with outlier channels, "
        f"{result['threads']} torch thread:"
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
    """The train recipe's micro-step (the draft registry's `build` and `training_loss`, anchors from
    `anchor_generator`, gradient clipping), stepped by a plain torch AdamW instead of a DeepSpeed engine."""

    def __init__(self, cfg):
        t = cfg.target
        self.cfg, self.micro = cfg, 0
        self.spec, self.settings = draft_spec(str(cfg.algo.name)), algo_settings(cfg)
        if self.spec.needs_teacher:
            raise SystemExit(f"the plain trainer runs drafts without a teacher, not {cfg.algo.name}")
        tokenizer = load_tokenizer(t.path, t.gguf_file, t.revision)
        embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
        inputs = DraftInputs(
            target_config=AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file)),
            layer_ids=list(t.layer_ids),
            mask_token_id=mask_token_id(tokenizer, t.mask_token_id),
            embed=embed,
            head=head,
        )
        torch.manual_seed(cfg.train.seed)
        self.model = self.spec.build(self.settings, inputs)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )

    def step(self, samples: list[dict[str, Any]]) -> float:
        generator = anchor_generator(self.cfg.train.seed, self.micro, 0, 1)
        loss, _ = self.spec.training_loss(self.model, self.model, samples, self.settings, None, generator)
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


def loader_vs_training(cfg, urls: dict[str, str], samples, steps: int, s3_rates=None) -> dict[str, Any]:
    micro_batch = int(cfg.train.micro_batch)
    trainer = PlainTrainer(cfg)
    memory = training_rate(trainer, from_memory(samples, micro_batch), steps)
    say(f"training from memory: {memory:,.1f} samples/s")
    rows = {}
    for name, url in urls.items():
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
    s = trainer.settings
    return {
        "training_from_memory_samples_per_s": memory,
        "algo": {"name": s.name, "num_layers": s.num_layers, "block_size": s.block_size,
                 "anchors_per_sequence": s.anchors_per_sequence},
        "micro_batch": micro_batch,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }  # fmt: skip


def print_loader(result: dict[str, Any]) -> None:
    memory, a = result["training_from_memory_samples_per_s"], result["algo"]
    print(
        f"\n== 3. Loader against training: {result['steps']} DFlash micro-steps timed ({a['num_layers']} "
        f"layer, block {a['block_size']}, {a['anchors_per_sequence']} anchors a sequence, micro-batch "
        f"{result['micro_batch']}),\nthe train recipe's step on a plain torch AdamW instead of DeepSpeed, "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, encodings_help="encodings to write, read and stream (default: all; bf16 always)")
    parser.add_argument("--s3", action="store_true", help="also write and read over a real S3 server")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each write and read")
    parser.add_argument(
        "--train-steps", type=int, help="micro-steps timed against the loader (default: the target's)"
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)  # the machine's 2 cores
    begin("cache_throughput")
    work = work_dir(args)
    encodings = chosen_encodings(args)
    data = prepare_data(args.target, work, prompts=args.prompts)
    bf16 = build_caches(data.overrides, [REFERENCE])[REFERENCE]

    # The features, captured once: the bf16 cache holds the target's output rounded to bf16, which is
    # what the cache stage hands the writer, so writes are timed without the target.
    samples = read_samples(bf16, torch.bfloat16)
    tp: dict[str, Any] = {
        "samples": len(samples),
        "tokens": bf16.manifest.num_tokens,
        "feature_dim": bf16.manifest.feature_dim,
        "repeats": args.repeats,
        "locations": {},
    }
    local = work / "throughput"
    tp["locations"]["local"] = throughput(
        "local", str(local), None, samples, bf16.manifest, encodings, args.repeats
    )
    if args.s3:
        with s3_server(work / "s3" / "root") as server:
            say(f"S3 server at {server.endpoint_url}")
            tp["s3_endpoint"] = server.endpoint_url
            tp["locations"]["s3"] = throughput(
                "s3", "s3://deepspec/throughput", server.storage_options, samples, bf16.manifest,
                encodings, args.repeats,
            )  # fmt: skip
    print_throughput(tp)
    codec = codec_rates(encodings)
    print_codec_rates(codec)

    cfg = compose([*data.overrides, *draft_overrides("dflash", data.preset)])
    samples = [{**s, "features": s["features"].float()} for s in samples]  # as the loader decodes them
    loader = loader_vs_training(
        cfg,
        {name: str(local / name) for name in encodings},
        samples,
        args.train_steps or data.preset.train_steps_timed,
        tp["locations"].get("s3"),
    )
    print_loader(loader)
    figures = {"data": data.summary, "throughput": tp, "codec": codec, "loader_vs_training": loader}
    write_results(figures, target=args.target, args=args, out=args.out)


if __name__ == "__main__":
    main()
