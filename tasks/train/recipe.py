"""The training recipe: what every rank runs under torchrun, for any algorithm.

    torchrun --nproc_per_node 8 -m deepspec.tasks.train.recipe RUN_DIR/train/ALGO/launch.yaml

    recipe = TrainRecipe(cfg)
    recipe.setup()       # ranks and device, the sample stream, the draft and its teacher, the engine, resume
    recipe.train()       # micro-steps; the optimizer steps every `accumulation` of them; checkpoints
    recipe.save_draft()  # rank 0: the draft, then the stage's completion record
    recipe.cleanup()

Each rank streams its share of the samples (`tasks/cache/loader.py`: the target cache, or the target
itself with `storage.mode=online`) and steps a DeepSpeed engine (gloo on CPU, NCCL on GPUs). The
algorithm enters only through its `DraftSpec` (`models/drafts/`): `build` makes the draft on the
target's embedding and LM head, `training_loss` turns a micro-batch into a loss, `save` writes it.
Eagle3 and DSpark also learn from the target's distribution (`models/teacher.py`).

A checkpoint every `train.save_every_steps` optimizer steps holds the engine (weights, optimizer,
schedule) and the stream's position, so a resumed run sees exactly the samples and anchors the
interrupted one would have seen next. The same entry point serves 1 CPU process, 8 GPUs, or many nodes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from datetime import timedelta

import torch
from omegaconf import DictConfig, OmegaConf
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
from deepspec.tasks import tracking
from deepspec.tasks.cache.loader import open_stream, supervised_token_counts
from deepspec.tasks.config import algo_settings
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.metrics import Metrics
from deepspec.tasks.train.schedule import (
    anchor_generator,
    deepspeed_config,
    loader_state_at,
    lr_lambda,
    micro_batch_size,
)

log = logging.getLogger(__name__)


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


class TrainRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.spec = draft_spec(str(cfg.algo.name))
        self.settings = algo_settings(cfg)
        self.paths = run_paths(cfg)
        self.metrics: dict[str, float] = {}

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

        # the engine: AdamW with warmup and cosine decay, gradients accumulated up to train.global_batch
        ds_config = deepspeed_config(cfg, self.world)
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

    def _resume(self) -> int:
        """The micro-step to start from: 0, or the latest checkpoint's, with the stream placed there."""
        ckpt_dir = self.paths.checkpoints
        if not (ckpt_dir / "latest").is_file():
            return 0
        _, client_state = self.engine.load_checkpoint(str(ckpt_dir))
        start = int(client_state["micro_step"])
        position = loader_state_at(start, self.micro_per_epoch, self.micro_batch)
        saved = client_state.get("loader") or position
        self.stream.load_state_dict(saved)
        if {k: self.stream.state_dict()[k] for k in position} != position:
            raise ConfigError(
                f"checkpoint {ckpt_dir}: its sample stream is at {saved}, but micro-step {start} with "
                f"train.micro_batch={self.micro_batch} is at {position}; it was saved with another train "
                "configuration: delete the checkpoints to start over"
            )
        log.info("resumed from %s at micro-step %d, sample stream at %s", ckpt_dir, start, saved)
        return start

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
            if step % train.save_every_steps == 0:
                self.save_checkpoint(step, micro + 1)
        bar.close()

    def _grad_norm(self) -> float | None:
        """The gradient norm before clipping, when every rank holds whole, reduced gradients (no ZeRO:
        DeepSpeed all-reduces them in the boundary's backward); ZeRO's optimizers report their own."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad.detach().float() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else None

    def save_checkpoint(self, step: int, next_micro: int) -> None:
        """Every rank writes its part: the engine's state and where the stream stands."""
        client_state = {"micro_step": next_micro, "loader": self.stream.state_dict()}
        self.engine.save_checkpoint(str(self.paths.checkpoints), tag=f"step{step}", client_state=client_state)

    def save_draft(self) -> None:
        """Rank 0 writes the draft, then the stage's completion record (last)."""
        if self.rank != 0:
            return
        from deepspec.tasks.train.stage import mark_trained

        self.spec.save(self.model, self.paths.draft_dir)
        OmegaConf.save(self.cfg, self.paths.train_dir / "config.yaml")
        mark_trained(self.cfg, optimizer_steps=self.total_steps, final_metrics=self.metrics)

    def cleanup(self) -> None:
        self.stream.close()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = TrainRecipe(OmegaConf.load(sys.argv[1]))
    recipe.setup()
    recipe.train()
    recipe.save_draft()
    recipe.cleanup()


if __name__ == "__main__":
    main()
