"""Resume on any number of ranks, after a real kill: 2 gloo ranks SIGKILLed inside an optimizer step and
resumed on 1, 1 rank killed and resumed on 2, and 2 ranks killed while writing a checkpoint, each ending
with the weights of an uninterrupted run at the same global batch. The recipe runs under torchrun on
stories260k at ZeRO-1 (the default stage), whose optimizer state is partitioned by rank, so resuming on
another number converts the checkpoint to DeepSpeed's universal form (`recipe._to_universal`).

On another number of ranks the weights agree within WEIGHT_ATOL, not bit for bit: the gradients of a
step are summed in another order (gloo's reduction over 2 ranks against accumulation on 1), and Adam
moves a weight by about lr whatever its gradient's size, so where a gradient nearly cancels the order
shows. Killed while saving (rank 1 dying before its optimizer shard, after rank 0 wrote its files,
where DeepSpeed's own `latest` would already name the broken tag), `latest` still names the last
complete checkpoint and the run resumed on the same ranks is bit-identical to the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from support.stories import build_cache_untracked, stories_overrides, write_answers

from deepspec.tasks.config import compose

STORIES = [  # 4 samples: an epoch divides by micro_batch x ranks for 1 and 2 ranks
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]
# One sample a micro-batch, so 1 and 2 ranks average the same per-sample losses (and draw the same
# anchors: micro-step x ranks + rank is the sample's global position). 6 optimizer steps of 2 samples, a
# checkpoint every 2.
TRAIN = ["algo.num_layers=1", "algo.block_size=4", "train=cpu_demo", "train.epochs=3", "train.micro_batch=1",
         "train.global_batch=2", "train.lr=1e-2", "train.threads_per_rank=1", "train.zero_stage=1",
         "train.save_every_steps=2", "train.eval_every_steps=0"]  # fmt: skip
WEIGHT_ATOL = 1e-4  # 1% of the learning rate; see the docstring
TESTS = Path(__file__).parents[1]


def _torchrun(nproc: int, hook: str, launches: list[Path]) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "support.killed_runs", hook, *map(str, launches)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, expect_ok: bool) -> None:
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise
    assert (process.returncode == 0) == expect_ok, output[-8000:]


def _kill_when_stopped(process: subprocess.Popen, train_dir: Path, nproc: int) -> None:
    """SIGKILL every rank once all wait inside the step (`support/killed_runs.stop_at`)."""
    markers = [train_dir / f"stopped-rank{r}" for r in range(nproc)]
    deadline = time.monotonic() + 300
    while not all(m.is_file() and m.read_text() for m in markers):
        assert process.poll() is None and time.monotonic() < deadline, "the ranks never reached the step"
        time.sleep(0.2)
    for marker in markers:
        os.kill(int(marker.read_text()), signal.SIGKILL)
        marker.unlink()
    _finish(process, expect_ok=False)


@pytest.fixture(scope="module")
def runs(assets_dir, tmp_path_factory) -> dict[str, Path]:
    """name -> the run's train dir: `two` and `one` uninterrupted on 2 and 1 ranks; `two_to_one`,
    `one_to_two` killed and resumed on the other number; `killed_saving` killed in its step-4 save and
    resumed on 2 ranks (its `latest` as the kill left it, in `latest_after_kill`)."""
    root = tmp_path_factory.mktemp("resume")
    base = stories_overrides(assets_dir, root / "data-run", "target.layer_ids=[0,1,2]", f"data_dir={root}")
    write_answers(base, STORIES)
    build_cache_untracked(base)

    def launch(name: str, nproc: int) -> Path:
        cfg = compose([*base, f"run_dir={root / name}", *TRAIN, f"train.nproc_per_node={nproc}"])
        path = root / "launches" / f"{name}-{nproc}.yaml"
        path.parent.mkdir(exist_ok=True)
        OmegaConf.save(cfg, path)
        return path

    train_dir = {name: root / name / "train" / "dflash" for name in
                 ("two", "one", "two_to_one", "one_to_two", "killed_saving")}  # fmt: skip
    _kill_when_stopped(  # killed in step 4 (its only micro-step), after step 3: resumes from step 2
        _torchrun(2, "stop:3", [launch("two", 2), launch("two_to_one", 2)]), train_dir["two_to_one"], 2
    )
    _kill_when_stopped(  # killed in step 4's second micro-step, half its gradient accumulated
        _torchrun(1, "stop:7", [launch("one", 1), launch("two_to_one", 1), launch("one_to_two", 1)]),
        train_dir["one_to_two"], 1,
    )  # fmt: skip
    _finish(_torchrun(2, "save:step4", [launch("one_to_two", 2), launch("killed_saving", 2)]), False)
    checkpoints = train_dir["killed_saving"] / "checkpoints"
    (root / "latest_after_kill").write_text((checkpoints / "latest").read_text())
    written = {p.name for p in (checkpoints / "step4").iterdir()}  # the kill came inside the save:
    assert "mp_rank_00_model_states.pt" in written  # rank 0's part written
    assert not any("zero_pp_rank_1" in name for name in written)  # rank 1's not
    _finish(_torchrun(2, "none", [launch("killed_saving", 2)]), True)
    return {**train_dir, "latest_after_kill": root / "latest_after_kill"}


def _draft(train_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(train_dir / "draft" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("resumed", ["two_to_one", "one_to_two"])
def test_a_run_killed_mid_step_resumes_on_another_number_of_ranks(runs, resumed):
    draft, two, one = _draft(runs[resumed]), _draft(runs["two"]), _draft(runs["one"])
    assert _max_diff(two, one) < WEIGHT_ATOL  # the same global batch trains the same weights
    diffs = {"two": _max_diff(draft, two), "one": _max_diff(draft, one)}
    print(f"{resumed}: max abs weight difference from the uninterrupted runs {diffs}")
    assert max(diffs.values()) < WEIGHT_ATOL, diffs


@pytest.mark.integration
def test_a_run_killed_while_saving_keeps_the_last_complete_checkpoint(runs):
    assert runs["latest_after_kill"].read_text() == "step2"
    checkpoints = runs["killed_saving"] / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step6"
    draft, two = _draft(runs["killed_saving"]), _draft(runs["two"])
    assert all(torch.equal(draft[k], two[k]) for k in two)  # resumed on the same ranks: bit-identical
