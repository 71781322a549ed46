"""The benchmark prompts: `<eval.data_dir>/<name>.jsonl`, one `{"turns": [str, ...]}` a line, or a small
built-in set (`tasks/data/builtin_eval.jsonl`, 2-3 prompts a benchmark, each row naming its benchmark)."""

from __future__ import annotations

import json
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
