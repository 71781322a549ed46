"""Train stage: a DFlash draft on the target cache, through a DeepSpeed engine.

`train_task` (the Prefect wrapper) launches `torchrun -m deepspec.tasks.train <config>`; every rank runs
`train_rank`, which streams its share of the samples (`cache_loader.py`: the target cache, or the target
itself with `storage.mode=online`), steps the DeepSpeed engine and saves a resumable checkpoint every
`train.save_every_steps`, the stream's position included, so a resumed run sees exactly the samples
and anchors the interrupted one would have seen next. Rank 0 writes the draft (`config.json`,
`model.safetensors`) and the completion marker last. The same entry point serves 1 CPU process,
8 GPUs, or many nodes:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m deepspec.tasks.train LAUNCH.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft, pack_blocks, save_draft
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.losses import (
    block_labels,
    expected_accepted_length,
    slot_weights,
    weighted_block_cross_entropy,
)
from deepspec.models.target import load_embedding_and_head, load_tokenizer
from deepspec.tasks import stage_io, tracking
from deepspec.tasks.cache_loader import answers_file, open_stream, storage_mode
from deepspec.tasks.config import config_hash, run_path
from deepspec.tasks.target_cache import read_manifest

log = logging.getLogger(__name__)

SUPPORTED_ALGOS = ("dflash",)


def stage_dir(cfg: DictConfig) -> Path:
    return run_path(cfg, "train")


def draft_dir(cfg: DictConfig) -> Path:
    return stage_dir(cfg) / "draft"


def train_hash(cfg: DictConfig) -> str:
    return config_hash(cfg.target, cfg.storage, cfg.algo, cfg.train)


def weights_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_fingerprint(cfg: DictConfig) -> str:
    """Identity of the data the draft learns from: the checksums of the cache's committed shards, or in
    online mode the answers file the target runs over."""
    if storage_mode(cfg) == "online":
        path = answers_file(cfg)
        if not path.is_file():
            raise DeepSpecError(f"{path} does not exist: run the regenerate stage first")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return "answers-" + digest.hexdigest()[:16]
    manifest = read_manifest(cfg.storage.url, dict(cfg.storage.storage_options))
    checksums = "".join(shard["sha256"] for shard in manifest.shards)
    return hashlib.sha256(checksums.encode()).hexdigest()[:16]


def check_done(cfg: DictConfig) -> dict | None:
    """The training record if a draft for this config and cache exists with the weights recorded."""
    record = stage_io.read_done(stage_dir(cfg), train_hash(cfg))
    weights = draft_dir(cfg) / "model.safetensors"
    if record is None or not weights.is_file():
        return None
    if record.get("cache_fingerprint") != cache_fingerprint(cfg):
        log.info("the training data changed since %s was trained; retraining", weights)
        return None
    if weights_sha256(weights) != record.get("weights_sha256"):
        log.warning("%s does not match its training record; retraining", weights)
        return None
    return record


def mask_token_id(cfg: DictConfig, tokenizer) -> int:
    if cfg.target.mask_token_id is not None:
        return int(cfg.target.mask_token_id)
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("target.mask_token_id: the tokenizer has no pad/unk/eos token; set it explicitly")


def anchor_generator(cfg: DictConfig, micro_step: int, rank: int, world: int) -> torch.Generator:
    """The generator of one micro-step's anchors: a function of the step, so a resumed run draws the same."""
    return torch.Generator().manual_seed((int(cfg.train.seed) << 40) + micro_step * world + rank)


def loader_state_at(micro_step: int, micro_steps_per_epoch: int, micro_batch: int) -> dict[str, int]:
    """The stream position after `micro_step` micro-steps (for checkpoints saved without one)."""
    epoch, index = divmod(micro_step, micro_steps_per_epoch)
    return {"epoch": epoch, "consumed": index * micro_batch}


