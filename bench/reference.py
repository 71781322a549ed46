"""The reference benchmark: Eagle3, DFlash and DSpark drafts of one target, trained the same way on the same
answers, their accepted length (tau) per benchmark, domain and macro at T = 0 and T = 1 with the
seed-to-seed noise, and their wall-clock speedup over plain decoding and over transformers' `generate`
(plain and prompt lookup) on the same prompts and machine.

    # the README's Results: ~1.5 h and ~2 h on 2 cores shared with other runs
    .venv/bin/python bench/reference.py --target stories260k --scaling 120 240 \
        --eval-prompts 5 --eval-tokens 96 --sampled-seeds 1
    .venv/bin/python bench/reference.py --target smollm2 --answers 600 --eval-prompts 2 --eval-tokens 64 \
        --sampled-seeds 1
    # a two-minute check of the whole path
    .venv/bin/python bench/reference.py --target stories260k --answers 48 --seeds 1 --epochs 1 \
        --eval-prompts 1 --eval-tokens 16 --scaling 24 --work /tmp/ref_smoke

A bench, not a `deepspec` subcommand: it compares algorithms and outside baselines and writes its figures
with the command, commit and machine under bench/results/, which is what `bench/` is for; every step is
still the pipeline's own stage, run as `deepspec pipeline` runs it.

1. Data, shared by every draft: the prompts stage, then the regenerate stage, then the cache stage (bf16),
   all in `<work>/data`. stories260k answers story openings in its own words (written first, as the cache
   benches do) with its preset's sampling (T = 1). SmolLM2-135M-Instruct takes the answers it already
   wrote with its preset's sampling, `../shared/assets/regen/smollm2_135m_instruct.jsonl` (`regen=file`),
   all of them or the first `--answers` distinct prompts.
2. Training: every algorithm x `--seeds` training seeds through the train stage (torchrun + DeepSpeed),
   `--parallel` runs at a time, one thread each, with one budget: the same epochs over the same samples
   (so the same optimizer steps), global batch, learning-rate schedule and anchors a sequence; 7 drafts a
   round (DFlash blocks of 8 slots, whose anchor slot drafts nothing; DSpark blocks of 7; Eagle3 7 test
   steps). CPU-sized drafts: `--layers` decoder layers (1).
3. Evaluation: the evaluate stage with the upstream protocol preset (`eval=upstream`: upstream's prompt
   selection of each of the nine benchmarks), capped for a CPU at `--eval-prompts` prompts a benchmark and
   `--eval-tokens` new tokens, at each of `--temperatures`. Each evaluation times speculative and plain
   decoding prompt by prompt in one process.
4. Baselines on the same prompts, in a process of their own: transformers' `generate` greedy, plain and
   with prompt lookup (`prompt_lookup_num_tokens`), whose outputs must be equal (the check is printed).
5. `--scaling N ...`: the `--scaling-algo` draft (seed 0) trained again on the first N answers with the
   same epochs, for tau against data size.

Stopped, it resumes: the stages skip what they finished, and finished evaluations and baselines are kept
in `<work>/done/`. `--fresh` starts over. The tables go to stdout, progress to stderr, and every figure,
with the wall time of each stage, to bench/results/reference-<target>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from common import ASSETS, REPO, SMOLLM2_DIR, begin, output_to, say, write_openings, write_results

ALGOS = ("eagle3", "dflash", "dspark")  # the paper's Table 1 order
SHARED_ANSWERS = ASSETS / "regen" / "smollm2_135m_instruct.jsonl"
EVAL_DIR = ASSETS / "eval"
PROMPT_LOOKUP_TOKENS = 10  # transformers' candidate length for prompt lookup (its documented example)


@dataclass(frozen=True)
class Reference:
    """A target's data and training settings; the draft's size and budget come from the options."""

    overrides: list[str]
    openings: int  # stories260k: openings it writes itself; 0: the shared SmolLM2 answers
    lr: float
    epochs: int
    global_batch: int
    micro_batch: int
    anchors: int
    eagle3_vocab: int | None  # Eagle3's draft vocabulary (d2t): its head is most of a CPU step


REFERENCES = {
    "stories260k": Reference(
        overrides=[
            "target=stories260k",
            f"target.path={ASSETS / 'models' / 'stories260k'}",
            "regen.batch_size=64",
            "storage.samples_per_shard=64",
        ],
        openings=480,
        lr=1.0e-2,
        epochs=24,
        global_batch=8,
        micro_batch=4,
        anchors=32,
        eagle3_vocab=None,  # 512 tokens
    ),
    "smollm2": Reference(
        overrides=[
            "target=smollm2_135m",
            f"target.path={SMOLLM2_DIR}",
            f"prompts.source={SHARED_ANSWERS}",
            "regen=file",
            f"regen.answers_file={SHARED_ANSWERS}",
            "storage.samples_per_shard=64",
            "storage.max_length=640",  # 512 answer tokens and the prompt: nothing is cut
        ],
        openings=0,
        lr=3.0e-3,
        epochs=1,
        global_batch=8,
        micro_batch=4,
        anchors=32,
        # of 49,152, the share EAGLE-3's Llama-3 drafts keep (32k of 128k): every position and 7 test
        # steps through the full head made an Eagle3 micro-step ~25 s on one thread, 6x DFlash's
        eagle3_vocab=8192,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--target", choices=sorted(REFERENCES), default="stories260k")
    p.add_argument("--answers", type=int, help="smollm2: the first N distinct prompts of the shared answers "
                   "(default: all 3,444); stories260k: openings to write (default 480)")  # fmt: skip
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--seeds", type=int, default=2, help="training seeds per algorithm (default 2)")
    p.add_argument(
        "--layers", type=int, default=1, help="draft decoder layers, DFlash and DSpark (default 1)"
    )
    p.add_argument("--epochs", type=int, help="epochs over the answers (default: the target's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the target's)")
    p.add_argument("--anchors", type=int, help="DFlash/DSpark blocks a sequence (default: the target's)")
    p.add_argument("--eval-prompts", type=int, default=10, help="prompts a benchmark (default 10)")
    p.add_argument("--eval-tokens", type=int, default=128, help="new tokens a prompt (default 128)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sampled-seeds", type=int, help="training seeds evaluated at T > 0 (default: all)")
    p.add_argument(
        "--scaling", type=int, nargs="*", default=[], help="answer counts for the data-scaling line"
    )
    p.add_argument("--scaling-algo", choices=ALGOS, default="dflash")
    p.add_argument("--parallel", type=int, default=2, help="trainings / evaluations at once, a thread each")
    p.add_argument("--work", type=Path, help="working directory (runs/bench/reference/<target>)")
    p.add_argument("--fresh", action="store_true", help="empty the working directory first")
    p.add_argument("--out", type=Path, help="results JSON (bench/results/reference-<target>-<date>.json)")
    p.add_argument(
        "--report", type=Path, metavar="RESULTS", help="print the tables of a results JSON; run nothing"
    )
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------
# Configs


def data_overrides(args: argparse.Namespace, work: Path, answers: int | None) -> list[str]:
    ref = REFERENCES[args.target]
    out = [*ref.overrides, f"data_dir={work / 'data'}"]
    if ref.openings:
        out.append(f"prompts.source={work / 'story_openings.jsonl'}")
    if answers is not None:
        out.append(f"prompts.max_samples={answers}")
    return out


def algo_overrides(args: argparse.Namespace, algo: str) -> list[str]:
    """7 drafts a round for every algorithm; DFlash's anchor slot drafts nothing (see its module)."""
    if algo == "eagle3":
        vocab = REFERENCES[args.target].eagle3_vocab
        return [
            "algo=eagle3",
            "algo.ttt_steps=7",
            f"algo.draft_vocab_size={'null' if vocab is None else vocab}",
        ]
    anchors = args.anchors or REFERENCES[args.target].anchors
    block = 8 if algo == "dflash" else 7
    return [f"algo={algo}", f"algo.num_layers={args.layers}", f"algo.block_size={block}",
            f"algo.anchors_per_sequence={anchors}"]  # fmt: skip


