"""Stage `evaluate`: lossless speculative decoding on the benchmarks, acceptance and measured speedup.

    deepspec evaluate                                              # the built-in prompts (a smoke test)
    deepspec evaluate eval.data_dir=../shared/assets/eval eval.max_samples=20 eval.temperature=0.0
    deepspec evaluate eval=upstream eval.data_dir=../shared/assets/eval   # upstream's protocol (GPU-sized)

Each benchmark is `<eval.data_dir>/<name>.jsonl`, one `{"turns": [str, ...]}` a line (`deepspec
convert-eval` builds them); only the first turn is answered (`benchmarks.py`), as upstream does, unless
`eval.multi_turn=true`: then every turn is (MT-Bench has two), each with the earlier turns and the
target's own answers to them (its plain decoding) as history, and each turn counts as a generation.
`eval=default` takes the first `eval.max_samples` rows of each file; `eval=upstream` takes upstream's
subsets (per-benchmark `eval.caps`, files longer than their cap shuffled with `eval.shuffle_seed`) at
T = 1 and 2,048 tokens.
With `eval.data_dir` unset, a small built-in set (2-3 prompts a benchmark) is used instead,
with a warning and `builtin_eval: true` in the results: its
figures say the pipeline works, not how good the draft is.

For every prompt the draft and target run `speculative_generate` at `eval.temperature`, and the target
alone runs `target_generate` on the same prompt; both are timed. Per benchmark the results give tau
(tokens per target forward, the target's own token included), upstream's #propose, verify_rate and
accept@k, the paper's conditional per-position acceptance (definitions: `acceptance_stats` in
`models/speculative.py`; a round whose kept drafts end the turn is counted up to that token, as upstream
counts it), and the speedup: speculative tokens per second over plain tokens per second (the wall-clock
ratio when both produce the same tokens, as at temperature 0). Per domain (`eval.domains`) and over all
benchmarks (`macro`) they are unweighted means of the benchmarks' figures; `pooled` pools every round
(a micro average). A draft with a confidence head (DSpark) also gets the head's c_k per position against
what verification kept, and `eval.confidence_threshold` > 0 stops each round where the head says so
(a config error for a draft without one). At temperature 0
`greedy_match` is the fraction of prompts whose speculative output equals the plain one, which
losslessness makes 1 up to floating-point ties.

Then, unless `eval.serving.concurrency` is empty, `serving_figures`: the target's verify steps a second
measured against the tokens a step verifies, and the rounds replayed at each concurrency for plain
decoding, each fixed draft length and (with a confidence head) DSpark's prefix scheduler.

The draft is the one the train stage wrote, DFlash, Eagle3 or DSpark, as its saved `config.json`
names it (`models.drafts.load_draft`); it must be of `algo.name`. Eagle3 also reads the context's token
ids and DSpark samples its own chain at temperatures above 0 (`models/speculative.py`).

Output: `<run_dir>/eval/<algo>/results.json`, `prompts.jsonl` (one line per prompt: benchmark, row, tokens,
and P, A, C of every round, for confidence intervals), `report.md` and a self-contained `report.html`
(tables and charts, `report.py`; all four are MLflow artifacts under `eval/`, and the tables a markdown
artifact on the Prefect flow run), then `_DONE.json` with the hash of the target,
algo and eval config and of the draft weights file; a re-run with both unchanged skips the stage.
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

from deepspec.models import calibration
from deepspec.models.chat import end_of_turn_ids, render_prompt
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.prefix_scheduler import measure_step_profile, serving_sweep
from deepspec.models.speculative import (
    Drafter,
    SpecResult,
    acceptance_stats,
    confidence_rounds,
    draft_seconds_per_round,
    recorded_rounds,
    speculative_generate,
    target_generate,
)
from deepspec.models.target import input_embeddings, load_target, output_head
from deepspec.tasks import artifacts, tracking
from deepspec.tasks.config import config_hash
from deepspec.tasks.evaluate import report
from deepspec.tasks.evaluate.benchmarks import BUILTIN, benchmark_cap, load_benchmark, select_prompts
from deepspec.tasks.files import atomic_write_text, mark_done, read_done, read_jsonl, sha256_file
from deepspec.tasks.paths import rendering, run_paths
from deepspec.tasks.results import (
    BenchmarkFigures,
    ConfidenceFigures,
    EvalResult,
    MacroFigures,
    ServingFigures,
    to_record,
)
from deepspec.tasks.train.stage import trained_draft

log = logging.getLogger(__name__)

RESULTS_FILE = report.RESULTS_FILE  # report.py finds results by this name
PROMPTS_FILE = "prompts.jsonl"
STS_FILE = "sts.json"  # beside the draft: Sequential Temperature Scaling fitted on held-out prompts


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


def greedy_match_note(dtype: torch.dtype, greedy: bool) -> str | None:
    """Why greedy_match can read below 1 though decoding is lossless, for a target not in float32."""
    if not greedy or dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"target verified in {name}: a multi-token verify forward and a one-token forward round "
        "differently, so near-ties can flip the argmax; greedy_match below 1 comes from that rounding, "
        "not from the acceptance rule (eval.target_dtype=float32 verifies in float32)"
    )


def _figures(results: list[SpecResult], plain: list[list[int]], spec_s: float, plain_s: float, greedy: bool):
    stats = acceptance_stats(results)
    plain_tokens = sum(len(t) for t in plain)
    spec_rate = stats["tokens"] / spec_s if spec_s > 0 else 0.0
    plain_rate = plain_tokens / plain_s if plain_s > 0 else 0.0
    matches = sum(r.tokens == t for r, t in zip(results, plain, strict=True))
    confidence = stats["confidence"]
    return BenchmarkFigures(
        samples=stats["samples"],
        new_tokens=stats["tokens"],
        target_new_tokens=plain_tokens,
        verify_steps=stats["steps"],
        tau=stats["tau"],
        propose=stats["propose"],
        verify_rate=stats["verify_rate"],
        accept_at=stats["accept_at"],
        conditional_acceptance=stats["conditional"],
        acceptance=stats["acceptance"],
        stopped_early=stats["stopped_early"],
        confidence=None if confidence is None else ConfidenceFigures(**confidence),
        spec_time_s=spec_s,
        target_time_s=plain_s,
        spec_tokens_per_s=spec_rate,
        target_tokens_per_s=plain_rate,
        speedup=spec_rate / plain_rate if plain_rate > 0 else None,
        greedy_match=matches / len(results) if greedy and results else None,
    )


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def macro_figures(per_bench: dict[str, BenchmarkFigures], names: list[str]) -> MacroFigures:
    """Each figure's unweighted mean over the benchmarks `names` (those without the figure left out)."""
    figures = [per_bench[n] for n in names]
    positions = max((len(f.accept_at) for f in figures), default=0)

    def per_position(key: str) -> list[float | None]:
        return [
            _mean([getattr(f, key)[k] for f in figures if k < len(getattr(f, key))]) for k in range(positions)
        ]

    return MacroFigures(
        benchmarks=list(names),
        tau=_mean([f.tau for f in figures]),
        propose=_mean([f.propose for f in figures]),
        verify_rate=_mean([f.verify_rate for f in figures]),
        speedup=_mean([f.speedup for f in figures]),
        accept_at=per_position("accept_at"),
        conditional_acceptance=per_position("conditional_acceptance"),
    )


