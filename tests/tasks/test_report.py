"""Evaluation reports: the Markdown and the self-contained HTML page of one run or several, their figures
as results.json holds them, `deepspec report`, and the page as a real browser renders it."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.documented import documented_commands
from support.drafts import save_untrained_draft

from deepspec.flows.cli import main
from deepspec.models.errors import DeepSpecError
from deepspec.tasks.evaluate.report import (
    acceptance_chart,
    comparison_markdown,
    html_report,
    load_results,
    markdown_report,
    num,
    run_names,
    write_reports,
)
from deepspec.tasks.results import EvalResult

VOID = {"meta", "br", "hr", "img", "input", "link"}  # HTML elements without an end tag


def _figures(tau: float | None, accept_at: list, **changes) -> dict:
    """One benchmark's BenchmarkFigures record, as the evaluate stage writes it (2 prompts, 3 drafts)."""
    figures = {
        "samples": 2, "new_tokens": 60, "target_new_tokens": 60, "verify_steps": 24, "tau": tau,
        "propose": 3.0, "verify_rate": 0.375, "accept_at": accept_at, "conditional_acceptance": accept_at,
        "acceptance": [0.5, 0.25, 0.0], "stopped_early": 0, "confidence": None, "spec_time_s": 1.0,
        "target_time_s": 1.2, "spec_tokens_per_s": 60.0, "target_tokens_per_s": 50.0, "speedup": 1.2,
        "greedy_match": 1.0,
    }  # fmt: skip
    return {**figures, **changes}


CONFIDENCE = {
    "mean": [0.7, 0.5, None], "predicted_prefix": [0.7, 0.35, None], "observed_prefix": [0.8, 0.2, None],
    "brier": [0.1, 0.05, None], "conditional_ece": [0.123, 0.2, None],
    "conditional_auroc": [0.81, None, None], "conditional_brier": [0.15, 0.2, None],
    "sts_temperatures": [1.5, 0.9, 1.0],
    "prefix_ece": [0.123, 0.25, None], "prefix_ece_sts": [0.05, 0.1, None],
    "reliability": [{"lo": 0.6, "hi": 0.7, "count": 12, "score": 0.65, "observed": 0.5833},
                    {"lo": 0.9, "hi": 1.0, "count": 3, "score": 0.95, "observed": 1.0}],
}  # fmt: skip


def _macro(names: list[str], tau: float) -> dict:
    return {"benchmarks": names, "tau": tau, "propose": 3.0, "verify_rate": 0.4, "speedup": 1.25,
            "accept_at": [0.7, 0.3, None], "conditional_acceptance": [0.7, 0.4, None]}  # fmt: skip


def _record(tau: tuple[float, float] = (1.5, 2.25), confidence: bool = True, **changes) -> dict:
    """A results.json record: gsm8k (math) and alpaca (chat), domains, macro, pooled with confidence."""
    return {
        "builtin_eval": False, "data_dir": "/data/eval", "target": "qwen3_4b", "algo": "dspark",
        "num_draft_tokens": 3, "temperature": 0.0, "max_new_tokens": 64, "seed": 0,
        "greedy_match_note": None, "shuffle_seed": None, "confidence_threshold": 0.0,
        "draft_file": "train/dspark/draft/model.safetensors", "draft_sha256": "ab" * 32,
        "prompts_file": "eval/dspark/prompts.jsonl",
        "benchmarks": {"gsm8k": _figures(tau[0], [0.8, 0.4, 0.1]),
                       "alpaca": _figures(tau[1], [0.6, None, None])},
        "domains": {"math": _macro(["gsm8k"], tau[0]), "chat": _macro(["alpaca"], tau[1])},
        "macro": _macro(["gsm8k", "alpaca"], (tau[0] + tau[1]) / 2),
        "pooled": _figures(1.875, [0.75, 0.4, 0.1], samples=4, confidence=CONFIDENCE if confidence else None),
        **changes,
    }  # fmt: skip


def _result(**changes) -> EvalResult:
    return EvalResult.from_json(_record(**changes))


def _run_dir(root: Path, record: dict) -> Path:
    """A run folder as the evaluate stage leaves it: <run>/eval/<algo>/results.json."""
    path = root / "eval" / record["algo"] / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")
    return root


