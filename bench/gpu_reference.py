"""One prepared run for a GPU machine: Eagle3, DFlash and DSpark drafts of SmolLM2-135M-Instruct trained the
same way on its 3,444 answers (features from the target, online), their tau and speedup on the nine
benchmarks at T = 0 and T = 1, and the step time and peak memory of one training step at the Qwen3-4B
draft shape, all in one JSON file.

    # the CPU check (stories260k, a few steps, 1 prompt a benchmark, 16 tokens; about a minute):
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_reference.py --device cpu --smoke --out /tmp/gpu_ref.json
    # the device run (one H200, under 10 minutes; --budget-s 540 by default):
    python3 bench/gpu_reference.py --target-path /tmp/smollm2 \\
        --answers .gpu/smollm2_135m_instruct.jsonl --eval-dir .gpu/eval

Phases, each timed, each printing progress with the elapsed seconds, each checked against the wall-clock
budget (`--budget-s`; a phase that would not fit is skipped with a note in the JSON):

1. target: `load_target` in bf16 on the GPU (a GGUF file is dequantized once, beside it), the preset of
   conf/target/smollm2_135m.yaml (layers [1, 14, 27], chat template with SmolLM's default system prompt).
2. data: every answer rendered by `render_conversation` (loss mask, 640 tokens) as tasks/cache/answers.py
   renders it, then the target's features and final hidden state computed by `capture_batches`, the one
   forward of the online stream (tasks/cache/loader.py), once, kept on the device for all three drafts.
3. train: each algorithm through its `DraftSpec` (`build`, `training_loss`), the same samples, order,
   optimizer steps and schedule: AdamW (0.9, 0.999), no weight decay, clip 1.0, 4% warmup then cosine,
   bf16 autocast on CUDA. Each draft is saved and loaded back by `load_draft`, as the evaluate stage
   loads it: in the dtype of the target's head (bf16 here).
4. step_time: one training step (forward, backward, clip, AdamW) of each algorithm at the Qwen3-4B draft
   shape (5 layers, 512 anchors, 4,096 tokens, micro-batch 1), random target embedding, head and
   features: mean time of 3 steps after a warm-up and `torch.cuda.max_memory_allocated`.
5. eval: `speculative_generate` and `target_generate` as tasks/evaluate/stage.py calls them (same prompt
   rendering, stop tokens and seeds), prompt by prompt over all benchmarks and both temperatures, so that
   a budget cut leaves every draft measured on the same prompts: tau (`acceptance_stats`), macro and
   per-domain means, speedup over plain decoding, and the share of greedy outputs equal to plain.
   Step time runs before eval so that eval takes whatever time is left; at 10 prompts x 256 tokens the
   budget may cut it short, and the JSON says how many prompts each benchmark got.

The device's image has torch, transformers, safetensors, pyarrow, numpy and jinja2 but none of omegaconf,
hydra, prefect, mlflow or deepspeed, and the repository is not installed there. This script therefore
imports only `deepspec.models` (pure torch/transformers) and, when `import deepspec` fails (or with
`--force-shim`), loads it straight from this checkout's `models/` through a small import shim; it never
imports `deepspec.tasks`, `bench/common.py` or tqdm. A GGUF target also needs the `gguf` package: carry
its wheel (pure Python; numpy, pyyaml, requests and tqdm are in the image).

Getting SmolLM2 there: its Q4_1 GGUF (which holds the tokenizer too) is 98 MB and the working tree that
travels is at most 64 MiB, so split it in two (`split -n 2`) into a git-ignored folder such as `.gpu/` and
carry one half in each of two consecutive calls while the machine stays warm: the first copies its half
to /tmp; the second joins both into /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, installs the gguf wheel
(`pip install --no-index --no-deps --target /tmp/site`, then PYTHONPATH=/tmp/site) and runs the command
above. Carry the answers and the eval folder (8 MB) in `.gpu/` too: `../shared` does not travel. The
results go to $OUT/gpu_reference.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DEEPSPEC_ASSETS") or REPO.parent / "shared" / "assets")
ALGOS = ("eagle3", "dflash", "dspark")
BENCHMARKS = ("gsm8k", "math500", "aime25", "humaneval", "mbpp", "livecodebench", "mt-bench", "alpaca",
              "arena-hard-v2")  # fmt: skip
DOMAINS = {  # conf/eval/default.yaml
    "math": ("gsm8k", "math500", "aime25"),
    "code": ("humaneval", "mbpp", "livecodebench"),
    "chat": ("mt-bench", "alpaca", "arena-hard-v2"),
}
# What the device's image lacks; none of it may be imported (checked, and written to the JSON).
FORBIDDEN_MODULES = (
    "omegaconf",
    "hydra",
    "prefect",
    "mlflow",
    "deepspeed",
    "deepspec.tasks",
    "deepspec.flows",
)
SKIP_LINE = (
    "gpu_reference: skipped: no CUDA device is present (run with --device cpu --smoke for the CPU check)"
)
# Shares of the budget (elapsed-time marks) that training and the step-time phase may run until, so
# that evaluation, which adapts to what is left, always gets time.
TRAIN_UNTIL, STEP_TIME_UNTIL = 0.55, 0.66
CLOSING_S = 5.0  # kept free at the end of the budget for the results file and the table

_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - _START


# ----------------------------------------------------------------------------------------------------
# Import: deepspec.models from the installed package, or from this checkout's models/ folder


def import_deepspec(force_shim: bool) -> str:
    """Make `deepspec.models` importable; 'installed' or 'shim'.

    The shim registers a bare `deepspec` package (no search path of its own: only `models` is there) whose
    `models` subpackage is loaded from REPO/models, as pyproject's `package-dir` maps it.
    """
    if not force_shim:
        try:
            import deepspec.models  # noqa: F401

            return "installed"
        except ModuleNotFoundError as err:
            if err.name not in ("deepspec", "deepspec.models"):
                raise
    for name in [m for m in sys.modules if m == "deepspec" or m.startswith("deepspec.")]:
        del sys.modules[name]
    package = types.ModuleType("deepspec")
    package.__path__ = []
    sys.modules["deepspec"] = package
    spec = importlib.util.spec_from_file_location(
        "deepspec.models", REPO / "models" / "__init__.py", submodule_search_locations=[str(REPO / "models")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deepspec.models"] = module
    spec.loader.exec_module(module)
    package.models = module  # type: ignore[attr-defined]
    return "shim"


def import_record(mode: str) -> dict[str, Any]:
    import deepspec.models.drafts

    loaded = sorted(m for m in sys.modules if m.startswith("deepspec"))
    forbidden = sorted(
        m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)
    )
    return {
        "mode": mode,
        "models_dir": str(Path(deepspec.models.drafts.__file__).parents[1]),
        "deepspec_modules": loaded,
        "forbidden_loaded": forbidden,
    }


# ----------------------------------------------------------------------------------------------------
# Presets (conf/target/*.yaml, conf/algo/*.yaml): hard-coded, since omegaconf is not on the device


@dataclass(frozen=True)
class TargetPreset:
    """What this script reads of conf/target/<name>.yaml."""

    name: str
    layer_ids: tuple[int, ...]
    use_chat_template: bool
    gguf_file: str | None
    system_prompt: str | None = None  # null: SmolLM's template adds its default system prompt
    mask_token_id: int | None = None

    def rendering(self) -> dict[str, Any]:
        """The `render_conversation` / `render_prompt` keywords (tasks/paths.py `rendering`)."""
        return {
            "use_chat_template": self.use_chat_template,
            "chat_template_kwargs": {},
            "system_prompt": self.system_prompt,
        }


SMOLLM2 = TargetPreset("smollm2_135m", (1, 14, 27), True, "SmolLM2-135M-Instruct.Q4_1.gguf")
STORIES260K = TargetPreset("stories260k", (0, 2, 4), False, None)


def algo_values(name: str, layers: int, anchors: int) -> dict[str, Any]:
    """conf/algo/{name}.yaml, with the decoder layers and anchors a sequence from the options."""
    if name == "dflash":  # blocks of 8 slots: the anchor and 7 mask tokens, 7 drafts a round
        return {"name": name, "block_size": 8, "num_layers": layers, "loss_decay": 4.0,
                "anchors_per_sequence": anchors}  # fmt: skip
    if name == "dspark":  # blocks of 7 slots, every slot drafting: 7 drafts a round
        return {"name": name, "block_size": 7, "num_layers": layers, "loss_decay": 4.0,
                "anchors_per_sequence": anchors, "markov_rank": 256, "markov_head_type": "vanilla",
                "confidence_head": True, "confidence_head_with_markov": True, "ce_weight": 0.1,
                "l1_weight": 0.9, "confidence_weight": 1.0}  # fmt: skip
    if name == "eagle3":  # one decoder layer by design; 7 test steps, 7 drafts a round
        return {"name": name, "ttt_steps": 7, "step_decay": 0.8, "draft_vocab_size": None}
    raise ValueError(f"unknown algorithm {name!r}")


def draft_needs_teacher(name: str) -> bool:
    from deepspec.models.drafts import draft_spec

    return draft_spec(name).needs_teacher


def algo_settings(name: str, layers: int, anchors: int, layer_ids: list[int], num_hidden_layers: int):
    """The algorithm's settings dataclass (`DraftSpec.settings`), checked as the config stage checks it."""
    from deepspec.models.drafts import draft_spec

    settings = draft_spec(name).settings(**algo_values(name, layers, anchors))
    problems = settings.problems(layer_ids, num_hidden_layers)
    if problems:
        raise ValueError(f"algo={name}: " + "; ".join(problems))
    return settings


