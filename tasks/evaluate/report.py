"""Reports people read, from the evaluate stage's `results.json` (`tasks/results.py` defines each figure).

`markdown_report` is one run's report.md; `html_report` is one self-contained page for one run or several
(inline CSS and hand-drawn SVG, no scripts, nothing fetched, so it opens anywhere offline);
`comparison_markdown` is a Table-1 style table of several runs. `deepspec report` prints and writes them.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

from deepspec.models.errors import DeepSpecError
from deepspec.tasks.files import atomic_write_text
from deepspec.tasks.results import (
    BenchmarkFigures,
    ConfidenceFigures,
    EvalResult,
    MacroFigures,
    ServingFigures,
    drafts_label,
)

RESULTS_FILE = "results.json"
Table = tuple[list[str], list[list[str]]]  # header, rows of cells
Section = tuple[str, str, Table]  # heading, what the figures mean, table
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
POOLED_COLOR = "#222"


def num(value: float | int | None, digits: int = 2) -> str:
    """A figure as the reports print it: `digits` decimals, counts whole, None (nothing to count) "-"."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _at(values: list | None, k: int) -> float | None:
    return values[k] if values and k < len(values) else None


def _rates(f: BenchmarkFigures | MacroFigures) -> list[str]:
    return [num(f.tau), num(f.propose), num(f.verify_rate, 3), num(f.speedup)]


def _bench_row(name: str, f: BenchmarkFigures) -> list[str]:
    speeds = [num(f.spec_tokens_per_s, 1), num(f.target_tokens_per_s, 1), num(f.greedy_match, 3)]
    return [name, num(f.samples), *_rates(f), *speeds]


def _macro_row(name: str, f: MacroFigures, result: EvalResult) -> list[str]:
    prompts = sum(result.benchmarks[b].samples for b in f.benchmarks if b in result.benchmarks)
    return [name, num(prompts), *_rates(f), "-", "-", "-"]  # no timings or greedy match of their own


def figures_table(result: EvalResult) -> Table:
    """One row per benchmark, per domain (macro), over all benchmarks (macro) and pooled (micro)."""
    header = ["benchmark", "prompts", "tau", "propose", "verify rate", "speedup", "spec tok/s", "plain tok/s",
              "greedy match"]  # fmt: skip
    rows = [_bench_row(name, f) for name, f in result.benchmarks.items()]
    rows += [_macro_row(f"{domain} (macro)", f, result) for domain, f in result.domains.items()]
    rows += [_macro_row("macro", result.macro, result), _bench_row("pooled (micro)", result.pooled)]
    return header, rows


def position_table(result: EvalResult, key: str) -> Table:
    """A per-position rate (`accept_at` or `conditional_acceptance`) of each benchmark, macro and pooled."""
    groups = [*result.benchmarks.items(), ("macro", result.macro), ("pooled (micro)", result.pooled)]
    positions = range(result.num_draft_tokens)
    header = ["benchmark", *(f"k={k}" for k in positions)]
    return header, [[name, *(num(_at(getattr(f, key), k), 3) for k in positions)] for name, f in groups]


def calibration_table(c: ConfidenceFigures) -> Table:
    header = ["k", "mean c_k", "predicted prefix", "observed prefix", "cond. ECE", "cond. AUROC",
              "cond. Brier", "prefix ECE", "prefix ECE (STS)", "STS temperature"]  # fmt: skip
    columns = [c.mean, c.predicted_prefix, c.observed_prefix, c.conditional_ece, c.conditional_auroc,
               c.conditional_brier, c.prefix_ece, c.prefix_ece_sts, c.sts_temperatures]  # fmt: skip
    if c.sts_heldout:  # eval.calibration_prompts: the temperatures saved with the draft
        header = [*header, "prefix ECE (held-out STS)", "held-out temperature"]
        columns += [c.sts_heldout["prefix_ece"], c.sts_heldout["temperatures"]]
    return header, [[str(k), *(num(_at(col, k), 3) for col in columns)] for k in range(len(c.mean))]


def reliability_table(c: ConfidenceFigures) -> Table:
    rows = [[f"{b['lo']:.1f}-{b['hi']:.1f}", num(int(b["count"])), num(b["score"], 3), num(b["observed"], 3)]
            for b in c.reliability]  # fmt: skip
    return ["score bin", "count", "mean score", "observed rate"], rows


