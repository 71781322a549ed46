"""Drafting from the decode cache gives what drafting from the whole context gives, round after round.

`speculative_generate` drafts inside `draft.decoding()`, where each round projects only the positions
committed since the round before (`models/drafts/kv_cache.py`). Here one draft drafts inside a decode
session and its copy drafts statelessly, over a context that grows as verification grows it (the anchor
plus some kept drafts a round); every round's logits must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support import tiny

from deepspec.models.drafts.dspark import DSparkDraft
from deepspec.models.drafts.eagle3 import Eagle3Draft
from deepspec.models.drafts.kv_cache import DecodeCache, GrowingKV

torch.set_num_threads(1)

dflash, dspark, eagle3, _context = tiny.dflash_draft, tiny.dspark_draft, tiny.eagle3_draft, tiny.draft_context
GROWTH = [1, 4, 2, 1, 5, 3, 1, 6]  # positions committed by each round: the anchor and the kept drafts


def _draft(draft, features, ids, p: int) -> torch.Tensor:
    """What a round reads of a draft: its logits (DSpark: its greedy chain's, with the confidences)."""
    anchor = int(ids[p])
    if isinstance(draft, Eagle3Draft):
        return draft.draft_logits(features[:p], anchor, context_ids=ids[:p])
    if isinstance(draft, DSparkDraft):
        proposal = draft.propose(features[:p], anchor, temperature=0.0)
        return torch.cat([proposal.logits, proposal.confidence[:, None]], dim=1)
    return draft.draft_logits(features[:p], anchor)


@pytest.mark.parametrize("build", [dflash, dspark, eagle3], ids=["dflash", "dspark", "eagle3"])
def test_cached_rounds_equal_stateless_rounds(build):
    cached = build().eval()
    stateless = copy.deepcopy(cached)
    width = cached.fc.weight.shape[1] if hasattr(cached, "fc") else cached.backbone.fc.weight.shape[1]
    features, ids = _context(width)
    p = 3  # the prompt
    with torch.no_grad(), cached.decoding():
        for grow in GROWTH:
            torch.testing.assert_close(_draft(cached, features, ids, p), _draft(stateless, features, ids, p))
            p += grow
    assert cached._decode_cache is None if hasattr(cached, "_decode_cache") else True


def test_eagle3_redrafting_one_context_with_another_anchor():
    """The last context position reads the anchor: a second call on the same context with another
    anchor must see the new one (it is projected again in every call)."""
    cached = eagle3().eval()
    stateless = copy.deepcopy(cached)
    features, ids = _context(cached.fc.weight.shape[1])
    with torch.no_grad(), cached.decoding():
        for anchor in (5, 9, 5):
            torch.testing.assert_close(
                cached.draft_logits(features[:7], anchor, context_ids=ids[:7]),
                stateless.draft_logits(features[:7], anchor, context_ids=ids[:7]),
            )


def test_a_decode_session_starts_empty_and_refuses_a_shrinking_context():
    draft = dflash().eval()
    features, ids = _context(draft.fc.weight.shape[1])
    with torch.no_grad():
        with draft.decoding():
            draft.draft_logits(features[:10], 4)
            assert draft._decode_cache.length == 10
            with pytest.raises(RuntimeError, match="shrank from 10 to 6"):
                draft.draft_logits(features[:6], 4)
        assert draft._decode_cache is None
        with draft.decoding():  # a new sequence: nothing of the last one is kept
            assert draft._decode_cache.length == 0
            torch.testing.assert_close(
                draft.draft_logits(features[:6], 4), dflash().draft_logits(features[:6], 4)
            )


def test_growing_kv_keeps_rows_across_growth_and_scratch():
    kv, rows = GrowingKV(), torch.arange(2 * 150 * 3, dtype=torch.float32).reshape(2, 150, 3)
    for start, stop in [(0, 5), (5, 70), (70, 71), (71, 150)]:  # crosses the 64-row start and a doubling
        kv.extend(rows[:, start:stop], -rows[:, start:stop])
        scratch_k, _ = kv.with_scratch(torch.ones(2, 4, 3), torch.ones(2, 4, 3))
        assert torch.equal(scratch_k[:, :stop], rows[:, :stop]) and bool((scratch_k[:, stop:] == 1).all())
    keys, values = kv.committed()
    assert torch.equal(keys, rows) and torch.equal(values, -rows)
    assert DecodeCache.for_layers(3).new_positions(4) == slice(0, 4)
