"""ZeRO 1, 2 and 3 on 2 gloo ranks train as 1 rank does at the same global batch, for every algorithm:
the same loss at every optimizer step, the same gradient norm, the same saved draft (under ZeRO-3 the
whole one, gathered from the partitions). The recipe runs under torchrun on stories260k
(`support/recipe_runs.py`: every run of one world size in one launch).

Under ZeRO-3 no parameter is whole when a loss begins (the runs keep none whole between gathers), so a
loss reading a weight outside the engine's call would read an empty placeholder and fail: as DFlash's and
DSpark's did, reading the LM head and DSpark's W2 after the call, until the frozen target weights became
buffers (`recipe.frozen_as_buffers`) and DSpark's loss moved inside its forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from support import tiny
from support.stories import build_cache_untracked, stories_overrides, write_answers

from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.recipe import frozen_as_buffers

ALGOS = {  # tiny drafts on a cache of layers 0..2: Eagle3's and DSpark's teacher runs layers 3 and 4
    "dflash": ["algo.num_layers=1", "algo.block_size=4"],
    "eagle3": ["algo=eagle3", "algo.ttt_steps=3", "algo.draft_vocab_size=128"],  # its own, trained head
    "dspark": ["algo=dspark", "algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"],
}
STORIES = [  # 4 samples: 2 optimizer steps an epoch, each rank of 2 taking one sample of each
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]
# One sample a micro-batch: 1 rank (two micro-steps a step) and 2 ranks (one each) then average the same
# per-sample losses into the same gradient; larger micro-batches would group the samples differently,
# each normalised by its own token count. Every anchor candidate is drawn (512 a sequence), so the
# anchor draws, which differ by rank, change nothing. A checkpoint is saved every 3 of the 6 steps; no
# validation (its losses would be recorded with training's).
TRAIN = ["train=cpu_demo", "train.epochs=3", "train.micro_batch=1", "train.global_batch=2", "train.lr=1e-2",
         "train.threads_per_rank=1", "train.save_every_steps=3", "train.eval_every_steps=0"]  # fmt: skip
STEPS = 6
# float32, the gradients summed in another order (gloo's all-reduce, ZeRO's reduce-scatter); measured
# at most 2e-7 apart
LOSS_RTOL = 1e-5
# 1% of the learning rate: Adam moves each weight by about lr a step whatever its gradient's size, so
# where a gradient nearly cancels the summation order shows; measured at most 2.3e-5 apart (ZeRO-3)
WEIGHT_ATOL = 1e-4
TESTS = Path(__file__).parents[1]


@dataclass
class Run:
    losses: list[float]  # per optimizer step: the mean over ranks and micro-steps
    grad_norms: list[float]
    whole_before_loss: list[int]  # every rank, every micro-step
    draft: dict[str, torch.Tensor]


def _launch(out: Path, launches: list[Path], nproc: int) -> list[list[dict]]:
    """One torchrun of `nproc` CPU ranks training each launch file in turn; their records."""
    out.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "support.recipe_runs", str(out), *map(str, launches)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return [
        [json.loads((out / f"{i}-rank{r}.json").read_text()) for r in range(nproc)]
        for i in range(len(launches))
    ]


def _run(records: list[dict], cfg) -> Run:
    accumulation = records[0]["accumulation"]
    micro = [
        [r["losses"][s * accumulation : (s + 1) * accumulation] for r in records]
        for s in range(len(records[0]["losses"]) // accumulation)
    ]
    draft = load_file(str(run_paths(cfg).draft_dir / "model.safetensors"))
    return Run(
        losses=[sum(map(sum, step)) / sum(map(len, step)) for step in micro],
        grad_norms=records[0]["grad_norms"],
        whole_before_loss=[n for r in records for n in r["whole_before_loss"]],
        draft=draft,
    )


@pytest.fixture(scope="module")
def zero_runs(assets_dir, tmp_path_factory) -> dict[tuple[str, int, int], Run]:
    """(algo, ZeRO stage, ranks) -> Run: each algorithm on 1 rank without ZeRO, and on 2 ranks at every
    stage, all from one cache."""
    root = tmp_path_factory.mktemp("zero")
    base = stories_overrides(assets_dir, root / "data-run", "target.layer_ids=[0,1,2]", f"data_dir={root}")
    write_answers(base, STORIES)
    build_cache_untracked(base)
    runs = {}
    for nproc, stages in ((1, [0]), (2, [1, 2, 3])):
        configs = {}
        for stage in stages:
            for algo, extra in ALGOS.items():
                name = f"{algo}-zero{stage}-{nproc}ranks"
                configs[algo, stage, nproc] = compose([*base, f"run_dir={root / name}", *extra, *TRAIN,
                    f"train.zero_stage={stage}", f"train.nproc_per_node={nproc}"])  # fmt: skip
        launches = []
        for cfg in configs.values():
            launches.append(run_paths(cfg).train_dir / "launch.yaml")
            launches[-1].parent.mkdir(parents=True)
            OmegaConf.save(cfg, launches[-1])
        records = _launch(root / f"records-{nproc}", launches, nproc)
        runs |= {key: _run(rec, cfg) for (key, cfg), rec in zip(configs.items(), records, strict=True)}
    return runs


def _assert_same_draft(draft: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert draft.keys() == expected.keys()
    for name, tensor in expected.items():
        assert draft[name].shape == tensor.shape, name  # whole, not one rank's partition
        torch.testing.assert_close(draft[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_the_engine_gets_only_the_trained_weights_under_their_names():
    """The target's frozen embedding and LM head become buffers: out of ZeRO-3's partitions, and the
    draft's state_dict, which saving and the checkpoints write, keeps every name and value."""
    cfg = DSparkConfig.from_target(
        tiny.qwen3(layers=2), num_layers=1, block_size=4, layer_ids=[0, 1], mask_token_id=3, markov_rank=8,
        markov_head_type="vanilla", confidence_head=True, confidence_head_with_markov=True, num_anchors=8,
    )  # fmt: skip
    head = torch.randn(cfg.backbone.vocab_size, cfg.backbone.hidden_size)
    draft = DSparkDraft(cfg, torch.randn_like(head), head)
    before = {name: t.clone() for name, t in draft.state_dict().items()}
    frozen = {name for name, p in draft.named_parameters() if not p.requires_grad}
    frozen_as_buffers(draft, torch.float32)
    assert frozen == {"backbone.embed_tokens.weight", "backbone.lm_head.weight"}
    assert frozen <= dict(draft.named_buffers()).keys()
    assert all(p.requires_grad for p in draft.parameters())
    assert draft.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[name]) for name, t in draft.state_dict().items())
    assert draft.backbone.lm_head.weight.data_ptr() == head.data_ptr()  # still the target's (the teacher's)
    bf16 = DSparkDraft(cfg, torch.randn_like(head), head)
    frozen_as_buffers(bf16, torch.bfloat16)  # bf16 training: DeepSpeed casts the parameters, not buffers
    assert bf16.backbone.lm_head.weight.dtype == bf16.backbone.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_two_ranks_train_as_one_at_every_zero_stage(zero_runs, algo, stage):
    one, two = zero_runs[algo, 0, 1], zero_runs[algo, stage, 2]
    assert len(one.losses) == len(two.losses) == len(two.grad_norms) == STEPS
    assert two.losses == pytest.approx(one.losses, rel=LOSS_RTOL)
    assert two.grad_norms == pytest.approx(one.grad_norms, rel=LOSS_RTOL)  # ZeRO's, before clipping
    assert one.losses[-1] < one.losses[0]
    _assert_same_draft(two.draft, one.draft)
    if stage == 3:  # nothing whole when a loss began: it read every weight inside the engine's gather
        assert len(two.whole_before_loss) == 2 * STEPS and set(two.whole_before_loss) == {0}
        _assert_same_draft(two.draft, zero_runs[algo, 1, 2].draft)
