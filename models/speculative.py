"""Lossless speculative decoding with chain drafting, and the plain autoregressive reference.

One round: the draft proposes a block d_1..d_B after the anchor token x (the last token the target has
not run yet); the target runs [x, d_1..d_B] in one forward and rejection sampling keeps a prefix of the
drafts plus one token of its own, so the output has exactly the target's distribution (Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023). At temperature 0
both sides are one-hot and the rule reduces to "accept while the draft equals the target's argmax".

Drafters differ in what they read and how they draft (`Drafter`): DFlash reads the context's target
features, Eagle3 also its token ids (`context_ids`), and DSpark samples its chain slot by slot, each slot
conditioned on the token drawn before it, so it hands over the tokens with the law q each was drawn from
(`propose`) rather than logits to draw from. Any proposal keeps decoding lossless, as long as every draft
is drawn from the q the acceptance rule is given.

The acceptance rule is one small function, `accept_or_resample`, so that a test can swap in a broken one
and see the losslessness test fail. Sampling runs on CPU in float32 with the caller's generator, so a
seed gives the same tokens on any device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

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
    probs: torch.Tensor  # [len(tokens), vocab] float32 on CPU: the law each token was drawn from
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


def sampling_law(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The law a token is drawn from, for a row (or rows) of logits: on CPU in float32, one-hot on the
    argmax at temperature 0. Drafters that draw their own chains (`propose`) use it too, so that q is
    formed exactly as the target's p is."""
    logits = logits.float().cpu()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a distribution; a one-hot one costs no random number."""
    if probs.max() >= 1.0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator | None
) -> tuple[bool, int | None]:
    """Rejection step for one drafted token: (True, None) to keep it, else (False, replacement).

    The token was drawn from q; it is kept with probability min(1, p(token) / q(token)), and on a
    rejection the replacement comes from norm(max(0, p - q)), which makes the result exactly p.
    """
    ratio = float(p[token] / q[token])
    if ratio >= 1.0 or (ratio > 0.0 and float(torch.rand((), generator=generator)) < ratio):
        return True, None
    residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    if total <= 0.0:  # p == q up to rounding: a rejection had probability ~0, p is the right law
        return False, _draw(p, generator)
    return False, _draw(residual / total, generator)


def _takes_context_ids(method: Callable) -> bool:
    try:
        return "context_ids" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read: a builtin or C extension
        return False


def _draft(
    drafter: Drafter,
    context_features: torch.Tensor,
    context_ids: torch.Tensor,
    anchor: int,
    temperature: float,
    generator: torch.Generator | None,
    confidence_threshold: float = 0.0,
) -> tuple[list[int], torch.Tensor, list[float]]:
    """One round's drafts, the laws q they were drawn from ([n, vocab] on CPU, n <= block size) and the
    confidence head's c_k of each draft (empty for a drafter without one)."""
    propose = getattr(drafter, "propose", None)
    method = propose if propose is not None else drafter.draft_logits
    extra = {"context_ids": context_ids} if _takes_context_ids(method) else {}
    if confidence_threshold > 0:  # only a drafter with a confidence head can stop early
        if propose is None or "confidence_threshold" not in inspect.signature(propose).parameters:
            raise ConfigError(
                f"confidence_threshold={confidence_threshold}: {type(drafter).__name__} has no confidence "
                "head to stop drafting with; set it to 0"
            )
        extra["confidence_threshold"] = confidence_threshold
    if propose is not None:
        proposal = propose(context_features, anchor, temperature=temperature, generator=generator, **extra)
        q = proposal.probs.float().cpu()
        assert len(proposal.tokens) == q.shape[0] <= drafter.num_draft_tokens, (len(proposal.tokens), q.shape)
        head = getattr(proposal, "confidence", None)
        confidence = [] if head is None else [float(c) for c in head.reshape(-1)]
        return [int(t) for t in proposal.tokens], q, confidence
    logits = drafter.draft_logits(context_features, anchor, **extra)
    assert logits.shape[0] == drafter.num_draft_tokens, (tuple(logits.shape), drafter.num_draft_tokens)
    q = sampling_law(logits, temperature)
    return [_draw(q[k], generator) for k in range(q.shape[0])], q, []