def micro_batch_size(micro_step: int, samples_per_epoch: int, micro_batch: int) -> int:
    """Samples a rank takes at `micro_step`: `micro_batch`, except for an epoch's short last micro-batch."""
    index_in_epoch = micro_step % math.ceil(samples_per_epoch / micro_batch)
    return min(micro_batch, samples_per_epoch - index_in_epoch * micro_batch)


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Anchor positions among tokens whose next token is supervised (so slot 0 always has a label).

    A sample with none still gets anchor 0 (its labels are all ignored), so every rank runs the same
    forward/backward/step sequence and DeepSpeed's collectives stay matched.
    """
    candidates = torch.nonzero(loss_mask[1:].bool()).flatten()
    if candidates.numel() == 0:
        return torch.zeros(1, dtype=torch.long)
    if candidates.numel() > count:
        candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    return candidates.sort().values


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    t = cfg.train
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch ({t.micro_batch}) "
            f"x ranks ({world_size})"
        )
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r}: expected bf16 or fp32")
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // per_step,
        "gradient_clipping": t.grad_clip,
        # torch's AdamW: DeepSpeed's fused CPU Adam would compile for minutes on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [0.9, 0.95], "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def train_rank(cfg: DictConfig) -> None:
    """The body every rank runs under torchrun (or alone, as a single process)."""
    import deepspeed

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(cfg.train.seed)
    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")

    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
    stream = open_stream(
        cfg,
        rank=rank,
        world_size=world,
        tokenizer=tokenizer,
        epochs=cfg.train.epochs,
        device=device,
        verify=bool(cfg.storage.verify),
    )

    embed, head = load_embedding_and_head(
        cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32"
    )
    from transformers import AutoConfig

    from deepspec.models.target import resolve_source

    target_config = AutoConfig.from_pretrained(resolve_source(cfg.target.path, cfg.target.gguf_file))
    draft_cfg = DFlashConfig.from_target(
        target_config,
        num_layers=cfg.algo.num_layers,
        block_size=cfg.algo.block_size,
        layer_ids=list(cfg.target.layer_ids),
        mask_token_id=mask_token_id(cfg, tokenizer),
    )
    model = DFlashDraft(draft_cfg, embed, head)
    trainable = [p for p in model.parameters() if p.requires_grad]

    ds_config = deepspeed_config(cfg, world)
    micro_batch = int(cfg.train.micro_batch)
    per_epoch = stream.samples_per_epoch  # this rank's, the same on every rank
    micro_steps_per_epoch = math.ceil(per_epoch / micro_batch)
    accumulation = ds_config["gradient_accumulation_steps"]
    total_steps = max(1, cfg.train.epochs * micro_steps_per_epoch // accumulation)
    optimizer_lambda = lr_lambda(total_steps, cfg.train.warmup_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, optimizer_lambda),
    )

    ckpt_dir = stage_dir(cfg) / "checkpoints"
    start_micro = 0
    if (ckpt_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(ckpt_dir))
        start_micro = int(client_state["micro_step"])
        loader_state = client_state.get("loader") or loader_state_at(
            start_micro, micro_steps_per_epoch, micro_batch
        )
        stream.load_state_dict(loader_state)
        position = loader_state_at(start_micro, micro_steps_per_epoch, micro_batch)
        if {k: stream.state_dict()[k] for k in position} != position:
            raise ConfigError(
                f"checkpoint {ckpt_dir}: its sample stream is at {loader_state}, but micro-step "
                f"{start_micro} with train.micro_batch={micro_batch} is at {position}; it was saved with "
                "another train configuration: delete the checkpoints to start over"
            )
        log.info("resumed from %s at micro-step %d, sample stream at %s", ckpt_dir, start_micro, loader_state)
    samples_left = iter(stream)

    weights = slot_weights(draft_cfg.block_size, cfg.algo.loss_decay, device=device)
    total_micro = cfg.train.epochs * micro_steps_per_epoch
    bar = tqdm(total=total_micro, initial=start_micro, desc="train", disable=rank != 0, unit="micro-step")
    hits = torch.zeros(draft_cfg.block_size)
    counts = torch.zeros(draft_cfg.block_size)
    loss_sum, loss_n = 0.0, 0
    metrics: dict[str, float] = {}
    for micro in range(start_micro, total_micro):
        samples = [next(samples_left) for _ in range(micro_batch_size(micro, per_epoch, micro_batch))]
        generator = anchor_generator(cfg, micro, rank, world)
        anchors = [sample_anchors(s["loss_mask"], cfg.algo.anchors_per_sequence, generator) for s in samples]
        kept = list(zip(samples, anchors, strict=True))
        packed = pack_blocks(
            [(s["input_ids"], s["features"]) for s, _ in kept],
            [a for _, a in kept],
            draft_cfg.block_size,
            draft_cfg.mask_token_id,
        )
        labels = torch.cat(
            [block_labels(s["input_ids"], s["loss_mask"], a, draft_cfg.block_size) for s, a in kept]
        ).to(device)
        packed = type(packed)(**{k: v.to(device) for k, v in vars(packed).items()})
        hidden = engine(packed)
        loss, stats = weighted_block_cross_entropy(hidden, model.lm_head.weight, labels, weights)
        engine.backward(loss)
        engine.step()
        bar.update(1)
        hits += stats["slot_hits"]
        counts += stats["slot_counts"]
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        step = (micro + 1) // accumulation
        boundary = (micro + 1) % accumulation == 0
        if boundary and rank == 0 and (step % cfg.train.log_every_steps == 0 or micro + 1 == total_micro):
            accuracy = hits / counts.clamp(min=1)
            metrics = {
                "train/loss": loss_sum / max(1, loss_n),
                "train/lr": scheduler.get_last_lr()[0],
                "train/expected_tau": expected_accepted_length(accuracy),
                **{f"train/acc_slot{k}": float(a) for k, a in enumerate(accuracy)},
            }
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tau=f"{metrics['train/expected_tau']:.2f}")
            tracking.log_metrics(cfg, metrics, step=step)
            hits.zero_(), counts.zero_()
            loss_sum, loss_n = 0.0, 0
        if boundary and step % cfg.train.save_every_steps == 0:
            client_state = {"micro_step": micro + 1, "loader": stream.state_dict()}
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client_state)
    bar.close()
    stream.close()

    if rank == 0:
        out = draft_dir(cfg)
        save_draft(model, out)
        OmegaConf.save(cfg, stage_dir(cfg) / "config.yaml")
        stage_io.mark_done(
            stage_dir(cfg),
            train_hash(cfg),
            weights_sha256=weights_sha256(out / "model.safetensors"),
            cache_fingerprint=cache_fingerprint(cfg),
            optimizer_steps=total_steps,
            final_metrics=metrics,
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def train(cfg: DictConfig) -> dict:
    """Train the draft unless a valid one for this config exists; returns the training record."""
    if cfg.algo.name not in SUPPORTED_ALGOS:
        raise ConfigError(
            f"algo={cfg.algo.name}: training is implemented for {', '.join(SUPPORTED_ALGOS)} so far"
        )
    done = check_done(cfg)
    if done is not None:
        log.info("train: a valid draft for this config is at %s; skipping", draft_dir(cfg))
        return {**done, "skipped": True}
    out = stage_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stage_io.clear_done(out)
    _discard_foreign_checkpoints(cfg)
    config_file = out / "launch.yaml"
    OmegaConf.save(cfg, config_file)
    tracking.run_id(cfg)  # create the MLflow run before ranks race to
    if cfg.train.nnodes > 1:
        raise ConfigError(
            f"train.nnodes={cfg.train.nnodes}: start every node yourself with\n  torchrun --nnodes "
            f"{cfg.train.nnodes} --nproc_per_node {cfg.train.nproc_per_node} --rdzv_backend c10d "
            f"--rdzv_endpoint HEAD_NODE:29500 -m deepspec.tasks.train {config_file}"
        )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
        f"--nproc_per_node={cfg.train.nproc_per_node}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "deepspec.tasks.train", str(config_file),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", _accelerator())}
    log.info("launching %s", " ".join(command))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise DeepSpecError(f"training failed (exit {result.returncode}); the ranks' output is above")
    record = check_done(cfg)
    if record is None:
        raise DeepSpecError(f"training exited cleanly but left no valid draft in {draft_dir(cfg)}")
    return record


def _discard_foreign_checkpoints(cfg: DictConfig) -> None:
    """Checkpoints resume only the configuration and data they were saved with; others are removed."""
    ckpt_dir = stage_dir(cfg) / "checkpoints"
    owner = ckpt_dir / "owner.json"
    identity = {"train_hash": train_hash(cfg), "data": cache_fingerprint(cfg)}
    if ckpt_dir.exists() and (not owner.is_file() or json.loads(owner.read_text()) != identity):
        log.warning("discarding %s: saved for another configuration or other data", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stage_io.atomic_write_text(owner, json.dumps(identity))


@task(name="train", cache_policy=NO_CACHE)  # stages validate their own outputs
def train_task(cfg: DictConfig) -> dict:
    return train(cfg)


def _accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_rank(OmegaConf.load(sys.argv[1]))


if __name__ == "__main__":
    main()
