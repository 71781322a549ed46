"""Fewer drafts a round (`set_num_draft_tokens`, `eval.num_draft_tokens`) as the engines run
`num_speculative_tokens` = n: Eagle3 runs n chain steps (the first n of its full chain); DFlash runs the
block [anchor, n masks] and DSpark a block of n slots (vLLM's `dflash` and `dspark` proposers), whose
slots attend to each other, so their rounds are those of a draft trained with that block, not a cut of
the full one. Decoding with any count stays lossless; a count beyond a block, or below one, is refused
naming its key.

Unit checks on tiny random drafts, then greedy decoding with the real stories260k target, whose output
must equal the target's own at every count.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from support import tiny
from support.eagle3 import target_samples, train_eagle3

from deepspec.models.drafts import set_num_draft_tokens
from deepspec.models.drafts.dspark import DSparkDraft
from deepspec.models.drafts.eagle3 import Eagle3Draft
from deepspec.models.errors import ConfigError
from deepspec.models.speculative import speculative_generate, target_generate
from deepspec.tasks.config import compose

torch.set_num_threads(1)

BUILDERS = {"dflash": tiny.dflash_draft, "dspark": tiny.dspark_draft, "eagle3": tiny.eagle3_draft}


def _round(draft, features, ids, p: int) -> tuple[list[int], torch.Tensor]:
    """One greedy round's drafted tokens and the logits they come from."""
    anchor = int(ids[p])
    if isinstance(draft, DSparkDraft):
        proposal = draft.propose(features[:p], anchor, temperature=0.0)
        return proposal.tokens, proposal.logits
    kwargs = {"context_ids": ids[:p]} if isinstance(draft, Eagle3Draft) else {}
    logits = draft.draft_logits(features[:p], anchor, **kwargs)
    return logits.argmax(-1).tolist(), logits


def test_a_capped_eagle3_chain_is_the_start_of_its_full_chain():
    full = tiny.eagle3_draft().eval()
    features, ids = tiny.draft_context(full.fc.weight.shape[1])
    tokens, logits = _round(full, features, ids, 9)
    assert len(tokens) == full.num_draft_tokens
    for n in range(1, full.num_draft_tokens):
        capped = tiny.eagle3_draft().eval()
        set_num_draft_tokens(capped, n)
        short_tokens, short_logits = _round(capped, features, ids, 9)
        assert short_tokens == tokens[:n]
        torch.testing.assert_close(short_logits, logits[:n])


@pytest.mark.parametrize(("algo", "engine_block"), [("dflash", lambda n: n + 1), ("dspark", lambda n: n)])
@pytest.mark.parametrize("cached", [False, True], ids=["stateless", "decode-cache"])
def test_a_capped_block_draft_drafts_the_engines_shorter_block(algo, engine_block, cached):
    """n drafts from a block of 4 slots are what the same weights draft in a block of engine_block(n)."""
    full = BUILDERS[algo]().eval()
    width = full.fc.weight.shape[1] if hasattr(full, "fc") else full.backbone.fc.weight.shape[1]
    features, ids = tiny.draft_context(width)
    full_tokens, full_logits = _round(full, features, ids, 9)
    for n in range(1, full.num_draft_tokens):
        capped, shorter = BUILDERS[algo]().eval(), BUILDERS[algo](engine_block(n)).eval()
        shorter.load_state_dict(full.state_dict())
        set_num_draft_tokens(capped, n)
        assert shorter.num_draft_tokens == n
        with capped.decoding() if cached else contextlib.nullcontext():
            if cached:
                _round(capped, features, ids, 5)  # the cache then holds an earlier round's context
            tokens, logits = _round(capped, features, ids, 9)
        expected_tokens, expected_logits = _round(shorter, features, ids, 9)
        assert tokens == expected_tokens and len(tokens) == n
        torch.testing.assert_close(logits, expected_logits)
        assert not torch.allclose(logits, full_logits[:n])  # the slots see each other: not a cut


def test_an_eagle3_chain_runs_longer_than_its_test_steps():
    draft = tiny.eagle3_draft().eval()
    features, ids = tiny.draft_context(draft.fc.weight.shape[1])
    tokens, _ = _round(draft, features, ids, 9)
    set_num_draft_tokens(draft, 7)
    longer, _ = _round(draft, features, ids, 9)
    assert len(longer) == 7 and longer[: len(tokens)] == tokens


@pytest.mark.parametrize(("algo", "n", "message"), [
    ("dflash", 4, "1 to 3 \\(its block\\)"),  # 4 slots: the anchor and 3 drafting mask slots
    ("dspark", 5, "1 to 4 \\(its block\\)"),
    ("eagle3", 0, "at least 1"),
])  # fmt: skip
def test_a_count_a_draft_cannot_put_up_is_refused(algo, n, message):
    with pytest.raises(ConfigError, match=f"eval.num_draft_tokens={n}: a .*Draft drafts {message}"):
        set_num_draft_tokens(BUILDERS[algo](), n, "eval.num_draft_tokens")


@pytest.mark.parametrize(("overrides", "message"), [
    (["algo=dflash", "algo.block_size=8", "eval.num_draft_tokens=8"], "1 to 7 \\(a block of algo=dflash\\)"),
    (["algo=dspark", "algo.block_size=7", "eval.num_draft_tokens=8"], "1 to 7 \\(a block of algo=dspark\\)"),
    (["algo=eagle3", "eval.num_draft_tokens=0"], "expected at least 1"),
])  # fmt: skip
def test_the_config_refuses_a_count_beyond_a_block_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=f"eval.num_draft_tokens=.*{message}"):
        compose(overrides)
    assert compose(["algo=eagle3", "eval.num_draft_tokens=12"]).eval.num_draft_tokens == 12


LAYER_IDS = [0, 2, 4]


@pytest.fixture(scope="module")
def stories(stories260k):
    """stories260k, a prompt, and an Eagle3 draft (2 test steps) trained on the target's own samples."""
    model, tokenizer = stories260k
    samples = target_samples(model, tokenizer.bos_token_id, count=16, length=48, seed=0)
    draft = train_eagle3(model, samples, LAYER_IDS, ttt_steps=2, steps=40).eval()
    return model, tokenizer("Once upon a time, there was a little dog").input_ids, draft


@pytest.mark.parametrize("n", [1, 2, 6])
def test_greedy_decoding_with_fewer_or_more_drafts_equals_the_target(stories, n):
    model, prompt, draft = stories
    decode = {"max_new_tokens": 32, "temperature": 0.0, "eos_token_ids": {2}}
    expected = target_generate(model, LAYER_IDS, prompt, **decode)
    set_num_draft_tokens(draft, n)
    result = speculative_generate(model, LAYER_IDS, draft, prompt, **decode)
    assert result.tokens == expected
    assert result.num_draft_tokens == n and max(result.proposed) == n and sum(result.accepted) > 0
