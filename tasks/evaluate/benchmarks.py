"""The benchmark prompts: `<eval.data_dir>/<name>.jsonl`, one `{"turns": [str, ...]}` a line, or a small
built-in set (`tasks/data/builtin_eval.jsonl`, 2-3 prompts a benchmark, each row naming its benchmark)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from deepspec.models.errors import DataError
from deepspec.tasks.files import read_jsonl

BUILTIN = Path(__file__).parents[1] / "data" / "builtin_eval.jsonl"
MAX_LISTED_ERRORS = 20


def load_benchmark(name: str, data_dir: str | Path | None) -> list[list[str]]:
    """The turns of every prompt of one benchmark: `<data_dir>/<name>.jsonl`, or the built-in set.

    Every line is checked; all bad lines are reported at once, each naming file, line and field.
    """
    builtin = data_dir is None
    path = BUILTIN if builtin else Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.jsonl")) if path.parent.is_dir() else []
        raise DataError(
            f"eval.data_dir: benchmark {name!r} needs {path}, which does not exist "
            f"(benchmarks found there: {', '.join(found) or 'none'})"
        )
    prompts: list[list[str]] = []
    errors: list[str] = []
    names: set[str] = set()
    for line_no, row in read_jsonl(
        path, on_error=lambda n, reason, _: errors.append(f"{path}:{n}: {reason}")
    ):
        if not isinstance(row, dict):
            errors.append(f"{path}:{line_no}: expected an object with a 'turns' field")
            continue
        if builtin:
            names.add(str(row.get("benchmark")))
            if row.get("benchmark") != name:
                continue
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            got = json.dumps(turns)[:80] if turns is not None else "nothing"
            errors.append(f"{path}:{line_no}: field 'turns': expected a non-empty list of strings, got {got}")
            continue
        prompts.append(turns)
    if errors:
        more = f"\n... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise DataError(
            f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(errors[:MAX_LISTED_ERRORS]) + more
        )
    if not prompts:
        choices = f" (built-in benchmarks: {', '.join(sorted(names))})" if builtin else ""
        raise DataError(f"{path}: no prompts for benchmark {name!r}{choices}")
    return prompts


def benchmark_cap(name: str, max_samples: int | None, caps: dict[str, int]) -> int | None:
    """How many prompts of `name` to evaluate: the smaller of the common and the per-benchmark cap."""
    limits = [n for n in (max_samples, caps.get(name)) if n is not None]
    return min(limits) if limits else None


def select_prompts(
    prompts: list[list[str]], cap: int | None, shuffle_seed: int | None
) -> list[tuple[int, list[str]]]:
    """(row index in the file, turns) of the prompts to evaluate.

    Without a seed, the first `cap` rows. With one, upstream's selection (`BaseEvaluator.run_dataset` in
    deepspec/eval/base_evaluator.py): a file longer than its cap is shuffled with `random.Random(seed)`
    and its first `cap` rows kept; a file within its cap is taken whole, in file order.
    """
    rows = list(enumerate(prompts))
    if cap is None or len(rows) <= cap:
        return rows
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows[:cap]
