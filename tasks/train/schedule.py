"""The arithmetic of a training run: DeepSpeed's config (batching, optimizer, ZeRO, precision), the
learning-rate schedule, and where a micro-step stands in the sample stream and the anchor draws."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from deepspec.models.errors import ConfigError


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    """Global batch = micro_batch x ranks x accumulation: DeepSpeed steps the optimizer once per
    `gradient_accumulation_steps` micro-steps."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    if (
        t.global_batch % per_step
    ):  # compose checks this for nproc x nnodes; a hand-started torchrun may differ
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch ({t.micro_batch}) "
            f"x ranks ({world_size})"
        )
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // per_step,
        "gradient_clipping": t.grad_clip,
        # torch's AdamW: DeepSpeed's fused CPU Adam would compile for minutes on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warmup over `warmup_ratio` of the optimizer steps, then cosine down to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def anchor_generator(seed: int, micro_step: int, rank: int, world: int) -> torch.Generator:
    """The generator of one micro-step's anchors: a function of the step, so a resumed run draws the same."""
    return torch.Generator().manual_seed((int(seed) << 40) + micro_step * world + rank)


def validation_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of held-out micro-batch `batch`'s anchors: the same at every validation and on any
    number of ranks, and apart from training's draws (bit 39 set)."""
    return torch.Generator().manual_seed((int(seed) << 40) + (1 << 39) + batch)


def loader_state_at(micro_step: int, micro_steps_per_epoch: int, micro_batch: int) -> dict[str, int]:
    """The stream position after `micro_step` micro-steps (for checkpoints saved without one)."""
    epoch, index = divmod(micro_step, micro_steps_per_epoch)
    return {"epoch": epoch, "consumed": index * micro_batch}


def micro_batch_size(micro_step: int, samples_per_epoch: int, micro_batch: int) -> int:
    """Samples a rank takes at `micro_step`: `micro_batch`, except for an epoch's short last micro-batch."""
    index_in_epoch = micro_step % math.ceil(samples_per_epoch / micro_batch)
    return min(micro_batch, samples_per_epoch - index_in_epoch * micro_batch)
