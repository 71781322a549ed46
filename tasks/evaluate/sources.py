"""Build the nine benchmark files, `<name>.jsonl` of `{"turns": [str, ...]}`, from their public datasets.

    deepspec convert-eval --list
    deepspec convert-eval --out-dir eval_datasets                      # all nine, from the Hugging Face hub
    deepspec convert-eval gsm8k mbpp --source-dir hf_copies --out-dir eval_datasets

Each benchmark names a dataset on the hub and the files of its split, as upstream's
`eval_datasets/convert_eval_datasets_to_jsonl.py` reads them, and formats each row the same way (math
prompts get upstream's "Please reason step by step" suffix, HumanEval is wrapped in a "write a solution"
request, LiveCodeBench in its code-generation prompt). `--source-dir DIR` reads `DIR/<hub id>/` instead,
a local copy in the dataset repository's own layout (what `huggingface-cli download --repo-type dataset
<hub id> --local-dir DIR/<hub id>` writes); without it, the files are fetched from the hub.
arena-hard-v2 is not in upstream's converter; it is read from lmarena-ai/arena-hard-auto's v2.0
question file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deepspec.models.errors import DataError
from deepspec.tasks.files import atomic_write_text

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Source:
    benchmark: str
    hub_id: str
    split: str  # for the listing; `files` are that split's files in the dataset repository
    files: tuple[str, ...]  # glob patterns inside the repository, each read in sorted order
    turns: Callable[[dict], list[str]]


def _math(field: str) -> Callable[[dict], list[str]]:
    return lambda row: [f"{row[field]}{REASONING_SUFFIX}"]


def _alpaca(row: dict) -> list[str]:
    return [f"{row['instruction']}\n\nInput:\n{row['input']}" if row["input"] else row["instruction"]]


def _humaneval(row: dict) -> list[str]:
    return [
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{row['prompt']}\n```"
    ]


def _livecodebench(row: dict) -> list[str]:
    starter = row["starter_code"]
    label = "Use the following code structure:" if starter else "Write your code in the following format:"
    return [
        "You are an expert Python programmer. You will be given a question (problem specification) and "
        "will generate a correct Python program that matches the specification and passes all tests. "
        "You will NOT return anything except for the program\n\n"
        f"### Question:\n{row['question_content']}\n\n"
        f"### Format: {label}\n```python\n{starter or '# YOUR CODE HERE'}\n```\n\n"
        "### Answer: (use the provided format with backticks)"
    ]


def _turns_list(field: str) -> Callable[[dict], list[str]]:
    return lambda row: list(row[field])


SOURCES = {
    s.benchmark: s
    for s in (
        Source("gsm8k", "openai/gsm8k", "main/test", ("main/test-*.parquet",), _math("question")),
        Source("math500", "HuggingFaceH4/MATH-500", "test", ("test.jsonl",), _math("problem")),
        Source("aime25", "MathArena/aime_2025", "train", ("data/train-*.parquet",), _math("problem")),
        Source(
            "humaneval", "openai/openai_humaneval", "test", ("openai_humaneval/test-*.parquet",), _humaneval
        ),
        Source(
            "mbpp", "google-research-datasets/mbpp", "sanitized/test", ("sanitized/test-*.parquet",),
            lambda row: [row["prompt"]],
        ),
        Source(
            "livecodebench", "livecodebench/code_generation_lite", "test (release_v6)",
            ("test.jsonl", "test[2-6].jsonl"), _livecodebench,
        ),
        Source(
            "mt-bench", "HuggingFaceH4/mt_bench_prompts", "train", ("data/train-*.parquet",),
            _turns_list("prompt"),
        ),
        Source("alpaca", "tatsu-lab/alpaca", "train", ("data/train-*.parquet",), _alpaca),
        Source(
            "arena-hard-v2", "lmarena-ai/arena-hard-auto", "arena-hard-v2.0 questions",
            ("data/arena-hard-v2.0/question.jsonl",), lambda row: [row["prompt"]],
        ),
    )
}  # fmt: skip


def _read(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of a parquet or JSON-lines file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def dataset_root(source: Source, source_dir: str | Path | None) -> Path:
    """The local copy `<source_dir>/<hub id>`, or the split's files fetched from the hub."""
    if source_dir is not None:
        root = Path(source_dir) / source.hub_id
        if not root.is_dir():
            raise DataError(f"--source-dir: {source.benchmark} needs a copy of {source.hub_id} at {root}")
        return root
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.hub_id, repo_type="dataset", allow_patterns=list(source.files)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:  # offline, unknown id, no access
        raise DataError(
            f"{source.benchmark}: cannot fetch {source.hub_id} from the Hugging Face hub "
            f"({type(err).__name__}); download it where the hub is reachable and pass its parent folder "
            f"as --source-dir (the files go under <source-dir>/{source.hub_id}/)"
        ) from None


def convert(
    name: str, source_dir: str | Path | None, out_dir: str | Path, overwrite: bool = False
) -> tuple[Path, int]:
    """Write `<out_dir>/<name>.jsonl` from the benchmark's dataset; (path, rows written)."""
    source = SOURCES[name]
    out = Path(out_dir) / f"{name}.jsonl"
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it")
    root = dataset_root(source, source_dir)
    files = [p for pattern in source.files for p in sorted(root.glob(pattern))]
    if not files:
        raise DataError(
            f"{root}: no files matching {list(source.files)} ({source.hub_id}, split {source.split})"
        )
    lines = []
    for path in files:
        for number, row in _read(path):
            try:
                turns = source.turns(row)
            except KeyError as err:
                raise DataError(f"{path}:{number}: field {err.args[0]!r} missing ({source.hub_id})") from None
            if not turns or not all(isinstance(t, str) and t for t in turns):
                raise DataError(f"{path}:{number}: expected non-empty text turns, got {str(turns)[:80]}")
            lines.append(json.dumps({"turns": turns}, ensure_ascii=False))
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return out, len(lines)


def listing() -> str:
    return "\n".join(
        f"{s.benchmark:<14} {s.hub_id:<36} split {s.split}; files {', '.join(s.files)}"
        for s in SOURCES.values()
    )
