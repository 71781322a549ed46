"""Training runs of the recipe in one torchrun launch, the last of them stopped by a kill.

    PYTHONPATH=tests torchrun --standalone --nproc_per_node 2 -m support.killed_runs \
        {none,stop:MICRO,save:TAG} LAUNCH.yaml ...

Every rank runs `TrainRecipe` (setup, train, save_draft) for each launch file in turn, in one process
group, nothing going to MLflow. In the last run, `stop:MICRO` makes every rank, on reaching micro-step
MICRO (inside the step, before its loss), write its pid to `<run_dir>/stopped-rank<r>` and wait there
for the test to SIGKILL it; `save:TAG` makes every rank but 0 SIGKILL itself as it starts writing its
part of checkpoint TAG, after rank 0 wrote its own (`kill_in_save`); torchrun then ends rank 0.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import deepspec.tasks.train.recipe as recipe_module
from deepspec.tasks import tracking


def stop_at(recipe: recipe_module.TrainRecipe, micro: int) -> None:
    spec, calls = recipe.spec, [0]

    def training_loss(*args):
        if recipe.start_micro + calls[0] == micro:
            marker = recipe.paths.train_dir / f"stopped-rank{recipe.rank}"
            marker.write_text(str(os.getpid()))
            time.sleep(600)  # until killed
        calls[0] += 1
        return spec.training_loss(*args)

    recipe.spec = dataclasses.replace(spec, training_loss=training_loss)


def kill_in_save(recipe: recipe_module.TrainRecipe, tag: str) -> None:
    """Ranks other than 0 die as they begin writing their part of `tag`, slowly enough that rank 0 has
    written all of its own: DeepSpeed's rank 0 then moves `latest` without waiting for the others."""
    checkpoint_engine = recipe.engine.checkpoint_engine
    save = checkpoint_engine.save

    def save_or_die(state_dict, path, *args, **kwargs):
        if recipe.rank > 0 and Path(path).parent.name == tag:
            time.sleep(3)  # a slow writer
            os.kill(os.getpid(), signal.SIGKILL)
        return save(state_dict, path, *args, **kwargs)

    checkpoint_engine.save = save_or_die


def main() -> None:
    hook, launches = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    tracking.log_metrics = lambda *args, **kwargs: None
    for i, launch in enumerate(launches):
        recipe = recipe_module.TrainRecipe(OmegaConf.load(launch))
        recipe.setup()
        if i == len(launches) - 1 and hook.startswith("stop:"):
            stop_at(recipe, int(hook.removeprefix("stop:")))
        if i == len(launches) - 1 and hook.startswith("save:"):
            kill_in_save(recipe, hook.removeprefix("save:"))
        recipe.train()
        recipe.save_draft()
        recipe.stream.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
