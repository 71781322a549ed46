"""Lossless speculative decoding with chain drafting, and the plain autoregressive reference.

One round: the draft proposes a block d_1..d_B after the anchor token x (the last token the target has
not run yet); the target runs [x, d_1..d_B] in one forward and rejection sampling keeps a prefix of the
drafts plus one token of its own, so the output has exactly the target's distribution (Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023). At temperature 0
both sides are one-hot and the rule reduces to "accept while the draft equals the target's argmax", which
`greedy_verify` applies to token ids.

Drafters differ in what they read and how they draft (`Drafter`): DFlash reads the context's target
features, Eagle3 also its token ids (`context_ids`), and DSpark samples its chain slot by slot, each slot
conditioned on the token drawn before it, so it hands over the tokens with the law q each was drawn from
(`propose`) rather than logits to draw from. Any proposal keeps decoding lossless, as long as every draft
is drawn from the q the acceptance rule is given.

The acceptance rule is one small function, `accept_or_resample`, so that a test can swap in a broken one
and see the losslessness test fail. Verification runs on the target's device in float32, vectorised over
the chain, with one host transfer a round (the kept count and the next token). Drafters that sample and
verification both draw with the caller's generator when it lives on the target's device, else with one
generator seeded from it, so a seed fixes every token on a given device.

Cost per round: the target's forward over the block, plus the draft's; a drafter with a `decoding()`
context (all three here) keeps the committed context projected inside it (`drafts/kv_cache.py`), so a
round's draft cost no longer grows with the context beyond attention itself.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

from deepspec.models import calibration
from deepspec.models.errors import ConfigError
from deepspec.models.target import TargetRunner


class Drafter(Protocol):
    """What speculative decoding needs from a draft model.

    A drafter whose `draft_logits` (or `propose`) declares a keyword `context_ids` also gets the token ids
    of positions 0..p-1 (a [p] int64 tensor on CPU): Eagle3 reads them, DFlash does without.
    """

    num_draft_tokens: int  # tokens drafted per round

    def draft_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """[num_draft_tokens, vocab] logits; row k is the distribution of the token at position p + k + 1.

        `context_features` are the target features of positions 0..p-1; the anchor sits at position p.
        Rows must not depend on the tokens drafted from them (feed the argmax chain back, not samples).
        """
        ...


class Proposal(Protocol):
    tokens: list[int]  # the drafted chain, at most num_draft_tokens tokens
    probs: torch.Tensor  # [len(tokens), vocab] float32 (any device): the law each token was drawn from
    # optional: a confidence head's c_k for each drafted slot ([len(tokens)]); read with getattr
    # confidence: torch.Tensor | None


class ProposingDrafter(Drafter, Protocol):
    """A drafter that draws its own chain (DSpark): slot k's law may depend on the tokens drawn before it.

    `speculative_generate` uses `propose` rather than `draft_logits` whenever a drafter has it. At
    temperature 0 the laws are one-hot on the argmax chain, the chain `draft_logits` describes.
    """

    def propose(
        self,
        context_features: torch.Tensor,
        anchor_token: int,
        *,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Proposal: ...


@dataclass
class SpecResult:
    """One generation and its rounds, counted as upstream's evaluator counts them (`base_evaluator.py`).

    A round whose kept drafts include an end-of-turn token ends there: its drafts are counted up to and
    including that token, and it adds no token of the target's. Hand-built results may leave `proposed`
    and `committed` empty: every round then proposed the whole block and added `accepted + 1` tokens.
    """

    tokens: list[int]  # new tokens only, eos included when generation stopped on it
    accepted: list[int] = field(default_factory=list)  # drafts kept in each round (up to an end of turn)
    num_draft_tokens: int = 0
    proposed: list[int] = field(default_factory=list)  # drafts each round put up (cut after a kept eos)
    committed: list[int] = field(default_factory=list)  # tokens each round added (upstream's accept length)
    confidence: list[list[float]] = field(default_factory=list)  # per round, the head's c_k of each draft
    stopped_early: int = 0  # rounds whose proposal was shorter than the block (the confidence head)
    draft_s: float = 0.0  # seconds in the drafter's calls, all rounds (each ends with its drafts on the host)


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """The rejection rule over a drafted chain: (drafts kept, the token that follows them).

    p [n+1, V]: the target's laws, row i for the token after input i (row n: after the last draft);
    q [n, V]: the laws the drafts [n] were drawn from. Draft i is kept with probability
    min(1, p_i(d_i) / q_i(d_i)) while every draft before it was; at the first rejection k the next token
    comes from norm(max(0, p_k - q_k)), which makes it exactly p_k, and with every draft kept from p_n
    (the bonus). All on p's device, with `generator` on that device; one host transfer.
    """
    n = drafts.shape[0]
    rows = torch.arange(n, device=p.device)
    ratio = p[rows, drafts] / q[rows, drafts]  # q > 0 where a draft was drawn
    kept = (torch.rand(n, generator=generator, device=p.device) < ratio).long().cumprod(0).sum()
    laws = torch.cat([(p[:n] - q).clamp_min(0.0), p[n:]])  # the residual of each row, then the bonus row
    law, total = laws[kept], laws[kept].sum()
    # p == q up to rounding: a rejection had probability ~0, and p is the right law
    law = torch.where(total > 0, law / total.clamp_min(1e-30), p[kept])
    token = torch.multinomial(law, 1, generator=generator)[0]
    kept_count, next_token = torch.stack([kept, token]).tolist()
    return kept_count, next_token


def greedy_verify(target_tokens: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """The rule at temperature 0, on token ids: keep drafts while each equals the target's argmax
    (target_tokens [n+1]), then the argmax after the last kept one. One host transfer."""
    n = drafts.shape[0]
    kept = (target_tokens[:n] == drafts).long().cumprod(0).sum()
    kept_count, next_token = torch.stack([kept, target_tokens[kept]]).tolist()
    return kept_count, next_token


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The caller's generator where verification runs on its device, else one seeded from it (one draw),
    so a seed still fixes every token."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def _takes(method: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read: a builtin or C extension
        return False


class _Drafting:
    """How to call a drafter, read once per generation: `propose` or `draft_logits`, with which extras."""

    def __init__(self, drafter: Drafter, confidence_threshold: float, vocab: int):
        self.drafter, self.vocab = drafter, vocab
        self.propose = getattr(drafter, "propose", None)
        method = self.propose if self.propose is not None else drafter.draft_logits
        self.context_ids = _takes(method, "context_ids")
        self.extra: dict = {}
        if confidence_threshold > 0:  # only a drafter with a confidence head can stop early
            if self.propose is None or not _takes(self.propose, "confidence_threshold"):
                raise ConfigError(
                    f"confidence_threshold={confidence_threshold}: {type(drafter).__name__} has no "
                    "confidence head to stop drafting with; set it to 0"
                )
            self.extra["confidence_threshold"] = confidence_threshold

    def __call__(
        self,
        context_features: torch.Tensor,
        context_ids: torch.Tensor,
        anchor: int,
        temperature: float,
        generator: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor | None, list[float]]:
        """One round's drafts, the laws q they were drawn from ([n, vocab], n <= block size; None at
        temperature 0, where verification compares token ids) and the confidence head's c_k of each
        draft (empty for a drafter without one)."""
        extra = {**self.extra, "context_ids": context_ids} if self.context_ids else self.extra
        if self.propose is not None:
            proposal = self.propose(
                context_features, anchor, temperature=temperature, generator=generator, **extra
            )
            q = proposal.probs
            n = len(proposal.tokens)
            assert q.shape[0] == n <= self.drafter.num_draft_tokens, (n, tuple(q.shape))
            self._check_vocab(q.shape[-1])
            head = getattr(proposal, "confidence", None)
            confidence = [] if head is None else [float(c) for c in head.reshape(-1)]
            return [int(t) for t in proposal.tokens], q, confidence
        logits = self.drafter.draft_logits(context_features, anchor, **extra)
        self._check_vocab(logits.shape[-1])
        assert logits.shape[0] == self.drafter.num_draft_tokens, (
            tuple(logits.shape),
            self.drafter.num_draft_tokens,
        )
        if temperature == 0:
            return logits.argmax(-1).tolist(), None, []
        q = torch.softmax(logits.float() / temperature, dim=-1)  # on the draft's device, as p is formed
        return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q, []

    def _check_vocab(self, size: int) -> None:
        if size != self.vocab:
            raise ConfigError(
                f"draft vocabulary {size} differs from the target's {self.vocab}: "
                "the draft was built for another target"
            )


def _stop_index(tokens: Sequence[int], eos_token_ids: set[int]) -> int | None:
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return i
    return None


def _sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """A token from one row of logits, on their device: the argmax at temperature 0."""
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator))


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    layer_ids: list[int],
    drafter: Drafter,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: set[int],
    generator: torch.Generator | None = None,
    confidence_threshold: float = 0.0,
) -> SpecResult:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`, distributed exactly as the target's.

    Stops after an eos token (kept) or at `max_new_tokens` (the last block is truncated). With
    `confidence_threshold` > 0 a drafter with a confidence head (DSpark) stops drafting where the head
    says so; the output law is unchanged, only how many drafts each round puts up. A drafter with a
    `decoding()` context keeps a cache of the committed context inside it, so a round projects only the
    positions committed since the round before.
    """
    num_drafts = int(drafter.num_draft_tokens)
    result = SpecResult(tokens=[], num_draft_tokens=num_drafts)
    if max_new_tokens <= 0:
        return result
    runner = TargetRunner(model, layer_ids)
    device = runner.model.device
    device_generator = _device_generator(generator, device)
    prefill = runner.extend(torch.tensor(list(prompt_ids), dtype=torch.long), last_logits_only=True)
    # target features of every committed position, in a buffer sized for the longest possible output
    n_ctx = prefill.features.shape[0]
    capacity = n_ctx + max_new_tokens + num_drafts + 1
    context = prefill.features.new_empty((capacity, prefill.features.shape[1]))
    context[:n_ctx] = prefill.features
    context_ids = torch.empty(capacity, dtype=torch.long)  # the token of every committed position
    context_ids[:n_ctx] = torch.tensor(list(prompt_ids), dtype=torch.long)
    anchor = _sample_token(prefill.logits[-1], temperature, device_generator)
    result.tokens.append(anchor)
    draft = _Drafting(drafter, confidence_threshold, vocab=prefill.logits.shape[-1])
    session = getattr(drafter, "decoding", None)

    with session() if session is not None else nullcontext():
        while len(result.tokens) < max_new_tokens and anchor not in eos_token_ids:
            began = time.perf_counter()  # the last verify ended on the host (its small copies may still run)
            drafts, q, confidence = draft(
                context[:n_ctx], context_ids[:n_ctx], anchor, temperature, device_generator
            )
            result.draft_s += time.perf_counter() - began  # its drafts are host ints: nothing in flight
            start = runner.length
            step = runner.extend(torch.tensor([anchor, *drafts], dtype=torch.long))
            n_accepted, nxt = verify(step.logits, drafts, q, temperature, device_generator)

            runner.rollback(start + 1 + n_accepted)  # the anchor and the kept drafts stay in the cache
            context[n_ctx : n_ctx + n_accepted + 1] = step.features[: n_accepted + 1]
            context_ids[n_ctx : n_ctx + n_accepted + 1] = torch.tensor([anchor, *drafts[:n_accepted]])
            n_ctx += n_accepted + 1
            ended = add_round(result, drafts, n_accepted, nxt, confidence, eos_token_ids)
            anchor = nxt
            if ended:
                break

    del result.tokens[max_new_tokens:]
    return result