def train_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    ref = REFERENCES[args.target]
    return [
        "train=cpu_demo",
        f"train.epochs={args.epochs or ref.epochs}",
        f"train.lr={args.lr or ref.lr}",
        f"train.global_batch={ref.global_batch}",
        f"train.micro_batch={ref.micro_batch}",
        "train.threads_per_rank=1",
        "train.log_every_steps=10",
        "train.save_every_steps=50",
        f"train.seed={seed}",
    ]


def eval_overrides(args: argparse.Namespace, temperature: float) -> list[str]:
    return [
        "eval=upstream",
        f"eval.data_dir={EVAL_DIR}",
        f"eval.max_samples={args.eval_prompts}",
        f"eval.max_new_tokens={args.eval_tokens}",
        f"eval.temperature={temperature}",
    ]


@dataclass
class Run:
    """One draft: an algorithm, a training seed and the answers it learns from."""

    algo: str
    seed: int
    answers: int | None  # None: the main data
    run_dir: Path
    overrides: list[str]  # data, algo and train overrides, run_dir included

    @property
    def name(self) -> str:
        return f"{self.algo}-s{self.seed}" + (f"-n{self.answers}" if self.answers else "")


def main_answers(args: argparse.Namespace) -> int | None:
    """prompts.max_samples of the main data: stories260k writes exactly its openings, so none."""
    return None if REFERENCES[args.target].openings else args.answers


