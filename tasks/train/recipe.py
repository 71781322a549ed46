"""The training recipe: what every rank runs under torchrun, for any algorithm.

    torchrun --nproc_per_node 8 -m deepspec.tasks.train.recipe RUN_DIR/train/ALGO/launch.yaml

    recipe = TrainRecipe(cfg)
    recipe.setup()       # ranks and device, the sample stream, the draft and its teacher, the engine, resume
    recipe.train()       # micro-steps; the optimizer steps every `accumulation` of them; validation;
                         # checkpoints
    recipe.save_draft()  # rank 0: the draft, then the stage's completion record
    recipe.cleanup()

Each rank streams its share of the samples (`tasks/cache/loader.py`: the target cache, or the target
itself with `storage.mode=online`) and steps a DeepSpeed engine (gloo on CPU, NCCL on GPUs). The
algorithm enters only through its `DraftSpec` (`models/drafts/`): `build` makes the draft on the
target's embedding and LM head, `training_loss` turns a micro-batch into a loss, `save` writes it.
Eagle3 and DSpark also learn from the target's distribution (`models/teacher.py`).

Every `train.eval_every_steps` optimizer steps, and at the last, every rank validates the draft on the
held-out samples (`validation.py`): `val/expected_tau` and `val/acc_slotK` go to MLflow, and the draft of
the best step so far is kept in `train/<algo>/best/` beside the last (`draft/`).

A checkpoint every `train.save_every_steps` optimizer steps holds the engine (weights, optimizer,
schedule) and the stream's position, so a resumed run sees exactly the samples and anchors the
interrupted one would have seen next; it goes on from the best draft the interrupted run kept. Every
rank writes its files, then rank 0 writes the tag's record (`deepspec.json`: step, ranks, ZeRO stage)
and only then moves `latest` to it, atomically: a crash while saving leaves `latest` on the last
complete checkpoint. A run may resume on another number of ranks at the same global batch: it starts
at the saved optimizer step (ZeRO-1/2/3's partitioned optimizer state converted to DeepSpeed's
universal checkpoint first); an optimizer step covers the same samples and anchor draws on any
number of ranks when an epoch's samples divide by micro_batch x ranks, and with train.micro_batch=1
the same losses (tests/tasks/test_train_resume.py). The same entry point serves 1 CPU process, 8
GPUs, or many nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from deepspec.models.drafts import draft_spec
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.errors import ConfigError
from deepspec.models.target import (
    load_embedding_and_head,
    load_tokenizer,
    mask_token_id,
    resolve_source,
)
from deepspec.models.teacher import Teacher
from deepspec.tasks import secrets, tracking
from deepspec.tasks.cache.loader import open_stream, supervised_token_counts
from deepspec.tasks.config import algo_settings
from deepspec.tasks.files import atomic_write_text
from deepspec.tasks.paths import run_paths
from deepspec.tasks.processes import die_with_parent, exit_if_orphaned
from deepspec.tasks.train.metrics import Metrics
from deepspec.tasks.train.schedule import (
    anchor_generator,
    deepspeed_config,
    loader_state_at,
    lr_lambda,
    micro_batch_size,
)
from deepspec.tasks.train.validation import (
    METRIC,
    clear_best,
    read_best,
    save_best,
    validate,
    validation_batches,
)
from deepspec.tasks.train.warm_start import load_initial

log = logging.getLogger(__name__)

CHECKPOINT_RECORD = "deepspec.json"  # in each checkpoint tag's folder: how it was saved


def draft_inputs(
    cfg: DictConfig, tokenizer, target_config, embed: torch.Tensor, head: torch.Tensor
) -> DraftInputs:
    """What an algorithm's `build` takes besides its settings, for this run's target and data."""
    vocab_size = target_config.get_text_config().vocab_size
    return DraftInputs(
        target_config=target_config,
        layer_ids=list(cfg.target.layer_ids),
        mask_token_id=mask_token_id(tokenizer, cfg.target.mask_token_id),
        embed=embed,
        head=head,
        token_counts=lambda: supervised_token_counts(cfg, tokenizer, vocab_size),
    )


def frozen_as_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """The draft's frozen parameters (the target's embedding and LM head) made buffers of the same names,
    so the engine holds only what it trains. ZeRO-3 would partition them, yet the losses read the head
    outside any module's forward (a chunk of rows at a time), where ZeRO-3 leaves a parameter an empty
    placeholder; whole on every rank they cost no more than the teacher holds (the same tensor, in
    float32). Cast to the training `dtype` here, as DeepSpeed casts parameters but not buffers."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad:
                delattr(module, name)
                module.register_buffer(name, param.detach().to(dtype))


class TrainRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.spec = draft_spec(str(cfg.algo.name))
        self.settings = algo_settings(cfg)
        self.paths = run_paths(cfg)
        self.metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}  # the last validation's
        self.best: dict[str, Any] | None = None  # {step, metric, value} of the draft kept in best/

    def setup(self) -> None:
        import deepspeed
        from transformers import AutoConfig

        cfg, t = self.cfg, self.cfg.target
        # ranks and device
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
        torch.manual_seed(cfg.train.seed)
        on_gpu = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")

        # the data: this rank's share of the samples, features decoded on its device
        tokenizer = load_tokenizer(t.path, t.gguf_file, t.revision)
        self.stream = open_stream(
            cfg,
            rank=self.rank,
            world_size=self.world,
            tokenizer=tokenizer,
            epochs=cfg.train.epochs,
            device=self.device,
            verify=bool(cfg.storage.verify),
            final_hidden=self.spec.needs_teacher,
        )

        # the draft, on the target's embedding and LM head, and the teacher it learns from
        embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
        target_config = AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file))
        text_config = target_config.get_text_config()
        self.teacher = None
        if self.spec.needs_teacher:
            self.teacher = Teacher.for_target(
                text_config, head, list(t.layer_ids), self.device, online=cfg.storage.mode == "online",
                path=t.path, gguf_file=t.gguf_file, revision=t.revision, dtype=t.dtype,
            )  # fmt: skip
        self.model = self.spec.build(self.settings, draft_inputs(cfg, tokenizer, target_config, embed, head))
        load_initial(cfg, self.spec, self.model, embed, head)  # release.init=released: the released weights
        frozen_as_buffers(self.model, torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)

        # the held-out samples validation reads, the same micro-batches on every rank and every time
        self.heldout = None
        if cfg.train.eval_every_steps:
            self.heldout = open_stream(
                cfg, tokenizer=tokenizer, device=self.device, verify=bool(cfg.storage.verify),
                final_hidden=self.spec.needs_teacher, heldout=True,
                target=getattr(self.stream, "model", None),  # online: the training stream's target
            )  # fmt: skip
            self.val_batches = validation_batches(
                self.heldout.num_samples, int(cfg.train.micro_batch), cfg.train.eval_samples, cfg.train.seed
            )

        # the engine: AdamW with warmup and cosine decay, gradients accumulated up to train.global_batch
        ds_config = deepspeed_config(cfg, self.world)
        self.saved = self._latest_record()
        if self.saved and self.saved["world"] != self.world and self.saved["zero_stage"]:
            # ZeRO's optimizer state is partitioned by rank: DeepSpeed re-partitions only a universal one
            ds_config["checkpoint"] = {"load_universal": True}
        self.accumulation = ds_config["gradient_accumulation_steps"]
        self.micro_batch = int(cfg.train.micro_batch)
        self.per_epoch = self.stream.samples_per_epoch  # this rank's, the same on every rank
        self.micro_per_epoch = math.ceil(self.per_epoch / self.micro_batch)
        self.total_micro = cfg.train.epochs * self.micro_per_epoch
        self.total_steps = max(1, self.total_micro // self.accumulation)
        schedule = lr_lambda(self.total_steps, cfg.train.warmup_ratio)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=[p for p in self.model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
        self.start_micro = self._resume()

    def _latest_record(self) -> dict[str, Any] | None:
        """The record of the checkpoint `latest` names (None: no checkpoint; a checkpoint of an earlier
        version without one is taken to be of this run's ranks)."""
        latest = self.paths.checkpoints / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text(encoding="utf-8").strip()
        record = self.paths.checkpoints / tag / CHECKPOINT_RECORD
        if not record.is_file():
            return {"tag": tag, "world": self.world, "zero_stage": int(self.cfg.train.zero_stage)}
        return json.loads(record.read_text(encoding="utf-8"))

    def _resume(self) -> int:
        """The micro-step to start from: 0, or the latest checkpoint's, with the stream placed there."""
        ckpt_dir, saved = self.paths.checkpoints, self.saved
        if saved is None:
            if self.rank == 0:
                clear_best(self.paths.best_dir)  # an earlier run's: this one has validated nothing yet
            return 0
        if saved["world"] == self.world:
            _, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=saved["tag"])
            start = int(client_state["micro_step"])
            loader = client_state.get("loader")
        else:
            start, loader = self._load_resharded(saved), None
        self.best = self._kept_best()
        position = loader_state_at(start, self.micro_per_epoch, self.micro_batch)
        state = loader or position
        self.stream.load_state_dict(state)
        if {k: self.stream.state_dict()[k] for k in position} != position:
            raise ConfigError(
                f"checkpoint {ckpt_dir}: its sample stream is at {state}, but micro-step {start} with "
                f"train.micro_batch={self.micro_batch} is at {position}; it was saved with another train "
                "configuration: delete the checkpoints to start over"
            )
        log.info("resumed from %s at micro-step %d, sample stream at %s", ckpt_dir, start, state)
        return start

    def _load_resharded(self, saved: dict[str, Any]) -> int:
        """Load a checkpoint saved on another number of ranks; the micro-step of its optimizer step here.
        The step's samples are the same: rank r of w reads the epoch's positions r, r + w, ..., so the
        `accumulation` micro-steps of step s cover its global positions s*G .. (s+1)*G - 1 on any w."""
        train, ckpt_dir, tag = self.cfg.train, self.paths.checkpoints, saved["tag"]
        for key in ("global_batch", "micro_batch"):
            if saved[key] != train[key]:
                raise ConfigError(
                    f"checkpoint {ckpt_dir / tag} was saved with train.{key}={saved[key]}, this run has "
                    f"{train[key]}: resume with the same, or delete the checkpoints to start over"
                )
        if any(self.stream.num_samples % (self.micro_batch * w) for w in (self.world, saved["world"])):
            # a rank's epoch wraps round (or ends short): the step positions differ between the two
            log.warning(
                "an epoch's %d samples do not divide by micro_batch x ranks (%d, %d): the steps after "
                "resuming group the samples otherwise than the interrupted run would have",
                self.stream.num_samples, saved["world"], self.world,
            )  # fmt: skip
        if saved["zero_stage"]:
            tag = self._to_universal(tag)
        self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if saved["zero_stage"]:  # a copy, needed only while loading
            torch.distributed.barrier()
            if self.rank == 0:
                shutil.rmtree(ckpt_dir / tag)
                (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's
        log.info("checkpoint %s of %d ranks resumed on %d", saved["tag"], saved["world"], self.world)
        return int(saved["step"]) * self.accumulation

    def _to_universal(self, tag: str) -> str:
        """Rank 0 converts checkpoint `tag` to DeepSpeed's universal form (each parameter's weights and
        optimizer state whole, in `<tag>_universal/`), the others wait; its tag. Redone each time, so a
        conversion cut short is never read."""
        from deepspeed.checkpoint import ds_to_universal

        out = self.paths.checkpoints / f"{tag}_universal"
        if self.rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(self.paths.checkpoints / tag), output_folder=str(out),
                num_extract_workers=1, num_merge_workers=1,  # no worker processes inside a rank
                keep_temp_folder=False, strict=True, inject_missing_state=True,
            ))  # fmt: skip
        torch.distributed.barrier()
        return out.name

    def train(self) -> None:
        cfg, train = self.cfg, self.cfg.train
        samples = iter(self.stream)
        bar = tqdm(
            total=self.total_micro, initial=self.start_micro, desc="train", disable=self.rank != 0,
            unit="micro-step",
        )  # fmt: skip
        running = Metrics(self.model.num_draft_tokens)
        for micro in range(self.start_micro, self.total_micro):
            batch = [next(samples) for _ in range(micro_batch_size(micro, self.per_epoch, self.micro_batch))]
            generator = anchor_generator(train.seed, micro, self.rank, self.world)
            loss, stats = self.spec.training_loss(
                self.engine, self.model, batch, self.settings, self.teacher, generator
            )
            self.engine.backward(loss)  # gradients add up over the micro-steps of one optimizer step
            boundary = self.engine.is_gradient_accumulation_boundary()
            unclipped = self._grad_norm() if boundary else None
            # The optimizer and the lr schedule step here, but only at the boundary: every
            # `accumulation` micro-steps DeepSpeed reduces the gradients over the ranks, clips them,
            # steps and zeroes them; on the other micro-steps this call does nothing.
            self.engine.step()
            running.add(loss, stats, len(batch), sum(int(b["num_tokens"]) for b in batch))
            bar.update(1)
            if not boundary:
                continue
            engine_norm = self.engine.get_global_grad_norm()  # ZeRO's optimizers keep it
            running.add_grad_norm(unclipped if engine_norm is None else engine_norm)
            step = (micro + 1) // self.accumulation
            if self.rank == 0 and (step % train.log_every_steps == 0 or micro + 1 == self.total_micro):
                self.metrics = running.summary(self.scheduler.get_last_lr()[0], self.world)
                bar.set_postfix(
                    loss=f"{self.metrics['train/loss']:.3f}", tau=f"{self.metrics['train/expected_tau']:.2f}"
                )
                tracking.log_metrics(cfg, self.metrics, step=step)
                running.reset()
            if train.eval_every_steps and (step % train.eval_every_steps == 0 or step == self.total_steps):
                self.validate(step)
            if step % train.save_every_steps == 0:
                self.save_checkpoint(step, micro + 1)
        bar.close()
        if self.best is not None and self.rank == 0:
            tracking.log_metrics(cfg, self.best_figures(), step=self.total_steps)

    def validate(self, step: int) -> None:
        """Every rank: the held-out figures at `step`, logged by rank 0; the draft kept in best/ when they
        are the best yet (every rank reaches the same verdict from the same summed counts)."""
        assert self.heldout is not None
        figures = validate(
            self.spec, self.engine, self.model, self.settings, self.teacher, self.heldout.samples,
            self.val_batches, seed=int(self.cfg.train.seed), rank=self.rank, world=self.world,
            device=self.device,
        )  # fmt: skip
        self.val_metrics = figures
        value = figures[METRIC]
        if self.rank == 0:
            tracking.log_metrics(self.cfg, figures, step=step)
            log.info("validation at step %d: %s %.4f", step, METRIC, value)
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"step": step, "metric": METRIC, "value": value}
        with self._whole_parameters():
            if self.rank == 0:
                save_best(self.spec.save, self.model, self.paths.best_dir, self.best)

    def _kept_best(self) -> dict[str, Any] | None:
        """On resuming: the record of the draft in best/, read by rank 0 (best/ is on its disk) and sent
        to every rank, since all must reach the same verdicts. It is the best this run has validated, the
        steps after the checkpoint that the interrupted run got to included: save_best only ever improves.
        """
        record = read_best(self.paths.best_dir) if self.rank == 0 else None
        if self.world == 1:
            return record
        sent = [1.0, record["step"], record["value"]] if record else [0.0, 0.0, 0.0]
        packed = torch.tensor(sent, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(packed)  # rank 0's numbers, the others adding zeros
        if not packed[0]:
            return None
        return {"step": int(packed[1]), "metric": METRIC, "value": float(packed[2])}

    def best_figures(self) -> dict[str, float]:
        assert self.best is not None
        return {"val/best_step": float(self.best["step"]), "val/best_expected_tau": float(self.best["value"])}

    def _whole_parameters(self):
        """The draft's trainable parameters whole on every rank for the block: under ZeRO-3 they are
        partitioned, so every rank joins the gather; under ZeRO 0 to 2 each rank holds them whole."""
        if self.engine.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)

    def _grad_norm(self) -> float | None:
        """The gradient norm before clipping, when every rank holds whole, reduced gradients (no ZeRO:
        DeepSpeed all-reduces them in the boundary's backward); ZeRO's optimizers report their own."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad.detach().float() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else None

    def save_checkpoint(self, step: int, next_micro: int) -> None:
        """Every rank writes its part: the engine's state and where the stream stands. Then rank 0 writes
        the record and commits the tag to `latest`: DeepSpeed's own `latest` is written in place, by rank
        0 as soon as its own files are, while other ranks may still be writing (or dying) theirs."""
        ckpt_dir, tag, train = self.paths.checkpoints, f"step{step}", self.cfg.train
        client_state = {"micro_step": next_micro, "loader": self.stream.state_dict()}
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        # save_checkpoint ends in a barrier: every rank's files are written
        if self.rank == 0:
            record = {
                "tag": tag, "step": step, "micro_step": next_micro, "world": self.world,
                "zero_stage": int(train.zero_stage), "global_batch": int(train.global_batch),
                "micro_batch": self.micro_batch,
            }  # fmt: skip
            atomic_write_text(ckpt_dir / tag / CHECKPOINT_RECORD, json.dumps(record, indent=2))
            atomic_write_text(ckpt_dir / "latest", tag)

    def save_draft(self) -> None:
        """Rank 0 writes the draft (whole: every rank joins ZeRO-3's gather), then the stage's completion
        record (last)."""
        with self._whole_parameters():
            if self.rank == 0:
                self.spec.save(self.model, self.paths.draft_dir)
        if self.rank != 0:
            return
        from deepspec.tasks.train.stage import mark_trained

        secrets.save_config(self.cfg, self.paths.train_dir / "config.yaml")
        final = {**self.metrics, **self.val_metrics, **(self.best_figures() if self.best else {})}
        mark_trained(self.cfg, optimizer_steps=self.total_steps, final_metrics=final, best=self.best)

    def cleanup(self) -> None:
        self.stream.close()
        if self.heldout is not None:
            self.heldout.close()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    die_with_parent()  # a rank never outlives its torchrun (which dies with the stage that launched it)
    exit_if_orphaned()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = TrainRecipe(OmegaConf.load(sys.argv[1]))
    recipe.setup()
    recipe.train()
    recipe.save_draft()
    recipe.cleanup()


if __name__ == "__main__":
    main()
