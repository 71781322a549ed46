"""Validation during training (`tasks/train/validation.py`): the held-out figures of a draft that
proposes the data's tokens and of one that never does, through DFlash's real training loss; the same
figures on 1 and 2 gloo ranks; the best draft replaced only whole; the config checks. Then one real run
on stories260k: prompts held out, answered and cached apart, a DeepSpeed rank validating every 2 steps,
the curve read back from MLflow, best/ holding the best step's draft, and the export taking it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepspec.models.drafts import dflash
from deepspec.models.errors import ConfigError
from deepspec.tasks.config import compose
from deepspec.tasks.files import sha256_file
from deepspec.tasks.train.validation import (
    BEST_FILE,
    rank_batches,
    read_best,
    save_best,
    validate,
    validation_batches,
)

VOCAB, BLOCK = 32, 4  # DFlash blocks of 4 slots: 3 drafts a block


class Oracle(nn.Module):
    """Stands in for a DFlash draft: each block row proposes the data's token at its own position, read
    from the features where `heldout_samples` put it (shifted by one id when `wrong`, and on the samples
    flagged in feature column 1 when `wrong="flagged"`). Its hidden state is the proposal one-hot and
    its LM head the identity, so the loss's top-1 is the proposal."""

    def __init__(self, wrong: bool | str = False):
        super().__init__()
        self.wrong = wrong
        self.fc = nn.Linear(1, 1)  # the loss reads the draft's device here
        self.lm_head = nn.Linear(VOCAB, VOCAB, bias=False)
        self.lm_head.weight.data = torch.eye(VOCAB)
        self.cfg = SimpleNamespace(block_size=BLOCK, mask_token_id=VOCAB - 1, hidden_size=VOCAB)
        self.num_draft_tokens = BLOCK - 1
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) at each forward

    def forward(self, packed):
        self.calls.append((self.training, torch.is_grad_enabled()))
        rows = {
            (int(s), int(p)): (int(f[0]), bool(f[1]))
            for s, p, f in zip(
                packed.context_sequence, packed.context_positions, packed.context_features, strict=True
            )
        }
        out = []
        for s, p in zip(packed.block_sequence.tolist(), packed.block_positions.tolist(), strict=True):
            token, flagged = rows.get((s, p), (0, False))  # past the end: no label reads it
            shift = self.wrong is True or (self.wrong == "flagged" and flagged)
            out.append((token + shift) % VOCAB)
        return F.one_hot(torch.tensor(out), VOCAB).float()