def _prompt_record(
    name: str, index: int, row: int, seed: int, spec: SpecResult, plain: list[int], times: tuple, greedy: bool
) -> dict:
    """One line of prompts.jsonl: enough to recompute every figure per prompt (confidence intervals)."""
    return {
        "benchmark": name,
        "index": index,  # position among the benchmark's evaluated prompts
        "row": row,  # 0-based row of <benchmark>.jsonl (blank lines not counted)
        "seed": seed,
        "new_tokens": len(spec.tokens),
        "target_new_tokens": len(plain),
        "rounds": len(spec.accepted),
        "proposed": spec.proposed,
        "accepted": spec.accepted,
        "committed": spec.committed,
        "stopped_early": spec.stopped_early,
        "confidence": spec.confidence if any(spec.confidence) else None,  # c_k of each round's drafts
        "spec_time_s": times[0],
        "target_time_s": times[1],
        "greedy_match": spec.tokens == plain if greedy else None,
    }


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
    draft is evaluated again). Without them, the draft that the train stage of this run wrote, the one
    `export.draft` names (`train.stage.trained_draft`: the best validated, or the last).
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
    caps, shuffle_seed = dict(cfg.eval.caps), cfg.eval.shuffle_seed
    prompts = {
        name: select_prompts(
            load_benchmark(name, cfg.eval.data_dir),
            benchmark_cap(name, cfg.eval.max_samples, caps),
            shuffle_seed,
        )
        for name in benchmarks
    }

    dtype = cfg.eval.target_dtype or cfg.target.dtype  # float32: greedy_match 1 on a bf16 target
    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    if default_draft:
        from deepspec.models.drafts import load_draft

        embed, head = input_embeddings(model).weight, output_head(model).weight
        drafter = load_draft(Path(draft_file).parent, embed, head)  # on the head's device
    else:
        drafter = draft_loader()
    if cfg.eval.num_draft_tokens is not None:
        from deepspec.models.drafts import set_num_draft_tokens

        set_num_draft_tokens(drafter, cfg.eval.num_draft_tokens, "eval.num_draft_tokens")
    layer_ids = list(cfg.target.layer_ids)
    eos = stop_token_ids(cfg, tokenizer)
    temperature = float(cfg.eval.temperature)
    greedy = temperature == 0
    decode = {"max_new_tokens": cfg.eval.max_new_tokens, "temperature": temperature, "eos_token_ids": eos}
    threshold = float(cfg.eval.confidence_threshold)
    if threshold > 0 and getattr(drafter, "confidence_head", None) is None:
        raise ConfigError(
            f"eval.confidence_threshold={threshold}: the {cfg.algo.name} draft at {draft_file} has no "
            "confidence head to stop drafting with; set eval.confidence_threshold=0"
        )

    def ids_of(messages: list[dict]) -> list[int]:
        return render_prompt(tokenizer, messages, **rendering(cfg))

    sts = None
    if cfg.eval.calibration_prompts > 0:
        sts = fit_heldout_sts(cfg, model, tokenizer, drafter, Path(draft_file).parent, decode)

    # one untimed run of each, so lazy initialisation does not count against the first benchmark
    warm = ids_of([{"role": "user", "content": next(iter(prompts.values()))[0][1][0]}])
    speculative_generate(
        model, layer_ids, drafter, warm, **{**decode, "max_new_tokens": 2}, confidence_threshold=threshold
    )
    target_generate(model, layer_ids, warm, **{**decode, "max_new_tokens": 2})

    per_bench: dict[str, BenchmarkFigures] = {}
    pooled: dict[str, list] = {"spec": [], "plain": [], "spec_s": [], "plain_s": []}
    records: list[dict] = []
    index = 0  # generations so far: each has its own sampling seed
    for name, rows in prompts.items():
        spec, plain, spec_s, plain_s = [], [], 0.0, 0.0
        for position, (row, turns) in enumerate(tqdm(rows, desc=f"eval {name}", unit="prompt")):
            history: list[dict] = []
            for turn, text in enumerate(turns if cfg.eval.multi_turn else turns[:1]):
                history.append({"role": "user", "content": text})
                ids = ids_of(history)
                seed = cfg.eval.seed * 1_000_003 + index
                index += 1
                start = time.perf_counter()
                spec.append(
                    speculative_generate(
                        model, layer_ids, drafter, ids, **decode,
                        generator=torch.Generator().manual_seed(seed), confidence_threshold=threshold,
                    )
                )  # fmt: skip
                spec_elapsed = time.perf_counter() - start
                start = time.perf_counter()
                plain.append(
                    target_generate(
                        model, layer_ids, ids, **decode, generator=torch.Generator().manual_seed(seed)
                    )
                )
                plain_elapsed = time.perf_counter() - start
                spec_s, plain_s = spec_s + spec_elapsed, plain_s + plain_elapsed
                records.append(
                    _prompt_record(
                        name, position, row, seed, spec[-1], plain[-1], (spec_elapsed, plain_elapsed), greedy
                    )
                    | {"turn": turn}
                )
                # the next turn's history holds the target's own answer (its plain decoding)
                answer = tokenizer.decode(plain[-1], skip_special_tokens=True)
                history.append({"role": "assistant", "content": answer})
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
    if sts is not None and overall.confidence is not None:  # held-out temperatures on the benchmarks' rounds
        rounds = confidence_rounds(pooled["spec"])
        sts["prefix_ece"] = calibration.prefix_ece(rounds, drafter.num_draft_tokens, sts["temperatures"])
        overall.confidence.sts_heldout = sts
    serving = serving_figures(cfg, model, pooled["spec"], overall.confidence)
    domains = {
        domain: macro_figures(per_bench, [n for n in names if n in per_bench])
        for domain, names in cfg.eval.domains.items()
        if any(n in per_bench for n in names)
    }
    macro = macro_figures(per_bench, list(per_bench))
    prompts_path = stage / PROMPTS_FILE
    atomic_write_text(prompts_path, "".join(json.dumps(r) + "\n" for r in records))

    result = EvalResult(
        builtin_eval=builtin,
        data_dir=cfg.eval.data_dir,
        target=str(cfg.target.name),
        algo=str(cfg.algo.name),
        num_draft_tokens=int(drafter.num_draft_tokens),
        temperature=temperature,
        max_new_tokens=int(cfg.eval.max_new_tokens),
        seed=int(cfg.eval.seed),
        shuffle_seed=None if shuffle_seed is None else int(shuffle_seed),
        confidence_threshold=threshold,
        greedy_match_note=greedy_match_note(model.dtype, greedy),
        draft_file=str(draft_file),
        draft_sha256=draft_sha,
        prompts_file=str(prompts_path),
        benchmarks=per_bench,
        domains=domains,
        macro=macro,
        pooled=overall,
        serving=serving,
    )
    atomic_write_text(results_path, json.dumps(to_record(result), indent=2))
    tracking.log_metrics(cfg, eval_metrics(result))
    for concurrency, metrics in serving_metrics(result.serving).items():  # MLflow plots them by step
        tracking.log_metrics(cfg, metrics, step=concurrency)
    for path in [results_path, prompts_path, *report.write_reports(result, stage)]:
        tracking.log_artifact(cfg, path, "eval")
    mark_done(stage, done_hash, results=RESULTS_FILE, draft_sha256=draft_sha, benchmarks=benchmarks)
    return result


