"""Speculative decoding with the Eagle3 and DSpark drafts on the real stories260k target: greedy output
equals the target's, Eagle3 is handed the context's token ids, DSpark's sampled proposals (shorter ones
included) keep the target's law.

The drafts are randomly initialised (their acceptance is low); losslessness must hold for any draft.
"""

from __future__ import annotations

import pytest
import torch
from support.eagle3 import target_samples, train_eagle3
from support.lossless import bigram_dspark, chi_square_pvalue, keep_every_draft

from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft
from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft, build_draft_vocab
from deepspec.models.speculative import acceptance_stats, speculative_generate, target_generate

LAYER_IDS = [0, 2, 4]
PROMPTS = ["Once upon a time, there was a little dog", "Tom and his mom went to the", "Lily wanted to"]
EOS = {2}
TOKENS = 24


@pytest.fixture(scope="module")
def stories(assets_dir):
    from deepspec.models.target import load_target

    path = assets_dir / "models" / "stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is missing")
    torch.set_num_threads(1)  # a 260K-parameter model is overhead-bound
    model, tokenizer = load_target(str(path))
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    greedy = [
        target_generate(model, LAYER_IDS, p, max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS)
        for p in prompts
    ]
    return model, tokenizer, prompts, greedy


def _weights(target):
    return target.get_input_embeddings().weight, target.get_output_embeddings().weight


def eagle3_draft(target, steps=4, draft_vocab=None) -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = Eagle3Config.from_target(
        target.config, layer_ids=LAYER_IDS, ttt_steps=steps, draft_vocab_size=draft_vocab
    )
    d2t = None
    if draft_vocab is not None:  # any draft_vocab tokens: here the lowest ids
        d2t, _ = build_draft_vocab(torch.zeros(cfg.vocab_size, dtype=torch.long), draft_vocab)
    return Eagle3Draft(cfg, *_weights(target), d2t=d2t).eval()


def dspark_draft(target, head="rnn", block=4) -> DSparkDraft:
    torch.manual_seed(0)
    cfg = DSparkConfig.from_target(
        target.config, num_layers=1, block_size=block, layer_ids=LAYER_IDS, mask_token_id=0, markov_rank=16,
        markov_head_type=head, confidence_head=True, confidence_head_with_markov=True, num_anchors=8,
    )  # fmt: skip
    draft = DSparkDraft(cfg, *_weights(target))
    with torch.no_grad():  # heads start near zero: make them matter
        for p in [*draft.markov_head.parameters(), *draft.confidence_head.parameters()]:
            p.normal_(std=0.5)
    return draft.eval()


class RecordingEagle3:
    """An Eagle3 draft that checks it is handed the tokens of every context position."""

    def __init__(self, draft: Eagle3Draft, prompt: list[int]):
        self.draft, self.num_draft_tokens, self.prompt = draft, draft.num_draft_tokens, prompt
        self.calls: list[tuple[int, list[int]]] = []

    def draft_logits(self, context_features, anchor_token, *, context_ids):
        assert context_ids.dtype == torch.long and context_ids.shape[0] == context_features.shape[0]
        self.calls.append((anchor_token, context_ids.tolist()))
        return self.draft.draft_logits(context_features, anchor_token, context_ids=context_ids)


class ShortProposals:
    """A DSpark draft stopping its chain at the first slot whose confidence is below a threshold."""

    def __init__(self, draft: DSparkDraft, threshold: float):
        self.draft, self.num_draft_tokens, self.threshold = draft, draft.num_draft_tokens, threshold
        self.lengths: list[int] = []

    def draft_logits(self, context_features, anchor_token):
        raise AssertionError("a drafter with propose is never asked for logits")

    def propose(self, context_features, anchor_token, *, temperature, generator):
        proposal = self.draft.propose(
            context_features,
            anchor_token,
            temperature=temperature,
            generator=generator,
            confidence_threshold=self.threshold,
        )
        self.lengths.append(len(proposal.tokens))
        return proposal


@pytest.mark.parametrize("draft_vocab", [None, 64], ids=["full-vocab", "reduced-vocab"])
def test_eagle3_greedy_output_equals_target(stories, draft_vocab):
    model, _, prompts, greedy = stories
    draft = eagle3_draft(model, draft_vocab=draft_vocab)
    for prompt, expected in zip(prompts, greedy, strict=True):
        drafter = RecordingEagle3(draft, prompt)
        result = speculative_generate(
            model, LAYER_IDS, drafter, prompt, max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS
        )
        assert result.tokens == expected
        assert result.num_draft_tokens == 4 and all(0 <= a <= 4 for a in result.accepted)
        sequence = [*prompt, *expected]
        for anchor, ids in drafter.calls:  # the committed tokens, then the anchor right after them
            assert ids == sequence[: len(ids)] and anchor == sequence[len(ids)]
        assert len(drafter.calls) == len(result.accepted) and drafter.calls[0][1] == prompt


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_dspark_greedy_output_equals_target(stories, head):
    model, _, prompts, greedy = stories
    draft = dspark_draft(model, head)
    for prompt, expected in zip(prompts, greedy, strict=True):
        result = speculative_generate(
            model, LAYER_IDS, draft, prompt, max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS
        )
        assert result.tokens == expected
        assert all(0 <= a <= 4 for a in result.accepted)


