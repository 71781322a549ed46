"""The statistical test of lossless sampling: the joint law of the first tokens speculative decoding
samples at temperature 1, against the target's exact law of those tokens (a chi-square test)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.stats import chisquare

from deepspec.models.speculative import speculative_generate

CHI_TOKENS = 3  # the joint law of the first three new tokens
MIN_EXPECTED = 5.0  # samples a bin must expect; rarer continuations are pooled


@torch.no_grad()
def exact_law(model, prompt: list[int], n_samples: int) -> dict[tuple[int, ...], float]:
    """The target's probability of every CHI_TOKENS-token continuation expected at least MIN_EXPECTED
    times in `n_samples` samples."""
    frontier = [((), 1.0)]
    for _ in range(CHI_TOKENS):
        nxt = []
        for prefix, prob in frontier:
            logits = model(input_ids=torch.tensor([[*prompt, *prefix]])).logits[0, -1]
            probs = torch.softmax(logits.double(), -1)
            for token in torch.nonzero(probs * prob * n_samples >= MIN_EXPECTED).flatten().tolist():
                nxt.append(((*prefix, token), prob * float(probs[token])))
        frontier = nxt
    return dict(frontier)


def keep_every_draft(p, q, drafts, generator) -> tuple[int, int]:
    """A broken `accept_or_resample`: every draft kept, then the bonus token from the last row of p."""
    return drafts.shape[0], int(torch.multinomial(p[-1], 1, generator=generator))


def chi_square_pvalue(
    model, layer_ids: list[int], prompt: list[int], drafter: Callable, n_samples: int
) -> float:
    """p-value of `n_samples` speculative samples (temperature 1, one seeded generator) against the exact
    law; `drafter()` gives the drafter of each sample. Bins: each likely continuation, plus the rest,
    made large enough by pooling the smallest."""
    law = exact_law(model, prompt, n_samples)
    generator = torch.Generator().manual_seed(0)
    counts, other = dict.fromkeys(law, 0), 0
    for _ in range(n_samples):
        result = speculative_generate(
            model, layer_ids, drafter(), prompt, max_new_tokens=CHI_TOKENS, temperature=1.0,
            eos_token_ids=set(), generator=generator,
        )  # fmt: skip
        key = tuple(result.tokens)
        if key in counts:
            counts[key] += 1
        else:
            other += 1
    bins = sorted(law, key=law.get)
    rest = 1.0 - sum(law.values())
    while bins and rest * n_samples < MIN_EXPECTED:
        key = bins.pop(0)
        rest += law[key]
        other += counts[key]
    assert len(bins) >= 5, "too few categories for a meaningful test"
    observed = [counts[k] for k in bins] + [other]
    expected = [law[k] * n_samples for k in bins] + [rest * n_samples]
    return chisquare(observed, expected).pvalue
