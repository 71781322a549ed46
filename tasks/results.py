"""What each stage returns: typed records that flows pass on and the summary reads. A stage's completion
record (`_DONE.json`) holds the same fields, so a skipped stage returns what the run that made it did."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_record(cls: type[T], record: dict[str, Any], **changes: Any) -> T:
    """An instance of the dataclass `cls` from a stored record (other keys ignored), with `changes`."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in record.items() if k in names}, **changes})


def to_record(result: Any) -> dict[str, Any]:
    """The fields of a result to store, without `skipped` (a property of the run that reads it)."""
    record = asdict(result)
    record.pop("skipped", None)
    return record


@dataclass
class PromptsResult:
    path: str  # prompts.jsonl
    rows: int  # training prompts
    heldout: int
    rejected: int  # malformed rows set aside in rejects.jsonl
    duplicates: int
    source: str
    skipped: bool = False


@dataclass
class RegenResult:
    path: str  # answers.jsonl
    prompts: int
    rows: int  # answered prompts
    failed: int
    output_tokens: int
    truncated: int  # answers cut at max_new_tokens
    tokens_per_s: float  # of the run that made the answers
    backend: str
    skipped: bool = False


@dataclass
class CacheResult:
    mode: str  # cached, or online (no cache: training runs the target)
    url: str | None
    samples: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: int = 0
    shards_built: int = 0  # by this run
    heldout_samples: int = 0  # in shards of their own, for validation (not counted in samples)
    skipped: bool = False


@dataclass
class TrainResult:
    draft_dir: str
    optimizer_steps: int
    weights_sha256: str
    data_fingerprint: str  # the data it learned from: cache shard checksums, or the answers file (online)
    final_metrics: dict[str, float] = field(default_factory=dict)
    # the draft validation kept in best/: {step, metric, value, weights_sha256}; None without validation
    best: dict[str, Any] | None = None
    skipped: bool = False


@dataclass
class ConfidenceFigures:
    """A confidence head's outputs against verification, per draft position k (0-based); entries are
    None where no round put up position k (`models.speculative.confidence_stats`)."""

    mean: list[float | None]  # mean c_k
    predicted_prefix: list[float | None]  # mean c_0 * ... * c_k: the head's chance that drafts 0..k survive
    observed_prefix: list[float | None]  # share of rounds that kept drafts 0..k
    brier: list[float | None]  # mean (predicted - observed)^2
    # the raw c_k against draft k surviving once drafts 0..k-1 have (`models/calibration.py`); empty in
    # results written before these were measured
    conditional_ece: list[float | None] = field(default_factory=list)
    conditional_auroc: list[float | None] = field(default_factory=list)
    conditional_brier: list[float | None] = field(default_factory=list)
    reliability: list[dict[str, float]] = field(default_factory=list)  # bins: lo, hi, count, score, observed
    sts_temperatures: list[float] = field(default_factory=list)  # Sequential Temperature Scaling, per slot
    prefix_ece: list[float | None] = field(default_factory=list)  # of the raw c_0 * ... * c_k
    prefix_ece_sts: list[float | None] | None = None  # of the calibrated ones, cross-fitted on two folds
    # eval.calibration_prompts > 0: STS fitted on held-out prompts (temperatures, prompts, rounds, the
    # held-out file) and the prefix ECE of these rounds after it
    sts_heldout: dict[str, Any] | None = None


@dataclass
class BenchmarkFigures:
    """Speculative against plain decoding on one benchmark, or all of them with rounds pooled.

    Per round, P drafts put up, A kept, C tokens committed (A + 1, or A when a kept draft ended the turn),
    R rounds; rates with nothing to count are None (`models.speculative.acceptance_stats`).
    """

    samples: int
    new_tokens: int
    target_new_tokens: int
    verify_steps: int  # R
    tau: float | None  # sum C / R: tokens per target forward, the target's own token included
    propose: float | None  # sum P / R: upstream's #propose
    verify_rate: float | None  # sum C / (sum P + R): upstream's verify_rate
    accept_at: list[float | None]  # [k] #(A > k) / #(P > k): upstream's accept_rate@k
    conditional_acceptance: list[float | None]  # [k] #(A > k) / #(P > k, A >= k): the paper's rate
    acceptance: list[float]  # [k-1] #(A >= k) / R: share of all rounds that kept at least k drafts
    stopped_early: int  # rounds whose proposal the confidence head cut short
    confidence: ConfidenceFigures | None  # a draft with a confidence head (DSpark) only
    spec_time_s: float
    target_time_s: float
    spec_tokens_per_s: float
    target_tokens_per_s: float
    speedup: float | None
    greedy_match: float | None  # at temperature 0: share of prompts whose output equals plain decoding's

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchmarkFigures:
        confidence = data.get("confidence")
        return from_record(
            cls, data, confidence=None if confidence is None else ConfidenceFigures(**confidence)
        )


