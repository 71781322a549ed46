"""Train stage: a DFlash, Eagle3 or DSpark draft on the target cache, through a DeepSpeed engine.

`train_task` (the Prefect wrapper) launches `torchrun -m deepspec.tasks.train.stage <config>`; every rank runs
`train_rank`, which streams its share of the samples (`cache_loader.py`: the target cache, or the target
itself with `storage.mode=online`), steps the DeepSpeed engine and saves a resumable checkpoint every
`train.save_every_steps`, the stream's position included, so a resumed run sees exactly the samples
and anchors the interrupted one would have seen next. Rank 0 writes the draft (`config.json`,
`model.safetensors`) and the completion marker last. The same entry point serves 1 CPU process,
8 GPUs, or many nodes:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m deepspec.tasks.train.stage LAUNCH.yaml

`algo.name` picks a recipe, the one place the algorithms differ (draft, micro-batch loss, saved files);
engine, optimizer, schedule, checkpoints and resume are shared:
- dflash: anchors, packed blocks, cross-entropy against the data's next tokens, slot k weighted
  exp(-k / loss_decay).
- eagle3: whole right-padded sequences, a `block_size`-step training-time test against the target's
  distribution, step k weighted step_decay^k; optionally a reduced draft vocabulary from the data.
- dspark: DFlash's anchors and blocks plus each slot's previous token (`block_rows`), against the
  target's distribution: ce_weight CE + l1_weight L1 + confidence_weight BCE.

Teacher (Eagle3, DSpark): the target's distribution is its frozen LM head applied to its final
(normalised) hidden state, only at the positions a loss reads. Online mode captures that state in the
target forward that yields the features. The cache holds only the chosen layers, so in cached mode
`Teacher` recomputes it: the cached feature of the last captured layer m (the residual stream after layer
m) runs through the target's decoder layers m+1..L-1 and final norm, loaded alone (`load_target_tail`:
causal attention over positions 0..T-1, as the target ran). For m = L-1 nothing runs: transformers
records the normalised final state as the last layer's output, so the cached feature is the state
itself. The recomputed teacher starts from the cache's rounded features (bf16 by default), so it
differs from the online one by that rounding. Targets whose later layers read more than the residual
stream (Gemma-4's per-layer inputs and shared keys/values) cannot be recomputed: a ConfigError says to
train online or to capture layer L-1.
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
import time
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from tqdm import tqdm

from deepspec.models.drafts import check_algo_name
from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft, pack_blocks, sample_anchors, save_draft
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.losses import (
    block_labels,
    chunked_dspark_loss,
    expected_accepted_length,
    slot_weights,
    weighted_block_cross_entropy,
)
from deepspec.models.target import (
    load_embedding_and_head,
    load_target,
    load_tokenizer,
    resolve_dtype,
    resolve_source,
)
from deepspec.tasks import files, tracking
from deepspec.tasks.cache.format import read_manifest
from deepspec.tasks.cache.loader import answers_file, open_stream, storage_mode, supervised_token_counts
from deepspec.tasks.config import config_hash, run_path

log = logging.getLogger(__name__)
STALE_LOCK_S = 15 * 60  # an op build takes minutes (DeepSpeed's CPU Adam: about 4 on 2 cores)

# algo fields each algorithm reads, beyond name, block_size and num_layers; the others stay null
ALGO_FIELDS = {
    "dflash": ("loss_decay", "anchors_per_sequence"),
    "eagle3": ("step_decay",),
    "dspark": (
        "loss_decay", "anchors_per_sequence", "markov_rank", "markov_head_type", "confidence_head",
        "confidence_head_with_markov", "ce_weight", "l1_weight", "confidence_weight",
    ),
}  # fmt: skip


def stage_dir(cfg: DictConfig) -> Path:
    return run_path(cfg, "train")


def draft_dir(cfg: DictConfig) -> Path:
    return stage_dir(cfg) / "draft"


def algo_identity(cfg: DictConfig) -> dict:
    """The algo section without its null fields: what a draft depends on. A field added for another
    algorithm leaves the hashes of existing runs, and so their finished stages, unchanged."""
    algo = OmegaConf.to_container(cfg.algo, resolve=True)
    return {k: v for k, v in algo.items() if v is not None}


def train_hash(cfg: DictConfig) -> str:
    return config_hash(cfg.target, cfg.storage, algo_identity(cfg), cfg.train)


def check_algo(cfg: DictConfig) -> None:
    """Every problem of the algo section (and of the target layers it needs) at once, as a ConfigError."""
    algo = cfg.algo
    check_algo_name(algo.name)
    problems = [
        f"algo.{key} is null, and algo={algo.name} needs it (conf/algo/{algo.name}.yaml sets it)"
        for key in ALGO_FIELDS[algo.name]
        if algo.get(key) is None
    ]
    if algo.block_size < 1:
        problems.append(f"algo.block_size={algo.block_size}: expected at least 1")
    if algo.name == "eagle3":
        from deepspec.models.drafts.eagle3 import NUM_FEATURE_LAYERS, default_layer_ids

        if algo.num_layers != 1:
            problems.append(f"algo.num_layers={algo.num_layers}: Eagle3 has exactly one decoder layer")
        layer_ids = list(cfg.target.layer_ids)
        if len(layer_ids) != NUM_FEATURE_LAYERS:
            n = cfg.target.num_hidden_layers
            usual = default_layer_ids(n) if n else []
            hint = (
                f"EAGLE3 takes layers 1, L/2 - 1 and L - 4: for this {n}-layer target pass "
                f"'target.layer_ids=[{','.join(map(str, usual))}]'"
                if len(set(usual)) == NUM_FEATURE_LAYERS
                else "EAGLE3 takes layers 1, L/2 - 1 and L - 4 of an L-layer target"
            )
            problems.append(
                f"target.layer_ids={layer_ids}: Eagle3 fuses exactly {NUM_FEATURE_LAYERS} target layers "
                f"(low, mid, high); {hint}"
            )
    if problems:
        raise ConfigError(f"algo={algo.name}: " + "; ".join(problems))


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
    record = files.read_done(stage_dir(cfg), train_hash(cfg))
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


# ----------------------------------------------------------------------------------------------------
# Teacher: the target's distribution from its final hidden state


class TargetTail(nn.Module):
    """The target's decoder layers m+1..L-1 and final norm: its final hidden state from the residual
    stream after layer m, run as the target runs it (causal attention, positions 0..T-1)."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.base, self.dtype = base, dtype

    @torch.no_grad()
    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [T, d] after layer m -> final normalised hidden state [T, d]."""
        positions = torch.arange(residual.shape[0], device=residual.device)[None]
        out = self.base(inputs_embeds=residual[None].to(self.dtype), position_ids=positions, use_cache=False)
        return out.last_hidden_state[0]


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`layers`, `norm`) of a causal LM, inside a multimodal wrapper too."""
    base = model.model
    return getattr(base, "language_model", base)