def _stop_index(tokens: Sequence[int], eos_token_ids: set[int]) -> int | None:
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return i
    return None


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
    says so; the output law is unchanged, only how many drafts each round puts up.
    """
    num_drafts = int(drafter.num_draft_tokens)
    result = SpecResult(tokens=[], num_draft_tokens=num_drafts)
    if max_new_tokens <= 0:
        return result
    runner = TargetRunner(model, layer_ids)
    prefill = runner.extend(torch.tensor(list(prompt_ids), dtype=torch.long))
    # target features of every committed position, in a buffer sized for the longest possible output
    n_ctx = prefill.features.shape[0]
    capacity = n_ctx + max_new_tokens + num_drafts + 1
    context = prefill.features.new_empty((capacity, prefill.features.shape[1]))
    context[:n_ctx] = prefill.features
    context_ids = torch.empty(capacity, dtype=torch.long)  # the token of every committed position
    context_ids[:n_ctx] = torch.tensor(list(prompt_ids), dtype=torch.long)
    anchor = _draw(sampling_law(prefill.logits[-1], temperature), generator)
    result.tokens.append(anchor)
    vocab = prefill.logits.shape[-1]

    while len(result.tokens) < max_new_tokens and anchor not in eos_token_ids:
        drafts, q, confidence = _draft(
            drafter,
            context[:n_ctx],
            context_ids[:n_ctx],
            anchor,
            temperature,
            generator,
            confidence_threshold,
        )
        if q.shape[-1] != vocab:
            raise ConfigError(
                f"draft vocabulary {q.shape[-1]} differs from the target's {vocab}: "
                "the draft was built for another target"
            )

        start = runner.length
        step = runner.extend(torch.tensor([anchor, *drafts], dtype=torch.long))
        p = sampling_law(step.logits, temperature)  # row i is the target's law for the token after input i
        n_accepted, nxt = 0, None
        for i, token in enumerate(drafts):
            ok, replacement = accept_or_resample(p[i], q[i], token, generator)
            if not ok:
                nxt = replacement
                break
            n_accepted += 1
        if nxt is None:  # every draft kept: a bonus token from the row after the last one
            nxt = _draw(p[len(drafts)], generator)

        runner.rollback(start + 1 + n_accepted)  # the anchor and the kept drafts stay in the cache
        context[n_ctx : n_ctx + n_accepted + 1] = step.features[: n_accepted + 1]
        context_ids[n_ctx : n_ctx + n_accepted + 1] = torch.tensor([anchor, *drafts[:n_accepted]])
        n_ctx += n_accepted + 1
        new = [*drafts[:n_accepted], nxt]
        stop = _stop_index(new, eos_token_ids)
        result.tokens.extend(new if stop is None else new[: stop + 1])
        _record_round(result, len(drafts), n_accepted, stop, confidence)
        anchor = nxt
        if stop is not None:
            break

    del result.tokens[max_new_tokens:]
    return result


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
    """Plain autoregressive decoding on the same `TargetRunner` path, one token per forward."""
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    runner = TargetRunner(model, layer_ids)
    step = runner.extend(torch.tensor(list(prompt_ids), dtype=torch.long))
    while True:
        token = _draw(sampling_law(step.logits[-1], temperature), generator)
        tokens.append(token)
        if len(tokens) >= max_new_tokens or token in eos_token_ids:
            return tokens
        step = runner.extend(torch.tensor([token], dtype=torch.long))


def _rounds(result: SpecResult) -> list[tuple[int, int, int, list[float]]]:
    """(proposed, accepted, committed, confidence) of each round; see `SpecResult` for hand-built ones."""
    n = len(result.accepted)
    proposed = result.proposed or [result.num_draft_tokens] * n
    committed = result.committed or [a + 1 for a in result.accepted]
    confidence = result.confidence or [[] for _ in range(n)]
    return list(zip(proposed, result.accepted, committed, confidence, strict=True))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def confidence_stats(results: Sequence[SpecResult]) -> dict | None:
    """What the confidence head said against what verification found, per draft position k (0-based).

    Over the rounds that put up position k (positions after a kept end of turn excluded, as upstream's
    `ConfidenceHeadRecorder.observe`): `mean` c_k, `predicted_prefix` the mean of c_0 * ... * c_k (the
    head's estimate that drafts 0..k all survive), `observed_prefix` the share of rounds that kept
    drafts 0..k, `brier` the mean squared gap between the two. None when no round had a head's output.
    """
    num_drafts = max((r.num_draft_tokens for r in results), default=0)
    count = [0] * num_drafts
    sums = {key: [0.0] * num_drafts for key in ("mean", "predicted_prefix", "observed_prefix", "brier")}
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
    if not any(count):
        return None
    return {key: [_ratio(v, n) for v, n in zip(values, count, strict=True)] for key, values in sums.items()}


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