def heldout_samples(count: int = 7, seed: int = 0) -> list[dict]:
    """Samples as the streams yield them: a 3-token prompt (unsupervised), then an answer; the token
    ids ride in feature column 0, and every third sample is flagged in column 1."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        n = 8 + i % 5
        ids = torch.randint(0, VOCAB - 1, (n,), generator=g)
        mask = torch.arange(n) >= 3
        features = torch.stack([ids.float(), torch.full((n,), float(i % 3 == 0))], dim=1)
        samples.append(
            {"sample_id": f"s{i}", "input_ids": ids, "loss_mask": mask, "features": features, "num_tokens": n}
        )
    return samples


def run_validation(draft, samples, rank: int = 0, world: int = 1, micro_batch: int = 2) -> dict:
    settings = SimpleNamespace(anchors_per_sequence=64, loss_decay=7.0)  # every candidate anchored
    batches = validation_batches(len(samples), micro_batch, None, seed=0)
    read = lambda items: [samples[i] for i in items]  # noqa: E731
    return validate(dflash.SPEC, draft, draft, settings, None, read, batches, seed=0, rank=rank, world=world)


def expected_counts(samples, flagged_only: bool = False) -> torch.Tensor:
    """Labels per draft slot, counted from the data: slot j of the block anchored at p reads token
    p + 1 + j, when p, p + 1 .. p + 1 + j are all supervised and inside the sequence."""
    counts = torch.zeros(BLOCK - 1)
    for s in samples:
        if flagged_only and not bool(s["features"][0, 1]):
            continue
        mask = s["loss_mask"]
        for p in range(len(mask) - 1):
            for j in range(BLOCK - 1):
                if p + 1 + j < len(mask) and bool(mask[p : p + 2 + j].all()):
                    counts[j] += 1
    return counts


def test_a_draft_proposing_the_data_is_accepted_at_every_slot_and_a_wrong_one_at_none():
    samples = heldout_samples()
    right, wrong = Oracle(), Oracle(wrong=True)
    right.train()
    figures = run_validation(right, samples)
    assert [figures[f"val/acc_slot{k}"] for k in range(BLOCK - 1)] == [1.0] * (BLOCK - 1)
    assert figures["val/expected_tau"] == BLOCK  # 1 + every draft of every block
    assert right.calls and all(call == (False, False) for call in right.calls)  # eval mode, no gradients
    assert right.training  # and back to training mode after
    figures = run_validation(wrong, samples)
    assert [figures[f"val/acc_slot{k}"] for k in range(BLOCK - 1)] == [0.0] * (BLOCK - 1)
    assert figures["val/expected_tau"] == 1.0


def test_every_held_out_label_counts_once():
    """A draft wrong on the flagged samples only: each slot's acceptance is the share of its labels in
    the other samples, counted from the data, so a sample dropped or counted twice shows."""
    samples = heldout_samples()
    figures = run_validation(Oracle(wrong="flagged"), samples)
    total, flagged = expected_counts(samples), expected_counts(samples, flagged_only=True)
    for k in range(BLOCK - 1):
        assert figures[f"val/acc_slot{k}"] == pytest.approx(float(1 - flagged[k] / total[k])), k
    assert 0 < figures["val/acc_slot0"] < 1


def test_ranks_share_the_micro_batches_each_once_in_lockstep():
    for batches, world in [(7, 2), (7, 3), (2, 4), (6, 3)]:
        runs = [rank_batches(batches, r, world) for r in range(world)]
        assert len({len(run) for run in runs}) == 1  # ZeRO-3: every rank forwards as often
        counted = sorted(b for run in runs for b, counted in run if counted)
        assert counted == list(range(batches))


def test_a_subset_of_held_out_samples_is_the_same_every_time():
    first = validation_batches(100, 4, 10, seed=3)
    assert first == validation_batches(100, 4, 10, seed=3) != validation_batches(100, 4, 10, seed=4)
    flat = [i for batch in first for i in batch]
    assert len(flat) == len(set(flat)) == 10 and flat == sorted(flat) and len(first) == 3
    assert [i for b in validation_batches(5, 2, None, 0) for i in b] == [0, 1, 2, 3, 4]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        figures = run_validation(Oracle(wrong="flagged"), heldout_samples(), rank, world, micro_batch=3)
        Path(out, f"rank{rank}.json").write_text(json.dumps(figures))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_give_the_figures_of_one(tmp_path):
    """Two real gloo ranks share 3 micro-batches of 7 samples (rank 1 repeats one uncounted, to keep
    step with rank 0) and sum their counts: one rank's figures, on both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2)
    alone = run_validation(Oracle(wrong="flagged"), heldout_samples(), micro_batch=3)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(alone)


