"""A small Eagle3 draft of stories260k trained on the target's own samples, close enough to the target
that its drafts are often accepted: for the sampling tests and `bench/eagle3_sampling.py`."""

from __future__ import annotations

import torch

from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft, build_draft_vocab, token_counts
from deepspec.models.target import capture_features


@torch.no_grad()
def target_samples(model, bos: int, count: int, length: int, seed: int) -> torch.Tensor:
    """[count, length] sequences the target samples from BOS at temperature 1: its own law, which a draft
    decoding at temperature 1 must learn."""
    torch.manual_seed(seed)
    ids = torch.full((count, 1), bos, dtype=torch.long)
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
        min_new_tokens=length - 1, max_new_tokens=length - 1, pad_token_id=bos,
    )  # fmt: skip


def train_eagle3(
    model,
    sequences: torch.Tensor,
    layer_ids: list[int],
    *,
    ttt_steps: int,
    steps: int,
    draft_vocab: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
) -> Eagle3Draft:
    """An Eagle3 draft trained full-batch on `sequences` [n, T] for `steps` AdamW steps against the
    target's distribution (its final states through its head, as the trainer hands them over)."""
    with torch.no_grad():
        features = capture_features(model, sequences, layer_ids)
        final = model.model(input_ids=sequences).last_hidden_state
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    cfg = Eagle3Config.from_target(
        model.config, layer_ids=layer_ids, ttt_steps=ttt_steps, draft_vocab_size=draft_vocab
    )
    mask = torch.ones_like(sequences, dtype=torch.bool)
    mask[:, :2] = False  # BOS and the first token: nothing predicts them
    d2t = None
    if draft_vocab is not None:
        d2t, _ = build_draft_vocab(
            token_counts(list(zip(sequences, mask, strict=True)), cfg.vocab_size), draft_vocab
        )
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg, embed.detach(), head.detach(), d2t=d2t)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = draft.forward_train(
            features, sequences, mask, target_hidden=final, target_head=head.detach()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval()
