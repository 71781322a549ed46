"""`eval=upstream` selects the prompts upstream's evaluator does: per benchmark its cap (eval.py TASKS),
and for a file longer than its cap a `random.Random(980406)` shuffle of the rows, first `cap` kept
(`BaseEvaluator.run_dataset`). The pins were computed from the files in ../shared/assets/eval."""

from __future__ import annotations

import random

import pytest

from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.benchmarks import benchmark_cap, load_benchmark, select_prompts

# benchmark: (rows in the file, prompts evaluated, first four row indices in evaluation order)
PINS = {
    "gsm8k": (1319, 500, [435, 902, 303, 1168]),
    "math500": (500, 500, [0, 1, 2, 3]),  # not longer than its cap: file order, no shuffle
    "aime25": (30, 30, [0, 1, 2, 3]),
    "humaneval": (164, 164, [0, 1, 2, 3]),
    "mbpp": (257, 256, [94, 116, 115, 25]),
    "livecodebench": (1055, 500, [14, 570, 218, 658]),
    "mt-bench": (80, 80, [0, 1, 2, 3]),
    "alpaca": (999, 500, [681, 734, 737, 698]),
    "arena-hard-v2": (750, 500, [228, 712, 412, 332]),
}


def test_upstream_preset_values():
    e = compose(["eval=upstream"]).eval
    assert (e.temperature, e.max_new_tokens, e.shuffle_seed, e.max_samples) == (1.0, 2048, 980406, None)
    assert dict(e.caps) == {name: n for name, (_, n, _) in PINS.items()}
    assert list(e.benchmarks) == list(PINS)


def test_upstream_selection_pins_the_first_prompts(assets_dir):
    data = assets_dir / "eval"
    if not (data / "gsm8k.jsonl").is_file():
        pytest.skip(f"benchmark files not found in {data}")
    e = compose(["eval=upstream"]).eval
    for name, (rows, count, first) in PINS.items():
        prompts = load_benchmark(name, data)
        chosen = select_prompts(prompts, benchmark_cap(name, e.max_samples, dict(e.caps)), e.shuffle_seed)
        assert len(prompts) == rows and len(chosen) == count, name
        assert [row for row, _ in chosen[:4]] == first, name
        assert all(turns == prompts[row] for row, turns in chosen)
        # upstream's own steps on its row dicts give the same order
        upstream = [{"id": i, "turns": t[:1]} for i, t in enumerate(prompts)]
        if len(upstream) > count:
            random.Random(980406).shuffle(upstream)
        assert [r["id"] for r in upstream[:count]] == [row for row, _ in chosen], name
    gsm8k = select_prompts(load_benchmark("gsm8k", data), 500, 980406)
    assert gsm8k[0][1][0].startswith("Ray had 25 lollipops. He kept 5 lollipops")


def test_default_selection_is_the_first_rows_and_caps_combine():
    prompts = [[str(i)] for i in range(10)]
    assert [r for r, _ in select_prompts(prompts, 3, None)] == [0, 1, 2]
    assert [r for r, _ in select_prompts(prompts, None, 5)] == list(range(10))
    assert [r for r, _ in select_prompts(prompts, 10, 5)] == list(range(10))  # within its cap: no shuffle
    shuffled = [r for r, _ in select_prompts(prompts, 4, 5)]
    assert shuffled != [0, 1, 2, 3] and len(set(shuffled)) == 4
    assert benchmark_cap("gsm8k", 20, {"gsm8k": 500}) == 20
    assert benchmark_cap("gsm8k", None, {"gsm8k": 500}) == 500
    assert benchmark_cap("mbpp", None, {"gsm8k": 500}) is None
