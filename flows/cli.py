"""`deepspec`: the one command users run.

    deepspec pipeline                          # every stage on the embedded default target
    deepspec pipeline --config-name demo       # the `make demo` preset
    deepspec retrain release.dir=runs/release   # the pipeline, then release the draft only if it is better
    deepspec train target=qwen3_4b train=gpu_8x
    deepspec config target=stories260k         # print the composed configuration
    deepspec estimate-cache target=qwen3_4b --tokens 1e9   # cache bytes per token and size, per encoding
    deepspec convert-eval --out-dir eval_datasets    # the nine benchmark files, from their public datasets
    deepspec report runs/exp1 runs/exp2 --out compare.html   # evaluation figures as tables and an HTML page

Each stage subcommand runs that stage's Prefect flow; arguments after the subcommand are Hydra overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

STAGES = {
    "prompts": "load, validate, deduplicate and split the instruction prompts",
    "regenerate": "have the target answer every prompt (its own answers are the training data)",
    "cache": "write the target's hidden states as sharded Arrow files to storage.url",
    "train": "train the draft with DeepSpeed on the cache (torchrun, train.nproc_per_node ranks)",
    "evaluate": "lossless speculative decoding on the benchmarks: accepted length and speedup",
    "export": "write the draft in the layout vLLM and SGLang load",
}

EPILOG = textwrap.dedent(
    """\
    overrides are Hydra syntax, e.g.:
      target=qwen3_4b algo=dflash regen=vllm storage=s3 storage.url=s3://bucket/run1
      run_dir=runs/exp1 train.epochs=3 eval.data_dir=path/to/benchmarks tracking.uri=http://127.0.0.1:5000
    config groups: target, algo, regen, storage, train, eval (see `deepspec config` and conf/ in the repo).
    A stage whose outputs already exist and match the configuration is skipped, so re-running is cheap.
    """
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepspec",
        description="Train and evaluate draft models for lossless speculative decoding.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {"pipeline": "run every stage in order, then print a table of the figures", **STAGES}
    commands["retrain"] = "the pipeline, then release the draft to release.dir if it beats the released one"
    commands["config"] = "print the composed configuration and exit"
    commands["estimate-cache"] = "print the cache's bytes per token and total size for each encoding"
    _convert_eval_parser(sub)
    _report_parser(sub)
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("--config-name", default="config", help="top-level preset in conf/ (config, demo)")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
        if name == "estimate-cache":
            p.add_argument("--tokens", type=_count, default=None,
                           help="tokens in the data set (e.g. 1.2e9); default: counted from "
                                "the run's regenerated answers")  # fmt: skip
    return parser


def _convert_eval_parser(sub) -> None:
    from deepspec.tasks.evaluate import sources

    help_text = 'build the benchmark files (<name>.jsonl of {"turns": [...]}) from their public datasets'
    p = sub.add_parser(
        "convert-eval",
        help=help_text,
        description=f"{help_text}.\n\nBenchmarks, their Hugging Face dataset and split:\n{sources.listing()}",
        epilog=textwrap.dedent(
            """\
            examples:
              deepspec convert-eval --out-dir eval_datasets          # all nine, fetched from the hub
              deepspec convert-eval gsm8k mbpp --source-dir hf_copies --out-dir eval_datasets
            Then: deepspec evaluate eval=upstream eval.data_dir=eval_datasets
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "benchmarks", nargs="*", metavar="BENCHMARK", help="benchmarks to build (default: all nine)"
    )
    p.add_argument("--out-dir", help="folder to write <benchmark>.jsonl into (eval.data_dir)")
    p.add_argument("--source-dir", default=None,
                   help="read DIR/<hub id>/, a local copy in the dataset repository's layout, "
                        "instead of fetching from the Hugging Face hub")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace files that exist")
    p.add_argument("--list", action="store_true", help="list the benchmarks and their datasets, and exit")


