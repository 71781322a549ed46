"""Regeneration throughput: output tokens/s of the `vllm` and `hf` backends, same prompts, same target,
same machine, and their ratio.

    make vllm assets                                              # .venv-vllm and SmolLM2-135M-Instruct
    .venv/bin/python bench/regen_bench.py                         # 128 prompts, up to 128 tokens: ~10 min
    .venv/bin/python bench/regen_bench.py --prompts 64 --max-new-tokens 64 --concurrency 32 64 128

Both runs are the real stage (`prepare_prompts`, then `regenerate`) on the first user turns of the offline
prompt mix (`../shared/assets/prompts/train_prompts_mix_tiny256.jsonl`) with the target preset's sampling
(SmolLM2: temperature 0.7, top-p 0.8, top-k 20). `hf` is in-process transformers, `regen.batch_size` rows
a `generate` call; `vllm` launches one vLLM server (`.venv-vllm`, CPU build) and sends token ids at
`regen.concurrency` rows in flight. The figure is the stage's own: new output tokens over the wall time
of its shards, the server's start excluded (printed apart). Every number is measured when the command
runs; the table goes to stdout, every figure to the results JSON
(bench/results/regen-smollm2-<date>.json, or `--out`). Timings need an otherwise idle machine: the load
average is recorded with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import ASSETS, REPO, SMOLLM2_DIR, begin, say, write_results

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """The prompts and regenerate stages in `run_dir`: the regenerate stage's figures, its wall time and
    the answers' mean length."""
    from deepspec.tasks.config import compose
    from deepspec.tasks.files import read_jsonl
    from deepspec.tasks.paths import run_paths
    from deepspec.tasks.prompts import prepare_prompts
    from deepspec.tasks.regenerate.stage import regenerate

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    prepare_prompts(cfg)
    began = time.perf_counter()
    info = dataclasses.asdict(regenerate(cfg))
    info["stage_s"] = time.perf_counter() - began
    answers = [row for _, row in read_jsonl(run_paths(cfg).answers)]
    info["mean_tokens"] = sum(r["completion_tokens"] for r in answers) / max(1, len(answers))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=16, help="regen.batch_size of the hf backend")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64], help="vllm rows in flight")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "regen")
    parser.add_argument("--out", type=Path, help="results JSON (bench/results/regen-smollm2-<date>.json)")
    args = parser.parse_args()
    if not (SMOLLM2_DIR / GGUF_FILE).is_file():
        raise SystemExit("SmolLM2-135M-Instruct is missing: run `make assets`")
    source = ASSETS / "prompts" / "train_prompts_mix_tiny256.jsonl"
    if not source.is_file():
        raise SystemExit(f"{source} is missing (offline assets; set DEEPSPEC_ASSETS)")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    begin("regen")
    shutil.rmtree(args.work, ignore_errors=True)
    common = [
        "target=smollm2_135m",
        f"target.path={SMOLLM2_DIR}",
        f"prompts.source={source}",
        f"prompts.max_samples={args.prompts}",
        f"regen.max_new_tokens={args.max_new_tokens}",
        f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}",
    ]
    args.work.mkdir(parents=True)
    runs: dict[str, dict[str, Any]] = {}
    runs["hf"] = run([*common, "regen=hf", f"regen.batch_size={args.hf_batch}"], args.work / "hf")
    say(f"hf: {runs['hf']['tokens_per_s']:.1f} tokens/s")
    for c in args.concurrency:
        name = f"vllm-c{c}"
        overrides = [*common, "regen=vllm", f"regen.concurrency={c}", "regen.parallel_shards=1"]
        runs[name] = run(overrides, args.work / name)
        say(f"{name}: {runs[name]['tokens_per_s']:.1f} tokens/s")

    hf = runs["hf"]["tokens_per_s"]
    print(
        f"\n== Regeneration throughput: SmolLM2-135M-Instruct, {args.prompts} prompts, up to "
        f"{args.max_new_tokens} new tokens, the preset's sampling; {os.cpu_count()} cores"
    )
    header = f"{'backend':<14}{'answers':>8}{'tokens':>9}{'mean':>7}{'cut':>6}{'stage s':>9}{'tokens/s':>10}{'x hf':>7}"
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        print(
            f"{name:<14}{r['rows']:>8}{r['output_tokens']:>9,}{r['mean_tokens']:>7.1f}{r['truncated']:>6}"
            f"{r['stage_s']:>9.1f}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / hf:>7.2f}"
        )
    print(
        "tokens/s: new output tokens over the wall time of the answering shards (vLLM's start excluded; "
        "stage s includes it and, for hf, the model load)."
    )
    write_results({"runs": runs}, target="smollm2", args=args, out=args.out)


if __name__ == "__main__":
    main()
