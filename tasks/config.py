"""Typed schema of the whole DeepSpec configuration.

The values live only in `conf/` YAML; these dataclasses give them types, so a misspelt key or a
wrong type fails while composing, naming the key. `compose()` is the one way to build a config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepspec.models.errors import ConfigError


@dataclass
class TargetConfig:
    name: str = "???"
    path: str = "???"  # hub id or local directory
    gguf_file: str | None = None  # a GGUF file inside `path`, dequantized on load
    revision: str | None = None
    dtype: str = "float32"
    layer_ids: list[int] = field(default_factory=list)  # residual stream after these layers (0-based)
    hidden_size: int | None = None  # None: read from the checkpoint's config (estimate-cache)
    num_hidden_layers: int | None = None
    use_chat_template: bool = True  # False for base models: prompt and answer are concatenated
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    mask_token_id: int | None = None  # None: the tokenizer's pad, unk or eos token
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512


@dataclass
class PromptsConfig:
    source: str = "mlabonne/open-perfectblend"  # HF dataset id, local .jsonl/.json/.parquet/.csv, builtin
    split: str = "train"
    max_samples: int | None = None
    heldout_fraction: float = 0.0
    seed: int = 0  # salts the hash that picks the held-out rows


@dataclass
class RegenConfig:
    backend: str = "hf"  # hf (in process), vllm (servers DeepSpec launches, or `endpoints`), openai
    max_new_tokens: int | None = None  # None: the target preset's value
    temperature: float | None = None  # None: the target preset's value
    seed: int = 0  # hf: batch seeds; vllm: the launched servers' --seed
    shard_size: int = 256  # prompts a Prefect task answers and commits together
    parallel_shards: int = 1  # shard tasks at once (threads of the flow's process)
    allow_failures: int = 0  # prompts that may still fail after retries without failing the stage
    batch_size: int = 8  # hf: rows per generate call
    # vllm and openai: OpenAI-compatible HTTP
    endpoints: list[str] = field(default_factory=list)  # base URLs ending in /v1
    api: str | None = None  # completions (token ids) | chat (messages); None: completions for vllm
    model: str | None = None  # served model name; None: the first one the server lists
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the API key
    concurrency: int = 64  # requests in flight over all replicas
    max_retries: int = 5  # transient failures (refused, timeout, 429, 5xx) before a row fails
    request_timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, e.g. {top_k: 20}
    # vllm without endpoints: servers launched and supervised by DeepSpec
    replicas: int | None = None  # None: one per `gpus_per_replica` GPUs, or 1 on a CPU
    gpus_per_replica: int | None = None  # tensor-parallel size; None: 1 with CUDA, 0 (CPU) without
    vllm_python: str | None = None  # the vLLM environment's python; None: $DEEPSPEC_VLLM_PYTHON or .venv-vllm
    server_dtype: str | None = None  # None: target.dtype
    max_model_len: int | None = None
    server_args: list[str] = field(default_factory=list)  # more `vllm serve` arguments


@dataclass
class StorageConfig:
    url: str = "???"  # any fsspec URL: a local path, file://, s3://bucket/prefix
    storage_options: dict[str, Any] = field(default_factory=dict)
    samples_per_shard: int = 64
    encoding: str = "bf16"
    max_length: int = 4096
    build_workers: int = 1  # shard tasks at once: threads sharing one target replica, or local Dask workers
    task_runner: str = "thread"  # "thread" (this process) or "dask" (pip install deepspec[dask])
    dask_address: str | None = None  # tcp://HOST:8786 of a Dask scheduler; None: a local cluster
    mode: str = "cached"  # "cached": train from the cache at `url`; "online": run the target in training
    verify: bool = False  # check every shard's sha256 when training opens it


@dataclass
class AlgoConfig:
    name: str = "dflash"  # dflash | eagle3 | dspark; fields another algorithm uses stay null
    block_size: int = 7  # DFlash, DSpark: slots a block drafts; Eagle3: training-time-test steps
    num_layers: int = 5  # draft decoder layers (Eagle3: 1)
    loss_decay: float | None = None  # DFlash, DSpark: slot k is weighted exp(-k / loss_decay)
    anchors_per_sequence: int | None = None  # DFlash, DSpark: blocks trained per sequence
    step_decay: float | None = None  # Eagle3: TTT step k is weighted step_decay^k
    draft_vocab_size: int | None = None  # Eagle3: the N most frequent supervised tokens; null: all
    markov_rank: int | None = None  # DSpark: rank of the sequential head; 0: none
    markov_head_type: str | None = None  # DSpark: vanilla | gated | rnn
    confidence_head: bool | None = None  # DSpark
    confidence_head_with_markov: bool | None = None  # DSpark: the head also reads W1[x_{k-1}]
    ce_weight: float | None = None  # DSpark loss: ce * CE + l1 * L1 + confidence * BCE
    l1_weight: float | None = None
    confidence_weight: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_batch: int = 512  # sequences per optimizer step, over all ranks
    micro_batch: int = 1  # sequences per rank per forward
    zero_stage: int = 1
    precision: str = "bf16"  # bf16 on GPU; fp32 on CPU
    nproc_per_node: int = 1
    nnodes: int = 1
    threads_per_rank: int | None = None  # None: CPU cores divided by ranks
    log_every_steps: int = 10
    save_every_steps: int = 500
    seed: int = 0


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)
    data_dir: str | None = None  # a directory of <benchmark>.jsonl; None: the built-in set
    max_samples: int = 20  # per benchmark
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: an SQLite store in the run directory
    experiment: str = "deepspec"


@dataclass
class DeepSpecConfig:
    run_dir: str = "runs/demo"
    target: TargetConfig = field(default_factory=TargetConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    regen: RegenConfig = field(default_factory=RegenConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides and check it against the schema."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="deepspec.conf", version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        cfg = OmegaConf.merge(OmegaConf.structured(DeepSpecConfig), raw)
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad configuration: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    if missing:
        raise ConfigError(f"configuration keys without a value: {', '.join(missing)}")
    OmegaConf.set_struct(cfg, True)
    return cfg


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections, used to tell whether a stage's outputs are still valid."""
    plain = [OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_path(cfg: DictConfig, *names: str) -> Path:
    """A path inside the run directory."""
    return Path(cfg.run_dir).joinpath(*names)
