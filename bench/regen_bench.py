"""Regeneration throughput of issue 3: output tokens/s of the `vllm` and `hf` backends, same prompts, same
target, same machine, and their ratio.

    make vllm assets                                              # .venv-vllm and SmolLM2-135M-Instruct
    .venv/bin/python bench/regen_bench.py                         # 128 prompts, up to 128 tokens: ~10 min
    .venv/bin/python bench/regen_bench.py --prompts 64 --max-new-tokens 64 --concurrency 32 64 128

Both runs are the real stage (`prepare_prompts`, then `regenerate`) on the first user turns of the offline
prompt mix (`../shared/assets/prompts/train_prompts_mix_tiny256.jsonl`) with the target preset's sampling
(SmolLM2: temperature 0.7, top-p 0.8, top-k 20). `hf` is in-process transformers, `regen.batch_size` rows
a `generate` call; `vllm` launches one vLLM server (`.venv-vllm`, CPU build) and sends token ids at
`regen.concurrency` rows in flight. The figure is the stage's own: new output tokens over the wall time
of its shards, the server's start excluded (printed apart). Every number is measured when the command
runs; the tables go to stdout and to `--out` (JSON). Timings need an otherwise idle machine: the load
average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DEEPSPEC_ASSETS") or REPO.parent / "shared" / "assets")
GGUF_DIR = REPO / ".cache" / "models" / "smollm2_135m_instruct"


def run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from deepspec.tasks.config import compose
    from deepspec.tasks.prompts import prepare_prompts
    from deepspec.tasks.regenerate.stage import regenerate

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    prepare_prompts(cfg)
    began = time.perf_counter()
    info = regenerate(cfg)
    info["stage_s"] = time.perf_counter() - began
    answers = [json.loads(line) for line in (run_dir / "regen" / "answers.jsonl").read_text().splitlines()]
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
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "regen_bench.json")
    args = parser.parse_args()
    if not (GGUF_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        raise SystemExit("SmolLM2-135M-Instruct is missing: run `make assets`")
    source = ASSETS / "prompts" / "train_prompts_mix_tiny256.jsonl"
    if not source.is_file():
        raise SystemExit(f"{source} is missing (offline assets; set DEEPSPEC_ASSETS)")

    import shutil

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(args.work, ignore_errors=True)
    common = [
        "target=smollm2_135m",
        f"target.path={GGUF_DIR}",
        f"prompts.source={source}",
        f"prompts.max_samples={args.prompts}",
        f"regen.max_new_tokens={args.max_new_tokens}",
        f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}",
    ]
    args.work.mkdir(parents=True)
    results: dict[str, Any] = {"load_before": os.getloadavg(), "cores": os.cpu_count(), "runs": {}}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    results["runs"]["hf"] = run([*common, "regen=hf", f"regen.batch_size={args.hf_batch}"], args.work / "hf")
    print(f"hf: {results['runs']['hf']['tokens_per_s']:.1f} tokens/s", flush=True)
    for c in args.concurrency:
        name = f"vllm-c{c}"
        overrides = [*common, "regen=vllm", f"regen.concurrency={c}", "regen.parallel_shards=1"]
        results["runs"][name] = run(overrides, args.work / name)
        print(f"{name}: {results['runs'][name]['tokens_per_s']:.1f} tokens/s", flush=True)
    results["load_after"] = os.getloadavg()

    hf = results["runs"]["hf"]["tokens_per_s"]
    print(
        f"\n== Regeneration throughput: SmolLM2-135M-Instruct, {args.prompts} prompts, up to "
        f"{args.max_new_tokens} new tokens, the preset's sampling; {os.cpu_count()} cores"
    )
    header = f"{'backend':<14}{'answers':>8}{'tokens':>9}{'mean':>7}{'cut':>6}{'stage s':>9}{'tokens/s':>10}{'x hf':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results["runs"].items():
        print(
            f"{name:<14}{r['rows']:>8}{r['output_tokens']:>9,}{r['mean_tokens']:>7.1f}{r['truncated']:>6}"
            f"{r['stage_s']:>9.1f}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / hf:>7.2f}"
        )
    print(
        "tokens/s: new output tokens over the wall time of the answering shards (vLLM's start excluded; "
        "stage s includes it and, for hf, the model load).\n"
        f"load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