@dataclass
class MacroFigures:
    """Unweighted means over benchmarks (each benchmark counts once, however many rounds it ran); a
    benchmark whose figure is None is left out of that figure's mean."""

    benchmarks: list[str]
    tau: float | None
    propose: float | None
    verify_rate: float | None
    speedup: float | None
    accept_at: list[float | None]
    conditional_acceptance: list[float | None]


def drafts_label(n: int) -> str:
    """A fixed draft length as reports name it: "plain" (none), "1 draft", "N drafts"."""
    return "plain" if n == 0 else f"{n} draft" if n == 1 else f"{n} drafts"


@dataclass
class ServingFigures:
    """Throughput against concurrency, simulated from the evaluation's rounds on the target's measured
    steps a second (`models.prefix_scheduler.serving_sweep`; `eval.serving`)."""

    profile_context: int  # cached tokens before each profiled step
    profile_tokens: list[int]  # tokens a step verifies
    profile_steps_per_s: list[float]  # the target's steps a second at each
    draft_s: float  # mean drafting time a round, charged to every step that drafts
    steps: int  # simulated steps at each concurrency
    temperatures: list[float] | None  # STS temperatures the scheduler's survivals use
    temperatures_from: str | None  # "held-out prompts" or "these rounds (in-sample)"; None: no scheduler
    # a row per concurrency: {"concurrency": n, "fixed": [served at length 0, 1, ...], "scheduler": served
    # or None}, served = {"tokens_per_s", "tokens_per_request_step", "mean_length"}; length 0 is plain
    rows: list[dict[str, Any]]

    @staticmethod
    def best(row: dict[str, Any]) -> tuple[str, float]:
        """A row's best policy (`drafts_label` of a fixed length, or "scheduler") and its tokens/s."""
        policies = [(drafts_label(n), f["tokens_per_s"]) for n, f in enumerate(row["fixed"])]
        policies += [("scheduler", row["scheduler"]["tokens_per_s"])] if row["scheduler"] else []
        return max(policies, key=lambda policy: policy[1])

    @classmethod
    def best_over_plain(cls, row: dict[str, Any]) -> float | None:
        plain = row["fixed"][0]["tokens_per_s"]
        return cls.best(row)[1] / plain if plain > 0 else None


@dataclass
class EvalResult:
    builtin_eval: bool
    data_dir: str | None
    target: str
    algo: str
    num_draft_tokens: int  # drafted per verify step (at most, with a confidence threshold)
    temperature: float
    max_new_tokens: int
    seed: int
    greedy_match_note: str | None  # why greedy_match may be below 1 on a target verified in bf16/fp16
    shuffle_seed: int | None  # upstream's seeded shuffle of each benchmark file, or null: file order
    confidence_threshold: float  # 0: off
    draft_file: str
    draft_sha256: str
    prompts_file: str  # per-prompt records, one JSON object a line
    benchmarks: dict[str, BenchmarkFigures]
    domains: dict[str, MacroFigures]  # macro averages over each domain's benchmarks
    macro: MacroFigures  # over every benchmark
    pooled: BenchmarkFigures  # every round of every benchmark pooled (a micro average)
    serving: ServingFigures | None = None  # eval.serving.concurrency: [] leaves it out
    skipped: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any], **changes: Any) -> EvalResult:
        benchmarks = {name: BenchmarkFigures.from_json(f) for name, f in data["benchmarks"].items()}
        domains = {name: MacroFigures(**f) for name, f in data["domains"].items()}
        return from_record(
            cls,
            data,
            benchmarks=benchmarks,
            domains=domains,
            macro=MacroFigures(**data["macro"]),
            pooled=BenchmarkFigures.from_json(data["pooled"]),
            serving=ServingFigures(**data["serving"]) if data.get("serving") else None,
            **changes,
        )


@dataclass
class ExportResult:
    path: str
    architecture: str
    weights_sha256: str  # of the trained draft it was written from
    source: str = ""  # that draft's folder: train/<algo>/best/ or draft/ (`export.draft`)
    skipped: bool = False


@dataclass
class ReleaseResult:
    """The release step's decision (`<run_dir>/release-<algo>.json`)."""

    promoted: bool
    reason: str  # why, with both taus and the margin
    candidate_tau: float  # this run's macro tau
    released_tau: float | None  # the draft released before the decision (None: there was none)
    margin: float
    release: str  # the released draft's folder after the decision (`<release.dir>/<name>`), or ""
    model_version: str | None  # this run's export in the MLflow model registry


@dataclass
class PipelineResult:
    """Every stage's result, and the table the pipeline ends with."""

    prompts: PromptsResult
    regenerate: RegenResult
    cache: CacheResult
    train: TrainResult
    evaluate: EvalResult
    export: ExportResult
    table: str = ""