def _convert_eval(args: argparse.Namespace) -> int:
    from deepspec.tasks.evaluate import sources

    if args.list:
        print(sources.listing())
        return 0
    if not args.out_dir:
        print("deepspec convert-eval: error: --out-dir is required", file=sys.stderr)
        return 2
    unknown = [name for name in args.benchmarks if name not in sources.SOURCES]
    if unknown:
        print(f"deepspec convert-eval: error: unknown benchmark(s) {unknown}; "
              f"choose from {list(sources.SOURCES)}", file=sys.stderr)  # fmt: skip
        return 2
    for name in args.benchmarks or list(sources.SOURCES):
        path, rows = sources.convert(name, args.source_dir, args.out_dir, args.overwrite)
        print(f"{name}: {rows} rows -> {path}")
    return 0


def _report_parser(sub) -> None:
    help_text = "print an evaluation's figures as Markdown tables; --out writes them as one HTML page"
    p = sub.add_parser(
        "report",
        help=help_text,
        description=f"{help_text}.\n\nOne run: its report (settings, per-benchmark figures, accept@k, "
        "calibration).\nSeveral: one row per run (tau per benchmark and domain, macro tau and speedup, "
        "pooled accept@k).\nThe HTML page is self-contained (inline CSS and SVG charts, no scripts).",
        epilog=textwrap.dedent(
            """\
            examples:
              deepspec report runs/exp1                    # one run: its report.md on stdout
              deepspec report runs/exp1 runs/exp2 --out compare.html --names dflash,dspark
            RUN_DIR may also be an eval/<algo> folder or a results.json file.
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = "a run folder holding eval/<algo>/results.json (or that folder, or the file)"
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help=where)
    p.add_argument("--out", metavar="FILE.html", help="also write the tables and charts as one HTML page")
    p.add_argument("--names", help="comma-separated names for the runs (default: each run folder's name)")


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepspec.tasks.evaluate import report
    from deepspec.tasks.files import atomic_write_text

    paths = [Path(run) for run in args.runs]
    names = args.names.split(",") if args.names else report.run_names(paths)
    if len(names) != len(paths) or len(set(names)) != len(names) or not all(names):
        print(f"deepspec report: error: --names needs {len(paths)} distinct, non-empty names, one per run; "
              f"got {args.names!r}", file=sys.stderr)  # fmt: skip
        return 2
    results = list(zip(names, (report.load_results(p) for p in paths), strict=True))
    one = len(results) == 1
    text = report.markdown_report(results[0][1], names[0]) if one else report.comparison_markdown(results)
    print(text, end="")
    if args.out:
        try:
            atomic_write_text(Path(args.out), report.html_report(results))
        except OSError as err:
            print(f"deepspec report: error: cannot write {args.out}: {err}", file=sys.stderr)
            return 2
        print(f"deepspec report: wrote {args.out}", file=sys.stderr)
    return 0


def _count(text: str) -> int:
    """A token count: 1200000, 1_200_000 or 1.2e6."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if value < 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole, non-negative number of tokens: {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary server whose first start migrates a fresh
    # database: slower than Prefect's 20 s default on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls home

    from deepspec.models.errors import DeepSpecError
    from deepspec.tasks.config import compose

    try:
        if args.command == "config":
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(compose(args.overrides, args.config_name)))
            return 0
        if args.command == "convert-eval":
            return _convert_eval(args)
        if args.command == "report":
            return _report(args)
        if args.command == "estimate-cache":
            from deepspec.tasks.cache.estimate import estimate_cache

            print(estimate_cache(compose(args.overrides, args.config_name), args.tokens))
            return 0
        compose(args.overrides, args.config_name)  # fail fast on a bad override, before Prefect starts
        from deepspec.flows.pipeline import STAGE_FLOWS, pipeline, retrain

        flows = {"pipeline": pipeline, "retrain": retrain, **STAGE_FLOWS}
        flows[args.command](overrides=list(args.overrides), config_name=args.config_name)
    except DeepSpecError as err:
        print(f"deepspec {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
