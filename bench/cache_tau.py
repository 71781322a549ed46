"""Accepted length (tau) per feature encoding: the same draft trained on each encoding's cache with
several training seeds, against a control trained and decoded with every feature zeroed.

    .venv/bin/python bench/cache_tau.py --encodings int4_mixed                  # stories260k, DFlash: ~25 min
    .venv/bin/python bench/cache_tau.py --encodings int4_mixed --algo eagle3    # ~35 min
    .venv/bin/python bench/cache_tau.py                                         # every encoding x 3 seeds: ~75 min
    .venv/bin/python bench/cache_tau.py --encodings int4 --seeds 2 --epochs 24 --parallel 1
    .venv/bin/python bench/cache_tau.py --target smollm2 --encodings int4_mixed  # no power on a CPU (below)

The real stages (`prepare_prompts`, `regenerate`, `build_cache` once per chosen encoding on the same
answers) build the caches. The same draft and settings are trained by the real train stage
(`tasks.train.stage.train`: torchrun + DeepSpeed, `--parallel` runs at a time with one thread each) on
each encoding's cache with `--seeds` training seeds, plus a control trained and decoded with every
feature zeroed (tau without the cache's information), as many seeds. The control gives the run its
power: "within noise of bf16" means something only where bf16 is measurably above the control. The
draft is DFlash, or `--algo eagle3` / `dspark`, which learn the teacher recomputed from the cached
features. Greedy tau on the prompts stage's held-out prompts with `speculative_generate`. An encoding's
difference to bf16 is judged against two noises: training (the pooled seed-to-seed sd of tau) and
prompts (a paired bootstrap). One seed is not enough: two encodings with the same reconstruction error
can differ by 0.1 in tau from the training run alone. The ranks' output goes to
`<work>/train_stage.log`.

stories260k is a base model: its prompts are story openings in its own words and its answers greedy
continuations (regen.temperature=0), which a one-layer draft learns in a few hundred optimizer steps on a
CPU; it trains 48 epochs by default (at 16 the zeroed control ties bf16). SmolLM2 answers chat prompts
from the offline mix; at CPU scale its tau has no power (10 epochs; 40 still leave bf16 at 1.09).

The table goes to stdout, progress to stderr, every figure to the results JSON
(bench/results/cache_tau-<target>-<date>.json). Runtimes are for an otherwise idle 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from common import (
    ALGOS,
    REFERENCE,
    add_data_args,
    begin,
    build_caches,
    chosen_encodings,
    draft_overrides,
    output_to,
    prepare_data,
    read_samples,
    say,
    shard_chunks,
    work_dir,
    write_cache,
    write_results,
)
from omegaconf import OmegaConf

from deepspec.models.chat import render_prompt
from deepspec.models.drafts import load_draft
from deepspec.models.speculative import acceptance_stats, speculative_generate
from deepspec.models.target import input_embeddings, load_target, output_head
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.stage import stop_token_ids
from deepspec.tasks.files import read_jsonl
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.stage import train

ZEROED_VARIANT = "zeroed"  # every feature zeroed, in training and in decoding: no target information
BOOTSTRAP_DRAWS = 2000


class ZeroedFeatures:
    """A draft decoding with every target feature zeroed, as the control variant was trained (greedy:
    `draft_logits` only; the context's token ids go on to a draft that reads them, Eagle3)."""

    def __init__(self, draft):
        self.draft, self.num_draft_tokens = draft, draft.num_draft_tokens
        self.takes_ids = "context_ids" in inspect.signature(draft.draft_logits).parameters

    def draft_logits(self, context_features: torch.Tensor, anchor_token: int, *, context_ids=None):
        extra = {"context_ids": context_ids} if self.takes_ids else {}
        return self.draft.draft_logits(torch.zeros_like(context_features), anchor_token, **extra)


@dataclasses.dataclass
class Variant:
    """One training run: an encoding's cache (or the zeroed control) and a training seed."""

    encoding: str
    seed: int
    cfg: Any

    @property
    def name(self) -> str:
        return f"{self.encoding}/s{self.seed}"


def train_variant(cfg) -> dict[str, Any]:
    began = time.perf_counter()
    record = train(cfg)
    return {"train_s": time.perf_counter() - began, "record": record}


def heldout_prompts(cfg, tokenizer) -> list[list[int]]:
    """The prompts stage's held-out rows, rendered as `evaluate` renders a prompt."""
    t = cfg.target
    kwargs = OmegaConf.to_container(t.chat_template_kwargs, resolve=True) or None
    return [
        render_prompt(
            tokenizer,
            row["conversations"],
            use_chat_template=bool(t.use_chat_template),
            chat_template_kwargs=kwargs,
            system_prompt=t.system_prompt,
        )
        for _, row in read_jsonl(run_paths(cfg).heldout)
    ]


def evaluate_drafts(cfg, variants: list[Variant], futures) -> dict[str, Any]:
    """Greedy speculative decoding of the held-out prompts with each run's draft, as each finishes."""
    t = cfg.target
    model, tokenizer = load_target(t.path, t.gguf_file, t.revision, t.dtype)
    prompts = heldout_prompts(cfg, tokenizer)
    eos = stop_token_ids(cfg, tokenizer)
    embed, head = input_embeddings(model).weight, output_head(model).weight
    out = {}
    for v in variants:
        trained = futures[v.name].result()
        draft = load_draft(run_paths(v.cfg).draft_dir, embed, head)
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
        record = trained["record"]
        out[v.name] = {
            "encoding": v.encoding,
            "seed": v.seed,
            "tau": stats["tau"],
            "acceptance": stats["acceptance"],
            "per_prompt_accepted": [r.accepted for r in results],
            "train_s": trained["train_s"],
            "optimizer_steps": record.optimizer_steps,
            "train_loss_mean": record.final_metrics.get("train/loss"),
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


def accepted_length(data, overrides: list[str], caches, parallel: int, seeds: int) -> dict[str, Any]:
    """Train every (encoding or control, seed) with the train stage, each in its own run directory on the
    shared data directory, and decode the held-out prompts with each draft."""
    work, bf16 = data.work, caches[REFERENCE]
    data_dir = run_paths(data.cfg).data_dir
    # the control's cache: bf16's samples with every feature zeroed, where the control's config looks
    zeroed = compose([*overrides, f"storage.url={work / 'zeroed'}", f"storage.encoding={REFERENCE}"])
    zero = [{**s, "features": torch.zeros_like(s["features"])} for s in read_samples(bf16, torch.bfloat16)]
    sizes = [int(s["samples"]) for s in bf16.manifest.shards]
    write_cache(run_paths(zeroed).cache_url, None, shard_chunks(zero, sizes), REFERENCE, bf16.manifest)

    variants = []
    for name in [*caches, ZEROED_VARIANT]:  # the control has as many seeds, so that its gap to bf16 has an sd
        storage = [f"storage.url={work / 'zeroed'}"] if name == ZEROED_VARIANT else []
        encoding = REFERENCE if name == ZEROED_VARIANT else name
        for seed in range(seeds):  # one cache, a training run of each seed in its own run directory
            extra = [
                f"run_dir={work / 'runs' / f'{name}-s{seed}'}",
                f"data_dir={data_dir}",
                *storage,
                f"storage.encoding={encoding}",
                f"train.seed={seed}",
            ]
            variants.append(Variant(name, seed, compose([*overrides, *extra])))

    log = work / "train_stage.log"
    say(
        f"train stage for {len(variants)} drafts (torchrun + DeepSpeed), {parallel} at a time; ranks -> {log}"
    )
    torch.set_num_threads(1)  # the training runs have the cores; evaluation takes one thread
    with output_to(log), ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {v.name: pool.submit(train_variant, v.cfg) for v in variants}
        runs = evaluate_drafts(data.cfg, variants, futures)
    torch.set_num_threads(2)
    return {
        "eval_prompts": len(runs[f"{REFERENCE}/s0"]["per_prompt_accepted"]),
        "eval_new_tokens": int(data.cfg.eval.max_new_tokens),
        "parallel": parallel,
        "train": OmegaConf.to_container(variants[0].cfg.train, resolve=True),
        "algo": OmegaConf.to_container(variants[0].cfg.algo, resolve=True),
        "runs": runs,
        **summarize(runs, seeds),
    }


def describe_draft(a: dict[str, Any]) -> str:
    """`1 layer, block 4, 32 anchors` for DFlash and DSpark; `4 TTT steps` for Eagle3 (one layer)."""
    if "ttt_steps" in a:
        return f"1 layer, {a['ttt_steps']} training-time-test steps"
    return f"{a['num_layers']} layer, block {a['block_size']}, {a['anchors_per_sequence']} anchors"


def print_tau(result: dict[str, Any]) -> None:
    a, t = result["algo"], result["train"]
    print(
        f"\n== Accepted length: greedy tau (the target's own token included) on {result['eval_prompts']} "
        f"held-out prompts, up to {result['eval_new_tokens']} new tokens.\nThe same {a['name']} draft ("
        f"{describe_draft(a)}) trained by "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(
        parser,
        encodings_help="encodings to train on (default: all); bf16, the reference, is always among them",
        encodings_aliases=["--tau-encodings"],  # its name when this bench was a section of a larger one
    )
    parser.add_argument("--algo", choices=ALGOS, default="dflash", help="the draft trained")
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds per encoding and for the control"
    )
    parser.add_argument("--parallel", type=int, default=2, help="train stage runs at a time, 1 thread each")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the target's)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)  # the machine's 2 cores; training sets its own
    begin("cache_tau")
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    data = prepare_data(args.target, work_dir(args), prompts=args.prompts, extra=extra)
    caches = build_caches(data.overrides, chosen_encodings(args))
    overrides = [*data.overrides, *draft_overrides(args.algo, data.preset)]
    figures = {
        "data": data.summary,
        "accepted_length": accepted_length(data, overrides, caches, args.parallel, args.seeds),
    }
    print_tau(figures["accepted_length"])
    write_results(figures, target=args.target, args=args, out=args.out)


if __name__ == "__main__":
    main()