def serving_figures(
    cfg: DictConfig, model, results: list[SpecResult], confidence: ConfidenceFigures | None
) -> ServingFigures | None:
    """Throughput against concurrency (`eval.serving`): the target's steps a second measured here, then
    the evaluation's rounds replayed at each concurrency (`prefix_scheduler.serving_sweep`). The
    scheduler's survivals use the held-out STS temperatures when fitted, else those of these rounds."""
    settings = cfg.eval.serving
    rounds = recorded_rounds(results)
    if not settings.concurrency or not rounds:
        return None
    profile = measure_step_profile(
        model, list(cfg.target.layer_ids), settings.profile_context, list(settings.profile_tokens)
    )
    temperatures, source = None, None
    if confidence is not None:
        heldout = confidence.sts_heldout
        temperatures = (heldout["temperatures"] if heldout else confidence.sts_temperatures) or None
        source = "held-out prompts" if heldout else "these rounds (in-sample)"
    draft_s = draft_seconds_per_round(results)
    rows = serving_sweep(
        rounds, profile, list(settings.concurrency), draft_s=draft_s, steps=settings.steps,
        temperatures=temperatures,
    )  # fmt: skip
    log.info("evaluate: serving simulated at concurrency %s", list(settings.concurrency))
    return ServingFigures(
        profile_context=profile.context, profile_tokens=profile.tokens,
        profile_steps_per_s=profile.steps_per_s, draft_s=draft_s, steps=int(settings.steps),
        temperatures=temperatures, temperatures_from=source, rows=rows,
    )  # fmt: skip


