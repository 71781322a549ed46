"""Peak memory and speed of one draft training step (forward + backward) at the presets' 512 anchors a
sequence, on a Qwen3-4B-shaped draft of five layers, on the CPU; optionally against the dense masks and
whole-batch logits this repository had before its index masks and chunked vocabulary losses.

    .venv/bin/python bench/train_step_bench.py --threads 1    # the presets' shape: ~18 min, 12.5 GB
    .venv/bin/python bench/train_step_bench.py --variants before after --anchors 64 --layers 1
    .venv/bin/python bench/train_step_bench.py --anchors 128 256 512 --skip-dspark --skip-eagle3
    .venv/bin/python bench/train_step_bench.py --skip-dspark --skip-eagle3 --out runs/bench/step.json

Geometry (Qwen3-4B, `conf/target/qwen3_4b.yaml`, `conf/algo/{dflash,dspark}.yaml`): hidden 2560, 32 query /
8 KV heads of 128, MLP 9728, vocabulary 151,936, blocks of 7 slots, five target layers (Eagle3: three),
`--layers` decoder layers (five, as the presets), fp32 (the CPU's fast path), the target's embedding and LM
head shared and frozen. Cut from a real run: sequences of `--seq-len` tokens (1,024, not up to 4,096: the
anchors, not the context, make most of the work), one step (no optimizer), a micro-batch of 1 sequence.
The DFlash loss covers all 7 slots of a block (upstream's convention; the DFlash trainer here supervises
the 6 mask slots), so its figures are an upper bound for that trainer.

Each configuration runs in its own subprocess (`--worker`, with `MALLOC_MMAP_THRESHOLD_` fixed so that
freed tensors leave the process): it builds the draft and a batch of `--batch` sequences of `--seq-len`
tokens (the first `--prompt-len` unsupervised), samples `--anchors` anchors a sequence (`sample_anchors`),
packs them (`pack_blocks`), runs one small warm-up forward, then times one step: draft forward, loss,
backward into the draft's weights (no optimizer step). Peak memory is the rise of the process's resident
set during that step: the kernel's high-water mark (VmHWM), reset through /proc/self/clear_refs just
before it, minus the resident set at its start (weights, batch and warm-up leftovers excluded); peak RSS
is that high-water mark itself (weights, shared embedding and head, and batch included). On the CPU this
is what the step allocates: torch keeps no allocator statistics there.

- before: one attention call per layer with the dense [queries x keys] bool mask and logits for every
  supervised row at once (autograd keeps them for the backward): what this repository did before it
  had index masks and chunked losses.
- after: attention in chunks of `ATTENTION_CHUNK_ROWS` queries, each with the mask of the keys it can
  see, built from the index vectors of `PackedBlocks`; the loss in chunks of `LOSS_CHUNK_ROWS` rows.
- upstream: the formula for deepseek-ai/DeepSpec at the same shapes and micro-batch:
  fp32 logits [batch x anchors x 7 x vocab] (DSpark: also the aligned target logits) plus its
  non-flex bool mask [batch x anchors*7 x (T + anchors*7)]. Memory only (not run here).

DSpark: `DSparkDraft.forward` + `dspark_loss` against `block_states` + `chunked_dspark_loss` (rank-256
vanilla Markov head, confidence head, teacher from the target's final states). Eagle3: `forward_train`
(hard labels: one-hot teachers) against `ttt_hidden` + a chunked weighted CE. The loss column shows that
each pair computes the same loss. Everything printed is measured when the command runs; the results
JSON (bench/results/train_step-qwen3_4b-<date>.json, or `--out`) holds every figure, the command, commit
and machine, and the load average, since other work on the machine slows every timing here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import begin, say, write_results

from deepspec.models.drafts.dflash import (
    ATTENTION_CHUNK_ROWS,
    DFlashConfig,
    DFlashDraft,
    pack_blocks,
    sample_anchors,
)
from deepspec.models.losses import (
    IGNORE,
    LOSS_CHUNK_ROWS,
    block_labels,
    chunked_dspark_loss,
    dspark_loss,
    slot_weights,
    supervised_prefix,
    weighted_block_cross_entropy,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, BLOCK = 2560, 32, 8, 128, 9728, 151_936, 7
DFLASH_BLOCK = BLOCK + 1  # the preset: the anchor slot drafts nothing in DFlash's (the engines') convention
LAYER_IDS = [1, 9, 17, 25, 33]  # qwen3_4b preset
EAGLE3_LAYER_IDS = [1, 17, 32]
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# worker: one configuration, one process


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def backbone_config(layers: int, block: int = BLOCK) -> DFlashConfig:
    return DFlashConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        intermediate_size=MLP, vocab_size=VOCAB, num_hidden_layers=layers, block_size=block,
        target_layer_ids=LAYER_IDS, mask_token_id=151_643, rope_theta=1e6, qk_norm=True,
        target_model_type="qwen3", target_num_hidden_layers=36,
    )  # fmt: skip


def make_batch(spec: dict, n_features: int) -> list[dict]:
    gen = torch.Generator().manual_seed(spec["seed"])
    samples = []
    for _ in range(spec["batch"]):
        t = spec["seq_len"]
        mask = torch.zeros(t, dtype=torch.long)
        mask[spec["prompt_len"] :] = 1
        samples.append(
            {
                "input_ids": torch.randint(0, VOCAB, (t,), generator=gen),
                "features": torch.randn(t, n_features * HIDDEN, generator=gen).to(torch.bfloat16),
                "final": torch.randn(t, HIDDEN, generator=gen),  # the target's last normalised states
                "loss_mask": mask,
            }
        )
    return samples


def dflash_step(spec: dict, embed: torch.Tensor):
    draft = DFlashDraft(backbone_config(spec["layers"], DFLASH_BLOCK), embed, embed)
    draft.attention_chunk_rows = ATTENTION_CHUNK_ROWS if spec["variant"] == "after" else None
    chunk_rows = LOSS_CHUNK_ROWS if spec["variant"] == "after" else None
    weights = slot_weights(BLOCK, 4.0)  # the BLOCK drafting mask slots, as `dflash.training_loss` weighs them
    samples = make_batch(spec, len(LAYER_IDS))

    def prepare(count: int):
        gen = torch.Generator().manual_seed(spec["seed"])
        anchors = [sample_anchors(s["loss_mask"], count, gen) for s in samples]
        packed = pack_blocks(
            [(s["input_ids"], s["features"]) for s in samples], anchors, DFLASH_BLOCK, 151_643
        )
        labels = torch.cat(
            [
                block_labels(s["input_ids"], s["loss_mask"], a, BLOCK)  # mask slot k's label: token p + k
                for s, a in zip(samples, anchors, strict=True)
            ]
        )
        return packed, labels

    def step(batch, backward=True):
        packed, labels = batch
        hidden = draft(packed).view(labels.shape[0], DFLASH_BLOCK, -1)[:, 1:].reshape(-1, HIDDEN)
        loss, _ = weighted_block_cross_entropy(
            hidden, draft.lm_head.weight, labels, weights, chunk_rows=chunk_rows
        )
        if backward:
            loss.backward()
        return loss, int((labels != IGNORE).sum()), labels.numel()

    return draft, prepare, step


def dspark_step(spec: dict, embed: torch.Tensor):
    from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft, block_rows

    cfg = DSparkConfig(
        backbone=backbone_config(spec["layers"]), markov_rank=256, markov_head_type="vanilla",
        confidence_head=True, confidence_head_with_markov=True, num_anchors=spec["anchors"],
    )  # fmt: skip
    draft = DSparkDraft(cfg, embed, embed)
    after = spec["variant"] == "after"
    draft.backbone.attention_chunk_rows = ATTENTION_CHUNK_ROWS if after else None
    weights = slot_weights(BLOCK, 4.0)
    terms = {"ce_weight": 0.1, "l1_weight": 0.9, "confidence_weight": 1.0}  # conf/algo/dspark.yaml
    samples = make_batch(spec, len(LAYER_IDS))

    def prepare(count: int):
        gen = torch.Generator().manual_seed(spec["seed"])
        anchors = [sample_anchors(s["loss_mask"], count, gen) for s in samples]
        pairs = list(zip(samples, anchors, strict=True))
        packed = pack_blocks([(s["input_ids"], s["features"]) for s in samples], anchors, BLOCK, 151_643)
        labels = torch.cat([block_labels(s["input_ids"], s["loss_mask"], a, BLOCK) for s, a in pairs])
        prev = torch.cat([block_rows(s["input_ids"], a, BLOCK) for s, a in pairs])
        teacher = torch.cat([block_rows(s["final"], a, BLOCK) for s, a in pairs])
        return packed, labels, prev, teacher

    def step(batch, backward=True):
        packed, labels, prev, teacher = batch
        if not after:
            out = draft(packed, prev, labels, target_hidden=teacher)
            loss, _ = dspark_loss(
                out.draft_logits,
                out.target_logits,
                out.labels,
                out.slots,
                out.confidence_logits,
                weights,
                **terms,
            )
        else:  # what `DSparkDraft.forward` would hand the loss instead of logits
            states = draft.block_states(packed, prev)
            index = supervised_prefix(labels).reshape(-1).nonzero().squeeze(-1)
            codes = states.codes.reshape(-1, states.codes.shape[-1])[index]
            loss, _ = chunked_dspark_loss(
                states.hidden.reshape(-1, HIDDEN)[index], draft.backbone.lm_head.weight,
                labels.reshape(-1)[index], index % BLOCK, states.confidence_logits.reshape(-1)[index], weights,
                target_hidden=teacher.reshape(-1, HIDDEN)[index], markov=(codes, draft.markov_head.markov_w2.weight),
                **terms,
            )  # fmt: skip
        if backward:
            loss.backward()
        return loss, int(supervised_prefix(labels).sum()), labels.numel()

    return draft, prepare, step


def eagle3_step(spec: dict, embed: torch.Tensor):
    from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft

    cfg = Eagle3Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        intermediate_size=MLP, vocab_size=VOCAB, draft_vocab_size=VOCAB, target_layer_ids=EAGLE3_LAYER_IDS,
        ttt_steps=BLOCK, rope_theta=1e6, target_model_type="qwen3", target_num_hidden_layers=36,
    )  # fmt: skip
    draft = Eagle3Draft(cfg, embed, embed)
    samples = make_batch(spec, len(EAGLE3_LAYER_IDS))
    features = torch.stack([s["features"] for s in samples])
    ids = torch.stack([s["input_ids"] for s in samples])
    mask = torch.stack([s["loss_mask"] for s in samples])

    def prepare(length: int):
        return features[:, :length], ids[:, :length], mask[:, :length]

    def step(batch, backward=True):
        feats, input_ids, loss_mask = batch
        # before: every step's [B, T, vocab] logits at once; after: the same loss over rows, in chunks
        chunk_rows = None if spec["variant"] == "before" else LOSS_CHUNK_ROWS
        loss, stats = draft.forward_train(feats, input_ids, loss_mask, chunk_rows=chunk_rows)
        rows = int(stats["slot_counts"].sum())
        if backward:
            loss.backward()
        return loss, rows, input_ids.numel() * BLOCK

    return draft, prepare, step


def worker(spec: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    embed = torch.empty(VOCAB, HIDDEN).normal_(std=0.02)  # the target's embedding and LM head, tied here
    build = {"dflash": dflash_step, "dspark": dspark_step, "eagle3": eagle3_step}[spec["algo"]]
    draft, prepare, step = build(spec, embed)
    size = spec["seq_len"] if spec["algo"] == "eagle3" else spec["anchors"]
    warm = prepare(spec["prompt_len"] + 8 if spec["algo"] == "eagle3" else 2)
    with torch.no_grad():  # first-call costs (thread pools, kernels) out of the timed step
        step(warm, backward=False)
    del warm
    batch = prepare(size)
    draft.zero_grad(set_to_none=True)
    gc.collect()
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    loss, supervised, block_rows = step(batch)
    seconds = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    return {
        **spec,
        "step_s": seconds,
        "peak_mib": (hwm - rss0) / 1024,
        "peak_rss_mib": hwm / 1024,
        "rss_before_mib": rss0 / 1024,
        "loss": float(loss),
        "supervised_rows": supervised,
        "block_rows": block_rows,
        "supervised_rows_per_s": supervised / seconds,
        "context_tokens_per_s": spec["batch"] * spec["seq_len"] / seconds,
    }


# --------------------------------------------------------------------------------------------------
# driver


def upstream_mib(spec: dict) -> dict:
    """deepseek-ai/DeepSpec at these shapes: fp32 logits and the non-flex bool mask, per micro-batch."""
    if spec["algo"] == "eagle3":
        return {"upstream_logits_mib": None, "upstream_mask_mib": None}  # not modelled here
    q = spec["anchors"] * BLOCK
    copies = 2 if spec["algo"] == "dspark" else 1  # DSpark also holds the aligned target logits
    logits = copies * spec["batch"] * q * VOCAB * 4
    mask = spec["batch"] * q * (spec["seq_len"] + q)
    return {"upstream_logits_mib": logits / MIB, "upstream_mask_mib": mask / MIB}


def dense_mask_mib(spec: dict) -> float:
    """This repository's former packed mask: all block rows x all context and block rows, bool."""
    if spec["algo"] == "eagle3":
        return 0.0
    q = spec["batch"] * spec["anchors"] * BLOCK
    return q * (spec["batch"] * spec["seq_len"] + q) / MIB