def _keep_layers_from(base: nn.Module, first: int) -> None:
    """Drop the decoder layers before `first` and the embedding; the config follows the kept layers."""
    import copy

    config = copy.deepcopy(base.config)
    config.num_hidden_layers = len(base.layers) - first
    if getattr(config, "layer_types", None):  # the forward reads the type of layer i from the config
        config.layer_types = list(config.layer_types)[first:]
    base.config = config
    base.layers = nn.ModuleList(list(base.layers)[first:])
    base.embed_tokens = nn.Identity()  # the tail starts from a residual stream, never from tokens


def load_target_tail(target_cfg: DictConfig, first_layer: int, device: torch.device) -> TargetTail:
    """`TargetTail` for layers `first_layer`..L-1: from a local safetensors checkpoint only those layers'
    weights and the final norm are read; otherwise (a hub id) the whole target loads, then the rest goes."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(target_cfg.path, target_cfg.gguf_file)
    dtype = resolve_dtype(target_cfg.dtype)
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    base = None
    if files:
        config = AutoConfig.from_pretrained(source, revision=target_cfg.revision)
        with init_empty_weights():  # parameters on the meta device, buffers (RoPE tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        base = _decoder(model)
        prefix = next(name for name, module in model.named_modules() if module is base) + "."
        _keep_layers_from(base, first_layer)
        state = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = _tail_name(key, prefix, first_layer)
                    if name is not None:
                        state[name] = f.get_tensor(key).to(dtype)
        base.load_state_dict(state, strict=False, assign=True)
        if any(p.is_meta for p in base.parameters()):  # weights under other names: take the slow road
            log.warning("%s: the tail layers' weights were not all found by name; loading the target", source)
            base = None
    if base is None:
        model, _ = load_target(target_cfg.path, target_cfg.gguf_file, target_cfg.revision, target_cfg.dtype)
        base = _decoder(model)
        _keep_layers_from(base, first_layer)
    return TargetTail(base.to(device).eval().requires_grad_(False), dtype)


def _tail_name(key: str, prefix: str, first: int) -> str | None:
    """The name in the kept decoder of a checkpoint tensor (layer i -> layer i - first), or None."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest.startswith("norm."):
        return rest
    parts = rest.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= first:
        return f"layers.{int(parts[1]) - first}.{parts[2]}"
    return None


