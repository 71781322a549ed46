"""Stage `evaluate`: lossless speculative decoding on the benchmarks, acceptance and measured speedup.

    deepspec evaluate                                              # the built-in prompts (a smoke test)
    deepspec evaluate eval.data_dir=../shared/assets/eval eval.max_samples=20 eval.temperature=0.0

Each benchmark is `<eval.data_dir>/<name>.jsonl`, one `{"turns": [str, ...]}` a line; only the first turn
is answered (`benchmarks.py`). With `eval.data_dir` unset, a small built-in set (2-3 prompts a
benchmark) is used instead, with a warning and `builtin_eval: true` in the results: its
figures say the pipeline works, not how good the draft is.

For every prompt the draft and target run `speculative_generate` at `eval.temperature`, and the target
alone runs `target_generate` on the same prompt; both are timed. Per benchmark and overall, the results
give tau (mean tokens per target forward in speculative decoding, the target's own token included),
the per-position acceptance rate, and the speedup: speculative tokens per second over plain tokens per
second (the wall-clock ratio when both produce the same tokens, as at temperature 0). At temperature 0
`greedy_match` is the fraction of prompts whose speculative output equals the plain one, which
losslessness makes 1 up to floating-point ties.

The draft is the one the train stage wrote, DFlash, Eagle3 or DSpark, as its saved `config.json`
names it (`models.drafts.load_draft`); it must be of `algo.name`. Eagle3 also reads the context's token
ids and DSpark samples its own chain at temperatures above 0 (`models/speculative.py`).

Output: `<run_dir>/eval/<algo>/results.json`, then `_DONE.json` with the hash of the target, algo and eval
config and of the draft weights file; a re-run with both unchanged skips the stage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from deepspec.models.chat import end_of_turn_ids, render_prompt
from deepspec.models.errors import DeepSpecError
from deepspec.models.speculative import (
    Drafter,
    SpecResult,
    acceptance_stats,
    speculative_generate,
    target_generate,
)
from deepspec.models.target import input_embeddings, load_target, output_head
from deepspec.tasks import tracking
from deepspec.tasks.config import config_hash
from deepspec.tasks.evaluate.benchmarks import BUILTIN, load_benchmark
from deepspec.tasks.files import atomic_write_text, mark_done, read_done, sha256_file
from deepspec.tasks.paths import rendering, run_paths
from deepspec.tasks.results import BenchmarkFigures, EvalResult, to_record
from deepspec.tasks.train.stage import trained_draft

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def stop_token_ids(cfg: DictConfig, tokenizer) -> set[int]:
    """eos, `<|im_end|>` when the vocabulary has it, and the token the chat template ends a turn with."""
    ids = set(
        end_of_turn_ids(
            tokenizer,
            use_chat_template=cfg.target.use_chat_template,
            chat_template_kwargs=dict(cfg.target.chat_template_kwargs),
        )
    )
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(int(im_end))
    return ids


def _figures(results: list[SpecResult], plain: list[list[int]], spec_s: float, plain_s: float, greedy: bool):
    stats = acceptance_stats(results)
    plain_tokens = sum(len(t) for t in plain)
    spec_rate = stats["tokens"] / spec_s if spec_s > 0 else 0.0
    plain_rate = plain_tokens / plain_s if plain_s > 0 else 0.0
    matches = sum(r.tokens == t for r, t in zip(results, plain, strict=True))
    return BenchmarkFigures(
        samples=stats["samples"],
        new_tokens=stats["tokens"],
        target_new_tokens=plain_tokens,
        verify_steps=stats["steps"],
        tau=stats["tau"],
        acceptance=stats["acceptance"],
        spec_time_s=spec_s,
        target_time_s=plain_s,
        spec_tokens_per_s=spec_rate,
        target_tokens_per_s=plain_rate,
        speedup=spec_rate / plain_rate if plain_rate > 0 else None,
        greedy_match=matches / len(results) if greedy and results else None,
    )


def _valid_results(path: Path, benchmarks: list[str]) -> EvalResult | None:
    try:
        result = EvalResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, or not the fields we write
        return None
    return result if sorted(result.benchmarks) == sorted(benchmarks) else None


def evaluate(
    cfg: DictConfig,
    draft_loader: Callable[[], Drafter] | None = None,
    draft_file: str | Path | None = None,
) -> EvalResult:
    """Run the benchmarks with speculative and plain decoding; write and return the results.

    `draft_loader()` returns the draft to evaluate and `draft_file` is its weights file (hashed, so a new
    draft is evaluated again). Without them, the draft that the train stage of this run wrote.
    """
    default_draft = draft_loader is None
    if default_draft:
        draft_file = trained_draft(cfg, "evaluate")
    elif draft_file is None:
        raise DeepSpecError("evaluate: a draft_loader needs the draft_file it loads, to tell drafts apart")
    draft_sha = sha256_file(draft_file)
    stage = run_paths(cfg).eval_dir
    results_path = stage / RESULTS_FILE
    benchmarks = list(cfg.eval.benchmarks)
    done_hash = config_hash(cfg.target, cfg.algo, cfg.eval, {"draft_sha256": draft_sha})
    if read_done(stage, done_hash) is not None:
        results = _valid_results(results_path, benchmarks)
        if results is not None:
            log.info("evaluate: %s is up to date; skipping", results_path)
            results.skipped = True
            return results
        log.warning("evaluate: %s is missing or incomplete; evaluating again", results_path)

    builtin = cfg.eval.data_dir is None
    if builtin:
        log.warning(
            "eval.data_dir is not set: using the small built-in prompt set %s (2-3 prompts a benchmark); "
            "its figures only show that evaluation works. Set eval.data_dir to a folder of "
            "<benchmark>.jsonl files for real numbers.",
            BUILTIN,
        )
    prompts = {name: load_benchmark(name, cfg.eval.data_dir)[: cfg.eval.max_samples] for name in benchmarks}

    model, tokenizer = load_target(
        cfg.target.path, cfg.target.gguf_file, cfg.target.revision, cfg.target.dtype
    )
    if torch.cuda.is_available():
        model.to("cuda")
    if default_draft:
        from deepspec.models.drafts import load_draft

        embed, head = input_embeddings(model).weight, output_head(model).weight
        drafter = load_draft(Path(draft_file).parent, embed, head).to(model.device)
    else:
        drafter = draft_loader()
    layer_ids = list(cfg.target.layer_ids)
    eos = stop_token_ids(cfg, tokenizer)
    temperature = float(cfg.eval.temperature)
    greedy = temperature == 0
    decode = {"max_new_tokens": cfg.eval.max_new_tokens, "temperature": temperature, "eos_token_ids": eos}

    def ids_of(turns: list[str]) -> list[int]:
        return render_prompt(tokenizer, [{"role": "user", "content": turns[0]}], **rendering(cfg))

    # one untimed run of each, so lazy initialisation does not count against the first benchmark
    warm = ids_of(next(iter(prompts.values()))[0])
    speculative_generate(model, layer_ids, drafter, warm, **{**decode, "max_new_tokens": 2})
    target_generate(model, layer_ids, warm, **{**decode, "max_new_tokens": 2})

    per_bench: dict[str, BenchmarkFigures] = {}
    pooled: dict[str, list] = {"spec": [], "plain": [], "spec_s": [], "plain_s": []}
    index = 0
    for name, rows in prompts.items():
        spec, plain, spec_s, plain_s = [], [], 0.0, 0.0
        for turns in tqdm(rows, desc=f"eval {name}", unit="prompt"):
            ids = ids_of(turns)
            seed = cfg.eval.seed * 1_000_003 + index
            index += 1
            start = time.perf_counter()
            spec.append(
                speculative_generate(
                    model, layer_ids, drafter, ids, **decode, generator=torch.Generator().manual_seed(seed)
                )
            )
            spec_s += time.perf_counter() - start
            start = time.perf_counter()
            plain.append(
                target_generate(
                    model, layer_ids, ids, **decode, generator=torch.Generator().manual_seed(seed)
                )
            )
            plain_s += time.perf_counter() - start
        per_bench[name] = _figures(spec, plain, spec_s, plain_s, greedy)
        pooled["spec"] += spec
        pooled["plain"] += plain
        pooled["spec_s"].append(spec_s)
        pooled["plain_s"].append(plain_s)
        figures = per_bench[name]
        log.info(
            "eval %s: tau %s, speedup %s over %d prompts",
            name,
            _fmt(figures.tau),
            _fmt(figures.speedup),
            len(rows),
        )
    overall = _figures(pooled["spec"], pooled["plain"], sum(pooled["spec_s"]), sum(pooled["plain_s"]), greedy)

    result = EvalResult(
        builtin_eval=builtin,
        data_dir=cfg.eval.data_dir,
        target=str(cfg.target.name),
        algo=str(cfg.algo.name),
        num_draft_tokens=int(drafter.num_draft_tokens),
        temperature=temperature,
        max_new_tokens=int(cfg.eval.max_new_tokens),
        seed=int(cfg.eval.seed),
        draft_file=str(draft_file),
        draft_sha256=draft_sha,
        benchmarks=per_bench,
        overall=overall,
    )
    atomic_write_text(results_path, json.dumps(to_record(result), indent=2))
    metrics: dict[str, float] = {}
    for name, figures in [*per_bench.items(), ("overall", overall)]:
        for key in ("tau", "speedup", "greedy_match"):
            if getattr(figures, key) is not None:
                metrics[f"eval/{name}/{key}"] = getattr(figures, key)
        for k, rate in enumerate(figures.acceptance, start=1):
            metrics[f"eval/{name}/accept_{k}"] = rate
    tracking.log_metrics(cfg, metrics)
    mark_done(stage, done_hash, results=RESULTS_FILE, draft_sha256=draft_sha, benchmarks=benchmarks)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@task(name="evaluate", cache_policy=NO_CACHE)  # stages validate their own outputs
def evaluate_task(cfg: DictConfig) -> EvalResult:
    return evaluate(cfg)
