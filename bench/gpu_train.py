"""A prepared GPU run of the training side: one training step of each algorithm at the Qwen3-4B draft shape
in bf16 with 512 anchors (step time, tokens/s, peak memory), the packed blocks' attention by the current
chunked SDPA path against flex attention with a block mask (compiled), and a float32 check that masks and
attention on CUDA equal the CPU path's. One JSON file.

    # the CPU check (tiny shapes, the same code paths; 10 to 30 s, mostly imports):
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_train.py --cpu-check --out /tmp/gpu_train.json
    # the device run (one H200, about 5 minutes; --budget-s 480 by default), then the CUDA tests:
    PYTHONUNBUFFERED=1 python3 bench/gpu_train.py --budget-s 420 2>&1 | tee $OUT/gpu_train.log
    python3 -m pytest -q -m "not slow" tests/models/test_attention_cuda.py 2>&1 | tee $OUT/cuda_tests.log

Phases, in this order, each printing progress with the elapsed seconds; a phase that would not fit in what
is left of `--budget-s` is skipped with a note in the JSON:

1. parity (float32, small shape, 2 sequences, chunks of 24 rows): `attention_chunks` built from
   `PackedBlocks` moved to the device equals the CPU's, slices and masks exactly; `DFlashAttention` on the
   device equals it on the CPU (output and every gradient, max abs difference <= FP32_TOL); this script's
   `chunked_sdpa` (the attention call alone, which phase 3 times) equals `DFlashAttention.forward`; the
   flex mask (`packed_mask_mod`) at every (query, key) equals `PackedBlocks.attention_mask`, and flex
   attention equals the chunked path.
2. steps: each algorithm's `DraftSpec.training_loss` (the recipe's micro-step, micro-batch 1) at the
   Qwen3-4B draft shape (hidden 2560, 32/8 heads of 128, MLP 9728, vocabulary 151,936, 5 layers, 512
   anchors, a 4,096-token sequence; Eagle3: one layer, 7 steps), in bf16 as DeepSpeed's bf16 runs it: the
   module and the frozen embedding and head in bf16, gradients copied into float32 master weights, norm
   clipped to 1, plain `torch.optim.AdamW` (betas 0.9/0.999, no decay) on those, copied back. Warm-up
   steps excluded; CUDA events time forward + backward + optimizer step; tokens/s counts the sequence's
   tokens (and block rows: anchors x block slots, Eagle3 tokens x steps); `torch.cuda.max_memory_allocated`
   over the timed steps (everything: weights, head, AdamW states, activations).
3. attention: one layer's attention over the packed blocks of DFlash (blocks of 8) and DSpark (blocks of
   7), q/k/v random in bf16 ([32, n_q, 128] queries, [8, n_c + n_q, 128] keys and values): the model's
   chunked SDPA path (`ATTENTION_CHUNK_ROWS` queries a call, each with the bool mask of the keys it can
   see), one SDPA call with the whole bool mask, and `torch.nn.attention.flex_attention` with a
   `BlockMask` from the same index vectors, compiled (`torch.compile`); skipped with the reason when this
   torch has no flex attention or compiling fails. For each: mask build time, forward, forward + backward,
   peak memory, and the relative L2 error of the output and of dq, dk, dv against the float32 chunked
   path on the same bf16 inputs (tolerance BF16_REL_TOL = 1e-2: bf16 keeps 8 bits, 2^-8 = 3.9e-3 a value).

The model's attention path is not changed here: whether DFlash/DSpark training should switch to flex
attention (or to one SDPA call) on CUDA is to be decided from phase 3's figures and phase 2's step time,
keeping the train/inference parity tests. Like bench/gpu_reference.py it imports only `deepspec.models`
(through that script's import shim when the package is not installed): nothing of omegaconf, hydra,
prefect, mlflow or deepspeed. Without CUDA it prints one line and exits 0, unless `--cpu-check`: tiny
shapes on the CPU, bf16 steps, flex eager (not compiled). Results: `--out`, else $OUT/gpu_train.json, else
bench/results/gpu_train-qwen3_4b-<date>.json. Exit status 1 when a check fails or a phase errors.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_reference import (
    QWEN3_4B,
    REPO,
    TINY,
    StepShape,
    base_record,
    elapsed,
    import_deepspec,
    import_record,
    say,
    step_setup,
)

ALGOS = ("dflash", "dspark", "eagle3")
BLOCKS = {"dflash": 8, "dspark": 7}  # conf/algo/{dflash,dspark}.yaml block_size
SKIP_LINE = "gpu_train: skipped: no CUDA device is present (run with --cpu-check for the CPU check)"
# the CPU check runs flex eagerly, on purpose: say so once in the JSON, not at every call
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
FP32_TOL = 1e-4  # max abs difference, device against CPU, float32, values of order 1
BF16_REL_TOL = 1e-2  # relative L2 error of a bf16 attention against float32 on the same inputs
PARITY_CHUNK_ROWS = 24  # 3 blocks of 8: several chunks, one of them across the two sequences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU: the check of every path")
    p.add_argument("--force-shim", action="store_true", help="import deepspec.models from models/ always")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (and attention calls) first")
    p.add_argument("--steps", type=int, default=5, help="timed training steps an algorithm")
    p.add_argument("--attention-iters", type=int, default=10, help="timed attention calls a variant")
    p.add_argument("--sequences", type=int, default=1, help="sequences packed in the attention phase")
    p.add_argument("--no-compile", action="store_true", help="flex attention eager (default on the CPU)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget; late phases skip")
    p.add_argument("--out", type=Path, help="results JSON (default $OUT/gpu_train.json, else bench/results/)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu_check else "cuda"
    args.smoke = args.cpu_check  # what `base_record` calls it
    args.shape = TINY if args.cpu_check else QWEN3_4B
    args.compile = not (args.no_compile or args.cpu_check)
    if args.cpu_check:
        args.warmup, args.steps, args.attention_iters = 1, 2, 2
    if args.out is None:
        out_dir = os.environ.get("OUT")
        day = time.strftime("%Y-%m-%d")
        args.out = (
            Path(out_dir) / "gpu_train.json"
            if out_dir
            else REPO / "bench" / "results" / f"gpu_train-qwen3_4b-{day}.json"
        )
    return args


# ----------------------------------------------------------------------------------------------------
# Timing and memory


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn() and its seconds: CUDA events on the GPU (the stream's time), the wall clock on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        return fn(), time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, begin.elapsed_time(end) / 1e3


def reset_peak(device: torch.device) -> int:
    """Bytes allocated now, after resetting the peak (0 on the CPU, where torch keeps no statistics)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gib(device: torch.device, baseline: int = 0) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# The packed blocks' attention: the model's chunked SDPA, and flex attention from the same index vectors