def teacher_tail_start(cfg: DictConfig, text_config) -> int | None:
    """The first target layer the cached-mode teacher must run (None: the cached feature is the final
    state, or online mode captures it); ConfigError when the target's later layers cannot be rerun."""
    if storage_mode(cfg) == "online":
        return None
    last, num_layers = max(cfg.target.layer_ids), text_config.num_hidden_layers
    if last + 1 >= num_layers:
        return None
    reads_more = [
        what
        for what, present in (
            ("per-layer token inputs", getattr(text_config, "hidden_size_per_layer_input", None)),
            ("keys and values shared across layers", getattr(text_config, "num_kv_shared_layers", 0)),
        )
        if present
    ]
    if reads_more:
        raise ConfigError(
            f"algo={cfg.algo.name} in cached mode recomputes the teacher from the last cached layer "
            f"({last}) through layers {last + 1}..{num_layers - 1}, but this {text_config.model_type} "
            f"target's layers also read {' and '.join(reads_more)}, which the cache does not hold: train "
            f"with storage.mode=online, or capture the last layer ({num_layers - 1}) in target.layer_ids"
        )
    return last + 1


class Teacher:
    """The target's final hidden state of a sample, and its frozen LM head on chosen rows (float32)."""

    def __init__(self, cfg: DictConfig, text_config, head_weight: torch.Tensor, device: torch.device):
        self.device = device
        self.online = storage_mode(cfg) == "online"
        self.head = head_weight.to(device=device, dtype=resolve_dtype(cfg.target.dtype))
        self.softcap = getattr(text_config, "final_logit_softcapping", None)  # Gemma caps logits
        layer_ids, d = list(cfg.target.layer_ids), text_config.hidden_size
        k = layer_ids.index(max(layer_ids))
        self.columns = slice(k * d, (k + 1) * d)  # the last captured layer's block of the features
        first = teacher_tail_start(cfg, text_config)
        self.tail = None if first is None else load_target_tail(cfg.target, first, device)

    @torch.no_grad()
    def final_hidden(self, sample: dict) -> torch.Tensor:
        """[T, d] on the device."""
        if "final_hidden" in sample:
            return sample["final_hidden"].to(self.device)
        if self.online:
            raise DeepSpecError("the online stream yielded no final hidden state (open it with final_hidden)")
        residual = sample["features"][:, self.columns].to(self.device)
        return residual if self.tail is None else self.tail(residual)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = (hidden.to(self.head.dtype) @ self.head.t()).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# ----------------------------------------------------------------------------------------------------
# Recipes: the draft, one micro-batch's loss, the saved draft


class DFlashRecipe:
    """Blocks at sampled anchors, cross-entropy against the data's next tokens."""

    def __init__(self, cfg, target_config, tokenizer, embed, head, device, teacher=None):
        self.cfg, self.device = cfg, device
        self.draft_cfg = DFlashConfig.from_target(
            target_config,
            num_layers=cfg.algo.num_layers,
            block_size=cfg.algo.block_size,
            layer_ids=list(cfg.target.layer_ids),
            mask_token_id=mask_token_id(cfg, tokenizer),
        )
        self.model = DFlashDraft(self.draft_cfg, embed, head)
        self.slots = self.draft_cfg.block_size
        self.weights = slot_weights(self.slots, cfg.algo.loss_decay, device=device)

    def step(self, engine, samples: list[dict], generator: torch.Generator):
        anchors = [
            sample_anchors(s["loss_mask"], self.cfg.algo.anchors_per_sequence, generator) for s in samples
        ]
        kept = list(zip(samples, anchors, strict=True))
        packed = pack_blocks(
            [(s["input_ids"], s["features"]) for s, _ in kept],
            [a for _, a in kept],
            self.draft_cfg.block_size,
            self.draft_cfg.mask_token_id,
        )
        labels = torch.cat(
            [block_labels(s["input_ids"], s["loss_mask"], a, self.draft_cfg.block_size) for s, a in kept]
        ).to(self.device)
        packed = type(packed)(**{k: v.to(self.device) for k, v in vars(packed).items()})
        hidden = engine(packed)
        return weighted_block_cross_entropy(hidden, self.model.lm_head.weight, labels, self.weights)

    def save(self, out: Path) -> None:
        save_draft(self.model, out)


