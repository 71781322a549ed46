"""Speculative decoding is lossless: greedy output equals the target's, sampled output has its law.

Everything runs the real pretrained stories260k model (vocabulary 512) from `../shared/assets`. The
drafters are real models too: the same story model drafting its own greedy chain (high acceptance) and a
randomly initialised small Llama with the same vocabulary (low acceptance). They keep the token
history themselves and ignore the target features.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from support.lossless import chi_square_pvalue, keep_every_draft
from transformers import LlamaConfig, LlamaForCausalLM

from deepspec.models import speculative
from deepspec.models.cpu_products import (
    ROWS_FIRST,
    multiply_as_f_linear,
    multiply_rows_first,
    rows_first_sizes,
)
from deepspec.models.speculative import (
    SpecResult,
    accept_or_resample,
    acceptance_stats,
    greedy_verify,
    speculative_generate,
    target_generate,
)
from deepspec.models.target import load_target

LAYER_IDS = [0, 2, 4]
STORY_PROMPTS = [
    "Once upon a time, there was a little dog",
    "Tom and his mom went to the",
    "Lily wanted to",
]
EOS = {2}


@pytest.fixture(scope="session")
def spec_assets() -> Path:
    env = os.environ.get("DEEPSPEC_ASSETS")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "assets"
    if not (path / "models" / "stories260k" / "config.json").is_file():
        pytest.skip(f"offline test assets not found at {path} (set DEEPSPEC_ASSETS to ../shared/assets)")
    return path


@pytest.fixture(scope="module")
def stories(spec_assets):
    torch.set_num_threads(1)  # a 260K-parameter model is overhead-bound; one thread is the fastest
    model, tokenizer = load_target(str(spec_assets / "models" / "stories260k"))
    return model, tokenizer


@pytest.fixture(scope="module")
def random_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        initializer_range=0.2,  # logits of a few units: a spiky proposal unrelated to the target
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


class ChainDrafter:
    """Drafts a block with a causal LM run over the token history, following its own greedy chain.

    The history is rebuilt from the context length: a verify step that kept `a` drafts grows the
    context by the old anchor plus `a` tokens, assumed to be this drafter's greedy guesses. That is
    exact at temperature 0; when sampling it may be wrong, which only makes the proposals worse:
    rejection sampling is lossless for any proposal.
    """

    def __init__(self, model, prompt_ids, block_size, *, logit_scale=1.0, memo=None):
        self.model = model
        self.history = list(prompt_ids)
        self.num_draft_tokens = block_size
        self.logit_scale = logit_scale
        self.memo = {} if memo is None else memo  # (history, anchor) -> logits, shared across samples
        self.last: tuple[int, list[int]] | None = None

    @torch.no_grad()
    def draft_logits(self, context_features, anchor_token):
        p = context_features.shape[0]
        if self.last is not None:
            anchor, guesses = self.last
            kept = p - len(self.history) - 1
            self.history += [anchor, *guesses[:kept]]
        assert len(self.history) == p
        key = (tuple(self.history), anchor_token)
        if key not in self.memo:
            seq, rows = [*self.history, anchor_token], []
            for _ in range(self.num_draft_tokens):
                logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                rows.append(logits * self.logit_scale)
                seq.append(int(logits.argmax()))
            self.memo[key] = torch.stack(rows)
        rows = self.memo[key]
        self.last = (anchor_token, rows.argmax(-1).tolist())
        return rows


def _ids(tokenizer, text):
    return tokenizer(text).input_ids


# ---------------------------------------------------------------- greedy: token-for-token equality

GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def greedy_references(stories):
    model, tokenizer = stories
    return {
        text: target_generate(
            model,
            LAYER_IDS,
            _ids(tokenizer, text),
            max_new_tokens=GREEDY_TOKENS,
            temperature=0.0,
            eos_token_ids=EOS,
        )
        for text in STORY_PROMPTS
    }


def _greedy_results(model, tokenizer, draft_model, block_size, references):
    """Speculative greedy decoding of every story prompt, each output asserted equal to the target's."""
    results = []
    for text in STORY_PROMPTS:
        prompt = _ids(tokenizer, text)
        drafter = ChainDrafter(draft_model, prompt, block_size)
        result = speculative_generate(
            model,
            LAYER_IDS,
            drafter,
            prompt,
            max_new_tokens=GREEDY_TOKENS,
            temperature=0.0,
            eos_token_ids=EOS,
        )
        assert result.tokens == references[text], text
        assert result.num_draft_tokens == block_size
        assert all(0 <= a <= block_size for a in result.accepted)
        results.append(result)
    return results


