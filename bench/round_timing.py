"""Timing a speculative decoding round in place: the draft's call, the target's verify forward, the rest.

`timed_runner(clock)` is the engine's `TargetRunner` with its `extend` timed (the prefill, then verify
forwards, or one-token steps of plain decoding); `TimedDrafter` wraps a drafter's drafting call.
`rounds_of` turns one generation's events into rounds; `binned` averages them by context length. Only
torch is imported, so the GPU scripts use it on a device image without the project's other dependencies.
On a GPU every timed call synchronises the device before and after (`sync`), so its time is its own.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

CONTEXT_BINS = (0, 256, 512, 1024, 2048, 4096, 1 << 30)


class Clock:
    """The engine's timed calls, in order: ("prefill" | "verify" | "step" | "draft", context, seconds)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.events: list[tuple[str, int, float]] = []
        cuda = device is not None and device.type == "cuda"
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def time(self, kind: str, context: int, call: Callable[[], Any]) -> Any:
        self.sync()
        began = time.perf_counter()
        out = call()
        self.sync()
        self.events.append((kind, context, time.perf_counter() - began))
        return out


def timed_runner(clock: Clock):
    """`TargetRunner` whose `extend` records its time: the prefill, then verify forwards (or plain steps)."""
    from deepspec.models.target import TargetRunner

    class TimedRunner(TargetRunner):
        def extend(self, token_ids, **kwargs):
            kind = "prefill" if self.length == 0 else ("step" if token_ids.numel() == 1 else "verify")
            return clock.time(kind, self.length, lambda: super(TimedRunner, self).extend(token_ids, **kwargs))

    return TimedRunner


class TimedDrafter:
    """A drafter whose drafting call records its time; `decoding` passes through unless `no_cache`."""

    def __init__(self, inner, clock: Clock, no_cache: bool = False):
        self.num_draft_tokens = inner.num_draft_tokens
        name = "propose" if hasattr(inner, "propose") else "draft_logits"
        method = getattr(inner, name)

        @functools.wraps(method)  # keeps the signature the engine reads (context_ids, ...)
        def timed(context_features, *args, **kwargs):
            return clock.time(
                "draft", context_features.shape[0], lambda: method(context_features, *args, **kwargs)
            )

        setattr(self, name, timed)
        if hasattr(inner, "decoding") and not no_cache:
            self.decoding = inner.decoding


def rounds_of(events: list[tuple[str, int, float]], total_s: float) -> list[dict[str, float]]:
    """Rounds from one generation's events: a round starts at a draft call; the overhead is what the
    generation took beyond its prefill, drafts and verifies, shared evenly among its rounds."""
    rounds, prefill_s = [], 0.0
    for kind, context, seconds in events:
        if kind == "prefill":
            prefill_s += seconds
        elif kind == "draft":
            rounds.append({"context": context, "draft_s": seconds, "verify_s": 0.0})
        elif kind == "verify" and rounds:
            rounds[-1]["verify_s"] += seconds
    spare = total_s - prefill_s - sum(r["draft_s"] + r["verify_s"] for r in rounds)
    for r in rounds:
        r["overhead_s"] = spare / len(rounds)
    return rounds


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def binned(rows: list[dict[str, float]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean of `keys` over rows grouped by context length (CONTEXT_BINS)."""
    out = []
    for lo, hi in zip(CONTEXT_BINS, CONTEXT_BINS[1:], strict=False):
        chosen = [r for r in rows if lo <= r["context"] < hi]
        if chosen:
            means = {k: mean([r[k] for r in chosen]) for k in keys}
            out.append({"context": [lo, hi], "count": len(chosen), **means})
    return out
