"""Bytes per token of the target cache, per feature encoding: analytic for Qwen3-4B, measured on a real
cache of each encoding built by the real stages for the chosen target.

    .venv/bin/python bench/cache_size.py                            # stories260k, every encoding: ~3 min
    .venv/bin/python bench/cache_size.py --prompts 48               # a quick check: ~1 min
    .venv/bin/python bench/cache_size.py --target smollm2           # SmolLM2 (`make assets`): ~5 min
    .venv/bin/python bench/cache_size.py --encodings int4 int4_mixed --out runs/bench/size.json

Analytic: `cache.estimate.estimate` for Qwen3-4B (upstream's layout: 30,726 B a token) and for the
chosen target. Measured: the real stages (`prepare_prompts`, `regenerate`, then `build_cache` once per
encoding on the same answers, each cache in its own folder under storage.url) build one cache per
encoding; bytes per token is manifest bytes over manifest tokens, Arrow framing included. The cache
stage's wall time per encoding is printed beside it (the target's forward passes included).

stories260k is a base model: its prompts are story openings in its own words (the first words of its
samples from BOS) and its answers greedy continuations (regen.temperature=0). SmolLM2 answers chat
prompts from the offline mix. The table goes to stdout, progress to stderr, every figure to the results
JSON (bench/results/cache_size-<target>-<date>.json). Runtimes are for an otherwise idle 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from common import (
    add_data_args,
    begin,
    build_caches,
    chosen_encodings,
    mb,
    prepare_data,
    work_dir,
    write_results,
)

from deepspec.tasks.cache.encoding import ENCODINGS
from deepspec.tasks.cache.estimate import estimate, target_geometry, upstream_bytes_per_token
from deepspec.tasks.config import compose


def bytes_per_token(cfg, caches) -> dict[str, Any]:
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
            m = caches[name].manifest
            row |= {
                "target_measured_bytes_per_token": m.num_bytes / m.num_tokens,
                "target_measured_ratio": m.num_bytes / m.num_tokens / upstream,
                "cache_bytes": m.num_bytes,
                "cache_tokens": m.num_tokens,
                "cache_samples": m.num_samples,
                "cache_stage_s": caches[name].stage_s,
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
    print("\n== Bytes per token: id + loss mask + features (upstream: + 2 masks, bf16, + final hidden)")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, encodings_help="encodings to build and measure (default: all; bf16 always)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)  # the machine's 2 cores
    begin("cache_size")
    data = prepare_data(args.target, work_dir(args), prompts=args.prompts)
    caches = build_caches(data.overrides, chosen_encodings(args))
    figures = {"data": data.summary, "bytes_per_token": bytes_per_token(data.cfg, caches)}
    print_bytes(figures["bytes_per_token"])
    write_results(figures, target=args.target, args=args, out=args.out)


if __name__ == "__main__":
    main()