@dataclass(frozen=True)
class StepShape:
    """A draft geometry for the step-time phase, and the batch it trains on."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    target_layers: int
    layer_ids: tuple[int, ...]  # DFlash and DSpark
    eagle3_layer_ids: tuple[int, ...]
    draft_layers: int
    anchors: int
    seq_len: int
    prompt_len: int  # unsupervised tokens at the start of the sequence
    mask_token_id: int
    rope_theta: float


# conf/target/qwen3_4b.yaml and conf/target_algo/qwen3_4b_eagle3.yaml; bench/train_step_bench.py's geometry
QWEN3_4B = StepShape(2560, 32, 8, 128, 9728, 151_936, 36, (1, 9, 17, 25, 33), (1, 17, 32), 5, 512, 4096, 256,
                     151_643, 1e6)  # fmt: skip
TINY = StepShape(64, 4, 2, 16, 128, 512, 8, (1, 3, 5, 6, 7), (1, 4, 6), 1, 16, 128, 32, 0, 1e4)


# ----------------------------------------------------------------------------------------------------
# Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (skipped when absent) or cpu")
    add("--smoke", action="store_true", help="tiny sizes: stories260k, a few steps, 1 prompt, 16 tokens")
    add("--force-shim", action="store_true", help="load deepspec.models from models/ even if installed")
    add(
        "--target-path",
        help="target folder (default: .cache/models/smollm2_135m_instruct; smoke: stories260k)",
    )
    add("--gguf-file", default="auto", help="GGUF file in --target-path; auto: the preset's if present; none")
    add("--target-dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    add("--answers", type=Path, help="answers JSONL (default: the shared SmolLM2 answers; smoke: generated)")
    add("--max-answers", type=int, help="the first N answers only")
    add("--max-length", type=int, default=640, help="tokens a conversation is cut to")
    add("--epochs", type=int, help="passes over the answers (default 1; smoke 2)")
    add("--global-batch", type=int, help="sequences an optimizer step (default 16; smoke 4)")
    add("--micro-batch", type=int, help="sequences a forward (default: the global batch)")
    add("--lr", type=float, default=3e-3)
    add("--layers", type=int, default=1, help="draft decoder layers (DFlash, DSpark; Eagle3 has one)")
    add("--anchors", type=int, help="DFlash/DSpark anchors a sequence (default 512; smoke 16)")
    add("--seed", type=int, default=0)
    add("--eval-dir", type=Path, default=ASSETS / "eval", help="<benchmark>.jsonl files of {turns}")
    add("--eval-prompts", type=int, help="prompts a benchmark (default 10; smoke 1)")
    add("--eval-tokens", type=int, help="new tokens a prompt (default 256; smoke 16)")
    add("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    add("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    add(
        "--step-shape",
        choices=("qwen3_4b", "tiny"),
        help="step-time draft shape (default qwen3_4b; smoke tiny)",
    )
    add("--step-steps", type=int, default=3, help="timed training steps a draft in the step-time phase")
    add(
        "--budget-s",
        type=float,
        default=540.0,
        help="wall-clock budget; phases that would not fit are skipped",
    )
    add("--out", type=Path, help="results JSON (default: $OUT/gpu_reference.json, else bench/results/)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.preset = STORIES260K if smoke else SMOLLM2
    if args.target_path is None:
        args.target_path = str(
            ASSETS / "models" / "stories260k" if smoke else REPO / ".cache/models/smollm2_135m_instruct"
        )
    if args.gguf_file == "auto":
        preset_file = args.preset.gguf_file
        args.gguf_file = (
            preset_file if preset_file and (Path(args.target_path) / preset_file).is_file() else None
        )
    elif args.gguf_file.lower() == "none":
        args.gguf_file = None
    if args.target_dtype is None:
        args.target_dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.answers is None and not smoke:
        args.answers = ASSETS / "regen" / "smollm2_135m_instruct.jsonl"
    if smoke:  # a few optimizer steps: 8 answers, 2 epochs of 2 steps
        args.max_answers = args.max_answers or 8
    args.epochs = args.epochs or (2 if smoke else 1)
    args.global_batch = args.global_batch or (4 if smoke else 16)
    args.anchors = args.anchors or (16 if smoke else 512)
    args.eval_prompts = args.eval_prompts or (1 if smoke else 10)
    args.eval_tokens = args.eval_tokens or (16 if smoke else 256)
    args.micro_batch = args.micro_batch or args.global_batch
    args.step_shape = {"qwen3_4b": QWEN3_4B, "tiny": TINY}[
        args.step_shape or ("tiny" if smoke else "qwen3_4b")
    ]
    if args.out is None:
        day = time.strftime("%Y-%m-%d")
        out_dir = os.environ.get("OUT")
        args.out = (
            Path(out_dir) / "gpu_reference.json"
            if out_dir
            else REPO / "bench" / "results" / f"gpu_reference-{args.preset.name}-{day}.json"
        )
    return args


# ----------------------------------------------------------------------------------------------------
# Budget and phases


@dataclass
class Report:
    """Everything the results file holds; phases record their status and wall time as they run."""

    budget_s: float
    record: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - elapsed()

    def until(self, share: float) -> float:
        """Seconds from now to the elapsed-time mark `share` x budget (negative when past it)."""
        return share * self.budget_s - elapsed()

    def skip(self, name: str, note: str) -> None:
        self.phases[name] = {"status": "skipped", "note": note}
        say(f"phase {name}: skipped: {note}")

    def run(self, name: str, fn: Callable[[], Any], *, need_s: float) -> Any:
        """`fn()` timed and recorded; None when it was skipped (too little budget left) or failed. A
        failure is recorded with its traceback and the run goes on: the other phases still report."""
        if self.left() < need_s:
            self.skip(name, f"{self.left():.0f} s of the budget left, the phase needs about {need_s:.0f} s")
            return None
        say(f"phase {name}: start")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as err:
            wall = time.perf_counter() - start
            self.phases[name] = {"status": "failed", "wall_s": wall, "error": f"{type(err).__name__}: {err}",
                                 "traceback": traceback.format_exc()[-6000:]}  # fmt: skip
            say(f"phase {name}: FAILED after {wall:.1f} s: {type(err).__name__}: {err}")
            traceback.print_exc()
            return None
        wall = time.perf_counter() - start
        self.phases[name] = {"status": "done", "wall_s": wall}
        say(f"phase {name}: done in {wall:.1f} s")
        return result


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Phase 1: the target


@dataclass
class Target:
    model: Any
    tokenizer: Any
    preset: TargetPreset
    layer_ids: list[int]
    embed32: torch.Tensor  # float32 embedding and head, as the train recipe loads them for the draft
    head32: torch.Tensor
    stop_ids: set[int]
    device: torch.device


def stop_token_ids(tokenizer, preset: TargetPreset) -> set[int]:
    """tasks/evaluate/stage.py `stop_token_ids`: eos, `<|im_end|>` if known, the template's end of turn."""
    from deepspec.models.chat import end_of_turn_ids

    ids = set(end_of_turn_ids(tokenizer, use_chat_template=preset.use_chat_template, chat_template_kwargs={}))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(int(im_end))
    return ids