def test_short_proposals_keep_greedy_output(stories):
    model, _, prompts, greedy = stories
    drafter = ShortProposals(dspark_draft(model), threshold=0.5)
    for prompt, expected in zip(prompts, greedy, strict=True):
        result = speculative_generate(
            model, LAYER_IDS, drafter, prompt, max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS
        )
        assert result.tokens == expected
    assert min(drafter.lengths) < 4, "the threshold never shortened a proposal"


def test_confidence_threshold_stops_drafting_and_is_recorded(stories):
    """`speculative_generate(confidence_threshold=t)` reaches DSpark's `propose`: rounds stop before the
    first slot whose c_k < t, every recorded c_k is at least t, and the output stays the target's."""
    model, _, prompts, greedy = stories
    draft = dspark_draft(model)
    full = speculative_generate(
        model, LAYER_IDS, draft, prompts[0], max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS
    )
    assert full.stopped_early == 0 and all(len(c) == 4 for c in full.confidence)
    result = speculative_generate(
        model, LAYER_IDS, draft, prompts[0], max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS,
        confidence_threshold=0.5,
    )  # fmt: skip
    assert result.tokens == greedy[0]
    assert result.stopped_early > 0
    assert result.stopped_early <= sum(p < 4 for p in result.proposed)  # an end of turn also cuts
    assert all(x >= 0.5 for c in result.confidence for x in c)
    assert all(len(c) >= p for c, p in zip(result.confidence, result.proposed, strict=True))


def test_confidence_threshold_needs_a_confidence_head(stories):
    from deepspec.models.errors import ConfigError

    model, _, prompts, _ = stories
    with pytest.raises(ConfigError, match="no confidence head"):
        speculative_generate(
            model, LAYER_IDS, eagle3_draft(model), prompts[0], max_new_tokens=4, temperature=0.0,
            eos_token_ids=EOS, confidence_threshold=0.5,
        )  # fmt: skip


# ---------------------------------------------------------------- sampling: the target's law

CHI_PROMPT = "One day, a"
# CHI_TOKENS = 3: the first token is the target's own; a round of two slots drafts the next two


@pytest.mark.parametrize("threshold", [0.0, 0.5], ids=["whole-blocks", "short-proposals"])
def test_dspark_sampled_proposals_keep_the_target_law(stories, threshold):
    """Temperature 1 through `propose`: slot 1 is drawn conditioned on the token drawn at slot 0."""
    model, tokenizer, _, _ = stories
    drafter = ShortProposals(bigram_dspark(model, tokenizer.bos_token_id), threshold)
    assert chi_square_pvalue(model, LAYER_IDS, tokenizer(CHI_PROMPT).input_ids, lambda: drafter, 600) > 0.01
    assert min(drafter.lengths) == (2 if threshold == 0.0 else 0) and max(drafter.lengths) == 2


def test_accepting_every_proposal_is_caught(stories, monkeypatch):
    """The same test fails when every drafted token is kept: the output then follows the draft's law."""
    from deepspec.models import speculative

    model, tokenizer, _, _ = stories
    monkeypatch.setattr(speculative, "accept_or_resample", keep_every_draft)
    drafter = ShortProposals(bigram_dspark(model, tokenizer.bos_token_id), 0.0)
    assert chi_square_pvalue(model, LAYER_IDS, tokenizer(CHI_PROMPT).input_ids, lambda: drafter, 300) < 0.01


# ---------------------------------------------------------------- Eagle3 sampling its own chain


class ArgmaxEagle3:
    """An Eagle3 draft without `propose`: its argmax-fed chain, rows drawn from independently."""

    def __init__(self, draft: Eagle3Draft):
        self.draft, self.num_draft_tokens = draft, draft.num_draft_tokens

    def draft_logits(self, context_features, anchor_token, *, context_ids):
        return self.draft.draft_logits(context_features, anchor_token, context_ids=context_ids)