def serving_table(serving: ServingFigures) -> Table:
    """Tokens a second at each concurrency: plain decoding, each fixed draft length, the scheduler (with
    its drafts verified a request a step), and the best of them over plain."""
    lengths = range(1, len(serving.rows[0]["fixed"])) if serving.rows else range(0)
    header = ["concurrency", "plain tok/s", *(f"{drafts_label(n)} tok/s" for n in lengths)]
    scheduled = any(row["scheduler"] for row in serving.rows)
    header += ["scheduler tok/s", "scheduler drafts"] if scheduled else []
    rows = []
    for row in serving.rows:
        cells = [str(row["concurrency"]), *(num(served["tokens_per_s"], 1) for served in row["fixed"])]
        if scheduled:
            scheduler = row["scheduler"] or {}
            cells += [num(scheduler.get("tokens_per_s"), 1), num(scheduler.get("mean_length"))]
        rows.append([*cells, num(serving.best_over_plain(row))])
    return [*header, "best / plain"], rows


def profile_table(serving: ServingFigures) -> Table:
    header = ["tokens a step", *(str(n) for n in serving.profile_tokens)]
    return header, [["steps a second", *(num(v, 1) for v in serving.profile_steps_per_s)]]


def serving_notes(serving: ServingFigures) -> dict[str, str]:
    scheduler = (
        f"; the scheduler (DSpark's Algorithm 1) admits drafts by prefix survival, STS temperatures from "
        f"{serving.temperatures_from}"
        if serving.temperatures_from
        else ""
    )
    return {
        "Serving (simulated)": "Tokens a second of the engine serving that many requests at once, from this "
        f"evaluation's rounds replayed for {serving.steps} steps on the target's measured step times "
        f"(below): plain decoding, each fixed draft length{scheduler}. A step that drafts also pays "
        f"{serving.draft_s * 1e3:.1f} ms, one request's measured drafting time a round (a batched "
        "drafter's lower bound).",
        "Target steps a second": f"Measured here: one forward verifying n tokens after "
        f"{serving.profile_context} cached ones; beyond the last point, time grows in proportion.",
    }


NOTES = {
    "Figures": "tau: tokens per target forward (its own token included); propose: drafts put up a round; "
    "verify rate: share of the verified tokens kept; speedup: speculative over plain tokens per second.",
    "accept@k": "Of the rounds that put up draft k (0-based), the share that kept it.",
    "Conditional acceptance": "P(draft k kept | drafts 0..k-1 kept): the paper's per-position rate.",
    "Confidence head calibration (pooled)": "c_k against draft k surviving once the drafts before it have; "
    "prefix ECE of c_0 * ... * c_k, raw and after Sequential Temperature Scaling (cross-fitted).",
    "Reliability bins": "Every position pooled: mean score against the observed survival rate, per bin.",
    "tau": "Tokens per target forward per benchmark, per domain and over all benchmarks (macro means).",
    "Pooled accept@k": "Every round of every benchmark pooled.",
}


def run_sections(result: EvalResult) -> list[Section]:
    """Every table of one run's report, each with a line (`NOTES`) saying what its figures are."""
    tables = {
        "Figures": figures_table(result),
        "accept@k": position_table(result, "accept_at"),
        "Conditional acceptance": position_table(result, "conditional_acceptance"),
    }
    c = result.pooled.confidence
    if c is not None:
        tables["Confidence head calibration (pooled)"] = calibration_table(c)
        if c.reliability:
            tables["Reliability bins"] = reliability_table(c)
    notes = dict(NOTES)
    if result.serving is not None:
        tables["Serving (simulated)"] = serving_table(result.serving)
        tables["Target steps a second"] = profile_table(result.serving)
        notes |= serving_notes(result.serving)
    return [(heading, notes[heading], table) for heading, table in tables.items()]