def flex_api() -> tuple[Callable | None, Callable | None, str | None]:
    """(flex_attention, create_block_mask, None), or (None, None, why not) on a torch without them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        return None, None, f"torch {torch.__version__} has no flex attention ({err})"
    return flex_attention, create_block_mask, None


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list, n_c: int) -> torch.Tensor:
    """The model's own attention call between `DFlashAttention`'s projections and `output`
    (`dflash.chunked_attention`): q [H, n_q, hd], k and v [Hkv, n_c + n_q, hd] -> [H, n_q, hd]. Phase 1
    checks the module against it, so that phase 3 times the model's own path."""
    from deepspec.models.drafts.dflash import chunked_attention

    return chunked_attention(q, k, v, chunks, n_c)


def packed_mask_mod(packed) -> Callable:
    """`PackedBlocks.attention_mask`'s rule as a flex `mask_mod` over (block row, key), keys being the
    context rows then the block rows: the same index vectors, no [queries x keys] matrix."""
    n_c = packed.context_positions.shape[0]
    ctx_seq, ctx_pos = packed.context_sequence, packed.context_positions
    blk_seq, blk_anchor, blk_index = packed.block_sequence, packed.block_anchor, packed.block_index

    def mask_mod(b, h, q_idx, kv_idx):
        ctx = kv_idx.clamp(max=n_c - 1)  # both sides are evaluated; the clamps keep indices in range
        blk = (kv_idx - n_c).clamp(min=0)
        sees_context = (ctx_seq[ctx] == blk_seq[q_idx]) & (ctx_pos[ctx] < blk_anchor[q_idx])
        return torch.where(kv_idx < n_c, sees_context, blk_index[blk] == blk_index[q_idx])

    return mask_mod


