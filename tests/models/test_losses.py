"""Block losses against values computed by hand; chunked losses against full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepspec.models.losses import (
    IGNORE,
    block_labels,
    chunked_dspark_loss,
    chunked_linear_loss,
    dspark_loss,
    expected_accepted_length,
    slot_weights,
    weighted_block_cross_entropy,
)


def test_slot_weights_decay():
    w = slot_weights(3, 4.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-0.25), math.exp(-0.5)]))


def test_block_labels_follow_anchor_and_mask():
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    mask = torch.tensor([0, 0, 1, 1, 0, 1])
    labels = block_labels(ids, mask, torch.tensor([1, 3, 4]), block_size=3)
    assert labels.tolist() == [[12, 13, IGNORE], [IGNORE] * 3, [15, IGNORE, IGNORE]]


def test_block_labels_stop_at_the_first_unsupervised_slot():
    """A hole in the loss mask ends the block's supervision, as upstream's cumprod `eval_mask`: token 14
    is supervised but follows the unsupervised 13, so slot 2 of the block at 1 learns nothing."""
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1])
    labels = block_labels(ids, mask, torch.tensor([0, 1, 4]), block_size=4)
    assert labels.tolist() == [
        [11, 12, IGNORE, IGNORE],
        [12, IGNORE, IGNORE, IGNORE],
        [15, 16, IGNORE, IGNORE],  # past the end
    ]


def test_weighted_cross_entropy_by_hand():
    head = torch.eye(3)  # logits equal the hidden state
    hidden = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([[0, 2], [IGNORE, 2]])
    weights = torch.tensor([1.0, 0.5])
    loss, stats = weighted_block_cross_entropy(hidden, head, labels, weights)

    def ce(row, label):
        return -(row[label] - row.logsumexp(0))

    expected = (1.0 * ce(hidden[0], 0) + 0.5 * ce(hidden[1], 2) + 0.5 * ce(hidden[3], 2)) / 2.0
    assert torch.isclose(loss, expected)
    assert stats["slot_counts"].tolist() == [1.0, 2.0]
    assert stats["slot_hits"].tolist() == [1.0, 1.0]


def test_expected_accepted_length():
    assert expected_accepted_length(torch.tensor([1.0, 1.0, 1.0])) == 4.0
    assert expected_accepted_length(torch.tensor([0.5, 0.5])) == 1.75
    assert expected_accepted_length(torch.tensor([0.0, 1.0])) == 1.0


def _block_problem(rows=6, block=3, d=8, vocab=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows * block, d, generator=gen).to(dtype).requires_grad_()
    head = torch.randn(vocab, d, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (rows, block), generator=gen)
    labels[torch.rand(rows, block, generator=gen) < 0.3] = IGNORE
    return hidden, head, labels, slot_weights(block, 2.0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_chunked_block_cross_entropy_matches_full_logits(chunk_rows):
    hidden, head, labels, weights = _block_problem()
    full, full_stats = weighted_block_cross_entropy(hidden, head, labels, weights, chunk_rows=None)
    (full_grad,) = torch.autograd.grad(full, hidden)
    loss, stats = weighted_block_cross_entropy(hidden, head, labels, weights, chunk_rows=chunk_rows)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(grad, full_grad)
    for key in ("slot_hits", "slot_counts"):
        assert torch.equal(stats[key], full_stats[key])


def test_chunked_block_cross_entropy_in_bfloat16():
    hidden, head, labels, weights = _block_problem(dtype=torch.bfloat16)
    full, _ = weighted_block_cross_entropy(hidden, head, labels, weights, chunk_rows=None)
    (full_grad,) = torch.autograd.grad(full, hidden)
    loss, _ = weighted_block_cross_entropy(hidden, head, labels, weights, chunk_rows=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, full, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad.float(), full_grad.float(), atol=2e-3, rtol=2e-2)


def test_chunked_loss_trains_a_head_and_a_second_input():
    """Gradients reach a trainable weight and every (x, W) pair, and a scaled backward scales them."""
    gen = torch.Generator().manual_seed(3)
    x1, w1 = torch.randn(5, 4, generator=gen), torch.randn(30, 4, generator=gen)
    x2, w2 = torch.randn(5, 2, generator=gen), torch.randn(30, 2, generator=gen)
    labels = torch.randint(0, 30, (5,), generator=gen)
    leaves = [t.requires_grad_() for t in (x1, w1, x2, w2)]

    def loss_fn(logits, rows, need_grad):
        share = F.cross_entropy(logits, labels[rows], reduction="sum")
        grad = torch.softmax(logits, -1) - F.one_hot(labels[rows], 30)
        return share, grad if need_grad else None

    expected = 3.0 * F.cross_entropy(x1 @ w1.t() + x2 @ w2.t(), labels, reduction="sum")
    expected_grads = torch.autograd.grad(expected, leaves)
    loss = 3.0 * chunked_linear_loss(loss_fn, [(x1, w1), (x2, w2)], chunk_rows=2)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_chunked_loss_keeps_no_logits_for_the_backward():
    hidden, head, labels, weights = _block_problem(rows=20, vocab=500)
    vocab_rows = int((labels != IGNORE).sum()) * head.shape[0]

    def saved_numel(chunk_rows):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            weighted_block_cross_entropy(hidden, head, labels, weights, chunk_rows=chunk_rows)
        return sum(sizes)

    assert saved_numel(None) >= vocab_rows  # autograd keeps the whole [rows, vocab] logits
    assert saved_numel(8) < vocab_rows / 10  # only the gathered hidden rows and indices


def _dspark_problem(rows=9, block=3, d=8, rank=4, vocab=40):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(rows, d, generator=gen).requires_grad_()
    codes = torch.randn(rows, rank, generator=gen).requires_grad_()
    w2 = (torch.randn(vocab, rank, generator=gen) * 0.5).requires_grad_()
    head = torch.randn(vocab, d, generator=gen)
    target_hidden = torch.randn(rows, d, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    slots = torch.arange(rows) % block
    confidence = torch.randn(rows, generator=gen).requires_grad_()
    return hidden, codes, w2, head, target_hidden, labels, slots, confidence, slot_weights(block, 2.0)


@pytest.mark.parametrize(
    "variant", ["markov", "no_markov", "target_logits", "softcap", "normaliser", "no_confidence"]
)
def test_chunked_dspark_loss_matches_dspark_loss(variant):
    hidden, codes, w2, head, target_hidden, labels, slots, confidence, weights = _dspark_problem()
    markov = None if variant == "no_markov" else (codes, w2)
    confidence = None if variant == "no_confidence" else confidence
    normaliser = torch.tensor(7.5) if variant == "normaliser" else None
    terms = {"ce_weight": 1.0, "l1_weight": 0.7, "confidence_weight": 0.3, "normaliser": normaliser}
    draft_logits = hidden @ head.t() + (codes @ w2.t() if markov else 0)
    target_logits = target_hidden @ head.t()
    softcap = {"target_softcap": 2.0} if variant == "softcap" else {}
    if softcap:
        target_logits = torch.tanh(target_logits / 2.0) * 2.0
    leaves = [hidden, *(markov or ()), *([] if confidence is None else [confidence])]
    full, full_stats = dspark_loss(draft_logits, target_logits, labels, slots, confidence, weights, **terms)
    full_grads = torch.autograd.grad(full, leaves)
    teacher = {"target_hidden": target_hidden}
    if variant == "target_logits":
        teacher = {"target_logits": target_logits}
    loss, stats = chunked_dspark_loss(
        hidden, head, labels, slots, confidence, weights, markov=markov, chunk_rows=4,
        **teacher, **softcap, **terms,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, full)
    for g, e in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert stats.keys() == full_stats.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], full_stats[key])
