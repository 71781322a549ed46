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
    skipped: bool = False


@dataclass
class TrainResult:
    draft_dir: str
    optimizer_steps: int
    weights_sha256: str
    data_fingerprint: str  # the data it learned from: cache shard checksums, or the answers file (online)
    final_metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


@dataclass
class BenchmarkFigures:
    """Speculative against plain decoding on one benchmark (or all of them pooled)."""

    samples: int
    new_tokens: int
    target_new_tokens: int
    verify_steps: int
    tau: float  # tokens per target forward, the target's own token included
    acceptance: list[float]  # per draft position
    spec_time_s: float
    target_time_s: float
    spec_tokens_per_s: float
    target_tokens_per_s: float
    speedup: float | None
    greedy_match: float | None  # at temperature 0: share of prompts whose output equals plain decoding's


@dataclass
class EvalResult:
    builtin_eval: bool
    data_dir: str | None
    target: str
    algo: str
    num_draft_tokens: int  # drafted per verify step
    temperature: float
    max_new_tokens: int
    seed: int
    draft_file: str
    draft_sha256: str
    benchmarks: dict[str, BenchmarkFigures]
    overall: BenchmarkFigures
    skipped: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any], **changes: Any) -> EvalResult:
        benchmarks = {name: BenchmarkFigures(**f) for name, f in data["benchmarks"].items()}
        return from_record(
            cls, data, benchmarks=benchmarks, overall=BenchmarkFigures(**data["overall"]), **changes
        )


@dataclass
class ExportResult:
    path: str
    architecture: str
    weights_sha256: str  # of the trained draft it was written from
    skipped: bool = False


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
