"""Validation during training, and the best step's draft kept beside the last.

Every `train.eval_every_steps` optimizer steps, and at the last, the recipe runs `validate` over the
held-out samples: the answers to `heldout.jsonl` (`prompts.heldout_fraction`), cached with the rest but
in shards no training stream reads; at most `train.eval_samples` of them, the same ones every time. They
go in micro-batches of `train.micro_batch` through the algorithm's own training loss, with gradients
off, the draft in eval mode and each micro-batch's anchors drawn by a generator of its own
(`schedule.validation_generator`), so every validation measures the same blocks. The loss's summed
`slot_hits` / `slot_counts` are the draft's per-position acceptance of its proposals (upstream's
accept_rate@k: slot k's top-1 equals the token there; DFlash and DSpark against the data, Eagle3 against
the target's own top-1, which it learns), and `expected_accepted_length` turns them into a simulated
accepted length: `val/expected_tau`, `val/acc_slotK` (DSpark adds its survival-chance figures).

Ranks share the micro-batches (rank r takes r, r + w, ...) and sum their counts, so the figures do not
depend on the number of ranks. Every rank runs the same number of forwards: under ZeRO-3 each forward
gathers the parameters collectively, so a rank short of one repeats a micro-batch it does not count.

The best value's draft is written by `save_best` to `train/<algo>/best/` (the algorithm's `save`, plus
`best.json`: step, metric, value) through a temporary folder and renames: a crash leaves the previous
best or the new one, never a mix (`read_best` puts back a previous one caught between the renames).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepspec.tasks.files import atomic_write_text
from deepspec.tasks.train.metrics import slot_figures
from deepspec.tasks.train.schedule import validation_generator

METRIC = "val/expected_tau"  # what picks the best step: higher is better
BEST_FILE = "best.json"


def validation_batches(num_samples: int, micro_batch: int, limit: int | None, seed: int) -> list[list[int]]:
    """The held-out samples a validation reads, in micro-batches, in data-set order: all of them, or
    `limit` drawn once by `seed` (the same draw every validation)."""
    items = np.arange(num_samples)
    if limit is not None and limit < num_samples:
        items = np.sort(np.random.default_rng(seed).choice(num_samples, limit, replace=False))
    order = items.tolist()
    return [order[start : start + micro_batch] for start in range(0, len(order), micro_batch)]


def rank_batches(num_batches: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """(micro-batch, counted) that `rank` runs: batches rank, rank + world, ...; every rank runs
    ceil(num_batches / world), one short of that repeating batch 0 without counting it."""
    mine = [(b, True) for b in range(rank, num_batches, world)]
    return mine + [(0, False)] * (-(-num_batches // world) - len(mine))


@dataclass
class SlotTotals:
    """Per-slot sums of a loss's statistics over the micro-batches validated."""

    slots: int
    hits: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    accept: torch.Tensor = field(init=False)  # DSpark's 1 - TV, when its loss reports it
    has_accept: bool = False

    def __post_init__(self) -> None:
        self.hits, self.counts, self.accept = (torch.zeros(self.slots) for _ in range(3))

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.hits += stats["slot_hits"].float().cpu()
        self.counts += stats["slot_counts"].float().cpu()
        if "slot_accept" in stats:
            self.accept += stats["slot_accept"].float().cpu()
            self.has_accept = True

    def all_reduce(self, device: torch.device) -> None:
        """Sum over the ranks (on `device`: NCCL reduces only CUDA tensors)."""
        flat = torch.cat([self.hits, self.counts, self.accept, torch.tensor([float(self.has_accept)])])
        flat = flat.to(device)
        torch.distributed.all_reduce(flat)
        self.hits, self.counts, self.accept, flag = flat.cpu().split([self.slots] * 3 + [1])
        self.has_accept = bool(flag.item() > 0)

    def figures(self) -> dict[str, float]:
        return slot_figures("val", self.hits, self.counts, self.accept if self.has_accept else None)


def validate(
    spec,
    forward,
    model: nn.Module,
    settings,
    teacher,
    samples: Callable[[Sequence[int]], list[dict[str, Any]]],
    batches: list[list[int]],
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """`val/*` figures of the draft on the held-out micro-batches `batches` (`samples(items)` reads
    them), through `spec.training_loss(forward, model, ...)` as training calls it: `forward` is the
    DeepSpeed engine wrapping `model` (or the model itself). Every rank calls this, with its `rank`."""
    totals = SlotTotals(int(model.num_draft_tokens))
    toggled = forward if isinstance(forward, nn.Module) else model  # the engine sets its module's mode
    was_training = model.training
    toggled.eval()
    try:
        with torch.no_grad():
            for b, counted in rank_batches(len(batches), rank, world):
                batch, generator = samples(batches[b]), validation_generator(seed, b)
                _, stats = spec.training_loss(forward, model, batch, settings, teacher, generator)
                if counted:
                    totals.add(stats)
    finally:
        toggled.train(was_training)
    if world > 1:
        totals.all_reduce(device or torch.device("cpu"))
    return totals.figures()


def save_best(
    save: Callable[[nn.Module, Path], None], model: nn.Module, best_dir: Path, record: dict[str, Any]
) -> None:
    """`model` written by `save` (the algorithm's) to `best_dir` with `best.json` holding `record`,
    replacing the previous best only once the new one is whole."""
    tmp, old = _tmp_dir(best_dir), _old_dir(best_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    atomic_write_text(tmp / BEST_FILE, json.dumps(record, indent=2))
    if best_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best_dir, old)
    os.replace(tmp, best_dir)  # a crash just before this leaves the previous best at `old`
    shutil.rmtree(old, ignore_errors=True)


def read_best(best_dir: Path) -> dict[str, Any] | None:
    """The record of the draft in `best_dir` (step, metric, value), or None when there is none."""
    old = _old_dir(best_dir)
    if not best_dir.exists() and (old / BEST_FILE).is_file():  # caught between save_best's renames
        os.replace(old, best_dir)
    path = best_dir / BEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def clear_best(best_dir: Path) -> None:
    """Remove a best draft and its leftovers: a run starting from scratch has none yet."""
    for path in (best_dir, _tmp_dir(best_dir), _old_dir(best_dir)):
        shutil.rmtree(path, ignore_errors=True)


def _tmp_dir(best_dir: Path) -> Path:
    return best_dir.with_name(f".{best_dir.name}.tmp")


def _old_dir(best_dir: Path) -> Path:
    return best_dir.with_name(f".{best_dir.name}.old")