def make_run(args, work: Path, algo: str, seed: int, answers: int | None = None) -> Run:
    name = f"{algo}-s{seed}" + (f"-n{answers}" if answers else "")
    run_dir = work / "runs" / name
    data = data_overrides(args, work, answers if answers is not None else main_answers(args))
    overrides = [*data, *algo_overrides(args, algo), *train_overrides(args, seed), f"run_dir={run_dir}"]
    return Run(algo, seed, answers, run_dir, overrides)


# ----------------------------------------------------------------------------------------------------
# Stages


def prepare_data(args, work: Path, answers: int | None) -> dict[str, Any]:
    """Prompts, answers and the cache, through the stages; their counts and wall times."""
    from deepspec.tasks.cache.stage import build_cache
    from deepspec.tasks.config import compose
    from deepspec.tasks.prompts import prepare_prompts
    from deepspec.tasks.regenerate.stage import regenerate

    overrides = [*data_overrides(args, work, answers), f"run_dir={work / 'runs' / 'data'}"]
    ref = REFERENCES[args.target]
    openings = work / "story_openings.jsonl"
    if ref.openings and not openings.is_file():
        write_openings(compose(overrides), args.answers or ref.openings, openings)
    cfg = compose(overrides)
    timed: dict[str, float] = {}
    began = time.perf_counter()
    prompts = prepare_prompts(cfg)
    timed["prompts_s"] = time.perf_counter() - began
    say(f"prompts: {prompts.rows} ({cfg.prompts.source})")
    began = time.perf_counter()
    answered = regenerate(cfg)
    timed["regenerate_s"] = time.perf_counter() - began
    say(f"answers: {answered.rows}, {answered.output_tokens:,} tokens (backend {answered.backend})")
    began = time.perf_counter()
    cache = build_cache(cfg)
    timed["cache_s"] = time.perf_counter() - began
    for key, skipped in (("prompts_s", prompts.skipped), ("regenerate_s", answered.skipped),
                         ("cache_s", cache.skipped)):  # fmt: skip
        timed[key] = kept_time(work / "done" / f"{key}-{answers}.json", None if skipped else timed[key])
    say(f"cache: {cache.samples} samples, {cache.tokens:,} tokens ({timed['cache_s'] or 0:.0f}s)")
    return {
        "prompts": prompts.rows, "answers": answered.rows, "answer_tokens": answered.output_tokens,
        "cache_samples": cache.samples, "cache_tokens": cache.tokens,
        **timed,
    }  # fmt: skip


