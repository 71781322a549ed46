"""A prepared GPU run: where a speculative decoding round's time goes on a Qwen3-4B-shaped target, bf16.

    # the CPU check (tiny shapes, a few seconds):
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_decode_split.py --device cpu --smoke --out /tmp/gpu_split.json
    # the device run (one H200, a few minutes):
    python3 bench/gpu_decode_split.py --out $OUT/gpu_decode_split.json

For each algorithm (DFlash and DSpark with 5 layers and their preset blocks, Eagle3 with 7 steps) and each
context length (`--contexts`), `speculative_generate` decodes `--tokens` tokens greedily after a random
prompt of that length, with the engine's own calls timed in place (`round_timing.py`, the device
synchronised around each): T_draft, T_verify and the overhead a round, and its share of the round (the
issue's goal: at most 10%). Plain decoding's time a token (T1) is measured at the same lengths.

Target and drafts have random weights (the Qwen3-4B geometry of conf/target/qwen3_4b.yaml, 4 B
parameters): the split of a round does not depend on what the weights say, but acceptance does, so tau
here is near 1 and says nothing. Like bench/gpu_reference.py, it imports only `deepspec.models` (through
that script's import shim when the package is not installed) and needs nothing beyond torch and
transformers. Without CUDA it prints one line and exits 0, unless `--device cpu`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_reference import (
    QWEN3_4B,
    TINY,
    StepShape,
    algo_settings,
    base_record,
    import_deepspec,
    import_record,
    shape_config,
)
from round_timing import Clock, TimedDrafter, mean, rounds_of, timed_runner

ALGOS = ("dflash", "dspark", "eagle3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the check)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the CPU check of the whole path")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192], help="prompt lengths")
    p.add_argument("--tokens", type=int, default=64, help="new tokens a generation")
    p.add_argument("--force-shim", action="store_true", help="import deepspec.models from models/ always")
    p.add_argument("--out", type=Path, default=Path("gpu_decode_split.json"), help="results JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.tokens = [16, 64], min(args.tokens, 12)
    return args


def build_target(shape: StepShape, device: torch.device, dtype: torch.dtype):
    """A Qwen3 decoder of `shape` with random weights, on the device, with the attention `load_target`
    gives a target."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from deepspec.models.target import fold_query_heads

    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.target_layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, rope_theta=shape.rope_theta, tie_word_embeddings=True, max_position_embeddings=40_960,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    fold_query_heads(model)
    return model.eval().requires_grad_(False)


def build_draft(name: str, shape: StepShape, target) -> tuple[Any, list[int]]:
    from deepspec.models.drafts import draft_spec
    from deepspec.models.drafts.spec import DraftInputs

    layer_ids = list(shape.eagle3_layer_ids if name == "eagle3" else shape.layer_ids)
    settings = algo_settings(name, shape.draft_layers, shape.anchors, layer_ids, shape.target_layers)
    weight = target.get_input_embeddings().weight
    inputs = DraftInputs(target_config=shape_config(shape), layer_ids=layer_ids,
                         mask_token_id=shape.mask_token_id, embed=weight, head=weight)  # fmt: skip
    torch.manual_seed(0)
    draft = draft_spec(name).build(settings, inputs).to(device=weight.device, dtype=weight.dtype)
    return draft.eval(), layer_ids


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from deepspec.models import speculative

    shape = TINY if args.smoke else QWEN3_4B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    target = build_target(shape, device, dtype)
    clock = Clock(device)
    speculative.TargetRunner = timed_runner(clock)  # the engine's own calls, timed in place
    decode = {"max_new_tokens": args.tokens, "temperature": 0.0, "eos_token_ids": set()}
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, shape.vocab, (n,), generator=gen).tolist() for n in args.contexts}

    def timed(call) -> tuple[Any, list, float]:
        clock.events.clear()
        clock.sync()
        began = time.perf_counter()
        out = call()
        clock.sync()
        return out, list(clock.events), time.perf_counter() - began

    plain: dict[int, float] = {}
    timed(
        lambda: speculative.target_generate(
            target, [0], prompts[args.contexts[0]], **{**decode, "max_new_tokens": 4}
        )
    )
    for n, ids in prompts.items():
        _, events, _ = timed(lambda ids=ids: speculative.target_generate(target, [0], ids, **decode))
        plain[n] = mean([s for kind, _, s in events if kind == "step"])
        print(f"plain, context {n}: T1 {plain[n] * 1e3:.2f} ms", flush=True)
    out: dict[str, Any] = {"shape": vars(shape), "dtype": str(dtype), "t1_s": plain, "algos": {},
                           "attention": target.config._attn_implementation}  # fmt: skip
    for name in ALGOS:
        draft, layer_ids = build_draft(name, shape, target)
        drafter = TimedDrafter(draft, clock)
        warm = prompts[args.contexts[0]]
        timed(
            lambda d=drafter, w=warm, ids=layer_ids: speculative.speculative_generate(
                target, ids, d, w, **{**decode, "max_new_tokens": 8}
            )
        )
        rows = {}
        for n, ids in prompts.items():
            result, events, total = timed(
                lambda ids=ids, d=drafter, lay=layer_ids: speculative.speculative_generate(
                    target, lay, d, ids, **decode
                )
            )
            rounds = rounds_of(events, total)
            td, tv, to = (mean([r[k] for r in rounds]) for k in ("draft_s", "verify_s", "overhead_s"))
            rows[n] = {"rounds": len(rounds), "tau": len(result.tokens) / max(len(rounds), 1),
                       "draft_s": td, "verify_s": tv, "overhead_s": to,
                       "overhead_share": to / (td + tv + to)}  # fmt: skip
            print(f"{name}, context {n}: draft {td * 1e3:.2f} ms, verify {tv * 1e3:.2f} ms, overhead "
                  f"{to * 1e3:.2f} ms ({rows[n]['overhead_share']:.0%} of a round)", flush=True)  # fmt: skip
        out["algos"][name] = rows
        del draft, drafter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_decode_split: no CUDA device here; nothing to measure (use --device cpu for the check)")
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    mode = import_deepspec(args.force_shim)
    record = {**base_record(args, device), "bench": "gpu_decode_split", "import": import_record(mode)}
    began = time.perf_counter()
    with torch.no_grad():
        record["figures"] = measure(args, device)
    record["wall_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
