"""What a verify forward costs against context length, and what DeepSpec's two changes to the target save:
the folded grouped-query attention (`models.attention`; transformers' `sdpa` copies every key head for
every query head) and, on a CPU, blocks of 1..3 rows multiplied as W @ x.T (`models.cpu_products`). All
variants are timed in turn in one process (one thread unless --threads).

    # SmolLM2-135M-Instruct (`make assets`; 9 query heads on 3 key heads), ~2 min
    .venv/bin/python bench/verify_cost.py
    # two threads, as the evaluate stage runs on this 2-core machine
    .venv/bin/python bench/verify_cost.py --threads 2 --contexts 512 --blocks 1 2 3
    # any local target, a longer context
    .venv/bin/python bench/verify_cost.py --target-path PATH --gguf-file none --contexts 256 2048

Each timing is the target's own decoding call (`TargetRunner.extend` of a block of B tokens over a cache
of `context` tokens, features captured as in a speculative round, then rolled back); B = 1 is plain
decoding, B = n + 1 verifies n drafts. The context is random token ids: attention's cost depends on its
length, not its content. The variants are timed alternately, repeat by repeat, and the median kept, so a
slower stretch of the machine falls on all. `loaded` is the target as `load_target` gives it.

A second table times the products alone: every linear weight of the target once (as a forward reads
them, from memory) times a block of 1..8 rows, as `F.linear` (x @ W.T) and as W @ x.T (one row as two
copies of it, as the target computes it): where the second form pays on this machine's BLAS.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import SMOLLM2_DIR, begin, say, write_results
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-path", type=Path, default=SMOLLM2_DIR, help="hub id or local folder")
    p.add_argument("--gguf-file", default=SMOLLM2_GGUF, help="GGUF file in --target-path, or none")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 1536], help="cached tokens")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3, 4, 8], help="tokens a forward")
    p.add_argument("--repeats", type=int, default=15, help="timed forwards of each block and variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluate stage uses the cores)")
    p.add_argument("--out", type=Path, help="results JSON (bench/results/verify_cost-<target>-<date>.json)")
    return p.parse_args()


def time_products(linears: list[nn.Linear], repeats: int) -> list[dict[str, Any]]:
    """Seconds for one pass of products over every weight, per block of rows, in both forms."""
    from deepspec.models.cpu_products import product_times

    rows_out = []
    for rows in range(1, 9):
        x_wt, w_xt = product_times(linears, rows, repeats)
        rows_out.append({"rows": rows, "x_wt_s": x_wt, "w_xt_s": w_xt})
        say(f"products of {rows} rows: x @ W.T {x_wt * 1e3:.1f} ms, W @ x.T {w_xt * 1e3:.1f} ms")
    return rows_out


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    begin("verify_cost")
    from deepspec.models.attention import PACKED_GQA_SDPA
    from deepspec.models.cpu_products import (
        cpu_float32_linears,
        multiply_as_f_linear,
        multiply_rows_first,
        rows_first_sizes,
    )
    from deepspec.models.target import TargetRunner, load_target

    gguf = None if args.gguf_file == "none" else args.gguf_file
    model, _ = load_target(str(args.target_path), gguf)
    cfg = model.config
    chosen = rows_first_sizes(model)
    linears = cpu_float32_linears(model)

    def use(attention: str, rows_first: frozenset[int]) -> None:
        model.set_attn_implementation(attention)
        if rows_first:
            multiply_rows_first(model, rows_first)
        else:
            multiply_as_f_linear(model)

    # name: (attention, rows-first products); the last is what load_target gives
    variants = {
        "sdpa": ("sdpa", frozenset()),
        "folded": (PACKED_GQA_SDPA, frozenset()),
        "loaded": (PACKED_GQA_SDPA, chosen),
    }
    layer_ids = [0, cfg.num_hidden_layers // 2, cfg.num_hidden_layers - 1]
    say(
        f"{cfg.num_attention_heads} query heads on {cfg.num_key_value_heads} key heads, {cfg.num_hidden_layers} "
        f"layers; load_target multiplies blocks of {sorted(chosen) or 'no'} rows as W @ x.T"
    )
    products = time_products(linears, args.repeats)

    ids = torch.randint(
        0,
        cfg.vocab_size,
        (max(args.contexts) + max(args.blocks),),
        generator=torch.Generator().manual_seed(0),
    )
    rows: list[dict[str, Any]] = []
    for context in args.contexts:
        runners = {}
        for name, variant in variants.items():
            use(*variant)
            runners[name] = TargetRunner(model, layer_ids)
            runners[name].extend(ids[:context], last_logits_only=True)
        for block in args.blocks:
            times: dict[str, list[float]] = {name: [] for name in variants}
            for repeat in range(args.repeats + 2):  # the first two warm up
                for name, variant in variants.items():
                    use(*variant)
                    began = time.perf_counter()
                    runners[name].extend(ids[context : context + block])
                    elapsed = time.perf_counter() - began
                    runners[name].rollback(context)
                    if repeat >= 2:
                        times[name].append(elapsed)
            row = {
                "context": context,
                "block": block,
                **{f"{n}_s": statistics.median(t) for n, t in times.items()},
            }
            rows.append(row)
            say(
                f"context {context}, block {block}: "
                + ", ".join(f"{n} {row[f'{n}_s'] * 1e3:.1f} ms" for n in variants)
            )
    use(*variants["loaded"])

    print("| rows | x @ W.T ms | W @ x.T ms | ratio |\n|---:|---:|---:|---:|")
    for r in products:
        print(
            f"| {r['rows']} | {r['x_wt_s'] * 1e3:.1f} | {r['w_xt_s'] * 1e3:.1f} | {r['x_wt_s'] / r['w_xt_s']:.2f} |"
        )
    print(
        "\n| context | block | sdpa ms | folded ms | loaded ms | sdpa / loaded |\n|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['context']} | {r['block']} | {r['sdpa_s'] * 1e3:.1f} | {r['folded_s'] * 1e3:.1f} | "
            f"{r['loaded_s'] * 1e3:.1f} | {r['sdpa_s'] / r['loaded_s']:.2f} |"
        )
    figures = {
        "query_heads": cfg.num_attention_heads,
        "key_heads": cfg.num_key_value_heads,
        "layers": cfg.num_hidden_layers,
        "rows_first": sorted(chosen),
        "repeats": args.repeats,
        "variants": {name: {"attention": a, "rows_first": sorted(r)} for name, (a, r) in variants.items()},
        "products": products,
        "rows": rows,
    }
    write_results(figures, target=Path(str(args.target_path)).name, args=args, out=args.out)


if __name__ == "__main__":
    main()