@pytest.mark.parametrize("block_size", [1, 4, 7])
@pytest.mark.parametrize("drafter_name", ["self", "random"])
def test_greedy_output_equals_target(stories, random_llama, greedy_references, drafter_name, block_size):
    model, tokenizer = stories
    draft_model = model if drafter_name == "self" else random_llama
    stats = acceptance_stats(_greedy_results(model, tokenizer, draft_model, block_size, greedy_references))
    if drafter_name == "self":  # the draft is the target: every draft is accepted
        assert stats["acceptance"] == [1.0] * block_size
    else:
        assert stats["acceptance"][0] < 0.5


@pytest.mark.parametrize("block_size", [1, 2])
def test_greedy_output_equals_target_through_rows_first_products(
    stories, random_llama, greedy_references, block_size
):
    """Decoding and verifying through W @ x.T products of 1..3 rows (what load_target gives a large target
    on a CPU; stories260k's weights fit in cache, so it keeps F.linear unless forced) gives the greedy
    output of plain decoding through F.linear."""
    model, tokenizer = stories
    loaded = rows_first_sizes(model)
    try:
        assert multiply_rows_first(model, ROWS_FIRST) > 0
        _greedy_results(model, tokenizer, random_llama, block_size, greedy_references)
    finally:  # the module's target as it was loaded
        multiply_as_f_linear(model)
        multiply_rows_first(model, loaded)


def test_eos_is_kept_and_stops(stories):
    model, tokenizer = stories
    prompt = _ids(tokenizer, STORY_PROMPTS[0])
    reference = target_generate(
        model, LAYER_IDS, prompt, max_new_tokens=12, temperature=0.0, eos_token_ids=EOS
    )
    stop = reference[4]  # pretend the fifth greedy token ends generation
    drafter = ChainDrafter(model, prompt, 7)
    result = speculative_generate(
        model, LAYER_IDS, drafter, prompt, max_new_tokens=12, temperature=0.0, eos_token_ids={stop}
    )
    expected = reference[: reference.index(stop) + 1]
    assert result.tokens == expected
    assert (
        target_generate(model, LAYER_IDS, prompt, max_new_tokens=12, temperature=0.0, eos_token_ids={stop})
        == expected
    )


# ---------------------------------------------------------------- sampling: the target's law

CHI_PROMPT = "One day, a"


@pytest.fixture(scope="module")
def chi_setup(stories):
    model, tokenizer = stories
    return model, _ids(tokenizer, CHI_PROMPT)


def _flattened_self_drafter(model, prompt):
    """The story model with flattened logits: a proposal close to the target's law but not equal to it,
    so that acceptances, rejections and resampling all happen often. The drafters share one memo."""
    memo: dict = {}
    return lambda: ChainDrafter(model, prompt, 2, logit_scale=0.5, memo=memo)


def test_sampling_matches_target_law(chi_setup):
    model, prompt = chi_setup
    pvalue = chi_square_pvalue(
        model, LAYER_IDS, prompt, _flattened_self_drafter(model, prompt), n_samples=800
    )
    assert pvalue > 0.01


def test_broken_acceptance_rule_is_caught(chi_setup, monkeypatch):
    """The same test fails when every draft is accepted: the output then follows the draft's law."""
    model, prompt = chi_setup
    calls = []

    def always_accept(p, q, drafts, generator):
        calls.append(drafts)
        return keep_every_draft(p, q, drafts, generator)

    monkeypatch.setattr(speculative, "accept_or_resample", always_accept)
    pvalue = chi_square_pvalue(
        model, LAYER_IDS, prompt, _flattened_self_drafter(model, prompt), n_samples=300
    )
    assert calls, "the broken rule was not used"
    assert pvalue < 0.01


# ---------------------------------------------------------------- the rule and the statistics