def fit_heldout_sts(cfg: DictConfig, model, tokenizer, drafter, draft_dir: Path, decode: dict) -> dict:
    """Sequential Temperature Scaling of a DSpark draft's confidence head, fitted on the rounds of greedy
    decoding of `eval.calibration_prompts` held-out prompts (the prompts stage's heldout.jsonl, first
    user turn), saved beside the draft as `sts.json` (the export stage carries it along)."""
    if getattr(drafter, "confidence_head", None) is None:
        raise ConfigError(
            f"eval.calibration_prompts={cfg.eval.calibration_prompts}: the {cfg.algo.name} draft has no "
            "confidence head to calibrate; set eval.calibration_prompts=0"
        )
    path = run_paths(cfg).heldout
    if not path.is_file():
        raise DeepSpecError(
            f"eval.calibration_prompts: {path} does not exist; run `deepspec prompts` (with "
            "prompts.heldout_fraction > 0) first, or set eval.calibration_prompts=0"
        )
    rows = [row for _, row in read_jsonl(path)][: cfg.eval.calibration_prompts]
    rounds = []
    for row in tqdm(rows, desc="calibrate", unit="prompt"):
        first = next(t for t in row["conversations"] if t["role"] == "user")
        ids = render_prompt(tokenizer, [first], **rendering(cfg))
        result = speculative_generate(
            model, list(cfg.target.layer_ids), drafter, ids, **{**decode, "temperature": 0.0}
        )
        rounds += confidence_rounds([result])
    sts = {
        "temperatures": calibration.fit_sts(rounds, int(drafter.num_draft_tokens)),
        "prompts": len(rows),
        "rounds": len(rounds),
        "heldout": str(path),
    }
    atomic_write_text(draft_dir / STS_FILE, json.dumps(sts, indent=2))
    log.info("evaluate: STS temperatures %s from %d held-out rounds -> %s", sts["temperatures"],
             len(rounds), draft_dir / STS_FILE)  # fmt: skip
    return sts