class Eagle3Recipe:
    """Whole sequences, right-padded; a training-time test against the target's distribution."""

    def __init__(self, cfg, target_config, tokenizer, embed, head, device, teacher):
        from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft, build_draft_vocab

        self.cfg, self.device, self.teacher = cfg, device, teacher
        draft_cfg = Eagle3Config.from_target(
            target_config,
            layer_ids=list(cfg.target.layer_ids),
            ttt_steps=cfg.algo.block_size,
            draft_vocab_size=cfg.algo.draft_vocab_size,
        )
        d2t = None
        if draft_cfg.reduced_vocab:
            counts = supervised_token_counts(cfg, tokenizer, draft_cfg.vocab_size)
            d2t, _ = build_draft_vocab(counts, draft_cfg.draft_vocab_size)
            kept = counts[torch.arange(draft_cfg.draft_vocab_size) + d2t].sum() / counts.sum().clamp(min=1)
            log.info("draft vocabulary: %d tokens cover %.1f%% of supervised tokens", d2t.numel(), 100 * kept)
        self.model = Eagle3Draft(draft_cfg, embed, head, d2t=d2t)
        self.slots = draft_cfg.ttt_steps

    def step(self, engine, samples: list[dict], generator: torch.Generator):
        length = max(int(s["input_ids"].shape[0]) for s in samples)
        width = samples[0]["features"].shape[1]
        features = torch.zeros(len(samples), length, width, device=self.device)  # where the stream decoded
        ids = torch.zeros(len(samples), length, dtype=torch.long)
        mask = torch.zeros(len(samples), length, dtype=torch.bool)
        # the target's final states, not its logits: the draft applies the head to supervised rows only,
        # a chunk at a time (the law of token t is row t - 1; rows nothing reads stay zero)
        head = self.teacher.head
        final = torch.zeros(len(samples), length, head.shape[1], device=self.device, dtype=head.dtype)
        for b, s in enumerate(samples):
            n = s["input_ids"].shape[0]
            features[b, :n], ids[b, :n], mask[b, :n] = s["features"], s["input_ids"], s["loss_mask"]
            if bool(s["loss_mask"][2:].any()):  # a token t >= 2 some step predicts
                final[b, :n] = self.teacher.final_hidden(s).to(device=self.device, dtype=head.dtype)
        device = self.device
        return engine(
            features.to(device), ids.to(device), mask.to(device), target_hidden=final, target_head=head,
            target_softcap=self.teacher.softcap, step_decay=self.cfg.algo.step_decay,
        )  # fmt: skip

    def save(self, out: Path) -> None:
        from deepspec.models.drafts.eagle3 import save_draft as save_eagle3

        save_eagle3(self.model, out)