def facts(result: EvalResult) -> list[tuple[str, str]]:
    """The settings a reader needs to trust the figures, as (label, value)."""
    builtin = result.builtin_eval or not result.data_dir
    threshold = f"{result.confidence_threshold:g}" if result.confidence_threshold else "off"
    items = [
        ("target", result.target), ("algo", result.algo), ("temperature", f"{result.temperature:g}"),
        ("drafts per round", str(result.num_draft_tokens)), ("max new tokens", str(result.max_new_tokens)),
        ("prompts", "built-in prompts (a smoke test)" if builtin else str(result.data_dir)),
        ("confidence threshold", threshold),
    ]  # fmt: skip
    if result.greedy_match_note:
        items.append(("greedy match note", result.greedy_match_note))
    return items


def default_title(result: EvalResult) -> str:
    return f"{result.algo} on {result.target}"


def _md_table(table: Table) -> str:
    header, rows = table
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
                      *map(line, rows)])  # fmt: skip


def _md_sections(sections: list[Section], level: str = "##") -> list[str]:
    return [f"{level} {heading}\n\n{note}\n\n{_md_table(table)}" for heading, note, table in sections]


def markdown_report(result: EvalResult, title: str | None = None) -> str:
    """One run's report.md: its settings, then every table of `run_sections`."""
    header = "; ".join(f"**{label}** {value}" for label, value in facts(result)) + "."
    parts = [f"# {title or default_title(result)}", header, *_md_sections(run_sections(result))]
    return "\n\n".join(parts) + "\n"


def _names(groups) -> list[str]:
    return list(dict.fromkeys(name for group in groups for name in group))


def comparison_sections(results: list[tuple[str, EvalResult]]) -> list[Section]:
    """tau per benchmark, per domain and macro (with macro speedup), then pooled accept@k, a row a run."""
    benches = _names(r.benchmarks for _, r in results)
    domains = _names(r.domains for _, r in results)
    header = ["run", *benches, *(f"{d} (macro)" for d in domains), "macro tau", "macro speedup"]
    rows = [[name, *(num(getattr(r.benchmarks.get(b), "tau", None)) for b in benches),
             *(num(getattr(r.domains.get(d), "tau", None)) for d in domains), num(r.macro.tau),
             num(r.macro.speedup)] for name, r in results]  # fmt: skip
    positions = range(max(r.num_draft_tokens for _, r in results))
    accept = [[name, *(num(_at(r.pooled.accept_at, k), 3) for k in positions)] for name, r in results]
    accept_header = ["run", *(f"k={k}" for k in positions)]
    return [
        ("tau", NOTES["tau"], (header, rows)),
        ("Pooled accept@k", NOTES["Pooled accept@k"], (accept_header, accept)),
    ]


def comparison_markdown(results: list[tuple[str, EvalResult]]) -> str:
    if not results:
        raise DeepSpecError("no evaluation results to compare")
    parts = [f"# {len(results)} evaluation runs", *_md_sections(comparison_sections(results))]
    return "\n\n".join(parts) + "\n"


W, H, X0, X1, Y0, Y1 = 560, 320, 56, 400, 36, 272  # the plot area; the legend sits right of X1
esc = html.escape