def test_the_best_draft_is_replaced_only_whole(tmp_path):
    best = tmp_path / "best"

    def save(model, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_text(model)

    save_best(save, "step-2", best, {"step": 2, "value": 1.1})
    assert read_best(best) == {"step": 2, "value": 1.1}

    def crash(model, out: Path) -> None:
        save(model, out)
        raise KeyboardInterrupt  # killed while writing the new best

    with pytest.raises(KeyboardInterrupt):
        save_best(crash, "step-4", best, {"step": 4, "value": 1.3})
    assert read_best(best)["step"] == 2 and (best / "model.safetensors").read_text() == "step-2"
    save_best(save, "step-6", best, {"step": 6, "value": 1.4})
    assert read_best(best)["step"] == 6 and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # killed between the two renames: the previous best waits under its old name, and is put back
    best.rename(tmp_path / ".best.old")
    assert read_best(best)["step"] == 6 and (best / BEST_FILE).is_file()


def test_validation_needs_held_out_prompts():
    with pytest.raises(ConfigError, match=r"train.eval_every_steps=5 validates on held-out samples"):
        compose(["train.eval_every_steps=5"])
    with pytest.raises(ConfigError, match=r"export.draft='first': expected one of \['best', 'last'\]"):
        compose(["export.draft=first"])
    with pytest.raises(ConfigError, match="train.eval_samples=0"):
        compose(["train.eval_every_steps=5", "prompts.heldout_fraction=0.1", "train.eval_samples=0"])
    cfg = compose(["train.eval_every_steps=5", "prompts.heldout_fraction=0.1"])
    assert (cfg.train.eval_every_steps, cfg.train.eval_samples, cfg.export.draft) == (5, None, "best")


@pytest.fixture(scope="module")
def heldout_cache(assets_dir, tmp_path_factory, one_thread):
    """stories260k answers, two of them to held-out prompts, cached with layers 0..2 (the teacher of
    Eagle3 and DSpark runs layers 3 and 4)."""
    from support.stories import STORIES, build_cache_untracked, stories_overrides, write_answers

    overrides = stories_overrides(
        assets_dir,
        tmp_path_factory.mktemp("heldout"),
        "target.layer_ids=[0,1,2]",
        "prompts.heldout_fraction=0.3",
    )
    write_answers(overrides, STORIES, heldout={"story-1", "story-3"})
    build_cache_untracked(overrides)
    return overrides


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("dflash", ["algo.num_layers=1", "algo.block_size=4"]),
        ("eagle3", ["algo.ttt_steps=3"]),
        ("dspark", ["algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"]),
    ],
)
def test_every_algorithm_validates_on_the_held_out_samples(heldout_cache, algo, extra):
    """A real draft of each algorithm, its loss run on the cached held-out samples as the recipe runs it:
    the same figures every time, and no gradient left behind."""
    from support.drafts import target_draft_inputs

    from deepspec.models.drafts import draft_spec
    from deepspec.models.target import load_target, load_tokenizer
    from deepspec.models.teacher import Teacher
    from deepspec.tasks.cache.loader import open_stream
    from deepspec.tasks.config import algo_settings

    cfg = compose([*heldout_cache, f"algo={algo}", *extra])
    spec, settings = draft_spec(algo), algo_settings(cfg)
    target, _ = load_target(cfg.target.path)
    teacher = None
    if spec.needs_teacher:
        teacher = Teacher.for_target(
            target.config, target.lm_head.weight, list(cfg.target.layer_ids), torch.device("cpu"),
            online=False, path=cfg.target.path,
        )  # fmt: skip
    torch.manual_seed(0)
    draft = spec.build(settings, target_draft_inputs(cfg, target))
    with open_stream(cfg, tokenizer=load_tokenizer(cfg.target.path), device="cpu", heldout=True) as heldout:
        batches = validation_batches(heldout.num_samples, 1, None, seed=0)
        runs = [
            validate(spec, draft, draft, settings, teacher, heldout.samples, batches, seed=0)
            for _ in range(2)
        ]
    assert runs[0] == runs[1] and len(batches) == 2
    slots = draft.num_draft_tokens
    assert all(0 <= runs[0][f"val/acc_slot{k}"] <= 1 for k in range(slots))
    assert 1 <= runs[0]["val/expected_tau"] <= 1 + slots
    assert ("val/expected_tau_accept" in runs[0]) == (algo == "dspark")
    assert all(p.grad is None for p in draft.parameters())


# ----------------------------------------------------------------------------------------------------
# A real run


@pytest.fixture(scope="module")
def validated_run(assets_dir, tracking_uri, tmp_path_factory):
    """stories260k: 32 built-in prompts, a quarter held out; answered, cached, and a DFlash draft trained
    by one DeepSpeed rank for 30 steps, validating every 2 and saving a checkpoint every 10, then
    exported with export.draft=best."""
    from deepspec.tasks.cache.stage import build_cache
    from deepspec.tasks.export import export
    from deepspec.tasks.prompts import prepare_prompts
    from deepspec.tasks.regenerate.stage import regenerate
    from deepspec.tasks.train.stage import train

    run_dir = tmp_path_factory.mktemp("validated")
    overrides = [
        "target=stories260k",
        f"target.path={assets_dir / 'models' / 'stories260k'}",
        f"run_dir={run_dir}",
        f"tracking.uri={tracking_uri}",
        "prompts.source=builtin",
        "prompts.max_samples=32",
        "prompts.heldout_fraction=0.25",
        "regen.max_new_tokens=32",
        "storage.samples_per_shard=4",
        "algo.num_layers=1",
        "algo.block_size=4",
        "train=cpu_demo",
        "train.epochs=10",
        "train.lr=1e-2",
        "train.threads_per_rank=1",
        "train.eval_every_steps=2",
        "train.save_every_steps=10",
    ]
    cfg = compose(overrides)
    prompts = prepare_prompts(cfg)
    regenerate(cfg)
    cache = build_cache(cfg)
    record = train(cfg)
    return {
        "overrides": overrides,
        "cfg": cfg,
        "prompts": prompts,
        "cache": cache,
        "train": record,
        "export": export(cfg),
    }