def test_accept_or_resample_greedy_is_deterministic():
    """One-hot laws: a draft equal to the target's token is kept and the bonus row decides the next
    token; a different one is replaced by the target's token and stops the chain."""
    p = torch.nn.functional.one_hot(torch.tensor([3, 1, 6]), 8).float()
    assert accept_or_resample(p, p[:2].clone(), torch.tensor([3, 1]), None) == (2, 6)
    q = torch.nn.functional.one_hot(torch.tensor([3, 5]), 8).float()
    assert accept_or_resample(p, q, torch.tensor([3, 5]), None) == (1, 1)
    assert greedy_verify(torch.tensor([3, 1, 6]), torch.tensor([3, 5])) == (1, 1)
    assert greedy_verify(torch.tensor([3, 1, 6]), torch.tensor([3, 1])) == (2, 6)
    assert greedy_verify(torch.tensor([4]), torch.tensor([], dtype=torch.long)) == (0, 4)


def test_accept_or_resample_single_token_law():
    """One draft from q, then the rule: the kept-or-replaced token is distributed as p."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 6000
    drafts = torch.multinomial(q, n, replacement=True, generator=generator)
    bonus = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the row after a kept draft: token 3, never p's
    counts = [0] * 4
    for d in drafts:
        kept, token = accept_or_resample(torch.stack([p, bonus]), q[None], d[None], generator)
        counts[int(d) if kept else token] += 1
    assert counts[3] == 0
    assert chisquare(counts[:3], [n * 0.5, n * 0.3, n * 0.2]).pvalue > 0.01


def test_acceptance_stats_by_hand():
    results = [
        SpecResult(tokens=[5, 6, 7, 8, 9], accepted=[3, 0], num_draft_tokens=4),
        SpecResult(tokens=[1, 2, 3, 4, 5, 6, 7], accepted=[4, 1], num_draft_tokens=4),
        SpecResult(tokens=[2], accepted=[], num_draft_tokens=4),
    ]
    stats = acceptance_stats(results)
    assert stats["steps"] == 4
    assert stats["tokens"] == 13
    assert stats["samples"] == 3
    assert stats["tau"] == pytest.approx((4 + 1 + 5 + 2) / 4)
    assert stats["acceptance"] == pytest.approx([3 / 4, 2 / 4, 2 / 4, 1 / 4])
    assert acceptance_stats([SpecResult(tokens=[2], num_draft_tokens=4)])["tau"] is None


def test_upstream_metrics_by_hand():
    """Rounds (P put up, A kept, C committed): (4, 2, 3), (4, 4, 5), (2, 2, 2: a kept end of turn at
    draft 1, no bonus), (4, 0, 1); by the definitions of upstream's `build_metrics_row` and the paper."""
    results = [
        SpecResult(tokens=[0] * 8, accepted=[2, 4], num_draft_tokens=4, proposed=[4, 4], committed=[3, 5]),
        SpecResult(tokens=[0] * 4, accepted=[2, 0], num_draft_tokens=4, proposed=[2, 4], committed=[2, 1]),
    ]
    stats = acceptance_stats(results)
    assert stats["steps"] == 4
    assert stats["tau"] == pytest.approx(11 / 4)
    assert stats["propose"] == pytest.approx(14 / 4)
    assert stats["verify_rate"] == pytest.approx(11 / (14 + 4))
    # accept@k = #(A > k) / #(P > k)
    assert stats["accept_at"] == pytest.approx([3 / 4, 3 / 4, 1 / 3, 1 / 3])
    # conditional: #(A > k) / #(P > k and A >= k): k=2 counts the rounds that reached draft 2 and put it up
    assert stats["conditional"] == pytest.approx([3 / 4, 3 / 3, 1 / 2, 1 / 1])
    assert stats["acceptance"] == pytest.approx([3 / 4, 3 / 4, 1 / 4, 1 / 4])
    assert stats["confidence"] is None
    # a position no round put up has no rate
    short = [SpecResult(tokens=[0] * 3, accepted=[1], num_draft_tokens=4, proposed=[2], committed=[2])]
    assert acceptance_stats(short)["accept_at"] == [1.0, 0.0, None, None]
    assert acceptance_stats(short)["conditional"] == [1.0, 0.0, None, None]