def train_run(run: Run) -> dict[str, Any]:
    """The train stage for one draft; its steps, time, final metrics and loss curve (from MLflow)."""
    from deepspec.tasks.config import compose
    from deepspec.tasks.train.stage import train

    cfg = compose(run.overrides)
    began = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - began
    say(f"trained {run.name}: {result.optimizer_steps} steps in {seconds:.0f}s"
        + (" (already trained)" if result.skipped else ""))  # fmt: skip
    return {
        "steps": result.optimizer_steps,
        "train_s": kept_time(run.run_dir / "train_s.json", None if result.skipped else seconds),
        "final": result.final_metrics,
        "curve": loss_curve(cfg),
    }


def kept_time(path: Path, seconds: float | None) -> float | None:
    """`seconds` measured now, written to `path`; or, for work an earlier run did (None), its time."""
    if seconds is not None:
        path.write_text(json.dumps(seconds))
        return seconds
    return json.loads(path.read_text()) if path.is_file() else None


def loss_curve(cfg) -> dict[str, list[list[float]]]:
    """[step, value] of the logged training loss and expected tau, read back from the run's MLflow."""
    from mlflow.tracking import MlflowClient

    from deepspec.tasks import tracking

    client = MlflowClient(tracking.tracking_uri(cfg))
    run_id = tracking.run_id(cfg)
    return {
        key: [[m.step, m.value] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("train/loss", "train/expected_tau")
    }


def evaluation_dir(run: Run, temperature: float) -> Path:
    """A run folder per temperature whose `train` is the draft's: evaluations at two temperatures of one
    draft run side by side without sharing an output folder."""
    folder = run.run_dir / f"eval-t{temperature:g}"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "train"
    if not link.exists():
        link.symlink_to(run.run_dir / "train", target_is_directory=True)
    return folder


def evaluate_worker(overrides: list[str]) -> dict[str, Any]:
    """The evaluate stage in a process of its own, one torch thread (a spawned worker)."""
    import torch

    torch.set_num_threads(1)
    from deepspec.tasks.config import compose
    from deepspec.tasks.evaluate.stage import evaluate
    from deepspec.tasks.results import to_record

    began = time.perf_counter()
    result = evaluate(compose(overrides))
    return {"eval_s": time.perf_counter() - began, "result": to_record(result)}


def baselines_worker(overrides: list[str]) -> dict[str, Any]:
    """transformers `generate`, greedy, plain and with prompt lookup, on the evaluation's prompts; one
    torch thread. Tokens/s pooled over every prompt, and whether the two decoded the same tokens."""
    import torch

    torch.set_num_threads(1)
    from deepspec.models.chat import render_prompt
    from deepspec.models.target import load_target
    from deepspec.tasks.config import compose
    from deepspec.tasks.evaluate.benchmarks import benchmark_cap, load_benchmark, select_prompts
    from deepspec.tasks.evaluate.stage import stop_token_ids
    from deepspec.tasks.paths import rendering

    cfg = compose(overrides)
    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32")
    eos = sorted(stop_token_ids(cfg, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    modes = {"generate": {}, "prompt_lookup": {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}}
    per_bench: dict[str, dict[str, Any]] = {}
    for name in cfg.eval.benchmarks:
        rows = select_prompts(
            load_benchmark(name, cfg.eval.data_dir),
            benchmark_cap(name, cfg.eval.max_samples, dict(cfg.eval.caps)),
            cfg.eval.shuffle_seed,
        )
        figures = {m: {"tokens": 0, "seconds": 0.0} for m in modes}
        equal = 0
        for _, turns in rows:
            ids = render_prompt(tokenizer, [{"role": "user", "content": turns[0]}], **rendering(cfg))
            x = torch.tensor([ids])
            outputs = []
            for mode, extra in modes.items():
                began = time.perf_counter()
                out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad, max_new_tokens=int(cfg.eval.max_new_tokens), **extra)  # fmt: skip
                figures[mode]["seconds"] += time.perf_counter() - began
                new = out[0, len(ids) :].tolist()
                figures[mode]["tokens"] += len(new)
                outputs.append(new)
            equal += outputs[0] == outputs[1]
        per_bench[name] = {**figures, "prompts": len(rows), "equal_outputs": equal}
    return per_bench


# ----------------------------------------------------------------------------------------------------
# Figures


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean: float | None, sd: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f"±{sd:.{digits}f}" if sd is not None else "")


def rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(cells: list[str]) -> list[str]:
    return [md_row(cells), md_row(["---"] * len(cells))]


def main_results(evals: dict[str, Any], algo: str, temperature: float) -> list[dict[str, Any]]:
    """The evaluation results of `algo`'s drafts on the main data at `temperature`, one per seed."""
    suffix = f"-T={temperature:g}"
    return [
        e["result"] for key, e in evals.items()
        if key.startswith(f"{algo}-s") and key.endswith(suffix) and "-n" not in key
    ]  # fmt: skip


def seeds_evaluated(args: argparse.Namespace, temperature: float) -> int:
    """Training seeds evaluated at `temperature`: all at T = 0, `--sampled-seeds` above it (results files
    written before that option read as all)."""
    sampled = getattr(args, "sampled_seeds", None)
    return args.seeds if temperature == 0 or sampled is None else min(sampled, args.seeds)


def tables(figures: dict[str, Any], args) -> str:
    """Markdown: Table 1 style tau per benchmark, domain and macro per algorithm (mean ± sd over seeds),
    then speed against the baselines, then training, then data scaling."""
    lines: list[str] = []
    evals = figures["evaluations"]
    first = next(iter(evals.values()))["result"]
    benches, domains = list(first["benchmarks"]), list(first["domains"])
    for temperature in args.temperatures:
        seeds = seeds_evaluated(args, temperature)
        lines.append(f"\ntau at T = {temperature:g} ({args.eval_prompts} prompts a benchmark, {args.eval_tokens} "
                     f"new tokens; mean ± sd over {seeds} training seeds)\n")  # fmt: skip
        lines += md_head(["algo", *benches, *domains, "macro"])
        for algo in args.algos:
            results = main_results(evals, algo, temperature)
            cells = [algo]
            cells += [fmt(*mean_sd([r["benchmarks"][b]["tau"] for r in results])) for b in benches]
            cells += [fmt(*mean_sd([r["domains"][d]["tau"] for r in results])) for d in domains]
            cells.append(fmt(*mean_sd([r["macro"]["tau"] for r in results])))
            lines.append(md_row(cells))

    base = figures.get("baselines") or {}
    hf = {
        m: rate(sum(b[m]["tokens"] for b in base.values()), sum(b[m]["seconds"] for b in base.values()))
        for m in ("generate", "prompt_lookup")
    }
    equal = sum(b["equal_outputs"] for b in base.values())
    prompts = sum(b["prompts"] for b in base.values())
    lines.append(
        f"\nspeed, one thread a process, tokens/s pooled over every prompt. Baselines on the same prompts: "
        f"transformers `generate` {fmt(hf['generate'], digits=1)} tokens/s, prompt lookup "
        f"{fmt(hf['prompt_lookup'], digits=1)} ({fmt(rate(hf['prompt_lookup'] or 0, hf['generate'] or 0))}x "
        f"`generate`), the same tokens on {equal}/{prompts} prompts (greedy). Speedup: speculative tokens/s "
        "over the baseline's; `plain` is DeepSpec's own plain decoding, timed prompt by prompt beside it.\n"
    )
    lines += md_head(["algo", "T", "tau (pooled)", "accept@k, k = 0..6 (macro)", "spec tok/s", "plain tok/s",
                      "vs plain", "vs generate", "vs prompt lookup"])  # fmt: skip
    for algo in args.algos:
        for temperature in args.temperatures:
            results = main_results(evals, algo, temperature)
            if not results:
                continue
            pooled = [r["pooled"] for r in results]
            spec = statistics.fmean(p["spec_tokens_per_s"] for p in pooled)
            plain = statistics.fmean(p["target_tokens_per_s"] for p in pooled)
            columns = zip(*[r["macro"]["accept_at"] for r in results], strict=True)
            accept = [mean_sd(list(col))[0] for col in columns]
            greedy = temperature == 0  # transformers' baselines run greedy
            lines.append(md_row([
                algo, f"{temperature:g}", fmt(*mean_sd([p["tau"] for p in pooled])),
                " ".join(fmt(a) for a in accept), fmt(spec, digits=1), fmt(plain, digits=1),
                fmt(*mean_sd([p["speedup"] for p in pooled])),
                fmt(rate(spec, hf["generate"] or 0) if greedy else None),
                fmt(rate(spec, hf["prompt_lookup"] or 0) if greedy else None),
            ]))  # fmt: skip

    lines.append("\ntraining: the same epochs, optimizer steps, batch and schedule for every algorithm\n")
    lines += md_head(["run", "steps", "minutes", "loss at 0, 25, 50, 75, 100% of the steps",
                      "expected tau (train, last steps)"])  # fmt: skip
    for name, tr in figures["training"].items():
        curve = tr["curve"].get("train/loss") or []
        marks = [curve[min(len(curve) - 1, round(q * (len(curve) - 1)))][1] for q in (0, 0.25, 0.5, 0.75, 1)]
        lines.append(md_row([
            name, str(tr["steps"]), fmt(tr["train_s"] / 60 if tr["train_s"] else None, digits=1),
            " ".join(fmt(v) for v in marks) if curve else "-", fmt(tr["final"].get("train/expected_tau")),
        ]))  # fmt: skip
    stages = figures["stages"]
    data = stages["data"]
    eval_min = [e["eval_s"] / 60 for e in evals.values()]
    minutes = [tr["train_s"] / 60 for tr in figures["training"].values() if tr["train_s"]]
    lines.append(
        f"\nwall time on this machine, {args.parallel} runs at a time (times of work an earlier, stopped "
        f"run did are that run's): prompts {fmt(data['prompts_s'], digits=0)} s, regenerate "
        f"{fmt(data['regenerate_s'], digits=0)} s ({data['answers']} answers, {data['answer_tokens']:,} tokens), "
        f"cache {fmt((data['cache_s'] or 0) / 60, digits=1)} min ({data['cache_tokens']:,} tokens), training "
        f"{fmt(min(minutes, default=None), digits=1)} to {fmt(max(minutes, default=None), digits=1)} min a draft, "
        f"evaluation {min(eval_min):.1f} to {max(eval_min):.1f} min a draft and temperature (speculative and "
        "plain decoding)"
    )
    if figures.get("scaling"):
        lines.append(f"\ndata scaling: {args.scaling_algo}, seed 0, the same epochs, T = 0\n")
        lines += md_head(["answers", "answer tokens", "macro tau"])
        for n, row in sorted(figures["scaling"].items(), key=lambda kv: int(kv[0])):
            lines.append(md_row([str(n), f"{row['answer_tokens']:,}", fmt(row["macro_tau"])]))
    return "\n".join(lines)


def report(path: Path) -> None:
    """Print the tables of a finished run's results file again."""
    record = json.loads(path.read_text())
    print(tables(record["figures"], argparse.Namespace(**record["options"])))


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.report:
        report(args.report)
        return
    begin("reference")
    work = (args.work or REPO / "runs" / "bench" / "reference" / args.target).resolve()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    done_dir = work / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    say(f"target {args.target}, working in {work}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    stages: dict[str, Any] = {"data": prepare_data(args, work, main_answers(args))}
    runs = [make_run(args, work, algo, seed) for algo in args.algos for seed in range(args.seeds)]
    for n in args.scaling:
        stages[f"data-n{n}"] = prepare_data(args, work, n)
        runs.append(make_run(args, work, args.scaling_algo, 0, n))

    log = work / "stages.log"
    say(f"train stage for {len(runs)} drafts, {args.parallel} at a time; the ranks' output -> {log}")
    began = time.perf_counter()
    with output_to(log), ThreadPoolExecutor(max_workers=args.parallel) as pool:
        training = dict(zip([r.name for r in runs], pool.map(train_run, runs), strict=True))
    stages["train_wall_s"] = time.perf_counter() - began

    jobs: dict[str, list[str]] = {}
    for run in runs:
        temps = args.temperatures if run.answers is None else [0.0]
        for temperature in [t for t in temps if run.seed < seeds_evaluated(args, t)]:
            folder = evaluation_dir(run, temperature)
            jobs[f"{run.name}-T={temperature:g}"] = [*run.overrides, f"run_dir={folder}",
                                                     *eval_overrides(args, temperature)]  # fmt: skip
    evaluations: dict[str, Any] = {}
    # finished evaluations are kept under names that hold the evaluation's size
    done_dir = done_dir / f"eval-p{args.eval_prompts}-t{args.eval_tokens}"
    done_dir.mkdir(exist_ok=True)
    baseline_file = done_dir / "baselines.json"
    began = time.perf_counter()
    say(f"evaluate stage for {len(jobs)} drafts and temperatures, and the baselines; output -> {log}")
    ctx = get_context("spawn")
    with output_to(log), ProcessPoolExecutor(max_workers=args.parallel, mp_context=ctx) as pool:
        futures = {}
        if not baseline_file.is_file():
            futures["baselines"] = pool.submit(baselines_worker, next(iter(jobs.values())))
        for key, overrides in jobs.items():
            kept = done_dir / f"{key}.json"
            if kept.is_file():
                evaluations[key] = json.loads(kept.read_text())
            else:
                futures[key] = pool.submit(evaluate_worker, overrides)
        for key, future in futures.items():
            value = future.result()
            if key == "baselines":
                baseline_file.write_text(json.dumps(value))
                say("baselines: transformers generate, plain and prompt lookup, done")
                continue
            (done_dir / f"{key}.json").write_text(json.dumps(value))
            evaluations[key] = value
            say(
                f"evaluated {key}: macro tau {fmt(value['result']['macro']['tau'])} in {value['eval_s']:.0f}s"
            )
    stages["eval_wall_s"] = time.perf_counter() - began

    figures: dict[str, Any] = {
        "settings": {**vars(args), "work": str(work), "drafts_a_round": 7,
                     "train": train_overrides(args, 0), "eval": eval_overrides(args, 0.0)},
        "stages": stages,
        "training": training,
        "evaluations": evaluations,
        "baselines": json.loads(baseline_file.read_text()),
    }  # fmt: skip
    figures["scaling"] = {
        n: {
            "answers": stages[f"data-n{n}"]["answers"],
            "answer_tokens": stages[f"data-n{n}"]["answer_tokens"],
            "macro_tau": evaluations[f"{args.scaling_algo}-s0-n{n}-T=0"]["result"]["macro"]["tau"],
        }
        for n in args.scaling
    }
    main_key = f"{args.scaling_algo}-s0-T=0"
    if args.scaling and main_key in evaluations:
        figures["scaling"][stages["data"]["answers"]] = {
            "answers": stages["data"]["answers"],
            "answer_tokens": stages["data"]["answer_tokens"],
            "macro_tau": evaluations[main_key]["result"]["macro"]["tau"],
        }
    text = tables(figures, args)
    print(text)
    figures["tables"] = text
    write_results(figures, target=args.target, args=args, out=args.out)


if __name__ == "__main__":
    main()