def token_mask(packed) -> torch.Tensor:
    """`packed_mask_mod` at every (query, key): [n_q, n_c + n_q] bool, to hold against `attention_mask`."""
    n_q, n_c = packed.block_ids.shape[0], packed.context_positions.shape[0]
    device = packed.block_ids.device
    q_idx = torch.arange(n_q, device=device)[:, None]
    kv_idx = torch.arange(n_c + n_q, device=device)[None, :]
    return packed_mask_mod(packed)(0, 0, q_idx, kv_idx)


def block_mask(packed, create_block_mask: Callable, compile_mask: bool):
    n_q, n_c = packed.block_ids.shape[0], packed.context_positions.shape[0]
    extra = (
        {"_compile": True}
        if compile_mask and "_compile" in inspect.signature(create_block_mask).parameters
        else {}
    )
    return create_block_mask(
        packed_mask_mod(packed), None, None, n_q, n_c + n_q, device=packed.block_ids.device, **extra
    )


def flex_attend(flex: Callable, q, k, v, mask) -> torch.Tensor:
    return flex(q[None], k[None], v[None], block_mask=mask, enable_gqa=True)[0]


def random_packed(seq_lens: list[int], prompt_len: int, anchors: int, block: int, seed: int = 0):
    """`pack_blocks` over random sequences (anchors by `sample_anchors`, as training draws them); the
    features are one column wide: only the index vectors matter to the attention."""
    from deepspec.models.drafts.dflash import pack_blocks, sample_anchors

    gen = torch.Generator().manual_seed(seed)
    sequences, picked = [], []
    for n in seq_lens:
        mask = torch.ones(n, dtype=torch.bool)
        mask[:prompt_len] = False
        picked.append(sample_anchors(mask, anchors, gen))
        sequences.append((torch.randint(0, 100, (n,), generator=gen), torch.zeros(n, 1)))
    return pack_blocks(sequences, picked, block, 0)


def model_chunk_rows(block: int) -> int:
    """`DFlashDraft.hidden`'s chunk: `ATTENTION_CHUNK_ROWS` rounded down to whole blocks."""
    from deepspec.models.drafts.dflash import ATTENTION_CHUNK_ROWS

    return max(1, ATTENTION_CHUNK_ROWS // block) * block


# ----------------------------------------------------------------------------------------------------
# Phase 1: float32 parity, device against CPU


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().float() - b.detach().cpu().float()).abs().max())


