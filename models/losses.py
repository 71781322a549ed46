"""Draft training losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def slot_weights(block_size: int, decay: float, device=None) -> torch.Tensor:
    """exp(-k / decay) for slots k = 0..B-1: early slots matter most, since a rejection ends the chain."""
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay)


def block_labels(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Label of slot k of the block anchored at p: token p+k+1 if it exists and is supervised, else IGNORE."""
    targets = anchors[:, None] + 1 + torch.arange(block_size)[None, :]  # [n_anchors, B]
    inside = targets < input_ids.shape[0]
    safe = targets.clamp(max=input_ids.shape[0] - 1)
    supervised = inside & loss_mask[safe].bool()
    return torch.where(supervised, input_ids[safe], torch.full_like(safe, IGNORE))


def weighted_block_cross_entropy(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of every supervised block slot, weighted per slot and normalised by the weight sum.

    hidden: [n_anchors * B, d] final draft states; labels: [n_anchors, B]; weights: [B].
    Logits are formed only for supervised slots. Returns the loss and per-slot top-1 accuracy.
    """
    block_size = labels.shape[1]
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    slot = torch.arange(block_size, device=labels.device).repeat(labels.shape[0])[keep]
    logits = hidden[keep] @ head_weight.t().to(hidden.dtype)
    ce = F.cross_entropy(logits.float(), flat[keep], reduction="none")
    w = weights[slot]
    loss = (w * ce).sum() / w.sum().clamp(min=1e-9)
    correct = (logits.argmax(-1) == flat[keep]).float()
    counts = torch.zeros(block_size).index_add_(0, slot.cpu(), torch.ones_like(correct).cpu())
    hits = torch.zeros(block_size).index_add_(0, slot.cpu(), correct.detach().cpu())
    return loss, {"slot_hits": hits, "slot_counts": counts}


def expected_accepted_length(slot_accuracy: torch.Tensor) -> float:
    """Rough greedy accepted length from per-slot accuracies (bonus included): 1 + sum of prefix products.

    It treats slots as independent, so it is a training-time signal; `evaluate` measures the real one.
    """
    acc = slot_accuracy.clamp(0, 1)
    return 1.0 + float(torch.cumprod(acc, 0).sum()) if acc.numel() else 1.0
