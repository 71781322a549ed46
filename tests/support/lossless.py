"""The statistical test of lossless sampling: the joint law of the first tokens speculative decoding
samples at temperature 1, against the target's exact law of those tokens (a chi-square test); a broken
acceptance rule to swap in, and a DSpark drafter close enough to a target to be accepted often."""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.stats import chisquare

from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft
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
    law; `drafter()` gives the drafter of each sample."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n_samples):
        result = speculative_generate(
            model, layer_ids, drafter(), prompt, max_new_tokens=CHI_TOKENS, temperature=1.0,
            eos_token_ids=set(), generator=generator,
        )  # fmt: skip
        samples.append(tuple(result.tokens))
    return pvalue_of(samples, exact_law(model, prompt, len(samples)))


def pvalue_of(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """Chi-square p-value of sampled continuations against their exact law. Bins: each likely
    continuation, plus the rest, made large enough by pooling the smallest."""
    n_samples = len(samples)
    counts, other = dict.fromkeys(law, 0), 0
    for key in samples:
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


@torch.no_grad()
def bigram_dspark(target, bos: int, layer_ids: tuple[int, ...] = (0, 2, 4)) -> DSparkDraft:
    """A DSpark draft whose slot logits are the target's next-token logits after [bos, x_{k-1}]: the
    backbone outputs zeros and a full-rank vanilla Markov head holds the bigram table. Its slot 1 law
    depends on the token drawn at slot 0, and it is close enough to the target to be accepted often."""
    vocab = target.config.vocab_size
    cfg = DSparkConfig.from_target(
        target.config, num_layers=1, block_size=2, layer_ids=list(layer_ids), mask_token_id=0,
        markov_rank=vocab, markov_head_type="vanilla", confidence_head=True, confidence_head_with_markov=True,
        num_anchors=8,
    )  # fmt: skip
    torch.manual_seed(0)
    draft = DSparkDraft(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    pairs = torch.stack([torch.full((vocab,), bos), torch.arange(vocab)], dim=1)
    bigram = target(input_ids=pairs).logits[:, -1].float()  # [x, next]
    draft.backbone.norm.weight.zero_()  # h_k = 0: the base logits vanish
    draft.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
    draft.markov_head.markov_w2.weight.copy_(0.8 * bigram.t())  # flattened: not the target's law
    draft.confidence_head.proj.weight.normal_(std=2.0)  # c_k varies with x_{k-1}
    return draft.eval()