def parity_phase(device: torch.device, compile_flex: bool) -> dict[str, Any]:
    from deepspec.models.drafts.dflash import DFlashAttention, DFlashConfig, attention_chunks
    from deepspec.models.drafts.layers import apply_rotary, rotary

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    try:
        block, rows = 8, PARITY_CHUNK_ROWS
        cpu_packed = random_packed([100, 60], 10, 12, block, seed=1)
        dev_packed = cpu_packed.to(device)
        cpu_chunks, dev_chunks = attention_chunks(cpu_packed, rows), attention_chunks(dev_packed, rows)
        masks_equal = len(cpu_chunks) == len(dev_chunks) and all(
            (c.queries, c.context, c.blocks) == (d.queries, d.context, d.blocks)
            and torch.equal(c.mask, d.mask.cpu())
            for c, d in zip(cpu_chunks, dev_chunks, strict=True)
        )  # fmt: skip

        cfg = DFlashConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=128, vocab_size=128, num_hidden_layers=1, block_size=block,
                           target_layer_ids=[1], mask_token_id=0)  # fmt: skip
        torch.manual_seed(0)
        cpu_attn = DFlashAttention(cfg)
        for param in cpu_attn.parameters():  # away from the all-ones norms, so their gradients say something
            param.data.add_(0.1 * torch.randn_like(param))
        dev_attn = copy.deepcopy(cpu_attn).to(device)
        n_q, n_c = cpu_packed.block_ids.shape[0], cpu_packed.context_positions.shape[0]
        x_block, x_context = torch.randn(n_q, 64), torch.randn(n_c, 64)
        grad_out = torch.randn(n_q, 64)

        def run(attn, packed, chunks, on: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            attn.zero_grad(set_to_none=True)
            ropes = [
                rotary(p, cfg.head_dim, cfg.rope_theta)
                for p in (packed.block_positions, packed.context_positions)
            ]
            out = attn(x_block.to(on), x_context.to(on), ropes[0], ropes[1], chunks)
            out.backward(grad_out.to(on))
            return out, {n: p.grad for n, p in attn.named_parameters()}  # fmt: skip

        cpu_out, cpu_grads = run(cpu_attn, cpu_packed, cpu_chunks, torch.device("cpu"))
        dev_out, dev_grads = run(dev_attn, dev_packed, dev_chunks, device)
        module = {"output": max_diff(dev_out, cpu_out)}
        module.update({f"grad {n}": max_diff(dev_grads[n], g) for n, g in cpu_grads.items()})

        with torch.no_grad():  # the attention call alone, as phase 3 times it, against the module
            q_rope = rotary(cpu_packed.block_positions, cfg.head_dim, cfg.rope_theta)
            keys = torch.cat([cpu_packed.context_positions, cpu_packed.block_positions])
            k_rope = rotary(keys, cfg.head_dim, cfg.rope_theta)
            q = apply_rotary(cpu_attn.queries(x_block), *q_rope)
            k, v = cpu_attn.keys_values(torch.cat([x_context, x_block]))
            k = apply_rotary(k, *k_rope)
            mirrored = cpu_attn.output(chunked_sdpa(q, k, v, cpu_chunks, n_c))
        record: dict[str, Any] = {
            "shape": {
                "sequences": [100, 60],
                "anchors": 12,
                "block": block,
                "chunk_rows": rows,
                "queries": n_q,
                "context": n_c,
                "chunks": len(cpu_chunks),
            },  # fmt: skip
            "chunk_masks_equal": masks_equal,
            "module_max_abs_diff": module,
            "chunked_sdpa_vs_module": max_diff(mirrored, cpu_out),
        }
        ok = masks_equal and max(module.values()) <= FP32_TOL and record["chunked_sdpa_vs_module"] <= FP32_TOL

        flex, create, why = flex_api()
        if flex is None:
            record["flex"] = {"status": "skipped", "note": why}
        else:
            dense = cpu_packed.attention_mask()
            reference = chunked_sdpa(q, k, v, cpu_chunks, n_c)
            attend = torch.compile(flex, dynamic=False) if compile_flex else flex
            out = flex_attend(
                attend, q.to(device), k.to(device), v.to(device), block_mask(dev_packed, create, compile_flex)
            )
            record["flex"] = {
                "compiled": compile_flex,
                "token_mask_equal": bool(torch.equal(token_mask(dev_packed).cpu(), dense)),
                "output_max_abs_diff": max_diff(out, reference),
            }  # fmt: skip
            ok = (
                ok
                and record["flex"]["token_mask_equal"]
                and record["flex"]["output_max_abs_diff"] <= FP32_TOL
            )
        record["ok"] = bool(ok)
        return record
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


# ----------------------------------------------------------------------------------------------------
# Phase 2: the recipe's step in bf16


def step_one(name: str, shape: StepShape, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps, then `steps` timed steps: forward, backward, clip, AdamW on float32 master weights."""
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    setup = step_setup(name, shape, device, torch.bfloat16)
    model = setup.model.to(torch.bfloat16)  # DeepSpeed bf16: the module, frozen embedding and head too
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().requires_grad_() for p in params]  # the bf16 optimizer's float32 copies
    optimizer = torch.optim.AdamW(masters, lr=6e-4, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()

    def step(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = setup.spec.training_loss(
            model, model, [setup.sample], setup.settings, setup.teacher, torch.Generator().manual_seed(i)
        )
        loss.backward()
        for master, param in zip(masters, params, strict=True):
            master.grad = param.grad.float()
            param.grad = None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
        return loss.detach(), stats

    for i in range(warmup):  # kernels chosen, AdamW's states allocated
        step(i)
    start_bytes = reset_peak(device)
    times, losses, stats = [], [], {}
    for i in range(warmup, warmup + steps):
        (loss, stats), seconds = timed(lambda i=i: step(i), device)
        times.append(seconds)
        losses.append(float(loss))
    step_s = sum(times) / len(times)
    tokens = shape.seq_len
    rows = tokens * setup.settings.ttt_steps if name == "eagle3" else shape.anchors * BLOCKS[name]
    supervised = int(stats["slot_counts"].sum()) if "slot_counts" in stats else None
    return {
        "step_s": step_s, "step_s_each": times, "loss_each": losses,
        "tokens_per_s": tokens / step_s, "block_rows_per_s": rows / step_s, "block_rows": rows,
        "supervised_rows": supervised, "trainable_parameters": sum(p.numel() for p in params),
        "draft_layers": 1 if name == "eagle3" else shape.draft_layers,
        "anchors": None if name == "eagle3" else shape.anchors, "seq_len": tokens,
        "peak_gib": peak_gib(device, baseline),
        "state_gib": None if device.type != "cuda" else (start_bytes - baseline) / 2**30,
    }  # fmt: skip


def steps_phase(args: argparse.Namespace, device: torch.device, budget_s: float) -> dict[str, Any]:
    records: dict[str, Any] = {}
    for name in args.algos:
        if elapsed() > budget_s:
            records[name] = {"status": "skipped", "note": "the steps' share of the budget is spent"}
            continue
        try:
            records[name] = step_one(name, args.shape, device, args.warmup, args.steps)
            r = records[name]
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
            say(f"  {name}: {1e3 * r['step_s']:.0f} ms a step, {r['tokens_per_s']:.0f} tokens/s{peak}")
        except Exception as err:  # out of memory in one draft leaves the others measured
            records[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
            say(f"  {name}: FAILED: {type(err).__name__}: {err}")
        free(device)
    return records


# ----------------------------------------------------------------------------------------------------
# Phase 3: chunked SDPA, one SDPA call, flex attention


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class Variant:
    """One way to attend over the packed blocks: its mask (built from `PackedBlocks`) and its call."""

    build: Callable[[], Any]
    attend: Callable[..., torch.Tensor]  # (q, k, v, mask) -> out
    backward: bool = True  # flex attention has no backward on the CPU


def attention_one(
    args: argparse.Namespace, block: int, device: torch.device, compiled: dict
) -> dict[str, Any]:
    from deepspec.models.drafts.dflash import attention_chunks

    shape: StepShape = args.shape
    packed = random_packed([shape.seq_len] * args.sequences, shape.prompt_len, shape.anchors, block).to(
        device
    )
    n_q, n_c = packed.block_ids.shape[0], packed.context_positions.shape[0]
    torch.manual_seed(0)
    # after the qk norms and RoPE q and k have unit scale per value; values as random
    q32 = torch.randn(shape.heads, n_q, shape.head_dim, device=device)
    k32, v32 = (torch.randn(shape.kv_heads, n_c + n_q, shape.head_dim, device=device) for _ in range(2))
    inputs = [t.to(torch.bfloat16) for t in (q32, k32, v32)]
    grad_out = torch.randn(shape.heads, n_q, shape.head_dim, device=device).to(torch.bfloat16)
    rows = model_chunk_rows(block)

    def sdpa(q, k, v, chunks):
        return chunked_sdpa(q, k, v, chunks, n_c)

    # the reference: the model's path in float32 on the bf16 inputs, so that only the arithmetic differs
    reference = forward_backward(
        sdpa, attention_chunks(packed, rows), [t.float() for t in inputs], grad_out.float()
    )
    variants = {
        "sdpa_chunked": Variant(lambda: attention_chunks(packed, rows), sdpa),
        "sdpa_one_call": Variant(lambda: attention_chunks(packed, None), sdpa),
    }
    record: dict[str, Any] = {"block": block, "sequences": args.sequences, "queries": n_q,
                              "keys": n_c + n_q, "chunk_rows": rows, "variants": {}}  # fmt: skip
    flex, create, why = flex_api()
    if flex is None:
        record["variants"]["flex"] = {"status": "skipped", "note": why}
    else:
        if "flex" not in compiled:
            compiled["flex"] = torch.compile(flex, dynamic=False) if args.compile else flex
        flex_fn = compiled["flex"]
        variants["flex_compiled" if args.compile else "flex_eager"] = Variant(
            lambda: block_mask(packed, create, args.compile),
            lambda q, k, v, mask: flex_attend(flex_fn, q, k, v, mask),
            backward=device.type == "cuda",
        )
    for name, variant in variants.items():
        try:
            r = record["variants"][name] = attention_variant(
                args, device, variant, inputs, grad_out, reference
            )
            fb = "-" if r["forward_backward_s"] is None else f"{1e3 * r['forward_backward_s']:.2f}"
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
            say(f"  block {block}, {name}: mask {1e3 * r['mask_s']:.1f} ms, fwd {1e3 * r['forward_s']:.2f} ms, "
                f"fwd+bwd {fb} ms{peak}, rel err out {r['rel_err']['out']:.1e}, "
                f"first call {r['first_call_s']:.1f} s")  # fmt: skip
        except Exception as err:  # flex failing to compile here is a figure, not the end of the run
            record["variants"][name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                        "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
            say(f"  block {block}, {name}: FAILED: {type(err).__name__}: {err}")
        free(device)
    return record


def forward_backward(attend: Callable, mask, tensors: list[torch.Tensor], grad: torch.Tensor | None):
    """The output and, with `grad`, the gradients of q, k, v (None without)."""
    if grad is None:
        with torch.no_grad():
            return attend(*tensors, mask), [None, None, None]
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = attend(*leaves, mask)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def attention_variant(args, device, variant: Variant, inputs, grad_out, reference) -> dict[str, Any]:
    grad = grad_out if variant.backward else None
    start = time.perf_counter()
    mask = variant.build()
    out, grads = forward_backward(variant.attend, mask, inputs, grad)  # the first call compiles, if it does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup):  # no-grad forwards too: a compiled flex recompiles for them once
        variant.build()
        forward_backward(variant.attend, mask, inputs, grad)
        forward_backward(variant.attend, mask, inputs, None)
    n = args.attention_iters
    mask_s = sum(timed(variant.build, device)[1] for _ in range(n)) / n
    forward_s = sum(
        timed(lambda: forward_backward(variant.attend, mask, inputs, None), device)[1] for _ in range(n)
    )
    baseline = reset_peak(device)
    fb_s = sum(
        timed(lambda: forward_backward(variant.attend, mask, inputs, grad), device)[1] for _ in range(n)
    )
    ref_out, ref_grads = reference
    errors = {"out": rel_err(out, ref_out)}
    if variant.backward:
        errors.update({f"d{x}": rel_err(g, r) for x, g, r in zip("qkv", grads, ref_grads, strict=True)})
    return {
        "first_call_s": first_call_s, "mask_s": mask_s, "forward_s": forward_s / n,
        "forward_backward_s": fb_s / n if variant.backward else None,
        "peak_gib": peak_gib(device, baseline) if variant.backward else None,
        "rel_err": errors, "tolerance": BF16_REL_TOL, "ok": max(errors.values()) <= BF16_REL_TOL,
        **({} if variant.backward else {"note": "forward only: flex attention has no backward on the CPU"}),
    }  # fmt: skip


def attention_phase(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    compiled: dict[str, Callable] = {}  # one compiled flex for both block sizes (recompiled per shape)
    records = {}
    for algo, block in BLOCKS.items():
        if elapsed() > args.budget_s - 60:
            records[algo] = {
                "status": "skipped",
                "note": f"{args.budget_s - elapsed():.0f} s of the budget left",
            }
            continue
        records[algo] = attention_one(args, block, device, compiled)
    return records


# ----------------------------------------------------------------------------------------------------


def failures(record: dict[str, Any]) -> list[str]:
    failed = [n for n, p in record["phases"].items() if p["status"] == "failed"]
    figures = record["figures"]
    if figures.get("parity") and not figures["parity"]["ok"]:
        failed.append("parity")
    failed += [f"steps/{a}" for a, r in (figures.get("steps") or {}).items() if r.get("status") == "failed"]
    for algo, r in (figures.get("attention") or {}).items():
        for name, v in r.get("variants", {}).items():
            if v.get("status") == "failed" or v.get("ok") is False:
                failed.append(f"attention/{algo}/{name}")
    return failed


def write(record: dict[str, Any], out: Path) -> None:
    """The results so far: written after every phase, so a run killed midway still leaves its figures."""
    record["wall_s"] = elapsed()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_check and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    mode = import_deepspec(args.force_shim)
    say(f"deepspec.models imported ({mode}); device {device}; budget {args.budget_s:.0f} s; out {args.out}")
    flex, _, why = flex_api()
    record = {
        **base_record(args, device), "bench": "gpu_train", "import": import_record(mode),
        "shape": vars(args.shape), "precision": "bf16 module, float32 AdamW master weights",
        "flex_attention": why or ("compiled" if args.compile else "eager"),
        "tolerances": {"fp32_max_abs": FP32_TOL, "bf16_rel_l2": BF16_REL_TOL},
        "phases": {}, "figures": {},
    }  # fmt: skip
    record["options"].pop("shape", None)
    phases: list[tuple[str, Callable[[], Any], float]] = [
        ("parity", lambda: parity_phase(device, args.compile), 0.0),
        ("steps", lambda: steps_phase(args, device, 0.6 * args.budget_s), 30.0),
        ("attention", lambda: attention_phase(args, device), 60.0),
    ]
    for name, fn, need_s in phases:
        if args.budget_s - elapsed() < need_s and not args.cpu_check:
            record["phases"][name] = {"status": "skipped", "note": f"{args.budget_s - elapsed():.0f} s left"}
            say(f"phase {name}: skipped")
            continue
        say(f"phase {name}: start")
        start = time.perf_counter()
        try:
            record["figures"][name] = fn()
            record["phases"][name] = {"status": "done", "wall_s": time.perf_counter() - start}
        except Exception as err:
            record["phases"][name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()[-6000:]}  # fmt: skip
            traceback.print_exc()
        say(f"phase {name}: {record['phases'][name]['status']} in {time.perf_counter() - start:.1f} s")
        free(device)
        write(record, args.out)
    parity = record["figures"].get("parity")
    if parity:
        say(f"parity: {'ok' if parity['ok'] else 'MISMATCH'}: {json.dumps(parity, default=str)}")
    failed = failures(record)
    record["failed"] = failed
    write(record, args.out)
    say(f"results written to {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
