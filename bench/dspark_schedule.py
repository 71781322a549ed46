"""DSpark's confidence head at work: its calibration before and after Sequential Temperature Scaling, a
static-threshold sweep, and the prefix scheduler (Algorithm 1) against fixed draft lengths over concurrency.

    # the reference SmolLM2 DSpark draft (bench/reference.py --target smollm2), ~2 min on one core
    .venv/bin/python bench/dspark_schedule.py runs/bench/reference/smollm2/runs/dspark-s0/train/dspark \
        --prompts 2 --tokens 64

The argument is a DSpark train stage's folder (its `config.yaml` and `draft/`). Steps:
1. Rounds: greedy speculative decoding (the evaluate stage's engine, every round a full block) of the
   first `--prompts` prompts of each of the nine benchmark files; each round's c_k and how many drafts
   verification kept.
2. Calibration (`models/calibration.py`): per slot, the raw c_k against conditional survival (ECE, AUROC,
   Brier), then the prefix products' ECE raw and after STS, cross-fitted on two folds of the prompts;
   reliability bins.
3. Threshold sweep: drafting stopped before the first slot whose c_k falls below t, replayed on the
   recorded rounds (a slot's c_k and verdict do not depend on whether later slots were drafted): tau and
   drafts a round against t.
4. Profile: the target's steps a second against the tokens a step verifies, measured on this machine
   (one sequence, a 256-token context, the new tokens in one forward).
5. Serving simulation (`models/prefix_scheduler.py`): 1 to 128 concurrent requests replaying the
   recorded rounds, the scheduler on the STS survivals against every fixed draft length (0: plain
   decoding). A step that drafts pays one request's measured drafting time too: a lower bound for a
   batch, exact at concurrency 1.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from common import ASSETS, begin, eval_prompts, say, write_results

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
PROFILE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CONCURRENCY = [1, 2, 4, 8, 16, 32, 64, 128]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("draft", type=Path, help="a DSpark train stage folder (config.yaml and draft/)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per benchmark (9 benchmarks)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--eval-dir", type=Path, default=ASSETS / "eval", help="<benchmark>.jsonl files")
    p.add_argument("--context", type=int, default=256, help="context length of the profile's forwards")
    p.add_argument(
        "--out", type=Path, help="results JSON (bench/results/dspark_schedule-<target>-<date>.json)"
    )
    return p.parse_args()


def threshold_sweep(rounds: list[tuple[list[float], int]]) -> list[dict[str, float]]:
    out = []
    for t in THRESHOLDS:
        lengths = [next((k for k, c in enumerate(cs) if c < t), len(cs)) for cs, _ in rounds]
        tokens = [min(kept, n) + 1 for (_, kept), n in zip(rounds, lengths, strict=True)]
        out.append({"threshold": t, "tau": statistics.fmean(tokens), "drafts": statistics.fmean(lengths)})
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    begin("dspark_schedule")
    from omegaconf import OmegaConf

    from deepspec.models import calibration
    from deepspec.models.drafts import load_draft
    from deepspec.models.prefix_scheduler import measure_step_profile, serving_sweep
    from deepspec.models.speculative import (
        acceptance_stats,
        confidence_rounds,
        draft_seconds_per_round,
        recorded_rounds,
        speculative_generate,
    )
    from deepspec.models.target import input_embeddings, load_target, output_head
    from deepspec.tasks.evaluate.stage import stop_token_ids

    cfg = OmegaConf.load(args.draft / "config.yaml")
    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32")
    drafter = load_draft(
        args.draft / "draft", input_embeddings(model).weight, output_head(model).weight
    ).eval()
    if getattr(drafter, "confidence_head", None) is None:
        raise SystemExit(
            f"{args.draft / 'draft'} has no confidence head: this bench needs a DSpark draft with one"
        )
    prompts = eval_prompts(cfg, tokenizer, args.eval_dir, args.prompts)
    say(f"{len(prompts)} prompts, {args.tokens} new tokens")
    decode = {
        "max_new_tokens": args.tokens,
        "temperature": 0.0,
        "eos_token_ids": stop_token_ids(cfg, tokenizer),
    }
    layer_ids = list(cfg.target.layer_ids)
    results = [speculative_generate(model, layer_ids, drafter, ids, **decode) for _, ids in prompts]
    draft_s = draft_seconds_per_round(results)
    rounds = confidence_rounds(results)
    stats = acceptance_stats(results)
    slots = drafter.num_draft_tokens
    say(f"{len(rounds)} rounds, tau {stats['tau']:.2f}")

    conf = stats["confidence"]
    temperatures = calibration.fit_sts(rounds, slots)
    figures: dict[str, Any] = {
        "prompts": len(prompts), "tokens": args.tokens, "rounds": len(rounds), "tau": stats["tau"],
        "accept_at": stats["accept_at"], "calibration": conf, "sts_temperatures": temperatures,
        "thresholds": threshold_sweep(rounds), "draft_s": draft_s,
    }  # fmt: skip
    profile = measure_step_profile(model, layer_ids, args.context, PROFILE_TOKENS)
    figures["profile"] = asdict(profile)
    figures["serving"] = serving_sweep(
        recorded_rounds(results), profile, CONCURRENCY, draft_s=draft_s, temperatures=temperatures
    )
    print(tables(figures, slots))
    write_results(figures, target=Path(cfg.target.path).name, args=args, out=args.out)


def tables(f: dict[str, Any], slots: int) -> str:
    def num(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    conf = f["calibration"]
    lines = [
        f"\n{f['rounds']} rounds from {f['prompts']} prompts x {f['tokens']} tokens, greedy; tau {f['tau']:.2f}",
        "",
        "| slot | accept@k | mean c_k | cond. ECE | cond. AUROC | cond. Brier | prefix ECE raw | prefix ECE STS | T_k |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sts = conf["prefix_ece_sts"] or [None] * slots
    for k in range(slots):
        lines.append(
            f"| {k} | {num(f['accept_at'][k])} | {num(conf['mean'][k])} | {num(conf['conditional_ece'][k])} "
            f"| {num(conf['conditional_auroc'][k])} | {num(conf['conditional_brier'][k])} "
            f"| {num(conf['prefix_ece'][k])} | {num(sts[k])} | {f['sts_temperatures'][k]:.2f} |"
        )
    lines += [
        "",
        "reliability of the raw c_k (all slots):",
        "",
        "| bin | rounds | mean c_k | kept |",
        "|---|---|---|---|",
    ]
    for b in conf["reliability"]:
        lines.append(
            f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {b['score']:.3f} | {b['observed']:.3f} |"
        )
    lines += ["", "static threshold (replayed):", "", "| threshold | tau | drafts a round |", "|---|---|---|"]
    for t in f["thresholds"]:
        lines.append(f"| {t['threshold']:.1f} | {t['tau']:.3f} | {t['drafts']:.2f} |")
    p = f["profile"]
    lines += [
        "",
        "target profile: "
        + ", ".join(f"{n} tok {s:.1f}/s" for n, s in zip(p["tokens"], p["steps_per_s"], strict=True)),
    ]
    lines += [
        "",
        f"serving simulation, tokens/s (tokens a request a step); a step that drafts also pays "
        f"{f['draft_s'] * 1e3:.1f} ms of drafting (one request's, measured: a batched drafter's lower bound)",
        "",
    ]
    head = ["concurrency", "scheduler", "drafts (sched.)"] + [
        f"fixed {n}" for n in range(len(f["serving"][0]["fixed"]))
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in f["serving"]:
        s = row["scheduler"]
        cells = [
            str(row["concurrency"]),
            f"{s['tokens_per_s']:.1f} ({s['tokens_per_request_step']:.2f})",
            f"{s['mean_length']:.2f}",
        ]
        cells += [f"{v['tokens_per_s']:.1f} ({v['tokens_per_request_step']:.2f})" for v in row["fixed"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
