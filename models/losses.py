"""Draft training losses.

The vocabulary-sized losses run in chunks of rows (`chunked_linear_loss`): the logits of one chunk,
[chunk_rows x vocab], exist at a time, and none are kept for the backward (each chunk's gradient is formed
in the forward), instead of [anchors x slots x vocab] for a whole batch held until the backward
(upstream: 512 x 7 x 151,936 fp32 = 2.2 GB a sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100
LOSS_CHUNK_ROWS = 512  # rows of logits at a time: 512 x 151,936 fp32 = 311 MB


class _ChunkedLinearLoss(torch.autograd.Function):
    """loss = sum over row chunks of loss_fn(sum_i x_i[rows] @ W_i.T), with gradients computed in the
    forward, chunk by chunk (the loss is a fixed function of each chunk's logits, so d loss / d logits is
    known there); the backward only scales them. Saves the gradients ([rows, d_i], and [V, d_i] for a
    W_i that needs one), never logits."""

    @staticmethod
    def forward(ctx, loss_fn, chunk_rows, *tensors):
        xs, ws = tensors[0::2], tensors[1::2]
        need_x = [ctx.needs_input_grad[2 + 2 * i] for i in range(len(xs))]
        need_w = [ctx.needs_input_grad[3 + 2 * i] for i in range(len(xs))]
        need_any = any(need_x) or any(need_w)
        ws_cast = [w.to(x.dtype) for x, w in zip(xs, ws, strict=True)]
        grad_x = [torch.empty_like(x) if need else None for x, need in zip(xs, need_x, strict=True)]
        grad_w = [
            torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need else None
            for w, need in zip(ws, need_w, strict=True)
        ]
        rows_total = xs[0].shape[0]
        total = torch.zeros((), dtype=torch.float32, device=xs[0].device)
        for start in range(0, rows_total, chunk_rows):
            rows = slice(start, min(start + chunk_rows, rows_total))
            logits = xs[0][rows] @ ws_cast[0].t()
            for x, w in zip(xs[1:], ws_cast[1:], strict=True):
                logits += x[rows] @ w.t()
            logits = logits.float()
            loss, grad_logits = loss_fn(logits, rows, need_any)
            total += loss
            if not need_any:
                continue
            for i, x in enumerate(xs):
                g = grad_logits.to(x.dtype)
                if need_x[i]:
                    grad_x[i][rows] = g @ ws_cast[i]
                if need_w[i]:
                    grad_w[i] += grad_logits.t() @ x[rows].float()
        ctx.grads = [g for pair in zip(grad_x, grad_w, strict=True) for g in pair]
        ctx.dtypes = [t.dtype for t in tensors]
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [
            None if g is None else (g * grad_output).to(dtype)
            for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        ]
        ctx.grads = None
        return None, None, *grads


def chunked_linear_loss(
    loss_fn: Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, torch.Tensor | None]],
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """A scalar loss over logits = sum_i x_i @ W_i.T ([M, V]) without holding all M rows of logits.

    pairs: (x_i [M, d_i], W_i [V, d_i]), e.g. (final hidden states, LM head) plus (Markov codes, W2).
    loss_fn(logits [m, V] float32, rows, need_grad) returns the chunk's share of the loss (a float32
    scalar) and, when need_grad, d share / d logits [m, V] (it may overwrite `logits` to form it).
    Gradients reach every x_i and W_i that requires them; each matmul runs in x_i's dtype, as
    `x @ W.t()` would.
    """
    tensors = [t for pair in pairs for t in pair]
    if not torch.is_grad_enabled():  # validation: no backward follows, so form no gradients either
        tensors = [t.detach() for t in tensors]
    return _ChunkedLinearLoss.apply(loss_fn, max(1, chunk_rows), *tensors)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in place."""
    return logits.sub_(logits.max(-1, keepdim=True).values).exp_().div_(logits.sum(-1, keepdim=True))


def slot_weights(block_size: int, decay: float, device=None) -> torch.Tensor:
    """exp(-k / decay) for slots k = 0..B-1: early slots matter most, since a rejection ends the chain."""
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay)


