"""`deepspec convert-eval` builds each benchmark file from its dataset, read here from small local copies
in each dataset repository's own layout (tests/data/eval_sources/<hub id>/, parquet or JSON lines)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from deepspec.flows.cli import main
from deepspec.models.errors import DataError
from deepspec.tasks.evaluate import sources
from deepspec.tasks.evaluate.benchmarks import load_benchmark

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "eval_sources"
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
EXPECTED = {
    "gsm8k": [
        [f"Tom has 3 apples and buys 2 more. How many apples does he have?{SUFFIX}"],
        [f"A box holds 4 pens. How many pens are in 3 boxes?{SUFFIX}"],
    ],
    "math500": [[f"What is $1+1$?{SUFFIX}"], [f"Solve $2x=6$.{SUFFIX}"]],
    "aime25": [[f"Find the remainder when $7^{{2025}}$ is divided by $10$.{SUFFIX}"]],
    "humaneval": [
        [
            "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
            'def add(a: int, b: int) -> int:\n    """Return a + b."""\n\n```'
        ]
    ],
    "mbpp": [
        ["Write a function to find the shared elements from the given two lists."],
        ["Write a python function to identify non-prime numbers."],
    ],
    "mt-bench": [["Write a haiku about autumn.", "Now make it about spring."]],
    "alpaca": [
        ["Give three tips for staying healthy."],
        ["Find the perimeter of the triangle.\n\nInput:\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8"],
    ],
    "arena-hard-v2": [["Write a zig program that prints hello."]],
}


def _documented(command: str) -> list[str]:
    """The argv of the line of the sources.py docstring that starts with `command`."""
    doc = sources.__doc__ or ""
    line = next(ln for ln in doc.splitlines() if ln.strip().startswith(command))
    words = shlex.split(line, comments=True)
    assert words[0] == "deepspec"
    return words[1:]


def test_documented_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf_copies").symlink_to(FIXTURES)
    argv = _documented("deepspec convert-eval gsm8k mbpp --source-dir")
    assert main(argv) == 0
    assert load_benchmark("gsm8k", tmp_path / "eval_datasets") == EXPECTED["gsm8k"]
    assert load_benchmark("mbpp", tmp_path / "eval_datasets") == EXPECTED["mbpp"]
    assert sorted(p.name for p in (tmp_path / "eval_datasets").iterdir()) == ["gsm8k.jsonl", "mbpp.jsonl"]
    assert "gsm8k: 2 rows" in capsys.readouterr().out
    assert main(argv) == 2  # the files exist now: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_every_benchmark_from_its_raw_layout(tmp_path):
    out = tmp_path / "eval"
    assert main(["convert-eval", "--source-dir", str(FIXTURES), "--out-dir", str(out)]) == 0
    assert sorted(p.stem for p in out.glob("*.jsonl")) == sorted(sources.SOURCES)
    for name, turns in EXPECTED.items():
        assert load_benchmark(name, out) == turns, name
    lcb = load_benchmark("livecodebench", out)  # test.jsonl, then test2.jsonl
    assert len(lcb) == 2
    assert "### Question:\nPrint the sum of two integers A and B.\n\n" in lcb[0][0]
    assert "Write your code in the following format:\n```python\n# YOUR CODE HERE\n```" in lcb[0][0]
    assert "Use the following code structure:\n```python\nclass Solution:" in lcb[1][0]
    assert lcb[0][0].startswith("You are an expert Python programmer.")


def test_converted_rows_have_the_shape_of_the_shipped_files(tmp_path, assets_dir):
    """The shipped benchmark files were made the same way: their first rows carry the same wrappers."""
    shipped = assets_dir / "eval"
    if not (shipped / "humaneval.jsonl").is_file():
        pytest.skip(f"benchmark files not found in {shipped}")
    sources.convert("humaneval", FIXTURES, tmp_path)
    ours, theirs = load_benchmark("humaneval", tmp_path)[0][0], load_benchmark("humaneval", shipped)[0][0]
    wrapper = re.compile(r"^(Write a solution .*?```python\n).*(\n```)$", re.S)
    assert wrapper.match(ours).groups() == wrapper.match(theirs).groups()
    assert load_benchmark("gsm8k", shipped)[0][0].endswith(SUFFIX)


def test_bad_rows_name_file_line_and_field(tmp_path):
    root = tmp_path / "src" / "HuggingFaceH4" / "MATH-500"
    root.mkdir(parents=True)
    (root / "test.jsonl").write_text(
        '{"problem": "ok"}\n{"question": "no problem field"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"test\.jsonl:2: field 'problem' missing"):
        sources.convert("math500", tmp_path / "src", tmp_path / "out")
    with pytest.raises(DataError, match=r"needs a copy of openai/gsm8k"):
        sources.convert("gsm8k", tmp_path / "src", tmp_path / "out")
    assert main(["convert-eval", "gsm8k", "nope", "--out-dir", str(tmp_path)]) == 2


def test_help_lists_every_dataset(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert-eval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for source in sources.SOURCES.values():
        assert source.benchmark in text and source.hub_id in text
    assert json.dumps({"turns": ["..."]})[:9] in text.replace('\\"', '"')


def test_an_unreachable_hub_is_a_clear_error_pointing_at_source_dir(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    # offline with an empty cache: what `deepspec convert-eval --out-dir DIR` meets without the hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["convert-eval", "gsm8k", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gsm8k: cannot fetch openai/gsm8k from the Hugging Face hub" in err and "--source-dir" in err
    assert not (tmp_path / "out" / "gsm8k.jsonl").exists()
