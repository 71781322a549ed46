"""Training throughput: tokens a second and peak memory of each algorithm's training on 1 rank and on 2
(the scaling ratio), through the real train stage (torchrun, DeepSpeed, gloo on a CPU).

    .venv/bin/python bench/train_throughput.py --target stories260k
    .venv/bin/python bench/train_throughput.py --target smollm2 --epochs 2

The target's preset (`bench/common.py` TARGETS) makes prompts, answers and a bf16 cache with the real
stages. Then, for each algorithm and rank count, the train stage trains the preset's small draft for
`--epochs` epochs at the same global batch (4 sequences, micro-batches of 2: one rank accumulates two
micro-steps, two ranks one each), one thread a rank, logging every optimizer step. Its figures are the
recipe's own: `train/tokens_per_s` (the tokens of a step over its wall time, times the ranks), taken as
the median over the logged steps after the first (the first pays for first allocations), and
`train/peak_memory_mb`, rank 0's peak resident set (a CPU keeps no allocator statistics: this includes
Python, torch and DeepSpeed, about 0.5 GB before any tensor). Scaling is the 2-rank tokens a second over
the 1-rank ones measured in the same run; with one thread a rank, 2 ranks also have twice the cores, so
2.0 is ideal. No GPU figures yet: no session so far had a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import ALGOS, TARGETS, begin, draft_overrides, prepare_data, say, work_dir, write_results


def train_once(overrides: list[str]) -> dict[str, float]:
    """Train one draft with the real stage; its throughput and memory as the recipe logged them."""
    from mlflow.tracking import MlflowClient

    from deepspec.tasks.config import compose
    from deepspec.tasks.paths import run_paths
    from deepspec.tasks.train.stage import train

    cfg = compose(overrides)
    began = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - began
    record = json.loads(run_paths(cfg).mlflow_record.read_text())
    client = MlflowClient(record["tracking_uri"])
    history = {
        key: [m.value for m in sorted(client.get_metric_history(record["run_id"], key), key=lambda m: m.step)]
        for key in ("train/tokens_per_s", "train/samples_per_s", "train/peak_memory_mb", "train/loss")
    }
    steady = history["train/tokens_per_s"][1:] or history["train/tokens_per_s"]
    return {
        "optimizer_steps": result.optimizer_steps,
        "tokens_per_s": statistics.median(steady),
        "samples_per_s": statistics.median(
            history["train/samples_per_s"][1:] or history["train/samples_per_s"]
        ),
        "peak_memory_mb": max(history["train/peak_memory_mb"]),
        "final_loss": history["train/loss"][-1],
        "stage_wall_s": wall,  # torchrun, imports and the engine's setup included
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="stories260k")
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--prompts", type=int, help="prompts to answer (default: the preset's)")
    parser.add_argument("--work", type=Path, help="working directory, emptied first")
    parser.add_argument(
        "--out", type=Path, help="results JSON (bench/results/train_throughput-<target>-<date>.json)"
    )
    args = parser.parse_args()
    begin("train_throughput")
    work = work_dir(args)
    data = prepare_data(args.target, work, prompts=args.prompts)
    from deepspec.tasks.cache.stage import build_cache

    say("cache stage (bf16)")
    cache = build_cache(data.cfg)
    say(f"cache: {cache.samples} samples, {cache.tokens:,} tokens")

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for algo in args.algos:
        for ranks in args.ranks:
            run_dir = work / "runs" / f"{algo}-{ranks}"
            say(f"train {algo} on {ranks} rank(s)")
            figures = train_once([
                *data.overrides, *draft_overrides(algo, data.preset), f"run_dir={run_dir}",
                f"data_dir={work / 'data'}", f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
                f"train.nproc_per_node={ranks}", "train.threads_per_rank=1", f"train.epochs={args.epochs}",
                "train.log_every_steps=1",
            ])  # fmt: skip
            rows.setdefault(algo, {})[str(ranks)] = figures
            say(f"  {figures['tokens_per_s']:.0f} tokens/s, peak {figures['peak_memory_mb']:.0f} MB")

    print(
        f"\n{args.target}: training throughput ({cache.samples} samples, {args.epochs} epoch(s), global batch 4)"
    )
    print(
        f"{'algo':8} {'ranks':>5} {'tokens/s':>9} {'samples/s':>9} {'peak MB':>8} {'steps':>6} {'scaling':>8}"
    )
    for algo, by_ranks in rows.items():
        base = by_ranks.get("1", {}).get("tokens_per_s")
        for ranks, f in by_ranks.items():
            scaling = f"{f['tokens_per_s'] / base:.2f}x" if base and ranks != "1" else "-"
            print(f"{algo:8} {ranks:>5} {f['tokens_per_s']:9.0f} {f['samples_per_s']:9.2f} "
                  f"{f['peak_memory_mb']:8.0f} {f['optimizer_steps']:6d} {scaling:>8}")  # fmt: skip
    scaling = {
        algo: by_ranks["2"]["tokens_per_s"] / by_ranks["1"]["tokens_per_s"]
        for algo, by_ranks in rows.items()
        if "1" in by_ranks and "2" in by_ranks
    }
    write_results(
        {"data": {**data.summary, "cache_samples": cache.samples, "cache_tokens": cache.tokens},
         "runs": rows, "scaling_2_over_1": scaling},
        target=args.target, args=args, out=args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
