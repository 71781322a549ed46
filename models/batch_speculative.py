"""Speculative decoding of several requests at once: one target forward verifies every request's drafts,
each request with its own draft length (DSpark's prefix scheduler chooses them; `prefix_scheduler.py`).

Each step, every unfinished request drafts (its own drafter: a `Drafter` keeps one sequence's decode
cache), `choose_lengths` cuts each proposal to the length it should verify, and the target runs all the
requests' [anchor, drafts] in one batched forward. Rows are as long as the longest request's; shorter
rows are padded. Every token ever fed stays in the batched KV cache, and the attention mask hides the
padding and every rejected draft from all later tokens, so each request's logits are those of its own
committed context. Position ids count only the committed tokens, so RoPE sees each request as if it ran
alone. The acceptance rule is `speculative.py`'s, applied request by request to the rows it verified:
cutting a proposal keeps the law q of the drafts left, so decoding stays lossless whatever the lengths.
A round is verified and counted exactly as `speculative_generate` does it (`verify`, `add_round`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from deepspec.models.speculative import (
    Drafter,
    SpecResult,
    _device_generator,
    _Drafting,
    _sample_token,
    add_round,
    verify,
)
from deepspec.models.target import check_layer_ids

Proposal = tuple[list[int], torch.Tensor | None, list[float]]  # drafts, their laws q, confidences
LengthChooser = Callable[[list[Proposal]], list[int]]


class _Batch:
    """The batched target: token ids fed so far, which of them count, and the KV cache of all of them."""

    def __init__(self, model: PreTrainedModel, layer_ids: list[int], size: int):
        self.model, self.layer_ids = model, check_layer_ids(layer_ids, model.config.num_hidden_layers)
        self.cache = DynamicCache()
        self.mask = torch.zeros(size, 0, dtype=torch.long, device=model.device)  # 1: a committed token
        self.committed = torch.zeros(size, dtype=torch.long, device=model.device)  # tokens that count
        self.width = 0  # tokens fed by the last forward, padding included

    def forward(self, rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each request its row (padded to the longest); logits [R, W, V] and features [R, W, F]."""
        width = max(len(r) for r in rows)
        device = self.model.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        fed = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            fed[i, : len(row)] = 1
        positions = self.committed[:, None] + torch.arange(width, device=device)[None]
        # the new tokens see each other causally (the model's own mask) and only committed tokens before
        self.mask = torch.cat([self.mask, fed.to(device)], dim=1)
        self.width = width
        out = self.model(input_ids=ids.to(device), attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, output_hidden_states=True)  # fmt: skip
        features = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
        return out.logits.float(), features

    def keep(self, kept: list[int]) -> None:
        """Of the tokens just fed, request i keeps its first kept[i]: the rest is masked from now on."""
        start = self.mask.shape[1] - self.width
        for i, n in enumerate(kept):
            self.mask[i, start + n :] = 0
            self.committed[i] += n


def _fork(drafter):
    """The drafter for one request: the same weights, its own decode cache (submodules that keep one,
    like DSpark's backbone, are forked too)."""
    twin = copy.copy(drafter)
    modules = getattr(drafter, "_modules", None)
    if modules is not None:
        twin._modules = {n: _fork(m) if hasattr(m, "decoding") else m for n, m in modules.items()}
    return twin


@torch.no_grad()
def batch_speculative_generate(
    model: PreTrainedModel,
    layer_ids: list[int],
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: set[int],
    generators: Sequence[torch.Generator | None] | None = None,
    choose_lengths: LengthChooser | None = None,
    pad_token_id: int = 0,
) -> list[SpecResult]:
    """Generate up to `max_new_tokens` tokens after each prompt, each distributed exactly as the target's,
    verifying all requests in one forward a step. `choose_lengths` gets every active request's proposal
    and returns how many of its drafts to verify (default: all of them)."""
    count = len(prompts)
    device = model.device
    generators = [_device_generator(g, device) for g in (generators or [None] * count)]
    drafters = [_fork(drafter) for _ in range(count)]
    results = [SpecResult(tokens=[], num_draft_tokens=int(drafter.num_draft_tokens)) for _ in range(count)]
    if max_new_tokens <= 0:
        return results
    batch = _Batch(model, layer_ids, count)
    lengths = [len(p) for p in prompts]
    logits, features = batch.forward([list(p) for p in prompts], pad_token_id)
    batch.keep(lengths)
    context = [features[i, : lengths[i]] for i in range(count)]
    context_ids = [torch.tensor(list(p), dtype=torch.long) for p in prompts]
    anchors = [_sample_token(logits[i, lengths[i] - 1], temperature, generators[i]) for i in range(count)]
    for i, anchor in enumerate(anchors):
        results[i].tokens.append(anchor)
    vocab = logits.shape[-1]
    drafting = [_Drafting(d, 0.0, vocab) for d in drafters]
    active = [i for i in range(count) if anchors[i] not in eos_token_ids and max_new_tokens > 1]

    with ExitStack() as sessions:
        for d in drafters:
            if hasattr(d, "decoding"):
                sessions.enter_context(d.decoding())
        while active:
            proposals = {i: drafting[i](context[i], context_ids[i], anchors[i], temperature, generators[i])
                         for i in active}  # fmt: skip
            chosen = choose_lengths([proposals[i] for i in active]) if choose_lengths else None
            rows: list[list[int]] = []
            cut: dict[int, Proposal] = {}
            for i in range(count):
                if i in proposals:
                    drafts, q, confidence = proposals[i]
                    n = len(drafts) if chosen is None else min(chosen[active.index(i)], len(drafts))
                    cut[i] = (drafts[:n], None if q is None else q[:n], confidence)
                    rows.append([anchors[i], *drafts[:n]])
                else:
                    rows.append([])  # finished: fed nothing (all padding, masked)
            logits, features = batch.forward(rows, pad_token_id)
            kept_tokens = [0] * count
            for i in list(active):
                drafts, q, confidence = cut[i]
                n_accepted, nxt = verify(logits[i, : len(drafts) + 1], drafts, q, temperature, generators[i])
                kept_tokens[i] = n_accepted + 1  # the anchor and the kept drafts
                context[i] = torch.cat([context[i], features[i, : n_accepted + 1]])
                context_ids[i] = torch.cat([context_ids[i], torch.tensor([anchors[i], *drafts[:n_accepted]])])
                ended = add_round(results[i], drafts, n_accepted, nxt, confidence, eos_token_ids)
                anchors[i] = nxt
                if ended or len(results[i].tokens) >= max_new_tokens:
                    active.remove(i)
            batch.keep(kept_tokens)

    for result in results:
        del result.tokens[max_new_tokens:]
    return results