def test_confidence_stats_by_hand():
    """Positions after the effective proposal length are left out, as upstream's recorder does."""
    results = [
        SpecResult(tokens=[0] * 3, accepted=[1], num_draft_tokens=3, proposed=[3], committed=[2],
                   confidence=[[0.8, 0.5, 0.5]]),
        SpecResult(tokens=[0] * 2, accepted=[1], num_draft_tokens=3, proposed=[1], committed=[1],
                   confidence=[[0.6, 0.9, 0.9]], stopped_early=1),
    ]  # fmt: skip
    stats = acceptance_stats(results)
    conf = stats["confidence"]
    assert conf["mean"] == pytest.approx([0.7, 0.5, 0.5])
    assert conf["predicted_prefix"] == pytest.approx([0.7, 0.4, 0.2])
    assert conf["observed_prefix"] == pytest.approx([1.0, 0.0, 0.0])
    assert conf["brier"] == pytest.approx([(0.2**2 + 0.4**2) / 2, 0.4**2, 0.2**2])
    # the raw c_k against draft k surviving after drafts 0..k-1 did: position 0 scored 0.8 and 0.6, both
    # kept; position 1 scored 0.5 once, rejected; position 2 was never reached with its prefix kept
    assert conf["conditional_brier"][:2] == pytest.approx([(0.2**2 + 0.4**2) / 2, 0.25])
    assert conf["conditional_ece"][:2] == pytest.approx([0.3, 0.5])
    assert conf["conditional_auroc"] == [None, None, None]  # one outcome only at every position
    assert conf["conditional_brier"][2] is None and conf["conditional_ece"][2] is None
    assert [b["count"] for b in conf["reliability"]] == [1, 1, 1]
    assert stats["stopped_early"] == 1


def test_end_of_turn_round_counted_as_upstream(stories):
    """A kept draft that ends the turn ends the round's count there: no drafts after it, no bonus."""
    model, tokenizer = stories
    prompt = _ids(tokenizer, STORY_PROMPTS[0])
    reference = target_generate(
        model, LAYER_IDS, prompt, max_new_tokens=12, temperature=0.0, eos_token_ids=EOS
    )
    stop = reference[4]
    result = speculative_generate(
        model, LAYER_IDS, ChainDrafter(model, prompt, 7), prompt, max_new_tokens=12, temperature=0.0,
        eos_token_ids={stop},
    )  # fmt: skip
    assert result.tokens == reference[: reference.index(stop) + 1]
    # the self-drafter guesses right, so the end of turn is a kept draft of the last round
    assert result.proposed[-1] == result.accepted[-1] == result.committed[-1] < 7
    assert sum(result.committed) == len(result.tokens) - 1  # the first token comes from the prefill
    assert len(result.confidence) == len(result.accepted) and result.confidence[-1] == []


def test_truncates_at_max_new_tokens(stories):
    model, tokenizer = stories
    prompt = _ids(tokenizer, STORY_PROMPTS[1])
    for n in (1, 2, 5):
        result = speculative_generate(
            model,
            LAYER_IDS,
            ChainDrafter(model, prompt, 7),
            prompt,
            max_new_tokens=n,
            temperature=0.0,
            eos_token_ids=EOS,
        )
        assert len(result.tokens) == n


class SlowDrafter(ChainDrafter):
    """Takes `pause` seconds longer to draft: its time must show in `draft_s`, and only there."""

    pause = 0.02

    def draft_logits(self, context_features, anchor_token):
        time.sleep(self.pause)
        return super().draft_logits(context_features, anchor_token)


def test_draft_time_is_the_drafters_own(stories):
    model, tokenizer = stories
    prompt = _ids(tokenizer, STORY_PROMPTS[0])
    run = {"max_new_tokens": 24, "temperature": 0.0, "eos_token_ids": EOS}
    fast = speculative_generate(model, LAYER_IDS, ChainDrafter(model, prompt, 3), prompt, **run)
    began = time.perf_counter()
    slow = speculative_generate(model, LAYER_IDS, SlowDrafter(model, prompt, 3), prompt, **run)
    total = time.perf_counter() - began
    rounds = len(slow.accepted)
    assert slow.tokens == fast.tokens and rounds == len(fast.accepted) > 1
    assert 0 < fast.draft_s < slow.draft_s < total
    # every round's pause lands in draft_s, once
    assert slow.draft_s - fast.draft_s == pytest.approx(rounds * SlowDrafter.pause, abs=rounds * 0.01)
    mean = speculative.draft_seconds_per_round([fast, slow])
    assert mean == pytest.approx((fast.draft_s + slow.draft_s) / (2 * rounds))
    assert speculative.draft_seconds_per_round([]) == 0.0