@pytest.mark.integration
def test_a_real_run_keeps_and_exports_its_best_validated_draft(validated_run, tracking_uri):
    from mlflow.tracking import MlflowClient

    from deepspec.tasks.export import export
    from deepspec.tasks.paths import run_paths
    from deepspec.tasks.tracking import run_id

    cfg, record = validated_run["cfg"], validated_run["train"]
    assert validated_run["prompts"].heldout > 0
    assert validated_run["cache"].heldout_samples == validated_run["prompts"].heldout
    paths = run_paths(cfg)

    # the curve: every second step and the last, read back from MLflow
    client = MlflowClient(tracking_uri)
    curve = {m.step: m.value for m in client.get_metric_history(run_id(cfg), "val/expected_tau")}
    steps = record.optimizer_steps
    assert sorted(curve) == sorted({*range(2, steps + 1, 2), steps}) and steps >= 20
    assert all(1.0 <= v <= cfg.algo.block_size for v in curve.values()) and max(curve.values()) > 1.0
    for k in range(cfg.algo.block_size - 1):
        assert len(client.get_metric_history(run_id(cfg), f"val/acc_slot{k}")) == len(curve)

    # best/: the first step with the highest value, recorded, and its draft
    best_step = min(s for s, v in curve.items() if v == max(curve.values()))
    assert record.best["step"] == best_step and record.best["value"] == pytest.approx(curve[best_step])
    assert record.final_metrics["val/best_step"] == best_step
    assert json.loads((paths.best_dir / BEST_FILE).read_text())["step"] == best_step
    best_sha = sha256_file(paths.best_dir / "model.safetensors")
    assert record.best["weights_sha256"] == best_sha
    figures = _validate_saved(cfg, paths.best_dir)
    assert figures["val/expected_tau"] == pytest.approx(curve[best_step], abs=1e-6)
    if best_step < steps:  # then the last draft is another
        assert best_sha != record.weights_sha256
        assert _validate_saved(cfg, paths.draft_dir)["val/expected_tau"] == pytest.approx(
            curve[steps], abs=1e-6
        )

    # export: export.draft=best (the default) took best/, export.draft=last takes draft/
    exported = validated_run["export"]
    assert exported.weights_sha256 == best_sha and exported.source == str(paths.best_dir)
    last = export(compose([*validated_run["overrides"], "export.draft=last"]))
    assert last.weights_sha256 == record.weights_sha256 and last.source == str(paths.draft_dir)


@pytest.mark.integration
def test_a_resumed_run_keeps_the_best_its_interrupted_run_kept(validated_run, tracking_uri):
    """The run resumed from a checkpoint at or after its best step, as after a crash there: it validates
    only the later steps again, none of them better, and ends with the best the interrupted run kept in
    best/ (the checkpoint does not hold it) and the same last draft."""
    from mlflow.tracking import MlflowClient

    from deepspec.tasks.files import DONE_FILE
    from deepspec.tasks.paths import run_paths
    from deepspec.tasks.tracking import run_id
    from deepspec.tasks.train.stage import train

    cfg, first = validated_run["cfg"], validated_run["train"]
    paths = run_paths(cfg)
    resume = next(k for k in (10, 20) if k >= first.best["step"])  # checkpoints: 10, 20, 30
    (paths.checkpoints / "latest").write_text(f"step{resume}")
    (paths.train_dir / DONE_FILE).unlink()
    again = train(cfg)
    assert not again.skipped and again.best == first.best
    assert again.weights_sha256 == first.weights_sha256
    history = MlflowClient(tracking_uri).get_metric_history(run_id(cfg), "val/expected_tau")
    steps = [m.step for m in history]
    assert all(steps.count(s) == (1 if s <= resume else 2) for s in set(steps))


def _validate_saved(cfg, draft_dir: Path) -> dict:
    """The held-out figures of the draft saved in `draft_dir`, validated as the recipe validates."""
    from deepspec.models.drafts import load_draft
    from deepspec.models.target import load_embedding_and_head, load_tokenizer
    from deepspec.tasks.cache.loader import open_stream
    from deepspec.tasks.config import algo_settings
    from deepspec.tasks.train.validation import validation_batches

    t = cfg.target
    embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
    draft = load_draft(draft_dir, embed, head)
    with open_stream(cfg, tokenizer=load_tokenizer(t.path), device="cpu", heldout=True) as heldout:
        batches = validation_batches(heldout.num_samples, cfg.train.micro_batch, None, cfg.train.seed)
        return validate(
            dflash.SPEC, draft, draft, algo_settings(cfg), None, heldout.samples, batches, seed=cfg.train.seed
        )