class DSparkRecipe:
    """DFlash's blocks plus each slot's previous token; CE + L1 + BCE against the target's distribution."""

    def __init__(self, cfg, target_config, tokenizer, embed, head, device, teacher):
        from deepspec.models.drafts.dspark import DSparkConfig, DSparkDraft

        a = cfg.algo
        self.cfg, self.device, self.teacher = cfg, device, teacher
        self.draft_cfg = DSparkConfig.from_target(
            target_config,
            num_layers=a.num_layers,
            block_size=a.block_size,
            layer_ids=list(cfg.target.layer_ids),
            mask_token_id=mask_token_id(cfg, tokenizer),
            markov_rank=a.markov_rank,
            markov_head_type=a.markov_head_type,
            confidence_head=a.confidence_head,
            confidence_head_with_markov=a.confidence_head_with_markov,
            num_anchors=a.anchors_per_sequence,
        )  # q/k norms for every target family and the target's logit cap come with the config
        self.model = DSparkDraft(self.draft_cfg, embed, head)
        self.slots = a.block_size
        self.weights = slot_weights(self.slots, a.loss_decay, device=device)
        self.loss_weights = {"ce_weight": a.ce_weight, "l1_weight": a.l1_weight}
        self.loss_weights["confidence_weight"] = a.confidence_weight

    def step(self, engine, samples: list[dict], generator: torch.Generator):
        from deepspec.models.drafts.dspark import block_rows

        block = self.slots
        anchors = [
            sample_anchors(s["loss_mask"], self.cfg.algo.anchors_per_sequence, generator) for s in samples
        ]
        packed = pack_blocks(
            [(s["input_ids"], s["features"]) for s in samples],
            anchors,
            block,
            self.draft_cfg.backbone.mask_token_id,
        )
        packed = type(packed)(**{k: v.to(self.device) for k, v in vars(packed).items()})
        pairs = list(zip(samples, anchors, strict=True))
        labels = torch.cat([block_labels(s["input_ids"], s["loss_mask"], a, block) for s, a in pairs])
        prev = torch.cat([block_rows(s["input_ids"], a, block) for s, a in pairs])
        final = torch.cat([block_rows(self.teacher.final_hidden(s), a, block) for s, a in pairs])
        # the kept slots' states, not logits: the loss applies the frozen head (capped as the target
        # caps it) and the Markov head's W2 to a chunk of rows at a time, on both sides
        rows = engine(packed, prev.to(self.device), labels.to(self.device), target_hidden=final, chunked=True)
        markov = None if rows.codes is None else (rows.codes, self.model.markov_head.markov_w2.weight)
        return chunked_dspark_loss(
            rows.hidden, self.model.backbone.lm_head.weight, rows.labels, rows.slots, rows.confidence_logits,
            self.weights, target_hidden=rows.target_hidden, markov=markov,
            target_softcap=self.draft_cfg.final_logit_softcapping, **self.loss_weights,
        )  # fmt: skip

    def save(self, out: Path) -> None:
        from deepspec.models.drafts.dspark import save_dspark

        save_dspark(self.model, out)


RECIPES = {"dflash": DFlashRecipe, "eagle3": Eagle3Recipe, "dspark": DSparkRecipe}
NEEDS_TEACHER = ("eagle3", "dspark")


class Metrics:
    """Running sums between two logged steps: loss, per-slot hits and counts, and any scalar statistic."""

    def __init__(self, slots: int):
        self.slots = slots
        self.reset()

    def reset(self) -> None:
        self.loss, self.n = 0.0, 0
        self.hits, self.counts = torch.zeros(self.slots), torch.zeros(self.slots)
        self.accept: torch.Tensor | None = None
        self.scalars: dict[str, float] = {}

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.loss, self.n = self.loss + loss.item(), self.n + 1
        self.hits += stats["slot_hits"]
        self.counts += stats["slot_counts"]
        if "slot_accept" in stats:  # DSpark: the chance each slot survives verification, 1 - TV
            self.accept = stats["slot_accept"] + (0 if self.accept is None else self.accept)
        for key, value in stats.items():
            if torch.is_tensor(value) and value.dim() == 0:
                self.scalars[key] = self.scalars.get(key, 0.0) + float(value)

    def summary(self, lr: float) -> dict[str, float]:
        accuracy = self.hits / self.counts.clamp(min=1)
        metrics = {
            "train/loss": self.loss / max(1, self.n),
            "train/lr": lr,
            "train/expected_tau": expected_accepted_length(accuracy),
            **{f"train/acc_slot{k}": float(a) for k, a in enumerate(accuracy)},
            **{f"train/{key}": total / max(1, self.n) for key, total in self.scalars.items()},
        }
        if self.accept is not None:
            accept = self.accept / self.counts.clamp(min=1)
            metrics["train/expected_tau_accept"] = expected_accepted_length(accept)
            metrics.update({f"train/accept_slot{k}": float(a) for k, a in enumerate(accept)})
        return metrics