def block_labels(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Label of slot k of the block anchored at p: token p+k+1 if it and tokens p+1..p+k all exist and are
    supervised, else IGNORE [n_anchors, block_size].

    The prefix rule is upstream's `build_eval_mask` (a cumprod over the block): a draft is accepted left
    to right, so a slot after an unsupervised one (a user turn, a tool output) would be trained on a
    prefix that verification of the data never reaches.
    """
    targets = anchors[:, None] + 1 + torch.arange(block_size)[None, :]  # [n_anchors, B]
    inside = targets < input_ids.shape[0]
    safe = targets.clamp(max=input_ids.shape[0] - 1)
    labels = torch.where(inside & loss_mask[safe].bool(), input_ids[safe], torch.full_like(safe, IGNORE))
    return labels.masked_fill_(~supervised_prefix(labels), IGNORE)


def weighted_block_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_rows: int | None = LOSS_CHUNK_ROWS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of every supervised block slot, weighted per slot and normalised by the weight sum.

    hidden: [n_anchors * B, d] final draft states; labels: [n_anchors, B]; weights: [B].
    Logits are formed only for supervised slots, `chunk_rows` rows at a time (None: all at once, with
    autograd keeping them for the backward). Returns the loss and per-slot top-1 accuracy.
    """
    block_size = labels.shape[1]
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    slot = torch.arange(block_size, device=labels.device).repeat(labels.shape[0])[keep]
    targets = flat[keep]
    w = weights.to(hidden.device)[slot].float()
    scale = w / w.sum().clamp(min=1e-9)
    correct = torch.zeros(targets.shape[0], device=hidden.device)
    if chunk_rows is None:
        logits = hidden[keep] @ head_weight.t().to(hidden.dtype)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        loss = (scale * ce).sum()
        correct = (logits.argmax(-1) == targets).float()
    else:

        def loss_fn(logits: torch.Tensor, rows: slice, need_grad: bool):
            label, row_scale = targets[rows], scale[rows]
            correct[rows] = (logits.argmax(-1) == label).float()
            label_logit = logits.gather(1, label[:, None])[:, 0]
            share = (row_scale * (logits.logsumexp(-1) - label_logit)).sum()
            if not need_grad:
                return share, None
            grad = _softmax_(logits)  # d ce / d logits = softmax - one_hot(label)
            grad[torch.arange(grad.shape[0], device=grad.device), label] -= 1.0
            return share, grad.mul_(row_scale[:, None])

        loss = chunked_linear_loss(loss_fn, [(hidden[keep], head_weight)], chunk_rows)
    slot_cpu = slot.cpu()
    counts = torch.zeros(block_size).index_add_(0, slot_cpu, torch.ones(slot_cpu.shape[0]))
    hits = torch.zeros(block_size).index_add_(0, slot_cpu, correct.detach().cpu())
    return loss, {"slot_hits": hits, "slot_counts": counts}


def expected_accepted_length(slot_accuracy: torch.Tensor) -> float:
    """Rough greedy accepted length from per-slot accuracies (bonus included): 1 + sum of prefix products.

    It treats slots as independent, so it is a training-time signal; `evaluate` measures the real one.
    """
    acc = slot_accuracy.clamp(0, 1)
    return 1.0 + float(torch.cumprod(acc, 0).sum()) if acc.numel() else 1.0


def chunked_dspark_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    slots: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    target_hidden: torch.Tensor | None = None,
    target_logits: torch.Tensor | None = None,
    markov: tuple[torch.Tensor, torch.Tensor] | None = None,
    target_softcap: float | None = None,
    ce_weight: float,
    l1_weight: float,
    confidence_weight: float,
    normaliser: torch.Tensor | float | None = None,
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`dspark_loss` (same terms, statistics and normalisation) without [M, vocab] logits.

    Rows are the supervised slots: hidden [M, d] final backbone states, whose draft logits are
    hidden @ head_weight.T, plus codes @ W2.T when markov = (codes [M, r], W2 [vocab, r]) is given.
    The teacher is target_hidden [M, d] (the target's final states, through the same frozen head, then
    capped as softcap * tanh(logits / softcap) when `target_softcap` is given, as Gemma's head does) or
    target_logits [M, vocab]. Both sides' logits exist `chunk_rows` rows at a time; d(CE + L1)/d logits
    is formed in the forward (`chunked_linear_loss`), the confidence BCE runs on its [M] logits as usual.
    """
    if (target_hidden is None) == (target_logits is None):
        raise ValueError("pass exactly one of target_hidden and target_logits")
    block_size = weights.shape[0]
    device = hidden.device
    w = weights.to(device)[slots].float()
    denominator = w.sum().clamp(min=1e-9) if normaliser is None else normaliser
    scale = w / denominator
    rows_total = labels.shape[0]
    ce, l1, hits = (torch.zeros(rows_total, device=device) for _ in range(3))

    def loss_fn(logits: torch.Tensor, rows: slice, need_grad: bool):
        label, row_scale = labels[rows], scale[rows]
        with torch.no_grad():
            if target_logits is not None:
                teacher = target_logits[rows].float()
            else:  # as `DSparkDraft.target_logits`: the states in the head's dtype
                teacher = (target_hidden[rows].to(head_weight.dtype) @ head_weight.t()).float()
                if target_softcap:
                    teacher = torch.tanh(teacher / target_softcap) * target_softcap
            p_target = torch.softmax(teacher, dim=-1)
        hits[rows] = (logits.argmax(-1) == label).float()
        ce[rows] = logits.logsumexp(-1) - logits.gather(1, label[:, None])[:, 0]
        p_draft = _softmax_(logits)
        diff = p_draft - p_target
        l1[rows] = diff.abs().sum(-1)
        share = (row_scale * (ce_weight * ce[rows] + l1_weight * l1[rows])).sum()
        if not need_grad:
            return share, None
        # d L1 / d logits = p * (s - <p, s>), s = sign(p - q); d CE / d logits = p - one_hot(label)
        sign = diff.sign_()
        grad = sign.sub_((p_draft * sign).sum(-1, keepdim=True)).mul_(p_draft).mul_(l1_weight)
        grad.add_(p_draft, alpha=ce_weight)
        grad[torch.arange(grad.shape[0], device=device), label] -= ce_weight
        return share, grad.mul_(row_scale[:, None])

    pairs = [(hidden, head_weight)] + ([markov] if markov is not None else [])
    loss = chunked_linear_loss(loss_fn, pairs, chunk_rows)
    accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
    bce = torch.zeros_like(ce)
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        loss = loss + confidence_weight * (w * bce).sum() / denominator
    slot_cpu = slots.cpu()
    stats = {
        "ce": ((w * ce).sum() / denominator).detach(),
        "l1": ((w * l1).sum() / denominator).detach(),
        "confidence": ((w * bce).sum() / denominator).detach(),
        "slot_counts": torch.zeros(block_size).index_add_(0, slot_cpu, torch.ones(slot_cpu.shape[0])),
        "slot_hits": torch.zeros(block_size).index_add_(0, slot_cpu, hits.cpu()),
        "slot_accept": torch.zeros(block_size).index_add_(0, slot_cpu, accept.cpu()),
    }
    return loss, stats


# --- DSpark (deepseek-ai/DeepSpec `deepspec/modeling/dspark/loss.py`, `common.py`) ---


def supervised_prefix(labels: torch.Tensor) -> torch.Tensor:
    """[n_anchors, B] bool: the slots before a block's first unsupervised one.

    DSpark drafts a chain, so a slot after a gap would be trained on a prefix that verification never
    reaches; upstream's `build_eval_mask` keeps the contiguous supervised prefix the same way.
    """
    return (labels != IGNORE).to(torch.int32).cumprod(dim=-1).bool()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 0.5 * sum |p - q| over the last dimension of two probability tensors."""
    return 0.5 * (p - q).abs().sum(dim=-1)


def acceptance_label(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """1 - TV(p_draft, p_target) at temperature 1, in [0, 1], without gradient.

    A token drawn from q is kept with probability sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al.
    2023), so this is the chance a slot survives verification given its prefix: the confidence head's
    soft label.
    """
    with torch.no_grad():
        p_draft = torch.softmax(draft_logits.float(), dim=-1)
        p_target = torch.softmax(target_logits.float(), dim=-1)
        return (1.0 - total_variation(p_draft, p_target)).clamp(0.0, 1.0)


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    slots: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    ce_weight: float,
    l1_weight: float,
    confidence_weight: float,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * CE + l1_weight * L1(p_draft, p_target) + confidence_weight * BCE(confidence, 1 - TV).

    Rows are the supervised slots of a whole batch (every anchor of every sequence): draft and target
    logits [M, vocab], labels [M], slot index k of each row [M], confidence logits [M] or None.
    `weights` [B] are the slot weights (exp(-k / decay)). Each term is a weighted sum over all rows
    divided by one normaliser, by default the sum of the rows' weights: the batch is normalised as a
    whole, so a sequence with many supervised slots counts more than one with few (upstream divides by
    the weight sum all-reduced over ranks). Pass `normaliser` to divide by a larger total, e.g. the
    weight sum over all micro-batches of an optimizer step, or over all ranks divided by the rank count
    when the engine averages gradients over ranks.

    L1 is sum_x |p_draft - p_target| (= 2 TV), as upstream's `l1_loss`; the BCE target is detached.
    Returns the loss and detached statistics: the three terms, and per-slot sums of top-1 hits and of
    1 - TV with the slot counts (for `expected_accepted_length`).
    """
    block_size = weights.shape[0]
    w = weights.to(draft_logits.device)[slots]
    denominator = w.sum().clamp(min=1e-9) if normaliser is None else normaliser
    logits = draft_logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_draft = torch.softmax(logits, dim=-1)
    p_target = torch.softmax(target_logits.float(), dim=-1).detach()
    l1 = (p_draft - p_target).abs().sum(dim=-1)
    accept = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    loss = (ce_weight * (w * ce).sum() + l1_weight * (w * l1).sum()) / denominator
    bce = torch.zeros_like(ce)
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        loss = loss + confidence_weight * (w * bce).sum() / denominator
    slot_cpu = slots.cpu()
    counts = torch.zeros(block_size).index_add_(0, slot_cpu, torch.ones(slot_cpu.shape[0]))
    hits = (logits.argmax(-1) == labels).float().detach().cpu()
    stats = {
        "ce": ((w * ce).sum() / denominator).detach(),
        "l1": ((w * l1).sum() / denominator).detach(),
        "confidence": ((w * bce).sum() / denominator).detach(),
        "slot_counts": counts,
        "slot_hits": torch.zeros(block_size).index_add_(0, slot_cpu, hits),
        "slot_accept": torch.zeros(block_size).index_add_(0, slot_cpu, accept.cpu()),
    }
    return loss, stats
