"""The prefix scheduler (DSpark's Algorithm 1) against brute force, and the serving simulation by hand."""

from __future__ import annotations

import itertools
import random

import pytest

from deepspec.models.prefix_scheduler import (
    StepProfile,
    measure_step_profile,
    schedule,
    serving_sweep,
    simulate,
)


def theta(survival, lengths, sps):
    expected = sum(1 + sum(row[:n]) for row, n in zip(survival, lengths, strict=True))
    return expected * sps(len(survival) + sum(lengths))


def test_an_idle_engine_verifies_every_draft_and_a_busy_one_only_likely_ones():
    survival = [[0.9, 0.5, 0.1], [0.6, 0.2, 0.05]]
    assert schedule(survival, lambda b: 1.0) == [3, 3]  # steps cost nothing more: every draft helps
    # step time in proportion to the tokens: no draft surviving less than always pays for itself
    assert schedule(survival, lambda b: 1.0 / b) == [0, 0]
    # one token of spare room (flat up to 3 tokens): it goes to the likeliest draft
    assert schedule(survival, lambda b: 1.0 if b <= 3 else 3 / b) == [1, 0]


def test_greedy_admission_finds_the_best_prefixes_on_concave_profiles():
    """For a throughput curve that saturates, greedy admission by survival is optimal among prefixes:
    checked against every combination of lengths."""
    rng = random.Random(0)
    for _ in range(30):
        survival = []
        for _ in range(3):
            c = [rng.uniform(0.3, 0.95) for _ in range(4)]
            survival.append([float(x) for x in itertools.accumulate(c, lambda a, b: a * b)])
        knee = rng.choice([4, 6, 9])
        profile = StepProfile([1, knee, 64], [10.0, 10.0, 10.0 * knee / 64])  # flat, then compute-bound
        best = max(itertools.product(range(5), repeat=3), key=lambda n: theta(survival, n, profile))
        got = schedule(survival, profile)
        assert theta(survival, got, profile) == pytest.approx(theta(survival, best, profile), rel=1e-9)


def test_profile_interpolates_and_extrapolates_in_proportion():
    profile = StepProfile([1, 8, 16], [100.0, 90.0, 50.0])
    assert profile(1) == 100.0 and profile(4) == pytest.approx(100 - 10 * 3 / 7)
    assert profile(16) == 50.0 and profile(32) == pytest.approx(25.0)


def test_simulation_counts_tokens_and_time():
    rounds = [(2, 2, [0.9, 0.8]), (2, 0, [0.9, 0.1])]  # a round that keeps both drafts, one that keeps none
    flat = StepProfile([1, 100], [10.0, 10.0])
    full = simulate(rounds, flat, 4, steps=50, fixed_length=2, seed=1)
    none = simulate(rounds, flat, 4, steps=50, fixed_length=0, seed=1)
    assert none.tokens_per_request_step == 1.0 and none.tokens_per_s == pytest.approx(40.0)
    assert full.mean_length == 2.0 and 1.0 < full.tokens_per_request_step < 3.0
    scheduled = simulate(rounds, flat, 4, steps=50, seed=1)  # a flat profile: verify everything offered
    assert scheduled.tokens_per_s == pytest.approx(full.tokens_per_s)
    # drafting costs a step its time: 0.1 s of verify plus 0.1 s of drafting halves the rate
    drafting = simulate(rounds, flat, 4, steps=50, fixed_length=2, seed=1, draft_s=0.1)
    assert drafting.tokens_per_s == pytest.approx(full.tokens_per_s / 2)
    assert simulate(
        rounds, flat, 4, steps=50, fixed_length=0, seed=1, draft_s=0.1
    ).tokens_per_s == pytest.approx(40)


def test_fixed_lengths_stop_at_what_a_round_put_up():
    rounds = [(1, 1, []), (3, 2, [])]  # a round cut short after one draft (kept), a full one keeping 2
    flat = StepProfile([1, 100], [10.0, 10.0])
    served = simulate(rounds * 50, flat, 1, steps=400, fixed_length=3, seed=0)
    short = simulate([rounds[0]], flat, 1, steps=10, fixed_length=3)
    assert short.mean_length == 1.0 and short.tokens_per_request_step == 2.0
    assert 1.0 < served.mean_length < 3.0 and 2.0 < served.tokens_per_request_step < 3.0


def test_serving_sweep_rows():
    rounds = [(2, 2, [0.9, 0.8]), (2, 0, [0.9, 0.1])]
    profile = StepProfile([1, 4, 64], [10.0, 10.0, 1.0])
    rows = serving_sweep(rounds, profile, [1, 8], draft_s=0.01, steps=40)
    assert [row["concurrency"] for row in rows] == [1, 8]
    for row in rows:
        n = row["concurrency"]
        assert len(row["fixed"]) == 3  # plain, 1 draft, 2 drafts
        plain = row["fixed"][0]
        assert plain == {"tokens_per_s": pytest.approx(n * profile(n)), "tokens_per_request_step": 1.0,
                         "mean_length": 0.0}  # fmt: skip
        assert [f["mean_length"] for f in row["fixed"]] == [0.0, 1.0, 2.0]
        expected = simulate(rounds, profile, n, steps=40, draft_s=0.01)
        assert row["scheduler"] == pytest.approx(vars(expected))
    # a round without the head's c_k: no scheduler, fixed lengths still
    without = serving_sweep([(2, 1, []), *rounds], profile, [4], draft_s=0.0, steps=10)
    assert without[0]["scheduler"] is None and len(without[0]["fixed"]) == 3


def test_profile_times_the_verify_forward_of_each_size(stories260k, one_thread):
    model, _ = stories260k
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)  # fmt: skip
    try:
        profile = measure_step_profile(model, [0, 2], context=20, tokens=[1, 3, 8], repeats=2)
    finally:
        hook.remove()
    assert seen == [20, 1, 1, 3, 3, 8, 8]  # the context once, then each size `repeats` times after it
    assert profile.tokens == [1, 3, 8] and profile.context == 20
    assert all(s > 0 for s in profile.steps_per_s)
    assert profile(1) == profile.steps_per_s[0] and profile(16) == pytest.approx(profile.steps_per_s[-1] / 2)
