"""Training figures between two logged optimizer steps: loss, per-slot agreement with the labels (and
DSpark's survival chance), the accepted length they imply, any scalar a loss reports, the gradient norm
before clipping, and the samples and tokens a second (this rank's, times the ranks: every rank trains on
an equal share of each optimizer step's samples), and this rank's peak memory."""

from __future__ import annotations

import time

import torch

from deepspec.models.losses import expected_accepted_length


class Metrics:
    def __init__(self, slots: int):
        self.slots = slots
        self.reset()

    def reset(self) -> None:
        self.loss, self.n = 0.0, 0
        self.hits, self.counts = torch.zeros(self.slots), torch.zeros(self.slots)
        self.accept: torch.Tensor | None = None
        self.scalars: dict[str, float] = {}
        self.samples, self.tokens, self.began = 0, 0, time.perf_counter()
        self.grad_norms: list[float] = []

    def add(
        self, loss: torch.Tensor, stats: dict[str, torch.Tensor], samples: int = 0, tokens: int = 0
    ) -> None:
        self.loss, self.n = self.loss + loss.item(), self.n + 1
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens
        self.hits += stats["slot_hits"]
        self.counts += stats["slot_counts"]
        if "slot_accept" in stats:  # DSpark: the chance each slot survives verification, 1 - TV
            self.accept = stats["slot_accept"] + (0 if self.accept is None else self.accept)
        for key, value in stats.items():
            if torch.is_tensor(value) and value.dim() == 0:
                self.scalars[key] = self.scalars.get(key, 0.0) + float(value)

    def add_grad_norm(self, norm: float | None) -> None:
        """An optimizer step's global gradient norm (before clipping), when the engine reports one."""
        if norm is not None:
            self.grad_norms.append(float(norm))

    def summary(self, lr: float, world: int = 1) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.began, 1e-9)
        metrics = {
            "train/loss": self.loss / max(1, self.n),
            "train/lr": lr,
            **slot_figures("train", self.hits, self.counts, self.accept),
            **{f"train/{key}": total / max(1, self.n) for key, total in self.scalars.items()},
            "train/samples_per_s": self.samples * world / seconds,
            "train/tokens_per_s": self.tokens * world / seconds,
        }
        if self.grad_norms:
            metrics["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        metrics["train/peak_memory_mb"] = peak_memory_mb()
        return metrics


def peak_memory_mb() -> float:
    """This rank's peak memory so far: the most CUDA memory torch allocated on its device, or on a CPU
    the process's peak resident set (torch keeps no allocator statistics there)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def slot_figures(
    prefix: str, hits: torch.Tensor, counts: torch.Tensor, accept: torch.Tensor | None = None
) -> dict[str, float]:
    """Per-slot agreement of the draft with the labels (`<prefix>/acc_slotK`: upstream's accept_rate@k)
    and the accepted length it implies (`<prefix>/expected_tau`), from a loss's summed `slot_hits` and
    `slot_counts`; with DSpark's summed `slot_accept` (1 - TV), the same by survival chance."""
    accuracy = hits / counts.clamp(min=1)
    figures = {
        f"{prefix}/expected_tau": expected_accepted_length(accuracy),
        **{f"{prefix}/acc_slot{k}": float(a) for k, a in enumerate(accuracy)},
    }
    if accept is not None:
        accept = accept / counts.clamp(min=1)
        figures[f"{prefix}/expected_tau_accept"] = expected_accepted_length(accept)
        figures.update({f"{prefix}/accept_slot{k}": float(a) for k, a in enumerate(accept)})
    return figures
