"""What a verify forward costs against context length with transformers' `sdpa` attention (key heads copied
for every query head) and with DeepSpec's folded grouped-query attention (`models.attention`), the one
`load_target` gives a target, timed in turn in one process on one thread.

    # SmolLM2-135M-Instruct (`make assets`; 9 query heads on 3 key heads), ~1.5 min
    .venv/bin/python bench/verify_attention.py
    # any local target, a longer context
    .venv/bin/python bench/verify_attention.py --target-path PATH --gguf-file none --contexts 256 2048

Each timing is the target's own decoding call (`TargetRunner.extend` of a block of B tokens over a cache
of `context` tokens, features captured as in a speculative round, then rolled back); B = 1 is plain
decoding, B = n + 1 verifies n drafts. The context is random token ids: attention's cost depends on its
length, not its content. Both attentions are timed alternately, repeat by repeat, and the median kept,
so a slower stretch of the machine falls on both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import SMOLLM2_DIR, begin, say, write_results

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-path", type=Path, default=SMOLLM2_DIR, help="hub id or local folder")
    p.add_argument("--gguf-file", default=SMOLLM2_GGUF, help="GGUF file in --target-path, or none")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 1536], help="cached tokens")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3, 4, 8], help="tokens a forward")
    p.add_argument("--repeats", type=int, default=15, help="timed forwards of each block and attention")
    p.add_argument(
        "--out", type=Path, help="results JSON (bench/results/verify_attention-<target>-<date>.json)"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    begin("verify_attention")
    from deepspec.models.attention import PACKED_GQA_SDPA
    from deepspec.models.target import TargetRunner, load_target

    gguf = None if args.gguf_file == "none" else args.gguf_file
    model, _ = load_target(str(args.target_path), gguf)
    cfg = model.config
    attentions = {"sdpa": "sdpa", "folded": PACKED_GQA_SDPA}
    layer_ids = [0, cfg.num_hidden_layers // 2, cfg.num_hidden_layers - 1]
    say(
        f"{cfg.num_attention_heads} query heads on {cfg.num_key_value_heads} key heads, {cfg.num_hidden_layers} layers"
    )

    ids = torch.randint(
        0,
        cfg.vocab_size,
        (max(args.contexts) + max(args.blocks),),
        generator=torch.Generator().manual_seed(0),
    )
    rows: list[dict[str, Any]] = []
    for context in args.contexts:
        runners = {}
        for name, implementation in attentions.items():
            model.set_attn_implementation(implementation)
            runners[name] = TargetRunner(model, layer_ids)
            runners[name].extend(ids[:context], last_logits_only=True)
        for block in args.blocks:
            times: dict[str, list[float]] = {name: [] for name in attentions}
            for repeat in range(args.repeats + 2):  # the first two warm up
                for name, implementation in attentions.items():
                    model.set_attn_implementation(implementation)
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
            row["ratio"] = row["sdpa_s"] / row["folded_s"]
            rows.append(row)
            say(
                f"context {context}, block {block}: sdpa {row['sdpa_s'] * 1e3:.1f} ms, folded {row['folded_s'] * 1e3:.1f} ms"
            )

    print("| context | block | sdpa ms | folded ms | sdpa / folded |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['context']} | {r['block']} | {r['sdpa_s'] * 1e3:.1f} | {r['folded_s'] * 1e3:.1f} | {r['ratio']:.2f} |"
        )
    figures = {
        "query_heads": cfg.num_attention_heads,
        "key_heads": cfg.num_key_value_heads,
        "layers": cfg.num_hidden_layers,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_results(figures, target=Path(str(args.target_path)).name, args=args, out=args.out)


if __name__ == "__main__":
    main()
