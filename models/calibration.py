"""How well a confidence head's scores predict verification: ECE, AUROC, Brier and reliability bins.

DSpark's head gives each drafted slot k a score c_k, trained toward 1 - TV(p_draft, p_target): the chance
that draft k survives verification once drafts 0..k-1 have. So the event a score is judged against is
that conditional survival, over the rounds that put up slot k and kept every slot before it; the product
c_0 * ... * c_k, the chance that the whole prefix survives, is judged in `speculative.confidence_stats`.

- ECE: the mean gap |mean score - observed rate| over equal-width score bins, weighted by bin size.
- AUROC: the chance that a surviving draft scored above a rejected one (ties count half); how well the
  score ranks drafts, whatever its scale. None when only one outcome occurred.
- Brier: the mean squared gap between score and outcome (0 or 1).

Sequential Temperature Scaling (the DSpark paper's STS) calibrates the prefix survival estimates
a_k = prod_{j<=k} sigmoid(logit(c_j) / T_j) slot by slot, left to right: with T_0..T_{k-1} fixed, T_k is
the value of a log-spaced grid whose a_k has the lowest ECE against "drafts 0..k all kept", over the
rounds that put slot k up. A temperature above 1 softens an overconfident head, below 1 sharpens it.
The scheduler (`prefix_scheduler.py`) reads the calibrated a_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BINS = 10


def _tensors(scores: Sequence[float], outcomes: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(scores) != len(outcomes):
        raise ValueError(f"{len(scores)} scores for {len(outcomes)} outcomes")
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(outcomes, dtype=torch.float64)


def reliability(scores: Sequence[float], outcomes: Sequence[bool], bins: int = BINS) -> list[dict]:
    """Equal-width bins over [0, 1]: each non-empty bin's edges, count, mean score and observed rate."""
    s, y = _tensors(scores, outcomes)
    index = (s * bins).long().clamp(0, bins - 1)  # a score of exactly 1 falls in the last bin
    out = []
    for b in range(bins):
        chosen = index == b
        n = int(chosen.sum())
        if n:
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                        "score": float(s[chosen].mean()), "observed": float(y[chosen].mean())})  # fmt: skip
    return out


def ece(scores: Sequence[float], outcomes: Sequence[bool], bins: int = BINS) -> float | None:
    if not scores:
        return None
    return sum(
        b["count"] * abs(b["score"] - b["observed"]) for b in reliability(scores, outcomes, bins)
    ) / len(scores)


def auroc(scores: Sequence[float], outcomes: Sequence[bool]) -> float | None:
    """Mann-Whitney: mean over (survivor, rejected) pairs of [score_s > score_r] + 0.5 [equal]."""
    s, y = _tensors(scores, outcomes)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    # ranks (1-based) with ties averaged; the survivors' rank sum counts the pairs they win
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]
    rank_sum = float(ranks[: len(pos)].sum())
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def brier(scores: Sequence[float], outcomes: Sequence[bool]) -> float | None:
    if not scores:
        return None
    s, y = _tensors(scores, outcomes)
    return float(((s - y) ** 2).mean())


STS_GRID = [round(10 ** (i / 40), 4) for i in range(-52, 53)]  # 0.05 .. 20, log-spaced
Round = tuple[Sequence[float], int]  # the c_k of the drafts a round put up, and how many it kept


def _logit(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(1e-6, 1 - 1e-6)
    return torch.log(c) - torch.log1p(-c)


def prefix_survival(confidence: Sequence[float], temperatures: Sequence[float] | None = None) -> list[float]:
    """a_k = prod_{j<=k} sigmoid(logit(c_j) / T_j): the chance that drafts 0..k all survive (T_j = 1:
    the raw product)."""
    c = torch.tensor(list(confidence), dtype=torch.float64)
    if temperatures is not None:
        c = torch.sigmoid(_logit(c) / torch.tensor(list(temperatures[: len(c)]), dtype=torch.float64))
    return torch.cumprod(c, 0).tolist()


def _slot(rounds: Sequence[Round], k: int) -> tuple[torch.Tensor, list[bool]]:
    """The rounds that put slot k up: their c_0..c_k ([n, k+1]) and whether drafts 0..k were all kept."""
    chosen = [(c, kept) for c, kept in rounds if len(c) > k]
    scores = torch.tensor([list(c[: k + 1]) for c, _ in chosen], dtype=torch.float64).reshape(-1, k + 1)
    return scores, [kept > k for _, kept in chosen]


def _survival(scores: torch.Tensor, temperatures: Sequence[float] | None) -> list[float]:
    """a_k of every row of c_0..c_k ([n, k+1]): `prefix_survival`'s last entry, for many rounds at once."""
    if temperatures is not None:
        t = torch.tensor(list(temperatures[: scores.shape[1]]), dtype=torch.float64)
        scores = torch.sigmoid(_logit(scores) / t)
    return scores.prod(1).tolist()


def fit_sts(rounds: Sequence[Round], slots: int, grid: Sequence[float] = STS_GRID) -> list[float]:
    """One temperature per slot, fitted left to right (see the module docstring); slots no round put up
    keep 1.0."""
    temperatures: list[float] = []
    for k in range(slots):
        scores, kept = _slot(rounds, k)
        best = min(grid, key=lambda t: ece(_survival(scores, [*temperatures, t]), kept)) if kept else 1.0
        temperatures.append(float(best))
    return temperatures


def prefix_ece(rounds: Sequence[Round], slots: int, temperatures: Sequence[float] | None = None) -> list:
    """ECE of a_k against "drafts 0..k all kept", per slot (None where no round put slot k up)."""
    return [
        ece(_survival(scores, temperatures), kept)
        for scores, kept in (_slot(rounds, k) for k in range(slots))
    ]


def cross_fitted_prefix_ece(folds: Sequence[Sequence[Round]], slots: int) -> list[float | None]:
    """ECE of the STS-calibrated a_k per slot, each fold's rounds scored with temperatures fitted on the
    other folds: what calibration gives on prompts it was not fitted on."""
    scored: list[list[float]] = [[] for _ in range(slots)]
    kept: list[list[bool]] = [[] for _ in range(slots)]
    for i, fold in enumerate(folds):
        rest = [r for j, other in enumerate(folds) if j != i for r in other]
        temperatures = fit_sts(rest, slots)
        for k in range(slots):
            scores, outcomes = _slot(fold, k)
            scored[k] += _survival(scores, temperatures)
            kept[k] += outcomes
    return [ece(s, o) for s, o in zip(scored, kept, strict=True)]
