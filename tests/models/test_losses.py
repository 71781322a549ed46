"""Block losses against values computed by hand."""

import math

import torch

from deepspec.models.losses import (
    IGNORE,
    block_labels,
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
    labels = block_labels(ids, mask, torch.tensor([1, 3]), block_size=3)
    assert labels.tolist() == [[12, 13, IGNORE], [IGNORE, 15, IGNORE]]


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
