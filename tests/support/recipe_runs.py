"""Several training runs of the recipe in one torchrun launch, recording what the tests compare.

    PYTHONPATH=tests torchrun --standalone --nproc_per_node 2 -m support.recipe_runs OUT_DIR LAUNCH.yaml ...

Every rank runs `TrainRecipe` (setup, train, save_draft) for each launch file in turn, in one process
group, and writes `OUT_DIR/<i>-rank<r>.json`: its loss at every micro-step, the gradient norm the recipe
logs at every optimizer step, and under ZeRO-3 how many parameters were whole when a loss began. One
launch for many runs, since starting torchrun and DeepSpeed costs more than a tiny draft's few steps.
Nothing goes to MLflow.

Under ZeRO-3 every parameter is partitioned, whatever its size: DeepSpeed otherwise keeps those of up to
1e5 elements (`stage3_param_persistence_threshold`), all of a tiny draft's, whole after their first
gather, and a loss reading one outside the engine's gather would pass unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

import deepspec.tasks.train.recipe as recipe_module
from deepspec.tasks import tracking
from deepspec.tasks.train.metrics import Metrics
from deepspec.tasks.train.schedule import deepspeed_config


def partition_everything(cfg, world: int) -> dict:
    config = deepspeed_config(cfg, world)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def whole_parameters(model: nn.Module) -> int:
    """Parameters whole on this rank: all of them below ZeRO-3, there only those gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = ZeroParamStatus.NOT_AVAILABLE
    return sum(getattr(p, "ds_status", None) != partitioned for p in model.parameters())


def run(launch: Path, out: Path) -> None:
    recipe = recipe_module.TrainRecipe(OmegaConf.load(launch))
    record: dict = {"losses": [], "grad_norms": [], "whole_before_loss": []}
    spec = recipe.spec

    def training_loss(forward, model, *args):
        record["whole_before_loss"].append(whole_parameters(model))
        loss, stats = spec.training_loss(forward, model, *args)
        record["losses"].append(loss.item())
        return loss, stats

    def add_grad_norm(metrics: Metrics, norm) -> None:
        record["grad_norms"].append(None if norm is None else float(norm))
        original(metrics, norm)

    recipe.spec = dataclasses.replace(spec, training_loss=training_loss)
    original, Metrics.add_grad_norm = Metrics.add_grad_norm, add_grad_norm
    try:
        recipe.setup()
        recipe.train()
        recipe.save_draft()
    finally:
        Metrics.add_grad_norm = original
    recipe.stream.close()
    record["accumulation"] = recipe.accumulation
    out.write_text(json.dumps(record))


def main() -> None:
    out_dir, launches = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    recipe_module.deepspeed_config = partition_everything
    tracking.log_metrics = lambda *args, **kwargs: None
    for i, launch in enumerate(launches):
        run(launch, out_dir / f"{i}-rank{os.environ['RANK']}.json")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