def verify(
    logits: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor | None,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """One round's verdict from the target's logits over [anchor, *drafts] ([n+1, vocab]): how many drafts
    are kept and the token after them, by `greedy_verify` at temperature 0, else `accept_or_resample`
    against the laws q the drafts were drawn from."""
    drafted = torch.tensor(drafts, dtype=torch.long, device=logits.device)
    if temperature == 0:
        return greedy_verify(logits.argmax(-1), drafted)
    p = torch.softmax(logits.float() / temperature, dim=-1)  # row i: the law of the token after input i
    return accept_or_resample(p, q.to(device=p.device, dtype=torch.float32), drafted, generator)


def add_round(
    result: SpecResult,
    drafts: list[int],
    n_accepted: int,
    next_token: int,
    confidence: list[float],
    eos_token_ids: set[int],
) -> bool:
    """A verified round's tokens (the kept drafts and the next token, up to an end of turn) and counts
    added to `result`; True when they ended the turn."""
    new = [*drafts[:n_accepted], next_token]
    stop = _stop_index(new, eos_token_ids)
    result.tokens.extend(new if stop is None else new[: stop + 1])
    _record_round(result, len(drafts), n_accepted, stop, confidence)
    return stop is not None


def _record_round(
    result: SpecResult, n_drafts: int, n_accepted: int, stop: int | None, confidence: list[float]
) -> None:
    """Count a round as upstream's `verify_draft_tokens` does: a kept end-of-turn draft at index `stop`
    ends the proposal there (drafts after it are not counted as put up) and the round adds no bonus."""
    if stop is not None and stop < n_accepted:
        proposed = kept = committed = stop + 1
    else:
        proposed, kept, committed = n_drafts, n_accepted, n_accepted + 1
    result.proposed.append(proposed)
    result.accepted.append(kept)
    result.committed.append(committed)
    result.confidence.append(confidence)
    result.stopped_early += n_drafts < result.num_draft_tokens


@torch.no_grad()
def target_generate(
    model: PreTrainedModel,
    layer_ids: list[int],
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: set[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """Plain autoregressive decoding on the same `TargetRunner` path, one token per forward, without the
    work only drafting needs (no features, logits of the last position only)."""
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    runner = TargetRunner(model, layer_ids)
    generator = _device_generator(generator, runner.model.device)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long)
    while True:
        step = runner.extend(ids, features=False, last_logits_only=True)
        token = _sample_token(step.logits[-1], temperature, generator)
        tokens.append(token)
        if len(tokens) >= max_new_tokens or token in eos_token_ids:
            return tokens
        ids = torch.tensor([token], dtype=torch.long)


def _rounds(result: SpecResult) -> list[tuple[int, int, int, list[float]]]:
    """(proposed, accepted, committed, confidence) of each round; see `SpecResult` for hand-built ones."""
    n = len(result.accepted)
    proposed = result.proposed or [result.num_draft_tokens] * n
    committed = result.committed or [a + 1 for a in result.accepted]
    confidence = result.confidence or [[] for _ in range(n)]
    return list(zip(proposed, result.accepted, committed, confidence, strict=True))


def recorded_rounds(results: Sequence[SpecResult]) -> list[tuple[int, int, list[float]]]:
    """(drafts put up, drafts kept, c_k of those drafts or [] without a head) of every round: what the
    serving simulation (`prefix_scheduler.simulate`) replays."""
    return [(p, a, c[:p]) for r in results for p, a, _, c in _rounds(r)]


def draft_seconds_per_round(results: Sequence[SpecResult]) -> float:
    """Mean time of a drafter's call over every round of `results` (`SpecResult.draft_s`); 0 without one."""
    rounds = sum(len(r.accepted) for r in results)
    return sum(r.draft_s for r in results) / rounds if rounds else 0.0


def confidence_rounds(results: Sequence[SpecResult]) -> list[tuple[list[float], int]]:
    """(c_k of the drafts each round put up, drafts it kept) of every round with a confidence head's
    output: what `calibration.py` fits and scores."""
    return [(c[:p], a) for r in results for p, a, _, c in _rounds(r) if c]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def confidence_stats(results: Sequence[SpecResult]) -> dict | None:
    """What the confidence head said against what verification found, per draft position k (0-based).

    Over the rounds that put up position k (positions after a kept end of turn excluded, as upstream's
    `ConfidenceHeadRecorder.observe`): `mean` c_k, `predicted_prefix` the mean of c_0 * ... * c_k (the
    head's estimate that drafts 0..k all survive), `observed_prefix` the share of rounds that kept
    drafts 0..k, `brier` the mean squared gap between the two. Then the raw c_k against the event it is
    trained for, draft k surviving once drafts 0..k-1 have (over the rounds that kept them;
    `models/calibration.py`): `conditional_ece`, `conditional_auroc`, `conditional_brier` per position,
    and `reliability`, the bins of every position pooled. Then Sequential Temperature Scaling:
    `sts_temperatures` fitted on every round, `prefix_ece` of the raw products and `prefix_ece_sts` of the
    calibrated ones, cross-fitted on two folds of the generations (None with fewer than two). None when
    no round had a head's output.
    """
    num_drafts = max((r.num_draft_tokens for r in results), default=0)
    count = [0] * num_drafts
    sums = {key: [0.0] * num_drafts for key in ("mean", "predicted_prefix", "observed_prefix", "brier")}
    scores: list[list[float]] = [[] for _ in range(num_drafts)]  # c_k of rounds that kept slots < k
    outcomes: list[list[bool]] = [[] for _ in range(num_drafts)]
    for result in results:
        for proposed, accepted, _, confidence in _rounds(result):
            prefix = 1.0
            for k, c in enumerate(confidence[:proposed]):
                prefix *= c
                survived = float(accepted > k)
                count[k] += 1
                sums["mean"][k] += c
                sums["predicted_prefix"][k] += prefix
                sums["observed_prefix"][k] += survived
                sums["brier"][k] += (prefix - survived) ** 2
                if accepted >= k:
                    scores[k].append(c)
                    outcomes[k].append(accepted > k)
    if not any(count):
        return None
    out = {key: [_ratio(v, n) for v, n in zip(values, count, strict=True)] for key, values in sums.items()}
    out["conditional_ece"] = [calibration.ece(s, o) for s, o in zip(scores, outcomes, strict=True)]
    out["conditional_auroc"] = [calibration.auroc(s, o) for s, o in zip(scores, outcomes, strict=True)]
    out["conditional_brier"] = [calibration.brier(s, o) for s, o in zip(scores, outcomes, strict=True)]
    out["reliability"] = calibration.reliability(sum(scores, []), sum(outcomes, []))
    # Sequential Temperature Scaling: temperatures fitted on every round, and the prefix ECE before and
    # after it, the latter cross-fitted over two folds of the generations (even and odd)
    folds = [confidence_rounds(results[i::2]) for i in (0, 1)]
    out["sts_temperatures"] = calibration.fit_sts(folds[0] + folds[1], num_drafts)
    out["prefix_ece"] = calibration.prefix_ece(folds[0] + folds[1], num_drafts)
    out["prefix_ece_sts"] = calibration.cross_fitted_prefix_ece(folds, num_drafts) if all(folds) else None
    return out


def acceptance_stats(results: Sequence[SpecResult]) -> dict:
    """The figures of a set of generations, over all their rounds pooled (a micro average).

    With per round: P drafts put up, A kept, C = tokens committed (A + 1, or A when a kept draft ended
    the turn), over R rounds, as upstream's `BaseEvaluator.build_metrics_row` defines them:
    - `tau` = sum C / R: tokens per target forward, the target's own token included (accept_len);
    - `propose` = sum P / R (their `#propose`, printed as "P+1");
    - `verify_rate` = sum C / (sum P + R): the share of the tokens the target verified that it kept;
    - `accept_at[k]` = #(A > k) / #(P > k): of the rounds that put up position k (0-based), the share
      that kept it (their accept_rate@k);
    and the paper's conditional rate `conditional[k]` = #(A > k) / #(P > k and A >= k): P(keep position
    k | positions < k kept). `acceptance[k-1]` = #(A >= k) / R, k = 1..B, is the share of all rounds
    that kept at least k drafts (it sums to tau - 1 without end-of-turn rounds).
    Rates with no round to count are None (tau too, when every generation stopped on its first token).
    """
    rounds = [x for r in results for x in _rounds(r)]
    num_drafts = max((r.num_draft_tokens for r in results), default=0)
    steps = len(rounds)
    proposed = sum(p for p, _, _, _ in rounds)
    committed = sum(c for _, _, c, _ in rounds)
    positions = range(num_drafts)
    return {
        "tau": _ratio(committed, steps),
        "propose": _ratio(proposed, steps),
        "verify_rate": _ratio(committed, proposed + steps),
        "accept_at": [
            _ratio(sum(a > k for _, a, _, _ in rounds), sum(p > k for p, _, _, _ in rounds))
            for k in positions
        ],
        "conditional": [
            _ratio(sum(a > k for _, a, _, _ in rounds), sum(p > k and a >= k for p, a, _, _ in rounds))
            for k in positions
        ],
        "acceptance": [sum(a > k for _, a, _, _ in rounds) / steps if steps else 0.0 for k in positions],
        "confidence": confidence_stats(results),
        "stopped_early": sum(r.stopped_early for r in results),
        "steps": steps,
        "tokens": sum(len(r.tokens) for r in results),
        "samples": len(results),
    }