def load_target_phase(args: argparse.Namespace, device: torch.device, report: Report) -> Target:
    from deepspec.models.target import check_layer_ids, load_embedding_and_head, load_target

    say(f"loading {args.target_path} (gguf {args.gguf_file}) in {args.target_dtype}")
    model, tokenizer = load_target(args.target_path, args.gguf_file, None, args.target_dtype)
    model.to(device)
    layer_ids = check_layer_ids(list(args.preset.layer_ids), model.config.num_hidden_layers)
    embed32, head32 = load_embedding_and_head(args.target_path, args.gguf_file, None, "float32")
    target = Target(model, tokenizer, args.preset, layer_ids, embed32, head32,
                    stop_token_ids(tokenizer, args.preset), device)  # fmt: skip
    config = model.config.get_text_config()
    report.figures["target"] = {
        "preset": args.preset.name, "path": args.target_path, "gguf_file": args.gguf_file,
        "dtype": args.target_dtype, "layer_ids": layer_ids, "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()), "stop_token_ids": sorted(target.stop_ids),
    }  # fmt: skip
    return target


# ----------------------------------------------------------------------------------------------------
# Phase 2: the answers, rendered, and the target's features

STORY_OPENINGS = (
    "Once upon a time, there was a little girl named Lily.",
    "Tom had a big red ball.",
    "One day, a cat saw a bird in the tree.",
    "Sam and his mom went to the park.",
    "There was a small dog who liked to run.",
    "Anna found a shiny stone by the river.",
    "The sun was hot and the kids wanted to swim.",
    "Ben wanted to help his dad in the garden.",
    "A little bunny lived in a hole under a big tree.",
    "Mia had a new doll that she loved very much.",
)