class TagChecker(HTMLParser):
    """Fails on an end tag that does not close the innermost open element; records every URL-ish value."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for _, v in attrs if v and "//" in v]
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for _, v in attrs if v and "//" in v]

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()


def check_page(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.open == [], f"never closed: {checker.open}"
    assert set(checker.urls) == {"http://www.w3.org/2000/svg"}  # the SVG namespace, nothing fetched
    assert page.count("http") == page.count('xmlns="http://www.w3.org/2000/svg"')
    return checker


def test_markdown_report_has_every_figure_as_formatted():
    report = markdown_report(_result(greedy_match_note="target verified in bfloat16: near-ties flip"))
    assert report.startswith("# dspark on qwen3_4b\n")
    assert "**target** qwen3_4b; **algo** dspark; **temperature** 0; **drafts per round** 3" in report
    assert "**prompts** /data/eval; **confidence threshold** off" in report
    assert "**greedy match note** target verified in bfloat16: near-ties flip" in report
    # prompts, tau, propose, verify rate, speedup, spec and plain tokens/s, greedy match
    assert "| gsm8k | 2 | 1.50 | 3.00 | 0.375 | 1.20 | 60.0 | 50.0 | 1.000 |" in report
    assert "| alpaca | 2 | 2.25 | 3.00 | 0.375 | 1.20 | 60.0 | 50.0 | 1.000 |" in report
    assert "| chat (macro) | 2 | 2.25 | 3.00 | 0.400 | 1.25 | - | - | - |" in report
    assert "| macro | 4 | 1.88 | 3.00 | 0.400 | 1.25 | - | - | - |" in report
    assert "| pooled (micro) | 4 | 1.88 |" in report
    assert "| benchmark | k=0 | k=1 | k=2 |" in report and "| alpaca | 0.600 | - | - |" in report
    # calibration per position: mean, prefixes, conditional ECE/AUROC/Brier, prefix ECE raw/STS, STS T
    assert "| 0 | 0.700 | 0.700 | 0.800 | 0.123 | 0.810 | 0.150 | 0.123 | 0.050 | 1.500 |" in report
    assert "| 2 | - | - | - | - | - | - | - | - | 1.000 |" in report
    assert "| 0.6-0.7 | 12 | 0.650 | 0.583 |" in report


def test_markdown_report_of_a_smoke_test_without_a_confidence_head():
    report = markdown_report(_result(confidence=False, builtin_eval=True, data_dir=None, temperature=1.0,
                                     confidence_threshold=0.6), title="my run")  # fmt: skip
    assert report.startswith("# my run\n")
    assert "**temperature** 1;" in report and "**confidence threshold** 0.6." in report
    assert "**prompts** built-in prompts (a smoke test)" in report
    assert "calibration" not in report and "Reliability" not in report
    assert num(None) == "-" and num(3) == "3" and num(0.12345, 3) == "0.123"


def test_html_report_is_one_self_contained_page_with_charts():
    page = html_report([("run <x> & y", _result())])
    checker = check_page(page)
    assert "<script" not in page and checker.tags.count("svg") == 2  # accept@k and reliability
    assert "run &lt;x&gt; &amp; y" in page and "<x>" not in page  # text escaped
    assert "<td>gsm8k</td><td>2</td><td>1.50</td>" in page and "<td>0.6-0.7</td><td>12</td>" in page
    # accept@k: gsm8k, alpaca (one known point: a dot, no line) and pooled; x = k, y = rate on 0..1
    assert checker.tags.count("polyline") == 2
    assert 'points="56.0,83.2 228.0,177.6 400.0,248.4"' in page  # pooled 0.75, 0.4, 0.1
    assert ">n=12</text>" in page and ">n=3</text>" in page  # reliability bins with their counts
    low = acceptance_chart("low rates", [("x", [0.2, None, 0.1, 0.05])])  # the y axis tops at 0.2
    assert 'points="56.0,36.0"' not in low and 'points="285.3,154.0 400.0,213.0"' in low
    assert '<circle cx="56.0" cy="36.0"' in low and ">0.2</text>" in low and ">0.75</text>" not in low


def test_comparison_has_one_row_per_run():
    runs = [("a", _result()), ("b", _result(tau=(1.25, 3.0))), ("c", _result(confidence=False))]
    table = comparison_markdown(runs)
    header = "| run | gsm8k | alpaca | math (macro) | chat (macro) | macro tau | macro speedup |"
    assert header in table
    assert "| a | 1.50 | 2.25 | 1.50 | 2.25 | 1.88 | 1.25 |" in table
    assert "| b | 1.25 | 3.00 | 1.25 | 3.00 | 2.12 | 1.25 |" in table
    assert "| c | 0.750 | 0.400 | 0.100 |" in table  # pooled accept@k
    assert sum(line.startswith("| b |") for line in table.splitlines()) == 2  # tau and accept@k
    page = html_report(runs)
    checker = check_page(page)
    assert checker.tags.count("svg") == 1 + 3 + 2  # runs compared, each run's accept@k, two reliability
    assert page.count('class="facts"') == 3


def test_write_reports_and_load_results(tmp_path):
    run = _run_dir(tmp_path / "exp1", _record())
    result = load_results(run)
    assert result.benchmarks["alpaca"].tau == 2.25
    assert load_results(run / "eval" / "dspark").pooled.confidence.reliability[0]["count"] == 12
    paths = write_reports(result, tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.html"]
    assert paths[0].read_text() == markdown_report(result)
    check_page(paths[1].read_text())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.md"]


def test_load_results_says_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeepSpecError, match=r"empty: no evaluation results .*eval/<algo>/results.json"):
        load_results(tmp_path / "empty")
    with pytest.raises(DeepSpecError, match="missing: no such file or folder"):
        load_results(tmp_path / "missing")
    two = _run_dir(tmp_path / "two", _record())
    _run_dir(two, _record(algo="dflash"))
    with pytest.raises(DeepSpecError, match=r"two: 2 evaluations \(.*eval/dflash, .*eval/dspark\)"):
        load_results(two)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DeepSpecError, match="bad.json: not valid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"algo": "dspark"}))
    with pytest.raises(DeepSpecError, match="bad.json: not the evaluate stage's results"):
        load_results(bad)


def test_run_names_tell_runs_apart(tmp_path):
    for folder in ("a/exp", "b/exp", "c/other"):
        _run_dir(tmp_path / folder, _record())
    assert run_names([tmp_path / "a/exp", tmp_path / "b/exp/eval/dspark", tmp_path / "c/other"]) == [
        "a/exp", "b/exp", "other"
    ]  # fmt: skip
    same = tmp_path / "c/other"
    assert run_names([same, same / "eval/dspark/results.json"]) == ["other", "other/dspark"]
    assert run_names([same, same]) == ["other", "other#2"]


def test_report_command(tmp_path, capsys):
    one = _run_dir(tmp_path / "one", _record())
    two = _run_dir(tmp_path / "two", _record(tau=(1.25, 3.0)))
    assert main(["report", str(one)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# one\n") and "| gsm8k | 2 | 1.50 |" in out
    page = tmp_path / "pages" / "compare.html"
    assert main(["report", str(one), str(two), "--out", str(page), "--names", "base,tuned"]) == 0
    out = capsys.readouterr().out
    assert "| base | 1.50 | 2.25 |" in out and "| tuned | 1.25 | 3.00 |" in out
    assert "<h2>tuned</h2>" in check_page_text(page)

    (tmp_path / "nothing").mkdir()
    assert main(["report", str(one), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert f"deepspec report: error: {tmp_path / 'nothing'}: no evaluation results" in err
    assert main(["report", str(one), "--names", "a,b"]) == 2
    assert "--names needs 1 distinct, non-empty names" in capsys.readouterr().err


def check_page_text(path: Path) -> str:
    page = path.read_text(encoding="utf-8")
    check_page(page)
    return page


@pytest.fixture(scope="module")
def evaluated_run(assets_dir, tracking_uri, tmp_path_factory, one_thread) -> Path:
    """A run folder whose evaluate stage really ran: an untrained DSpark draft on stories260k."""
    from deepspec.models.target import load_target
    from deepspec.tasks.config import compose
    from deepspec.tasks.evaluate.stage import evaluate

    stories, run = assets_dir / "models" / "stories260k", tmp_path_factory.mktemp("dspark-run")
    cfg = compose(
        ["target=stories260k", f"target.path={stories}", f"run_dir={run}", "algo=dspark", "algo.num_layers=1",
         "algo.block_size=4", "algo.markov_rank=16", "eval.benchmarks=[gsm8k,alpaca]", "eval.max_samples=1",
         "eval.max_new_tokens=8", f"tracking.uri={tracking_uri}"]
    )  # fmt: skip
    save_untrained_draft(cfg, load_target(str(stories))[0])
    evaluate(cfg)
    return run


def test_report_of_a_real_evaluation(evaluated_run, capsys, tmp_path):
    result = load_results(evaluated_run)
    assert result.pooled.confidence is not None and result.pooled.confidence.reliability
    assert main(["report", str(evaluated_run), "--out", str(tmp_path / "run.html")]) == 0
    out = capsys.readouterr().out
    for name, figures in result.benchmarks.items():
        assert f"| {name} | 1 | {num(figures.tau)} | {num(figures.propose)} |" in out
    first = result.pooled.confidence.reliability[0]
    assert f"| {first['lo']:.1f}-{first['hi']:.1f} | {first['count']} | {num(first['score'], 3)} |" in out
    assert "| concurrency | plain tok/s | 1 draft tok/s |" in out and "scheduler tok/s" in out
    assert check_page_text(tmp_path / "run.html").count("<svg") == 3  # accept@k, reliability, serving


def _served(tokens_per_s: float, per_step: float, length: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "tokens_per_request_step": per_step, "mean_length": length}


SERVING = {
    "profile_context": 256, "profile_tokens": [1, 8, 64], "profile_steps_per_s": [50.0, 40.0, 10.0],
    "draft_s": 0.004, "steps": 200, "temperatures": [1.5, 0.9, 1.0], "temperatures_from": "held-out prompts",
    "rows": [
        {"concurrency": 1, "scheduler": _served(62.0, 1.6, 1.4),
         "fixed": [_served(50.0, 1.0, 0.0), _served(60.0, 1.5, 1.0), _served(55.0, 1.8, 2.0)]},
        {"concurrency": 64, "scheduler": _served(650.0, 1.02, 0.05),
         "fixed": [_served(640.0, 1.0, 0.0), _served(500.0, 1.5, 1.0), _served(300.0, 1.8, 2.0)]},
    ],
}  # fmt: skip


def test_serving_is_a_table_and_a_chart():
    result = _result(serving=SERVING)
    report = markdown_report(result)
    assert "STS temperatures from held-out prompts" in report and "pays 4.0 ms" in report
    header = (
        "| concurrency | plain tok/s | 1 draft tok/s | 2 drafts tok/s | scheduler tok/s | scheduler drafts |"
    )
    assert f"{header} best / plain |" in report
    assert "| 1 | 50.0 | 60.0 | 55.0 | 62.0 | 1.40 | 1.24 |" in report  # the scheduler is best: 62 / 50
    assert "| 64 | 640.0 | 500.0 | 300.0 | 650.0 | 0.05 | 1.02 |" in report
    assert "| steps a second | 50.0 | 40.0 | 10.0 |" in report
    checker = check_page(html_report([("run", result)]))
    assert checker.tags.count("svg") == 3  # accept@k, reliability, serving
    # without a confidence head: fixed lengths only, the best of them over plain
    rows = [{**row, "scheduler": None} for row in SERVING["rows"]]
    plain = markdown_report(
        _result(confidence=False, serving={**SERVING, "rows": rows, "temperatures_from": None})
    )
    assert "scheduler" not in plain and "| 1 | 50.0 | 60.0 | 55.0 | 1.20 |" in plain
    assert (
        EvalResult.from_json(_record(serving=SERVING)).serving.rows == SERVING["rows"]
    )  # results.json round trip


def _chromium() -> str:
    """Chromium on PATH, else the one `make browser` unpacks from Debian's packages into .cache."""
    unpacked = Path(__file__).resolve().parents[2] / ".cache" / "chromium" / "chromium"
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(unpacked)
    if binary is None:
        pytest.skip("no chromium to render the report with: `make browser` (Debian) or install chromium")
    return binary


