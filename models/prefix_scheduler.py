"""DSpark's hardware-aware prefix scheduler (the paper's Algorithm 1), and a simulation of serving with it.

A verification step runs the target over every token the batch verifies, B in all; the target does
SPS(B) such steps a second, a measured profile (`StepProfile`). Request r offers its drafts 0..P_r-1
with prefix survival estimates a_{r,j}, the chance that drafts 0..j all pass (the confidence head's
products after Sequential Temperature Scaling, `calibration.py`). Verifying the first l_r drafts of each
request yields, in expectation, tau = sum_r (1 + sum_{j < l_r} a_{r,j}) tokens a step (every request
gets at least its target's own token), so throughput is Theta = tau * SPS(B) with B = sum_r (1 + l_r).
The scheduler starts from l_r = 0 and admits drafts in order of survival, while Theta grows: on an idle
engine (SPS flat in B) it verifies long prefixes, under load only the likeliest ones.

The schedule only chooses how many drafts each request verifies; verification keeps its lossless rule
(`speculative.py`), so the output law does not depend on it.

`simulate` replays recorded rounds (each round's c_k and how many drafts verification kept of a full
block) at a concurrency: each step draws one round per request, the scheduler (or a fixed length) picks
the lengths, a request gains min(kept, l_r) + 1 tokens, and the step takes 1 / SPS(B) seconds, plus the
drafting time of a step when given (`draft_s`: the batch's drafts, run before it is scheduled; none
when no request drafts).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deepspec.models.calibration import Round, prefix_survival


def schedule(survival: Sequence[Sequence[float]], sps: Callable[[int], float]) -> list[int]:
    """Algorithm 1: draft lengths l_r for the requests whose prefix survivals are `survival` [r][j]."""
    lengths = [0] * len(survival)
    tokens, expected = len(survival), float(len(survival))  # each request's own token
    best, best_lengths = expected * sps(tokens), list(lengths)
    # by survival, highest first; a prefix's drafts come in order because a_{r,j} cannot grow with j
    candidates = sorted((-a, r, j) for r, row in enumerate(survival) for j, a in enumerate(row) if a > 0)
    for negative, r, j in candidates:
        if j != lengths[r]:  # not the next draft of its prefix (a tie broke the order): skip it
            continue
        lengths[r], tokens, expected = j + 1, tokens + 1, expected - negative
        theta = expected * sps(tokens)
        if theta <= best:
            break
        best, best_lengths = theta, list(lengths)
    return best_lengths


@dataclass
class StepProfile:
    """Steps a second of the target against the tokens a step verifies, from measured points; linear in
    between, and beyond the last point the step time grows in proportion to the tokens."""

    tokens: list[int]  # increasing
    steps_per_s: list[float]

    def __call__(self, n: int) -> float:
        points = list(zip(self.tokens, self.steps_per_s, strict=True))
        if n <= points[0][0]:
            return points[0][1]
        for (t0, s0), (t1, s1) in zip(points, points[1:], strict=False):
            if n <= t1:
                return s0 + (s1 - s0) * (n - t0) / (t1 - t0)
        last_tokens, last_sps = points[-1]
        return last_sps * last_tokens / n


@dataclass
class Served:
    """What a simulated run served: tokens a second, and tokens a request a step."""

    tokens_per_s: float
    tokens_per_request_step: float
    mean_length: float  # drafts verified a request a step


def simulate(
    rounds: Sequence[Round],
    profile: StepProfile,
    concurrency: int,
    *,
    steps: int = 200,
    temperatures: Sequence[float] | None = None,
    fixed_length: int | None = None,
    draft_s: float = 0.0,
    seed: int = 0,
) -> Served:
    """Serve `concurrency` requests for `steps` steps from recorded rounds (see the module docstring):
    with the scheduler on the STS-calibrated survivals, or every request at `fixed_length` drafts."""
    rng = random.Random(seed)
    tokens = seconds = drafts = 0.0
    for _ in range(steps):
        batch = [rounds[rng.randrange(len(rounds))] for _ in range(concurrency)]
        if fixed_length is None:
            lengths = schedule([prefix_survival(c, temperatures) for c, _ in batch], profile)
        else:
            lengths = [min(fixed_length, len(c)) for c, _ in batch]
        tokens += sum(min(kept, n) + 1 for (_, kept), n in zip(batch, lengths, strict=True))
        seconds += 1.0 / profile(concurrency + sum(lengths)) + (draft_s if fixed_length != 0 else 0.0)
        drafts += sum(lengths)
    return Served(tokens / seconds, tokens / (steps * concurrency), drafts / (steps * concurrency))


def scheduled_lengths(
    profile: Callable[[int], float], temperatures: Sequence[float] | None = None
) -> Callable[[list[tuple]], list[int]]:
    """Algorithm 1 as `batch_speculative.batch_speculative_generate`'s `choose_lengths`: the requests'
    proposals (drafts, laws, confidences) in, the draft length each verifies out."""

    def choose(proposals: list[tuple]) -> list[int]:
        return schedule(
            [prefix_survival(confidence, temperatures) for _, _, confidence in proposals], profile
        )

    return choose