def generate_answers(target: Target, count: int, max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """The smoke run's answers: the target's own greedy continuations of story openings."""
    from deepspec.models.chat import render_prompt
    from deepspec.models.speculative import target_generate

    rows = []
    for i, opening in enumerate((STORY_OPENINGS * (count // len(STORY_OPENINGS) + 1))[:count]):
        user = {"role": "user", "content": opening}
        ids = render_prompt(target.tokenizer, [user], **target.preset.rendering())
        tokens = target_generate(target.model, target.layer_ids, ids, max_new_tokens=max_new_tokens,
                                 temperature=0.0, eos_token_ids=target.stop_ids)  # fmt: skip
        text = target.tokenizer.decode(
            [t for t in tokens if t not in target.stop_ids], skip_special_tokens=True
        )
        rows.append({"id": f"smoke-{i}", "conversations": [user, {"role": "assistant", "content": text}]})
    return rows


def read_answers(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Rows {id, conversations} of an answers JSONL (tasks/cache/answers.py `read_answers`, unchecked)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            rows.append({"id": str(row.get("id", f"line-{line_no}")), "conversations": row["conversations"]})
            if limit is not None and len(rows) >= limit:
                break
    return rows


@dataclass
class Data:
    samples: list[dict[str, Any]]  # features kept in bf16 on the device; `training_sample` widens them
    token_counts: torch.Tensor  # [V] supervised tokens (Eagle3's reduced vocabulary, if one is asked for)


def data_phase(args: argparse.Namespace, target: Target, needs_teacher: bool, report: Report) -> Data:
    from deepspec.models.chat import render_conversation
    from deepspec.models.errors import DataError
    from deepspec.models.target import capture_batches

    if args.answers is None:
        rows = generate_answers(target, args.max_answers)
        source = "generated"
    else:
        rows = read_answers(args.answers, args.max_answers)
        source = str(args.answers)
    say(f"{len(rows)} answers from {source}; rendering (max_length {args.max_length})")
    rendered, errors, empty = [], 0, 0
    for row in rows:
        try:
            r = render_conversation(target.tokenizer, row["conversations"], **target.preset.rendering(),
                                    max_length=args.max_length)  # fmt: skip
        except DataError:
            errors += 1
            continue
        if not any(r.loss_mask):  # the online stream and the cache stage drop these
            empty += 1
            continue
        rendered.append((row["id"], r.input_ids, r.loss_mask))
    if not rendered:
        raise RuntimeError("no answer has a supervised token after rendering")
    vocab = target.model.config.get_text_config().vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    for _, ids, mask in rendered:
        supervised = torch.tensor(ids)[torch.tensor(mask, dtype=torch.bool)]
        counts += torch.bincount(supervised, minlength=vocab)[:vocab]

    say(f"capturing layers {target.layer_ids} of {len(rendered)} sequences on {target.device}")
    start = time.perf_counter()
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    samples: list[dict[str, Any]] = [{} for _ in rendered]
    # more padded tokens a forward on a GPU than the online stream's 8,192 (a CPU's): same numbers, sooner
    tokens_per_batch = 32_768 if target.device.type == "cuda" else 8192
    batches = capture_batches(target.model, [ids for _, ids, _ in rendered], target.layer_ids, pad_id=pad,
                              tokens_per_batch=tokens_per_batch, final_hidden=needs_teacher)  # fmt: skip
    for batch in batches:
        for j, i in enumerate(batch.indices):
            sample_id, ids, mask = rendered[i]
            samples[i] = {
                "sample_id": sample_id,
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "loss_mask": torch.tensor(mask, dtype=torch.bool),
                "features": batch.features[j].to(target.device),  # bf16, as capture_batches rounds them
                "num_tokens": len(ids),
            }
            if batch.final_hidden is not None:
                samples[i]["final_hidden"] = batch.final_hidden[j].to(target.device)
    sync(target.device)
    capture_s = time.perf_counter() - start
    tokens = sum(s["num_tokens"] for s in samples)
    report.figures["data"] = {
        "answers": source, "rows": len(rows), "samples": len(samples), "render_errors": errors,
        "no_supervised_tokens": empty, "tokens": tokens, "supervised_tokens": int(counts.sum()),
        "max_length": args.max_length, "capture_s": capture_s, "capture_tokens_per_s": tokens / capture_s,
    }  # fmt: skip
    say(f"{len(samples)} samples, {tokens} tokens captured in {capture_s:.1f} s")
    return Data(samples, counts)


def training_sample(stored: dict[str, Any]) -> dict[str, Any]:
    """A sample as the online stream yields it: features (and the final state) in float32."""
    sample = {**stored, "features": stored["features"].float()}
    if "final_hidden" in stored:
        sample["final_hidden"] = stored["final_hidden"].float()
    return sample


# ----------------------------------------------------------------------------------------------------
# Phase 3: training


def lr_factor(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """tasks/train/schedule.py `lr_lambda`: linear warmup over `warmup_ratio` of the steps, cosine to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The online stream's order for one rank (tasks/cache/loader.py `RankOrder` with one group and a
    whole-epoch shuffle buffer): the group permutation, then a shuffle, from `seed + epoch`."""
    import numpy as np

    rng = np.random.default_rng(seed + epoch)
    rng.permutation(1)  # the order of the one group: drawn so the shuffle below matches the stream's
    items = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(items)
    return items.tolist()


def make_optimizer(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW as conf/train/default.yaml sets it, with the recipe's warmup-cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps, 0.04))
    return params, optimizer, scheduler


def train_one(
    name: str, args: argparse.Namespace, target: Target, data: Data, draft_dir: Path, seconds: float
) -> dict[str, Any]:
    """Train one algorithm, save it to `draft_dir`; stops early (and says so) after `seconds`."""
    from deepspec.models.drafts import draft_spec
    from deepspec.models.drafts.spec import DraftInputs
    from deepspec.models.losses import expected_accepted_length
    from deepspec.models.target import mask_token_id
    from deepspec.models.teacher import Teacher

    deadline = time.perf_counter() + seconds
    spec, device, config = draft_spec(name), target.device, target.model.config
    text = config.get_text_config()
    settings = algo_settings(name, args.layers, args.anchors, target.layer_ids, text.num_hidden_layers)
    torch.manual_seed(args.seed)
    inputs = DraftInputs(target_config=config, layer_ids=target.layer_ids,
                         mask_token_id=mask_token_id(target.tokenizer, target.preset.mask_token_id),
                         embed=target.embed32, head=target.head32, token_counts=lambda: data.token_counts)  # fmt: skip
    model = spec.build(settings, inputs).to(device)  # built on the CPU as the recipe builds it, then moved
    teacher = None
    if spec.needs_teacher:  # online: the samples carry the final state; the head in the target's dtype
        teacher = Teacher.for_target(text, target.head32, target.layer_ids, device, online=True,
                                     path=args.target_path, gguf_file=args.gguf_file, dtype=args.target_dtype)  # fmt: skip
    n = len(data.samples)
    steps_per_epoch = math.ceil(n / args.global_batch)
    total_steps = args.epochs * steps_per_epoch
    params, optimizer, scheduler = make_optimizer(model, args.lr, total_steps)
    model.train()
    losses: list[float] = []
    slots = int(model.num_draft_tokens)
    hits, counts = torch.zeros(slots), torch.zeros(slots)
    tail_from = max(0, total_steps - max(1, total_steps // 10))  # last 10% of steps: the final figures
    micro, step, stopped = 0, 0, False
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = epoch_order(n, args.seed, epoch)
        for first in range(0, n, args.global_batch):
            chosen = order[first : first + args.global_batch]
            parts = [chosen[i : i + args.micro_batch] for i in range(0, len(chosen), args.micro_batch)]
            step_loss = 0.0
            for part in parts:
                # tasks/train/schedule.py `anchor_generator` for rank 0 of 1
                generator = torch.Generator().manual_seed((int(args.seed) << 40) + micro)
                batch = [training_sample(data.samples[i]) for i in part]
                with autocast(device):
                    loss, stats = spec.training_loss(model, model, batch, settings, teacher, generator)
                (loss / len(parts)).backward()  # the mean over the step's micro-batches, as DeepSpeed's
                step_loss += float(loss.detach()) / len(parts)
                if step >= tail_from:
                    hits += stats["slot_hits"].detach().float().cpu()
                    counts += stats["slot_counts"].detach().float().cpu()
                micro += 1
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step += 1
            if step == 1 or step % max(1, total_steps // 5) == 0:
                say(f"  {name}: step {step}/{total_steps} loss {step_loss:.3f}")
            if time.perf_counter() > deadline and step < total_steps:
                stopped = True
                break
        if stopped:
            break
    sync(device)
    wall = time.perf_counter() - start
    spec.save(model, draft_dir)
    tail = losses[tail_from:] or losses[-1:]
    record = {
        "steps": step, "planned_steps": total_steps, "micro_steps": micro, "epochs": args.epochs,
        "samples": n, "global_batch": args.global_batch, "micro_batch": args.micro_batch, "lr": args.lr,
        "settings": algo_values(name, args.layers, args.anchors), "num_draft_tokens": slots,
        "trainable_parameters": sum(p.numel() for p in params), "loss_first": losses[0] if losses else None,
        "loss_last_10pct": sum(tail) / len(tail) if tail else None,
        "slot_accuracy_last_10pct": (hits / counts.clamp(min=1)).tolist(),
        "expected_tau_last_10pct": expected_accepted_length(hits / counts.clamp(min=1)),
        "wall_s": wall, "steps_per_s": step / wall if wall > 0 else None,
        "stopped_by_budget": stopped,
    }  # fmt: skip
    say(f"  {name}: {step} steps in {wall:.1f} s, loss {record['loss_first']:.3f} -> {record['loss_last_10pct']:.3f}"
        f"{' (stopped by the budget)' if stopped else ''}")  # fmt: skip
    del model, optimizer, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def train_phase(
    args: argparse.Namespace, target: Target, data: Data, drafts_root: Path, report: Report
) -> dict[str, Path]:
    """Every algorithm in turn, each given an equal share of the training budget that is left."""
    trained: dict[str, Path] = {}
    records: dict[str, Any] = {}
    report.figures["train"] = records
    for k, name in enumerate(args.algos):
        share = report.until(TRAIN_UNTIL) / (len(args.algos) - k)
        if share < 5:
            records[name] = {"status": "skipped", "note": f"{share:.0f} s of the training budget left"}
            say(f"  {name}: skipped, {share:.0f} s of the training budget left")
            continue
        try:
            records[name] = train_one(name, args, target, data, drafts_root / name, share)
            trained[name] = drafts_root / name
        except Exception as err:  # one algorithm failing leaves the others measured
            records[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-6000:]}  # fmt: skip
            say(f"  {name}: FAILED: {type(err).__name__}: {err}")
            traceback.print_exc()
    if not trained:
        raise RuntimeError("no algorithm was trained")
    return trained


# ----------------------------------------------------------------------------------------------------
# Phase 4: step time and peak memory at the Qwen3-4B draft shape


def shape_config(shape: StepShape) -> types.SimpleNamespace:
    """A target config with the fields the drafts' `from_target` read (any transformers version)."""
    return types.SimpleNamespace(
        model_type="qwen3", hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate_size=shape.intermediate,
        vocab_size=shape.vocab, num_hidden_layers=shape.target_layers, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, max_position_embeddings=40_960,
    )  # fmt: skip


@dataclass
class StepSetup:
    """One draft at a step-time shape, the teacher it learns from and the one random sequence it trains on."""

    spec: Any  # DraftSpec
    settings: Any
    model: torch.nn.Module
    teacher: Any
    sample: dict[str, Any]
    layer_ids: list[int]


def step_setup(name: str, shape: StepShape, device: torch.device, teacher_dtype: torch.dtype) -> StepSetup:
    """The draft (float32, on `device`) on a random tied embedding and LM head, as the recipe builds it."""
    from deepspec.models.drafts import draft_spec
    from deepspec.models.drafts.spec import DraftInputs
    from deepspec.models.teacher import Teacher

    spec = draft_spec(name)
    layer_ids = list(shape.eagle3_layer_ids if name == "eagle3" else shape.layer_ids)
    settings = algo_settings(name, shape.draft_layers, shape.anchors, layer_ids, shape.target_layers)
    torch.manual_seed(0)
    # the target's embedding and LM head: random, tied (as Qwen3-4B's), float32 as the recipe loads them
    weight = torch.randn(shape.vocab, shape.hidden, device=device) * 0.02
    inputs = DraftInputs(target_config=shape_config(shape), layer_ids=layer_ids,
                         mask_token_id=shape.mask_token_id, embed=weight, head=weight)  # fmt: skip
    model = spec.build(settings, inputs).to(device)
    d = shape.hidden
    k = layer_ids.index(max(layer_ids))
    teacher = Teacher(weight.to(teacher_dtype), device, columns=slice(k * d, (k + 1) * d), online=True)
    # one sequence: ids and mask on the CPU, features and final state on the device (the cached stream's
    # layout with decode_device set), features rounded to bf16 as every cache and online capture rounds them
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(shape.seq_len, dtype=torch.bool)
    mask[: shape.prompt_len] = False
    sample = {
        "sample_id": "random", "num_tokens": shape.seq_len, "loss_mask": mask,
        "input_ids": torch.randint(0, shape.vocab, (shape.seq_len,), generator=gen),
        "features": torch.randn(shape.seq_len, len(layer_ids) * d, device=device).to(torch.bfloat16).float(),
        "final_hidden": torch.randn(shape.seq_len, d, device=device),
    }  # fmt: skip
    return StepSetup(spec, settings, model, teacher, sample, layer_ids)


def step_time_one(name: str, shape: StepShape, device: torch.device, teacher_dtype: torch.dtype,
                  timed_steps: int) -> dict[str, Any]:  # fmt: skip
    """Warm-up step, then `timed_steps` timed steps (forward, backward, clip, AdamW) of one draft."""
    # what is on the device already (the target, the captured features) is not this step's
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    setup = step_setup(name, shape, device, teacher_dtype)
    spec, settings, model, sample = setup.spec, setup.settings, setup.model, setup.sample
    teacher, layer_ids = setup.teacher, setup.layer_ids
    params, optimizer, _ = make_optimizer(model, 1e-4, 100)
    model.train()

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss, _ = spec.training_loss(
                model, model, [sample], settings, teacher, torch.Generator().manual_seed(i)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    step(0)  # warm-up: kernels chosen, AdamW's states allocated
    sync(device)
    state_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for i in range(1, timed_steps + 1):
        start = time.perf_counter()
        loss = step(i)  # float(loss) waits for the forward; the sync below for the backward and AdamW
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    gib = 2**30
    record = {
        "step_s": sum(times) / len(times), "step_s_each": times, "loss": loss,
        "trainable_parameters": sum(p.numel() for p in params), "target_layer_ids": layer_ids,
        "draft_layers": 1 if name == "eagle3" else shape.draft_layers,
        "anchors": None if name == "eagle3" else shape.anchors,
        # the step's own memory: the draft, the shared embedding/head, AdamW states, batch, activations
        "peak_gib": None if peak is None else (peak - baseline) / gib,
        "state_gib": None if state_bytes is None else (state_bytes - baseline) / gib,
        "other_allocated_gib": baseline / gib,  # the target and its features, held meanwhile
    }  # fmt: skip
    return record  # the draft, its optimizer and the batch are freed with this frame


def step_time_phase(args: argparse.Namespace, device: torch.device, report: Report) -> dict[str, Any]:
    shape: StepShape = args.step_shape
    records: dict[str, Any] = {}
    report.figures["step_time"] = {"shape": shape.__dict__, "micro_batch": 1,
                                   "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                                   "algos": records}  # fmt: skip
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in args.algos:
        if report.until(STEP_TIME_UNTIL) < 3:
            records[name] = {"status": "skipped", "note": "the step-time budget is spent"}
            continue
        try:
            records[name] = step_time_one(name, shape, device, teacher_dtype, args.step_steps)
            r = records[name]
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
            say(f"  {name}: {1000 * r['step_s']:.0f} ms a step{peak}")
        except Exception as err:  # out of memory in one draft leaves the others measured
            records[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()[-6000:]}  # fmt: skip
            say(f"  {name}: FAILED: {type(err).__name__}: {err}")
        gc.collect()  # the last draft's weights and AdamW states go before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------------------------------
# Phase 5: evaluation


def load_prompts(
    eval_dir: Path, count: int, render: Callable[[str], list[int]], limit: int
) -> dict[str, Any]:
    """Per benchmark, the rendered first turn of its first `count` rows (eval=default's selection) that
    leave room for the new tokens in the target's context (`limit` prompt tokens): stories260k has 512
    positions, so its smoke run passes over longer prompts; SmolLM2's 8,192 take the first rows as the
    stage does. {name: {"rows": [row index, ...], "ids": [[token id, ...], ...], "too_long": n}}."""
    prompts = {}
    for name in BENCHMARKS:
        path = eval_dir / f"{name}.jsonl"
        if not path.is_file():
            say(f"  {path} is missing: benchmark {name} left out")
            continue
        chosen: dict[str, Any] = {"rows": [], "ids": [], "too_long": 0}
        with path.open(encoding="utf-8") as f:
            for row, line in enumerate(line for line in f if line.strip()):
                ids = render(json.loads(line)["turns"][0])
                if len(ids) > limit:
                    chosen["too_long"] += 1
                    continue
                chosen["rows"].append(row)
                chosen["ids"].append(ids)
                if len(chosen["ids"]) == count:
                    break
        if chosen["ids"]:
            prompts[name] = chosen
        else:
            say(f"  {name}: no prompt within {limit} tokens; left out")
    return prompts


def load_drafters(target: Target, drafts: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """Each saved draft loaded back as the evaluate stage loads it: `load_draft` on the target's own
    embedding and head, so it runs in the target's dtype (bf16 on the GPU)."""
    from deepspec.models.drafts import load_draft
    from deepspec.models.target import input_embeddings, output_head

    embed, head = input_embeddings(target.model).weight, output_head(target.model).weight
    return {name: load_draft(path, embed, head).to(target.device).eval() for name, path in drafts.items()}


def eval_phase(args: argparse.Namespace, target: Target, drafts: dict[str, Path], report: Report) -> dict:
    from deepspec.models.chat import render_prompt
    from deepspec.models.speculative import speculative_generate, target_generate

    drafters = load_drafters(target, drafts)

    def render(text: str) -> list[int]:
        return render_prompt(
            target.tokenizer, [{"role": "user", "content": text}], **target.preset.rendering()
        )

    context = getattr(target.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
    selected = load_prompts(args.eval_dir, args.eval_prompts, render, context - args.eval_tokens - 8)
    if not selected:
        raise RuntimeError(f"no benchmark prompt in {args.eval_dir}")
    prompts = {b: chosen["ids"] for b, chosen in selected.items()}
    offsets, total = {}, 0  # the stage's seed of a prompt: eval.seed (0) * 1_000_003 + its running index
    for b, rows in prompts.items():
        offsets[b], total = total, total + len(rows)
    model, layer_ids, stop = target.model, target.layer_ids, target.stop_ids

    def decode(t: float, tokens: int) -> dict[str, Any]:
        return {"max_new_tokens": tokens, "temperature": t, "eos_token_ids": stop}

    warm = next(iter(prompts.values()))[0]  # one untimed run of each, as the stage does
    for drafter in drafters.values():
        speculative_generate(model, layer_ids, drafter, warm, **decode(0.0, 2))
    target_generate(model, layer_ids, warm, **decode(0.0, 2))

    temps = list(args.temperatures)
    spec_out = {t: {a: {b: [] for b in prompts} for a in drafters} for t in temps}
    spec_s = {t: {a: {b: 0.0 for b in prompts} for a in drafters} for t in temps}
    plain_out = {t: {b: [] for b in prompts} for t in temps}
    plain_s = {t: {b: 0.0 for b in prompts} for t in temps}
    deadline = args.budget_s - CLOSING_S
    longest_unit, cut = 0.0, False
    # prompt-major: after a budget cut every draft, benchmark and temperature has (nearly) as many prompts
    for i in range(args.eval_prompts):
        for t in temps:
            for b, rows in prompts.items():
                if i >= len(rows):
                    continue
                if elapsed() + longest_unit > deadline:
                    cut = True
                    break
                unit = time.perf_counter()
                seed = offsets[b] + i
                start = time.perf_counter()
                plain_out[t][b].append(target_generate(model, layer_ids, rows[i], **decode(t, args.eval_tokens),
                                                       generator=torch.Generator().manual_seed(seed)))  # fmt: skip
                sync(target.device)
                plain_s[t][b] += time.perf_counter() - start
                for a, drafter in drafters.items():
                    start = time.perf_counter()
                    spec_out[t][a][b].append(
                        speculative_generate(model, layer_ids, drafter, rows[i], **decode(t, args.eval_tokens),
                                             generator=torch.Generator().manual_seed(seed))
                    )  # fmt: skip
                    sync(target.device)
                    spec_s[t][a][b] += time.perf_counter() - start
                longest_unit = max(longest_unit, time.perf_counter() - unit)
            if cut:
                break
            say(f"  eval: prompt {i + 1}/{args.eval_prompts} of every benchmark at T={t:g} done")
        if cut:
            break
    if cut:
        say("  eval: stopped by the budget; the figures cover the prompts evaluated")
    figures = eval_figures(temps, drafters, spec_out, spec_s, plain_out, plain_s)
    figures["budget_cut"] = cut
    if args.target_dtype != "float32" and 0.0 in temps:  # the stage's `greedy_match_note`
        figures["greedy_match_note"] = (
            f"target verified in {args.target_dtype}: a multi-token verify forward and a one-token forward "
            "round differently, so near-ties can flip the argmax; greedy_match below 1 comes from that"
        )
    figures["draft_dtype"] = {
        a: str(next(d.parameters()).dtype).removeprefix("torch.") for a, d in drafters.items()
    }
    figures["prompts_requested"] = args.eval_prompts
    figures["prompt_rows"] = {b: chosen["rows"] for b, chosen in selected.items()}
    figures["prompts_too_long"] = {
        b: chosen["too_long"] for b, chosen in selected.items() if chosen["too_long"]
    }
    figures["max_new_tokens"] = args.eval_tokens
    return figures


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _rate(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def eval_figures(temps, drafters, spec_out, spec_s, plain_out, plain_s) -> dict[str, Any]:
    """Per temperature and draft: each benchmark's figures, the macro and per-domain means (unweighted
    over benchmarks, as the stage's `macro_figures`), the share of greedy outputs equal to plain."""
    from deepspec.models.speculative import acceptance_stats

    out: dict[str, Any] = {"plain": {}, "temperatures": {}}
    for t in temps:
        key = f"T={t:g}"
        plain = {b: {"prompts": len(runs), "tokens": sum(map(len, runs)), "seconds": plain_s[t][b],
                     "tokens_per_s": _rate(sum(map(len, runs)), plain_s[t][b])}
                 for b, runs in plain_out[t].items() if runs}  # fmt: skip
        out["plain"][key] = plain
        per_algo = {}
        for a in drafters:
            benches = {}
            matches = total = 0
            for b, results in spec_out[t][a].items():
                if not results:
                    continue
                stats = acceptance_stats(results)
                rate = _rate(stats["tokens"], spec_s[t][a][b])
                plain_rate = plain[b]["tokens_per_s"]
                greedy = None
                if t == 0:
                    same = sum(r.tokens == p for r, p in zip(results, plain_out[t][b], strict=True))
                    greedy, matches, total = same / len(results), matches + same, total + len(results)
                benches[b] = {
                    "prompts": len(results), "tokens": stats["tokens"], "rounds": stats["steps"],
                    "tau": stats["tau"], "propose": stats["propose"], "accept_at": stats["accept_at"],
                    "seconds": spec_s[t][a][b], "tokens_per_s": rate,
                    "speedup": rate / plain_rate if rate and plain_rate else None, "greedy_match": greedy,
                }  # fmt: skip
            per_algo[a] = {
                "benchmarks": benches,
                "tau_macro": _mean([f["tau"] for f in benches.values()]),
                "speedup_macro": _mean([f["speedup"] for f in benches.values()]),
                "tau_domains": {
                    d: _mean([benches[b]["tau"] for b in names if b in benches])
                    for d, names in DOMAINS.items()
                },  # fmt: skip
                "greedy_match": matches / total if total else None,
            }
        out["temperatures"][key] = per_algo
    return out


# ----------------------------------------------------------------------------------------------------
# The record, the table, main


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def base_record(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import transformers

    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("preset", "step_shape")}  # fmt: skip
    return {
        "bench": "gpu_reference", "command": shlex.join([sys.executable, *sys.argv]), "cwd": os.getcwd(),
        "options": options, "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "smoke": args.smoke,
    }  # fmt: skip


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: Report) -> None:
    evaluation = report.figures.get("eval") or {}
    train = report.figures.get("train") or {}
    steps = (report.figures.get("step_time") or {}).get("algos", {})
    header = (
        f"{'algo':7} {'T':>3} {'tau':>5} {'math':>5} {'code':>5} {'chat':>5} {'speedup':>7} {'greedy':>6}"
    )
    print("\n" + header + f" {'loss':>6} {'step ms':>8} {'peak GiB':>8}")
    print("-" * (len(header) + 25))
    for key, per_algo in (evaluation.get("temperatures") or {}).items():
        for a, f in per_algo.items():
            d = f["tau_domains"]
            s = steps.get(a, {})
            print(f"{a:7} {key[2:]:>3} {_fmt(f['tau_macro']):>5} {_fmt(d['math']):>5} {_fmt(d['code']):>5} "
                  f"{_fmt(d['chat']):>5} {_fmt(f['speedup_macro']):>7} {_fmt(f['greedy_match']):>6} "
                  f"{_fmt(train.get(a, {}).get('loss_last_10pct'), '.3f'):>6} "
                  f"{_fmt(None if 'step_s' not in s else 1000 * s['step_s'], '.0f'):>8} "
                  f"{_fmt(s.get('peak_gib'), '.1f'):>8}")  # fmt: skip
    if not evaluation:
        for a, s in steps.items():
            print(f"{a:7} step {_fmt(None if 'step_s' not in s else 1000 * s['step_s'], '.0f')} ms, "
                  f"peak {_fmt(s.get('peak_gib'), '.1f')} GiB")  # fmt: skip
    print(
        "phases: "
        + ", ".join(f"{n} {p['status']} {p.get('wall_s', 0):.0f}s" for n, p in report.phases.items())
    )


def write_report(report: Report, out: Path, mode: str) -> None:
    """The results so far: written after every phase, so a run killed midway still leaves its figures."""
    report.record["import"] = import_record(mode)
    record = {**report.record, "wall_s": elapsed(), "phases": report.phases, "figures": report.figures}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def failures(report: Report) -> list[str]:
    """Failed phases, and failed algorithms inside the phases that go on past one."""
    failed = [n for n, p in report.phases.items() if p["status"] == "failed"]
    per_algo = {"train": report.figures.get("train") or {},
                "step_time": (report.figures.get("step_time") or {}).get("algos") or {}}  # fmt: skip
    for phase, records in per_algo.items():
        failed += [f"{phase}/{a}" for a, r in records.items() if r.get("status") == "failed"]
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return 0
    mode = import_deepspec(args.force_shim)
    say(f"deepspec.models imported ({mode}); device {device}; budget {args.budget_s:.0f} s; out {args.out}")
    report = Report(args.budget_s, base_record(args, device))
    needs_teacher = any(draft_needs_teacher(a) for a in args.algos)
    with tempfile.TemporaryDirectory(prefix="gpu_reference-") as tmp:
        target = report.run("target", lambda: load_target_phase(args, device, report), need_s=0)
        data = drafts = None
        if target is not None:
            data = report.run("data", lambda: data_phase(args, target, needs_teacher, report), need_s=10)
        write_report(report, args.out, mode)
        if data is not None:
            drafts = report.run(
                "train", lambda: train_phase(args, target, data, Path(tmp), report), need_s=20
            )
        else:
            report.skip("train", "needs the target and its data")
        write_report(report, args.out, mode)
        report.run("step_time", lambda: step_time_phase(args, device, report), need_s=15)
        write_report(report, args.out, mode)
        if drafts:
            report.figures["eval"] = report.run(
                "eval", lambda: eval_phase(args, target, drafts, report), need_s=15
            )
        else:
            report.skip("eval", "needs trained drafts")
    write_report(report, args.out, mode)
    say(f"results written to {args.out}")
    print_table(report)
    failed = failures(report)
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