def eval_metrics(result: EvalResult) -> dict[str, float]:
    """MLflow metrics: eval/<benchmark|pooled|macro|domain_<name>>/<figure>; positions k are 0-based."""
    metrics: dict[str, float] = {}
    groups: list[tuple[str, BenchmarkFigures | MacroFigures]] = [
        *result.benchmarks.items(),
        ("pooled", result.pooled),
        ("macro", result.macro),
        *((f"domain_{d}", f) for d, f in result.domains.items()),
    ]
    for name, figures in groups:
        for key in ("tau", "propose", "verify_rate", "speedup", "greedy_match", "stopped_early"):
            value = getattr(figures, key, None)
            if value is not None:
                metrics[f"eval/{name}/{key}"] = float(value)
        for key, label in (("accept_at", "accept_at"), ("conditional_acceptance", "cond_accept")):
            for k, rate in enumerate(getattr(figures, key)):
                if rate is not None:
                    metrics[f"eval/{name}/{label}_{k}"] = rate
        confidence = getattr(figures, "confidence", None)
        if confidence is not None:
            keys = ("mean", "predicted_prefix", "observed_prefix", "conditional_ece", "conditional_auroc",
                    "prefix_ece", "prefix_ece_sts")  # fmt: skip
            for key in keys:
                for k, value in enumerate(getattr(confidence, key) or []):
                    if value is not None:
                        metrics[f"eval/{name}/confidence_{key}_{k}"] = value
    return metrics


def serving_metrics(serving: ServingFigures | None) -> dict[int, dict[str, float]]:
    """MLflow metrics of the serving simulation, keyed by concurrency (their step):
    eval/serving/{plain,best,scheduler}_tokens_per_s and best_over_plain (best: over every policy)."""
    out: dict[int, dict[str, float]] = {}
    for row in serving.rows if serving is not None else []:
        rates = {"plain": row["fixed"][0]["tokens_per_s"], "best": ServingFigures.best(row)[1]}
        if row["scheduler"]:
            rates["scheduler"] = row["scheduler"]["tokens_per_s"]
        metrics = {f"eval/serving/{name}_tokens_per_s": rate for name, rate in rates.items()}
        ratio = ServingFigures.best_over_plain(row)
        if ratio is not None:
            metrics["eval/serving/best_over_plain"] = ratio
        out[int(row["concurrency"])] = metrics
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _where(cfg: DictConfig) -> str:
    """Where the full report is: beside the results, and in the MLflow run's artifacts (`eval/`)."""
    reports = run_paths(cfg).eval_dir.resolve()
    where = f"Report: `{reports / 'report.html'}` and `report.md` (also in MLflow's `eval/`)"
    return f"{where}\n\n{artifacts.mlflow_line(cfg)}"


@task(name="evaluate", cache_policy=NO_CACHE)  # stages validate their own outputs
def evaluate_task(cfg: DictConfig) -> EvalResult:
    """The stage, plus its tables as a markdown artifact on the flow run's page in the Prefect UI
    (`evaluation-<algo>`: the UI's "latest" of a key is the newest run's)."""
    result = evaluate(cfg)
    artifacts.publish(
        cfg, "evaluation", result, markdown=f"{report.markdown_report(result)}\n\n{_where(cfg)}\n",
        description=f"{result.algo} on {result.target}: tau and speedup per benchmark",
    )  # fmt: skip
    return result