def test_a_browser_renders_the_page(evaluated_run, tmp_path):
    """Headless Chromium draws the page: the charts' colours and the tables' text are on the screenshot."""
    from PIL import Image  # matplotlib's dependency, which mlflow's brings

    chromium = _chromium()
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(html_report([("real", load_results(evaluated_run)), ("hand-written", _result())]))
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,1600", "--hide-scrollbars", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # anti-aliased text and lines, not a blank page
    counts = {rgb: n for n, rgb in colours}
    assert counts.get((255, 255, 255), 0) < 1200 * 1600 * 0.95
    assert counts.get((31, 119, 180), 0) > 20 and counts.get((255, 127, 14), 0) > 20  # chart lines drawn


def test_the_readmes_report_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's `deepspec report` line, in a folder holding the runs it names."""
    readme = [argv for place, argv in documented_commands() if place.startswith("README")]
    argv = next(argv for argv in readme if argv[0] == "report")
    monkeypatch.chdir(tmp_path)
    _run_dir(Path("runs/stories260k"), _record(algo="dflash"))
    _run_dir(Path("runs/stories260k"), _record(tau=(1.25, 3.0), algo="eagle3"))
    _run_dir(Path("runs/stories-lr"), _record(tau=(1.25, 3.0), algo="dflash"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| stories260k/dflash | 1.50 | 2.25 |" in out and "| stories260k/eagle3 | 1.25 | 3.00 |" in out
    assert "| stories-lr | 1.25 | 3.00 |" in out
    check_page_text(tmp_path / "compare.html")