def _text(x: float, y: float, text: str, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    where = f'x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
    return f"<text {where}{extra}>{esc(text)}</text>"


def _sx(v: float, hi: float) -> float:
    return X0 + v / hi * (X1 - X0)


def _sy(v: float, top: float = 1.0) -> float:
    return Y1 - v / top * (Y1 - Y0)


def _top(values: list[float]) -> float:
    """The y axis' top: the smallest of 0.1, 0.2, 0.5 and 1 at or above every value, so low rates show."""
    return next(t for t in (0.1, 0.2, 0.5, 1.0) if all(v <= t for v in values))


def _axes(title: str, x_ticks: list[tuple[float, str]], labels: tuple[str, str], top: float = 1) -> list[str]:
    """Frame, y grid 0..top, x ticks at the given (position, label), axis labels (x, y) and the title."""
    (x_label, y_label), grid = labels, [top * i / 4 for i in range(5)]
    out = [f'<rect x="{X0}" y="{Y0}" width="{X1 - X0}" height="{Y1 - Y0}" fill="#fff" stroke="#888"/>']
    for v, y in ((v, _sy(v, top)) for v in grid):
        out.append(f'<line x1="{X0}" x2="{X1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(_text(X0 - 6, y + 4, f"{v:g}", "end"))
    for x, label in x_ticks:
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y1}" y2="{Y1 + 5}" stroke="#888"/>')
        out.append(_text(x, Y1 + 18, label))
    out.append(_text((X0 + X1) / 2, Y1 + 38, x_label, size=12))
    middle = (Y0 + Y1) / 2
    out.append(_text(16, middle, y_label, size=12, extra=f' transform="rotate(-90 16 {middle})"'))
    out.append(_text(W / 2, 20, title, size=14, extra=' font-weight="bold"'))
    return out


def _svg(title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'role="img" aria-label="{esc(title)}" font-family="sans-serif">\n<title>{esc(title)}</title>\n'
            + "\n".join(parts) + "\n</svg>")  # fmt: skip


def _legend(i: int, name: str, color: str, style: str = 'stroke-width="3"') -> list[str]:
    y = Y0 + 8 + 18 * i
    label = name if len(name) <= 20 else name[:19] + "…"
    return [f'<line x1="{X1 + 14}" x2="{X1 + 34}" y1="{y}" y2="{y}" stroke="{color}" {style}/>',
            _text(X1 + 40, y + 4, label, "start")]  # fmt: skip


def acceptance_chart(title: str, series: list[tuple[str, list[float | None]]]) -> str:
    """accept@k against k, one polyline per series (broken where a rate is None), a "pooled" one bold."""
    hi = max(max((len(v) for _, v in series), default=1) - 1, 1)
    top = _top([v for _, values in series for v in values if v is not None])
    parts = _axes(title, [(_sx(k, hi), str(k)) for k in range(hi + 1)], ("draft position k", "accept@k"), top)
    for i, (name, values) in enumerate(series):
        pooled = name.startswith("pooled")
        color, width = (POOLED_COLOR, 3) if pooled else (COLORS[i % len(COLORS)], 1.8)
        points = [(_sx(k, hi), _sy(v, top)) for k, v in enumerate(values) if v is not None]
        for missing, group in itertools.groupby(enumerate(values), key=lambda kv: kv[1] is None):
            known = [] if missing else [f"{_sx(k, hi):.1f},{_sy(v, top):.1f}" for k, v in group]
            if len(known) > 1:  # a lone point gets only its dot
                style = f'fill="none" stroke="{color}" stroke-width="{width}"'
                parts.append(f'<polyline points="{" ".join(known)}" {style}/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points]
        parts += _legend(i, name, color)
    return _svg(title, parts)


def reliability_chart(title: str, bins: list[dict[str, float]]) -> str:
    """Observed survival rate against mean score per bin, over the diagonal; area and label give counts."""
    most = max((b["count"] for b in bins), default=1)
    ticks = [(_sx(v, 1), f"{v:g}") for v in (0, 0.2, 0.4, 0.6, 0.8, 1)]
    parts = _axes(title, ticks, ("mean score c_k", "observed survival rate"))
    dashed = 'stroke-dasharray="5 4"'
    parts.append(f'<line x1="{X0}" y1="{Y1}" x2="{X1}" y2="{Y0}" stroke="#999" {dashed}/>')
    for b in bins:
        x, y, r = _sx(b["score"], 1), _sy(b["observed"]), 3 + 9 * (b["count"] / most) ** 0.5
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{COLORS[0]}" fill-opacity="0.55" '
                     f'stroke="{COLORS[0]}"/>')  # fmt: skip
        halo = ' stroke="#fff" stroke-width="3" paint-order="stroke"'  # legible over lines and other dots
        parts.append(_text(x, y - r - 3, f"n={int(b['count'])}", size=10, extra=halo))
    parts += _legend(0, "bins (area ~ count)", COLORS[0]) + _legend(1, "perfect calibration", "#999", dashed)
    return _svg(title, parts)


def _ceiling(value: float) -> float:
    """The y axis' top for ratios: the first of 1, 1.5, 2, 3, 4, 5, 6, 8, 10, ... at or above `value`
    (up to 8e6; `value` itself past that)."""
    tops = (step * 10.0**e for e in range(7) for step in (1, 1.5, 2, 3, 4, 5, 6, 8))
    return next((top for top in tops if top >= value), value)


def serving_chart(title: str, serving: ServingFigures) -> str:
    """Throughput over plain decoding's against concurrency (evenly spaced ticks: the concurrencies are
    usually powers of two), a line per fixed draft length and a bold one for the scheduler."""
    concurrency = [row["concurrency"] for row in serving.rows]
    lengths = len(serving.rows[0]["fixed"])
    series = [
        (drafts_label(n), [row["fixed"][n]["tokens_per_s"] for row in serving.rows])
        for n in range(1, lengths)
    ]
    if any(row["scheduler"] for row in serving.rows):
        series.append(
            ("scheduler", [(row["scheduler"] or {}).get("tokens_per_s", 0.0) for row in serving.rows])
        )
    plain = [row["fixed"][0]["tokens_per_s"] for row in serving.rows]
    ratios = [
        (name, [v / p if p else 0.0 for v, p in zip(values, plain, strict=True)]) for name, values in series
    ]
    top = _ceiling(max([1.0, *(v for _, values in ratios for v in values)]))
    hi = max(len(concurrency) - 1, 1)
    ticks = [(_sx(i, hi), str(n)) for i, n in enumerate(concurrency)]
    parts = _axes(title, ticks, ("concurrent requests", "tokens/s over plain decoding"), top)
    dashed = 'stroke-dasharray="5 4"'
    parts.append(
        f'<line x1="{X0}" x2="{X1}" y1="{_sy(1, top):.1f}" y2="{_sy(1, top):.1f}" stroke="#999" {dashed}/>'
    )
    for i, (name, values) in enumerate(ratios):
        scheduler = name == "scheduler"
        color, width = (POOLED_COLOR, 3) if scheduler else (COLORS[i % len(COLORS)], 1.8)
        points = [(_sx(k, hi), _sy(v, top)) for k, v in enumerate(values)]
        if len(points) > 1:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="{width}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points]
        parts += _legend(i, name, color)
    parts += _legend(len(ratios), "plain decoding", "#999", dashed)
    return _svg(title, parts)


CSS = """
body { font-family: system-ui, sans-serif; color: #222; margin: 24px auto; max-width: 1400px; padding: 0 1em }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 20px 0 4px; } p.what { color: #555; margin: 0 0 6px; font-size: 0.9em; }
p.facts span { display: inline-block; margin-right: 16px; font-size: 0.92em; }
p.note { background: #fff8e1; padding: 6px; }
table { border-collapse: collapse; font-size: 0.82em; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 5px; border-bottom: 1px solid #e6e6e6; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; font-size: 0.92em; }
td:first-child, th:first-child { text-align: left; } th span { white-space: nowrap; }
div.wide { overflow-x: auto; }
tbody tr:nth-child(even) { background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; margin-top: 16px; }
"""


def _html_table(table: Table) -> str:
    header, rows = table
    # a header wraps at spaces only, never inside "arena-hard-v2"
    head = "".join("<th>" + " ".join(f"<span>{esc(w)}</span>" for w in h.split()) + "</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return (
        f'<div class="wide"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table></div>'
    )


def _html_sections(sections: list[Section]) -> list[str]:
    return [f'<h3>{esc(h)}</h3>\n<p class="what">{esc(n)}</p>\n{_html_table(t)}' for h, n, t in sections]


def _html_run(name: str, result: EvalResult, heading: str) -> str:
    items = facts(result)
    spans = "".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in items if k != "greedy match note")
    parts = [f"<{heading}>{esc(name)}</{heading}>", f'<p class="facts">{spans}</p>']
    if result.greedy_match_note:
        parts.append(f'<p class="note">{esc(result.greedy_match_note)}</p>')
    parts += _html_sections(run_sections(result))
    series = [*((b, f.accept_at) for b, f in result.benchmarks.items()), ("pooled", result.pooled.accept_at)]
    figures = [acceptance_chart(f"accept@k: {name}", series)]
    c = result.pooled.confidence
    if c is not None and c.reliability:
        figures.append(reliability_chart(f"Reliability: {name}", c.reliability))
    if result.serving is not None and result.serving.rows:
        figures.append(serving_chart(f"Serving: {name}", result.serving))
    parts.append('<div class="figures">\n' + "\n".join(figures) + "\n</div>")
    return "<section>\n" + "\n".join(parts) + "\n</section>"