def train_rank(cfg: DictConfig) -> None:
    """The body every rank runs under torchrun (or alone, as a single process)."""
    import deepspeed
    from transformers import AutoConfig

    check_algo(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(cfg.train.seed)
    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")

    algo = cfg.algo.name
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file, cfg.target.revision)
    stream = open_stream(
        cfg,
        rank=rank,
        world_size=world,
        tokenizer=tokenizer,
        epochs=cfg.train.epochs,
        device=device,
        verify=bool(cfg.storage.verify),
        final_hidden=algo in NEEDS_TEACHER,
    )

    embed, head = load_embedding_and_head(
        cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32"
    )
    target_config = AutoConfig.from_pretrained(resolve_source(cfg.target.path, cfg.target.gguf_file))
    teacher = None
    if algo in NEEDS_TEACHER:
        teacher = Teacher(cfg, target_config.get_text_config(), head, device)
    recipe = RECIPES[algo](cfg, target_config, tokenizer, embed, head, device, teacher)
    model = recipe.model
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

    total_micro = cfg.train.epochs * micro_steps_per_epoch
    bar = tqdm(total=total_micro, initial=start_micro, desc="train", disable=rank != 0, unit="micro-step")
    running = Metrics(recipe.slots)
    metrics: dict[str, float] = {}
    for micro in range(start_micro, total_micro):
        samples = [next(samples_left) for _ in range(micro_batch_size(micro, per_epoch, micro_batch))]
        loss, stats = recipe.step(engine, samples, anchor_generator(cfg, micro, rank, world))
        engine.backward(loss)
        engine.step()
        bar.update(1)
        running.add(loss, stats)
        step = (micro + 1) // accumulation
        boundary = (micro + 1) % accumulation == 0
        if boundary and rank == 0 and (step % cfg.train.log_every_steps == 0 or micro + 1 == total_micro):
            metrics = running.summary(scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tau=f"{metrics['train/expected_tau']:.2f}")
            tracking.log_metrics(cfg, metrics, step=step)
            running.reset()
        if boundary and step % cfg.train.save_every_steps == 0:
            client_state = {"micro_step": micro + 1, "loader": stream.state_dict()}
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client_state)
    bar.close()
    stream.close()

    if rank == 0:
        out = draft_dir(cfg)
        recipe.save(out)
        OmegaConf.save(cfg, stage_dir(cfg) / "config.yaml")
        files.mark_done(
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
    check_algo(cfg)
    if cfg.algo.name in NEEDS_TEACHER:  # fail here, not in every rank, when the teacher cannot be had
        from transformers import AutoConfig

        source = resolve_source(cfg.target.path, cfg.target.gguf_file)
        teacher_tail_start(cfg, AutoConfig.from_pretrained(source).get_text_config())
    done = check_done(cfg)
    if done is not None:
        log.info("train: a valid draft for this config is at %s; skipping", draft_dir(cfg))
        return {**done, "skipped": True}
    out = stage_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    files.clear_done(out)
    _discard_foreign_checkpoints(cfg)
    config_file = out / "launch.yaml"
    OmegaConf.save(cfg, config_file)
    tracking.run_id(cfg)  # create the MLflow run before ranks race to
    if cfg.train.nnodes > 1:
        raise ConfigError(
            f"train.nnodes={cfg.train.nnodes}: start every node yourself with\n  torchrun --nnodes "
            f"{cfg.train.nnodes} --nproc_per_node {cfg.train.nproc_per_node} --rdzv_backend c10d "
            f"--rdzv_endpoint HEAD_NODE:29500 -m deepspec.tasks.train.stage {config_file}"
        )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
        f"--nproc_per_node={cfg.train.nproc_per_node}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "deepspec.tasks.train.stage", str(config_file),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", _accelerator())}
    for lock, age_s in stale_build_locks():
        log.warning(
            "%s is %.0f minutes old: a torch extension build (DeepSpeed compiles its ops on first use) "
            "killed midway leaves it, and every later build waits on it forever. If no build is running, "
            "delete it.", lock, age_s / 60,
        )  # fmt: skip
    log.info("launching %s", " ".join(command))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise DeepSpecError(f"training failed (exit {result.returncode}); the ranks' output is above")
    record = check_done(cfg)
    if record is None:
        raise DeepSpecError(f"training exited cleanly but left no valid draft in {draft_dir(cfg)}")
    return record


def stale_build_locks(max_age_s: float = STALE_LOCK_S) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) of torch extension builds older than `max_age_s`. Torch's folders:
    with $TORCH_EXTENSIONS_DIR, DIR/<op>/lock, else <cache>/torch_extensions/<python>_<device>/<op>/lock."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now, stale = time.time(), []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # its build just finished
            continue
        if age > max_age_s:
            stale.append((lock, age))
    return stale


def _discard_foreign_checkpoints(cfg: DictConfig) -> None:
    """Checkpoints resume only the configuration and data they were saved with; others are removed."""
    ckpt_dir = stage_dir(cfg) / "checkpoints"
    owner = ckpt_dir / "owner.json"
    identity = {"train_hash": train_hash(cfg), "data": cache_fingerprint(cfg)}
    if ckpt_dir.exists() and (not owner.is_file() or json.loads(owner.read_text()) != identity):
        log.warning("discarding %s: saved for another configuration or other data", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(owner, json.dumps(identity))


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