@pytest.mark.parametrize("draft_vocab", [None, 64], ids=["full-vocab", "reduced-vocab"])
def test_eagle3_propose_at_temperature_0_is_the_argmax_chain(stories, draft_vocab):
    """`propose` at temperature 0 drafts `draft_logits`'s chain, one-hot laws on it; decoding through it
    gives the target's greedy output, round for round as the `draft_logits` path."""
    model, _, prompts, greedy = stories
    draft = eagle3_draft(model, draft_vocab=draft_vocab)
    sequence = [*prompts[0], *greedy[0]]
    ids = torch.tensor(sequence)
    with torch.no_grad():
        states = model.model(input_ids=ids[None], output_hidden_states=True).hidden_states
    features = torch.cat([states[i + 1][0] for i in LAYER_IDS], dim=-1)
    for p in range(3, len(sequence) - 1, 4):
        proposal = draft.propose(
            features[:p], sequence[p], temperature=0.0, generator=None, context_ids=ids[:p]
        )
        chain = draft.draft_logits(features[:p], sequence[p], context_ids=ids[:p]).argmax(-1)
        assert proposal.tokens == chain.tolist()
        assert proposal.probs.shape == (4, 512) and proposal.probs.dtype == torch.float32
        assert torch.equal(proposal.probs.argmax(-1), chain) and bool((proposal.probs.sum(-1) == 1).all())
    for prompt, expected in zip(prompts, greedy, strict=True):
        runs = [
            speculative_generate(
                model, LAYER_IDS, drafter, prompt, max_new_tokens=TOKENS, temperature=0.0, eos_token_ids=EOS
            )
            for drafter in (draft, ArgmaxEagle3(draft))
        ]
        assert runs[0].tokens == runs[1].tokens == expected and runs[0].accepted == runs[1].accepted


@pytest.fixture(scope="module")
def sampled_stories(stories):
    """16 stories the target samples at temperature 1, for drafts that must learn its law."""
    model, tokenizer, _, _ = stories
    return target_samples(model, tokenizer.bos_token_id, count=16, length=32, seed=0)


class CountingEagle3:
    """A trained Eagle3 draft whose proposals are counted."""

    def __init__(self, draft: Eagle3Draft):
        self.draft, self.num_draft_tokens, self.proposals = draft, draft.num_draft_tokens, 0

    def draft_logits(self, context_features, anchor_token, *, context_ids):
        raise AssertionError("a drafter with propose is never asked for logits")

    def propose(self, context_features, anchor_token, *, temperature, generator, context_ids):
        self.proposals += 1
        return self.draft.propose(
            context_features,
            anchor_token,
            temperature=temperature,
            generator=generator,
            context_ids=context_ids,
        )


@pytest.mark.parametrize("draft_vocab", [None, 64], ids=["full-vocab", "reduced-vocab"])
def test_eagle3_sampled_chain_keeps_the_target_law(stories, sampled_stories, draft_vocab):
    """Temperature 1 through `propose`, each step fed the token drawn at the step before; with a reduced
    vocabulary the laws are over the target vocabulary, 0 outside the draft's. The draft is trained
    briefly on the target's samples, so its drafts are often accepted and the test has power."""
    model, tokenizer, _, _ = stories
    draft = train_eagle3(model, sampled_stories, LAYER_IDS, ttt_steps=2, steps=40, draft_vocab=draft_vocab)
    drafter = CountingEagle3(draft)
    prompt = tokenizer(CHI_PROMPT).input_ids
    assert chi_square_pvalue(model, LAYER_IDS, prompt, lambda: drafter, 600) > 0.01
    assert drafter.proposals >= 600
    generator = torch.Generator().manual_seed(0)
    proposal = draft.propose(
        *_context(model, prompt), temperature=1.0, generator=generator, context_ids=torch.tensor(prompt[:-1])
    )
    assert proposal.probs.shape == (2, 512) and torch.allclose(proposal.probs.sum(-1), torch.ones(2))
    outside = ~draft.t2d
    assert bool((proposal.probs[:, outside] == 0).all()) and bool(draft.t2d[proposal.tokens].all())
    runs = [
        speculative_generate(
            model,
            LAYER_IDS,
            draft,
            prompt,
            max_new_tokens=TOKENS,
            temperature=1.0,
            eos_token_ids=set(),
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        for seed in range(4)
    ]
    assert acceptance_stats(runs)["tau"] > 1.0, "no draft was ever accepted: the test has no power"


def _context(model, prompt: list[int]) -> tuple[torch.Tensor, int]:
    """The target features of the prompt's positions but the last, and its last token (the anchor)."""
    with torch.no_grad():
        states = model.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    features = torch.cat([states[i + 1][0] for i in LAYER_IDS], dim=-1)
    return features[:-1], prompt[-1]