def html_report(results: list[tuple[str, EvalResult]]) -> str:
    """One page for one run, or several: their comparison first, then each run's tables and figures."""
    if not results:
        raise DeepSpecError("no evaluation results to report")
    if len(results) == 1:
        title, body = results[0][0], [_html_run(*results[0], heading="h1")]
    else:
        title = f"{len(results)} evaluation runs"
        chart = acceptance_chart("Pooled accept@k per run", [(n, r.pooled.accept_at) for n, r in results])
        body = [f"<h1>{esc(title)}</h1>", *_html_sections(comparison_sections(results))]
        body += [f'<div class="figures">\n{chart}\n</div>', *(_html_run(n, r, "h2") for n, r in results)]
    head = f'<meta charset="utf-8">\n<title>{esc(title)}</title>\n<style>{CSS}</style>'
    page = "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", head, "</head>", "<body>", *body])
    return page + "\n</body>\n</html>\n"


def write_reports(result: EvalResult, out_dir: Path) -> list[Path]:
    """report.md and report.html of one run into `out_dir`, each written whole or not at all."""
    out_dir, title = Path(out_dir), default_title(result)
    paths = [out_dir / "report.md", out_dir / "report.html"]
    atomic_write_text(paths[0], markdown_report(result, title))
    atomic_write_text(paths[1], html_report([(title, result)]))
    return paths