def run(spec: dict, timeout_s: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )  # fmt: skip
    if proc.returncode != 0:
        return {
            **spec,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode,
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", type=int, nargs="+", default=[512], help="DFlash anchors a sequence")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences a micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=256, help="unsupervised tokens at the start")
    parser.add_argument("--layers", type=int, default=5, help="draft decoder layers (presets: 5)")
    parser.add_argument(
        "--variants", nargs="+", choices=("before", "after"), default=["after"],
        help="after: index masks and chunked losses (what trains); before: dense mask, whole-batch logits",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads a worker (1: other work on the cores)"
    )
    parser.add_argument("--dspark-anchors", type=int, default=512)
    parser.add_argument("--eagle3-len", type=int, default=128, help="Eagle3 tokens a sequence")
    parser.add_argument("--skip-dspark", action="store_true")
    parser.add_argument("--skip-eagle3", action="store_true")
    parser.add_argument("--timeout-s", type=int, default=1800, help="per configuration")
    parser.add_argument(
        "--out", type=Path, help="results JSON (bench/results/train_step-qwen3_4b-<date>.json)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    begin("train_step")
    base = {"seq_len": args.seq_len, "prompt_len": args.prompt_len, "layers": args.layers,
            "threads": args.threads, "seed": 0}  # fmt: skip
    grid = [{**base, "algo": "dflash", "anchors": n, "batch": b} for b in args.batch for n in args.anchors]
    if not args.skip_dspark:
        grid.append({**base, "algo": "dspark", "anchors": args.dspark_anchors, "batch": 1})
    if not args.skip_eagle3:
        prompt = min(args.prompt_len, args.eagle3_len // 4)
        grid.append({**base, "algo": "eagle3", "anchors": 0, "batch": 1, "seq_len": args.eagle3_len,
                     "prompt_len": prompt})  # fmt: skip
    results = []
    for spec in grid:
        for variant in args.variants:
            full = {**spec, "variant": variant}
            result = {
                **run(full, args.timeout_s),
                **upstream_mib(full),
                "dense_mask_mib": dense_mask_mib(full),
            }
            results.append(result)
            say(f"{spec['algo']} anchors={spec['anchors']} batch={spec['batch']} {variant}: "
                f"{result.get('step_s', float('nan')):.1f} s, {result.get('peak_mib', float('nan')):.0f} MiB rise, "
                f"{result.get('peak_rss_mib', float('nan')):.0f} MiB peak RSS "
                f"{result.get('error', '')}")  # fmt: skip

    header = (f"{'algo':7} {'T':>5} {'anchors':>7} {'batch':>5} {'variant':7} {'rows':>6} {'step s':>7} "
              f"{'rows/s':>7} {'tok/s':>7} {'peak MiB':>9} {'RSS MiB':>8} {'old mask MiB':>12} {'upstream MiB':>12} "
              f"{'loss':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(
                f"{r['algo']:7} {r['seq_len']:>5} {r['anchors']:>7} {r['batch']:>5} {r['variant']:7} error: {r['error']}"
            )
            continue
        upstream = (
            "-"
            if r["upstream_logits_mib"] is None
            else f"{r['upstream_logits_mib'] + r['upstream_mask_mib']:.0f}"
        )
        print(f"{r['algo']:7} {r['seq_len']:>5} {r['anchors'] or '-':>7} {r['batch']:>5} {r['variant']:7} "
              f"{r['supervised_rows']:>6} {r['step_s']:>7.1f} {r['supervised_rows_per_s']:>7.1f} "
              f"{r['context_tokens_per_s']:>7.1f} {r['peak_mib']:>9.0f} {r['peak_rss_mib']:>8.0f} {r['dense_mask_mib']:>12.1f} "
              f"{upstream:>12} {r['loss']:>9.5f}")  # fmt: skip
    print(
        "\nrows: supervised slots (Eagle3: supervised TTT rows); tok/s: context tokens a second; peak: the step's "
        "resident-set rise; RSS: the process's peak resident set; old mask: the former packed bool mask; "
        "upstream: fp32 logits + bool mask by formula."
    )
    print(
        f"Cut from a real run: {args.layers} draft layers, {args.seq_len}-token sequences (real ones reach "
        "4,096), one step without the optimizer, fp32 on the CPU; DFlash's loss over its 7 mask slots (blocks of 8)."
    )
    geometry = {
        "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate": MLP,
        "vocab": VOCAB, "block": BLOCK, "dflash_block": DFLASH_BLOCK, "layers": args.layers,
    }  # fmt: skip
    figures = {
        "geometry": geometry,
        "attention_chunk_rows": ATTENTION_CHUNK_ROWS,
        "loss_chunk_rows": LOSS_CHUNK_ROWS,
        "results": results,
    }
    write_results(figures, target="qwen3_4b", args=args, out=args.out)


if __name__ == "__main__":
    main()
