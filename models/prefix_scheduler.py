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

`simulate` replays recorded rounds (`speculative.recorded_rounds`: the drafts each round put up, how many
verification kept, and their c_k) at a concurrency: each step draws one round per request, the scheduler
(or a fixed length, capped at what the round put up) picks the lengths, a request gains
min(kept, l_r) + 1 tokens, and the step takes 1 / SPS(B) seconds, plus the drafting time of a step when
given (`draft_s`: the batch's drafts, run before it is scheduled; none when no request drafts). Replaying
a round's first l drafts is exact because whether draft j is kept never depends on the drafts after it.
`serving_sweep` runs it over concurrencies for plain decoding, every fixed length and the scheduler;
`measure_step_profile` measures SPS on the machine at hand.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from deepspec.models.calibration import prefix_survival

Recorded = tuple[int, int, Sequence[float]]  # a round: drafts put up, drafts kept, their c_k (or none)


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
    context: int = 0  # cached tokens before each measured step

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
    rounds: Sequence[Recorded],
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
    with the scheduler on the STS-calibrated survivals (rounds with c_k), or every request at
    `fixed_length` drafts."""
    rng = random.Random(seed)
    tokens = seconds = drafts = 0.0
    for _ in range(steps):
        batch = [rounds[rng.randrange(len(rounds))] for _ in range(concurrency)]
        if fixed_length is None:
            lengths = schedule([prefix_survival(c, temperatures) for _, _, c in batch], profile)
        else:
            lengths = [min(fixed_length, proposed) for proposed, _, _ in batch]
        tokens += sum(min(kept, n) + 1 for (_, kept, _), n in zip(batch, lengths, strict=True))
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


def serving_sweep(
    rounds: Sequence[Recorded],
    profile: StepProfile,
    concurrency: Sequence[int],
    *,
    draft_s: float,
    steps: int = 200,
    temperatures: Sequence[float] | None = None,
) -> list[dict]:
    """At each concurrency: every fixed draft length up to the longest round put up (`fixed[l]`; l = 0 is
    plain decoding) and the scheduler when every round has c_k (else None); each a `Served` as a dict."""
    longest = max((proposed for proposed, _, _ in rounds), default=0)
    scheduled = bool(rounds) and all(len(c) == proposed for proposed, _, c in rounds)
    rows = []
    for n in concurrency:
        common = {"steps": steps, "draft_s": draft_s}
        fixed = [
            asdict(simulate(rounds, profile, n, fixed_length=length, **common))
            for length in range(longest + 1)
        ]
        scheduler = simulate(rounds, profile, n, temperatures=temperatures, **common) if scheduled else None
        rows.append({"concurrency": n, "fixed": fixed, "scheduler": scheduler and asdict(scheduler)})
    return rows


@torch.no_grad()
def measure_step_profile(
    model, layer_ids: list[int], context: int, tokens: Sequence[int], repeats: int = 3
) -> StepProfile:
    """Steps a second of the target verifying n new tokens after `context` cached ones (a verify step as
    the engine runs it: every position's logits and the `layer_ids` features; median of `repeats`), for
    each n in `tokens`. One sequence: a batch's attention over several contexts is not modelled."""
    from deepspec.models.target import TargetRunner

    device = model.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    vocab = model.config.vocab_size
    draw = torch.Generator().manual_seed(0)
    runner = TargetRunner(model, layer_ids)
    runner.extend(torch.randint(0, vocab, (context,), generator=draw), features=False, last_logits_only=True)
    steps_per_s = []
    for n in tokens:
        ids, times = torch.randint(0, vocab, (n,), generator=draw), []
        for _ in range(repeats):
            sync()
            began = time.perf_counter()
            runner.extend(ids)
            sync()
            times.append(time.perf_counter() - began)
            runner.rollback(context)
        steps_per_s.append(1.0 / statistics.median(times))
    return StepProfile(list(tokens), steps_per_s, context)