def find_results(path: Path) -> Path:
    """The results.json that `path` names: the file, an eval/<algo> folder, or a run folder with one."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DeepSpecError(f"{path}: no such file or folder")
    if (path / RESULTS_FILE).is_file():
        return path / RESULTS_FILE
    found = sorted((path / "eval").glob(f"*/{RESULTS_FILE}"))
    if not found:
        raise DeepSpecError(
            f"{path}: no evaluation results (no {RESULTS_FILE} there, nor eval/<algo>/{RESULTS_FILE} "
            f"under it); run `deepspec evaluate run_dir={path}` first"
        )
    if len(found) > 1:
        listed = ", ".join(str(f.parent) for f in found)
        raise DeepSpecError(f"{path}: {len(found)} evaluations ({listed}); name the one to report")
    return found[0]


def load_results(path: Path) -> EvalResult:
    """The EvalResult at `path` (see `find_results`); a DeepSpecError naming the file if it is not one."""
    file = find_results(path)
    try:
        return EvalResult.from_json(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as err:
        raise DeepSpecError(f"{file}: cannot read it ({err})") from err
    except ValueError as err:
        raise DeepSpecError(f"{file}: not valid JSON ({err})") from err
    except (KeyError, TypeError, AttributeError) as err:
        what = f"{type(err).__name__}: {err}"
        raise DeepSpecError(f"{file}: not the evaluate stage's results ({what})") from err


def _run_folder(path: Path) -> Path:
    """The run folder a results path points into: `<run>/eval/<algo>/results.json` gives `<run>`."""
    path = Path(path).resolve()
    path = path.parent if path.is_file() else path
    return path.parent.parent if path.parent.name == "eval" else path


def _algo_folder(path: Path) -> str | None:
    """The algorithm a path names, when it points into `<run>/eval/<algo>`."""
    path = Path(path).resolve()
    path = path.parent if path.is_file() else path
    return path.name if path.parent.name == "eval" else None


def run_names(paths: list[Path]) -> list[str]:
    """Each run folder's name; runs of one name get parent folders prepended until they differ; one run
    folder named for several of its algorithms (`<run>/eval/<algo>`) gives "<run>/<algo>"; the same
    folder given twice gets "#2", "#3"."""
    folders = [_run_folder(p) for p in paths]
    depth = [1] * len(folders)

    def name(i: int) -> str:
        return "/".join(folders[i].parts[-depth[i] :])

    def clashes(i: int) -> bool:
        others = (j for j in range(len(folders)) if folders[j] != folders[i])
        return depth[i] < len(folders[i].parts) and any(name(j) == name(i) for j in others)

    while clash := [i for i in range(len(folders)) if clashes(i)]:
        for i in clash:
            depth[i] += 1
    names, seen = [name(i) for i in range(len(folders))], {}
    for i, path in enumerate(paths):
        algo = _algo_folder(path)
        if algo and folders.count(folders[i]) > 1:
            names[i] = f"{names[i]}/{algo}"
    for i, base in enumerate(names):
        seen[base] = seen.get(base, 0) + 1
        names[i] = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return names
