"""The configuration: types here, values in `conf/` YAML, every check at compose time.

One source of defaults. The values, and the comments saying what each means, live only in `conf/` YAML
(`conf/config.yaml` and one folder per group). The dataclasses below give every field a type and no
default, so a key the YAML does not set fails `compose` by name instead of falling back to a second,
hidden default. The `algo` section is typed by the chosen algorithm's own settings class
(`models/drafts/<algo>.py`, e.g. Eagle3's `ttt_steps`), so a key of another algorithm fails too.

`compose()` is the one way to build a config. It reports every problem it finds at once: unknown keys,
wrong types and values without a default (each section on its own), then every check that needs
neither data nor weights (`config_problems`: algorithm settings, target layers per algorithm, dtypes,
precision and batch arithmetic, storage mode, task runner, encodings, regeneration backends). So
`deepspec pipeline ...` fails before its first stage, not hours later in training.

Derived values are filled in while composing, so the composed config says what runs: `regen.api`,
`regen.max_new_tokens` and `regen.temperature` left null take the backend's API and the target's values.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepspec.models.drafts import DRAFTS, draft_spec
from deepspec.models.errors import ConfigError
from deepspec.tasks import secrets


@dataclass
class TargetConfig:
    name: str
    path: str
    gguf_file: str | None
    revision: str | None
    dtype: str
    layer_ids: list[int]
    hidden_size: int | None
    num_hidden_layers: int | None
    use_chat_template: bool
    chat_template_kwargs: dict[str, Any]
    system_prompt: str | None
    mask_token_id: int | None
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int


@dataclass
class PromptsConfig:
    source: str
    split: str
    max_samples: int | None
    heldout_fraction: float
    seed: int


@dataclass
class RegenConfig:
    backend: str
    max_new_tokens: int | None
    temperature: float | None
    seed: int
    shard_size: int
    parallel_shards: int
    allow_failures: int
    batch_size: int
    endpoints: list[str]
    api: str | None
    model: str | None
    api_key_env: str | None
    concurrency: int
    max_retries: int
    request_timeout_s: float
    extra_body: dict[str, Any]
    replicas: int | None
    gpus_per_replica: int | None
    vllm_python: str | None
    server_dtype: str | None
    max_model_len: int | None
    server_args: list[str]
    answers_file: str | None


@dataclass
class StorageConfig:
    url: str
    storage_options: dict[str, Any]
    samples_per_shard: int
    encoding: str
    max_length: int
    build_workers: int
    task_runner: str
    dask_address: str | None
    mode: str
    verify: bool


@dataclass
class TrainConfig:
    epochs: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    betas: list[float]
    grad_clip: float
    global_batch: int
    micro_batch: int
    zero_stage: int
    precision: str
    nproc_per_node: int
    nnodes: int
    threads_per_rank: int | None
    log_every_steps: int
    save_every_steps: int
    seed: int
    eval_every_steps: int
    eval_samples: int | None


@dataclass
class ServingConfig:
    concurrency: list[int]  # []: no serving simulation
    profile_context: int
    profile_tokens: list[int]
    steps: int


@dataclass
class EvalConfig:
    benchmarks: list[str]
    data_dir: str | None
    max_samples: int | None
    caps: dict[str, int]
    shuffle_seed: int | None
    max_new_tokens: int
    temperature: float
    seed: int
    confidence_threshold: float
    num_draft_tokens: int | None  # null: the draft's own
    domains: dict[str, list[str]]
    target_dtype: str | None  # null: target.dtype
    multi_turn: bool
    calibration_prompts: int
    serving: ServingConfig


@dataclass
class ExportConfig:
    draft: str


@dataclass
class ReleaseConfig:
    dir: str | None
    margin: float
    alias: str
    init: str


@dataclass
class TrackingConfig:
    uri: str | None
    experiment: str


@dataclass
class DeepSpecConfig:
    run_dir: str
    data_dir: str
    target: TargetConfig
    prompts: PromptsConfig
    regen: RegenConfig
    storage: StorageConfig
    algo: Any  # typed by the chosen algorithm's settings class while composing
    train: TrainConfig
    eval: EvalConfig
    export: ExportConfig
    release: ReleaseConfig
    tracking: TrackingConfig


SECTIONS = {
    "target": TargetConfig,
    "prompts": PromptsConfig,
    "regen": RegenConfig,
    "storage": StorageConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "release": ReleaseConfig,
    "tracking": TrackingConfig,
}
REGEN_BACKENDS = ("hf", "vllm", "openai", "file")
REGEN_APIS = ("completions", "chat")
STORAGE_MODES = ("cached", "online")  # train from the cache at storage.url, or run the target in training
TASK_RUNNERS = ("thread", "dask")  # where the cache stage's shard tasks run
PRECISIONS = ("bf16", "fp32")
EXPORT_DRAFTS = ("best", "last")  # the trained draft evaluate and export use
RELEASE_INITS = ("scratch", "released")  # what the retrain flow's training starts from


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides, type it and check it; ConfigError listing
    every problem otherwise."""
    overrides = list(overrides or [])
    try:
        raw = _hydra(overrides, config_name)
    except (HydraException, OmegaConfBaseException) as err:
        message = _unknown_key(err, overrides, config_name) or f"bad configuration: {err}"
        raise ConfigError(secrets.scrub(message, overrides)) from err  # Hydra's messages echo values
    cfg, problems = _typed(raw)
    held: dict[str, str] = {}
    if not problems:  # secret references stay text, never resolved into the config (tasks/secrets.py)
        held, problems = secrets.hold_references(cfg)
    if not problems:
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as err:
            problems.append(f"{_key_of(err)}: {_message(err)}")
    if not problems:
        missing = sorted(OmegaConf.missing_keys(cfg))
        problems += [f"{key}: no value (set it, e.g. {key}=...)" for key in missing]
    if not problems:
        _fill_derived(cfg)
        problems += config_problems(cfg)
    if problems:
        raise ConfigError(_report(problems))
    secrets.restore_references(cfg, held)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _hydra(overrides: list[str], config_name: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="deepspec.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _unknown_key(err: Exception, overrides: list[str], config_name: str) -> str | None:
    """For Hydra's "Could not override 'algo.block_size'", the keys that section does take."""
    match = re.search(r"Could not override '([^']+)'", str(err))
    if match is None:
        return None
    key = match.group(1)
    section, _, name = key.partition(".")
    schema = SECTIONS.get(section)
    if section == "algo":
        try:  # the algorithm the other overrides pick
            raw = _hydra([o for o in overrides if not o.startswith(key)], config_name)
            schema, section = DRAFTS[raw.algo.name].settings, f"algo={raw.algo.name}"
        except (HydraException, OmegaConfBaseException, KeyError):
            return None
    if schema is None or name.partition(".")[0] in schema.__dataclass_fields__:
        return None  # a key inside a known setting (e.g. regen.extra_body): Hydra's message says what to do
    keys = ", ".join(schema.__dataclass_fields__)
    return f"bad configuration: {key} is not a setting of {section}; its keys: {keys}"


def _typed(raw: DictConfig) -> tuple[DictConfig, list[str]]:
    """`raw` typed section by section, so that every section's unknown keys and bad types are reported."""
    problems = [
        f"{key}: not a configuration key" for key in raw if key not in DeepSpecConfig.__dataclass_fields__
    ]
    sections: dict[str, Any] = {key: raw.get(key) for key in ("run_dir", "data_dir")}
    schemas: dict[str, Any] = dict(SECTIONS)
    algo_name = OmegaConf.select(raw, "algo.name", default=None)
    if algo_name not in DRAFTS:
        problems.append(f"algo.name={algo_name!r}: expected one of {list(DRAFTS)}")
    else:
        schemas["algo"] = DRAFTS[algo_name].settings
    for key, schema in schemas.items():
        try:
            sections[key] = OmegaConf.merge(OmegaConf.structured(schema), raw.get(key) or {})
        except OmegaConfBaseException as err:
            known = (
                f" (its keys: {', '.join(schema.__dataclass_fields__)})" if "not in" in _message(err) else ""
            )
            problems.append(f"{key}.{_key_of(err)}: {_message(err)}{known}")
    if problems:
        return OmegaConf.create({}), problems
    root = OmegaConf.structured(DeepSpecConfig)
    for key, section in sections.items():  # already typed: assigned, not merged again
        root[key] = section
    return root, problems


def _key_of(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


def _message(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "msg", None) or err).splitlines()[0]


def _report(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"bad configuration: {problems[0]}"
    return f"bad configuration, {len(problems)} problems:\n  " + "\n  ".join(problems)


def _fill_derived(cfg: DictConfig) -> None:
    regen, target = cfg.regen, cfg.target
    if regen.api is None:  # vLLM is sent the token ids DeepSpec renders; other servers, messages
        regen.api = "chat" if regen.backend == "openai" else "completions"
    if regen.max_new_tokens is None:
        regen.max_new_tokens = target.max_new_tokens
    if regen.temperature is None:
        regen.temperature = target.temperature


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem a composed config shows without data or weights, each naming its key."""
    from deepspec.models.target import DTYPES
    from deepspec.tasks.cache.encoding import ENCODINGS

    t, r, s, tr, e, p = cfg.target, cfg.regen, cfg.storage, cfg.train, cfg.eval, cfg.prompts
    layer_ids = list(t.layer_ids)
    n_layers = t.num_hidden_layers
    settings = algo_settings(cfg)
    draft_limit = settings.max_draft_tokens  # tokens a round can draft (`set_num_draft_tokens`)

    def one_of(key: str, value: Any, choices) -> tuple[bool, str]:
        return value in choices, f"{key}={value!r}: expected one of {list(choices)}"

    def increasing(key: str, values, empty_ok: bool) -> tuple[bool, str]:
        values = list(values)
        fine = (empty_ok or bool(values)) and all(v >= 1 for v in values)
        fine = fine and all(b > a for a, b in zip(values, values[1:], strict=False))
        empty = ", or [] (off)" if empty_ok else ""
        return fine, f"{key}={values}: expected counts of at least 1 in increasing order{empty}"

    checks: list[tuple[bool, str]] = [
        # target
        one_of("target.dtype", t.dtype, DTYPES),
        one_of("eval.target_dtype", e.target_dtype, [None, *DTYPES]),
        (bool(layer_ids), "target.layer_ids is empty: the draft needs at least one target layer"),
        (
            all(b > a for a, b in zip(layer_ids, layer_ids[1:], strict=False))
            and min(layer_ids, default=0) >= 0,
            f"target.layer_ids={layer_ids}: expected layer indices in increasing order, from 0",
        ),
        (
            n_layers is None or max(layer_ids, default=0) < n_layers,
            f"target.layer_ids={layer_ids}: the target has {n_layers} layers (0..{(n_layers or 1) - 1})",
        ),
        (t.temperature >= 0, f"target.temperature={t.temperature}: expected 0 (greedy) or more"),
        (0 < t.top_p <= 1, f"target.top_p={t.top_p}: expected a value in (0, 1]"),
        (t.top_k >= 0, f"target.top_k={t.top_k}: expected 0 (off) or more"),
        (t.max_new_tokens >= 1, f"target.max_new_tokens={t.max_new_tokens}: expected a positive count"),
        # prompts
        (
            0 <= p.heldout_fraction < 1,
            f"prompts.heldout_fraction={p.heldout_fraction}: expected a value in [0, 1)",
        ),
        (
            p.max_samples is None or p.max_samples >= 1,
            f"prompts.max_samples={p.max_samples}: expected a positive count or null",
        ),
        # regen
        one_of("regen.backend", r.backend, REGEN_BACKENDS),
        one_of("regen.api", r.api, REGEN_APIS),
        (r.max_new_tokens >= 1, f"regen.max_new_tokens={r.max_new_tokens}: expected a positive count"),
        (r.temperature >= 0, f"regen.temperature={r.temperature}: expected 0 (greedy) or more"),
        *[
            (r[key] >= 1, f"regen.{key}={r[key]}: expected a positive count")
            for key in ("batch_size", "shard_size", "concurrency", "parallel_shards")
        ],
        (r.allow_failures >= 0, f"regen.allow_failures={r.allow_failures}: expected 0 or more"),
        (r.max_retries >= 0, f"regen.max_retries={r.max_retries}: expected 0 or more"),
        (
            r.backend != "openai" or bool(r.endpoints),
            "regen.backend=openai needs regen.endpoints=[https://HOST/v1, ...]",
        ),
        (
            r.backend != "file" or bool(r.answers_file),
            "regen.backend=file needs regen.answers_file=PATH.jsonl (answers the target already wrote)",
        ),
        # storage
        one_of("storage.mode", s.mode, STORAGE_MODES),
        one_of("storage.encoding", s.encoding, ENCODINGS),
        one_of("storage.task_runner", s.task_runner, TASK_RUNNERS),
        (
            s.task_runner == "dask" or not s.dask_address,
            f"storage.dask_address={s.dask_address!r} needs storage.task_runner=dask",
        ),
        (s.build_workers >= 1, f"storage.build_workers={s.build_workers}: need at least 1"),
        (s.samples_per_shard >= 1, f"storage.samples_per_shard={s.samples_per_shard}: need at least 1"),
        (s.max_length >= 2, f"storage.max_length={s.max_length}: expected at least 2 tokens"),
        # train
        one_of("train.precision", tr.precision, PRECISIONS),
        one_of("train.zero_stage", tr.zero_stage, (0, 1, 2, 3)),
        (tr.epochs >= 1, f"train.epochs={tr.epochs}: expected at least 1"),
        (tr.lr > 0, f"train.lr={tr.lr}: expected a positive learning rate"),
        (0 <= tr.warmup_ratio < 1, f"train.warmup_ratio={tr.warmup_ratio}: expected a value in [0, 1)"),
        (
            len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas),
            f"train.betas={list(tr.betas)}: expected AdamW's two betas, each in [0, 1)",
        ),
        *[
            (tr[key] >= 1, f"train.{key}={tr[key]}: expected at least 1")
            for key in ("micro_batch", "nproc_per_node", "nnodes", "log_every_steps", "save_every_steps")
        ],
        (tr.eval_every_steps >= 0, f"train.eval_every_steps={tr.eval_every_steps}: expected 0 (off) or more"),
        (
            tr.eval_every_steps == 0 or p.heldout_fraction > 0,
            f"train.eval_every_steps={tr.eval_every_steps} validates on held-out samples, and "
            "prompts.heldout_fraction=0 holds none out: set it above 0 (e.g. 0.05), or "
            "train.eval_every_steps=0",
        ),
        (
            tr.eval_samples is None or tr.eval_samples >= 1,
            f"train.eval_samples={tr.eval_samples}: expected a positive count, or null (all held out)",
        ),
        (
            tr.global_batch % max(1, tr.micro_batch * tr.nproc_per_node * tr.nnodes) == 0,
            f"train.global_batch={tr.global_batch} must be a multiple of train.micro_batch "
            f"({tr.micro_batch}) x ranks ({tr.nproc_per_node * tr.nnodes}: nproc_per_node x nnodes)",
        ),
        # eval
        (bool(e.benchmarks), "eval.benchmarks is empty"),
        (
            e.max_samples is None or e.max_samples >= 1,
            f"eval.max_samples={e.max_samples}: expected at least 1, or null (no common cap)",
        ),
        *[(n >= 1, f"eval.caps.{name}={n}: expected at least 1") for name, n in e.caps.items()],
        (
            0 <= e.confidence_threshold <= 1,
            f"eval.confidence_threshold={e.confidence_threshold}: expected a value in [0, 1] (0: off)",
        ),
        (
            e.confidence_threshold == 0 or bool(OmegaConf.select(cfg, "algo.confidence_head", default=False)),
            f"eval.confidence_threshold={e.confidence_threshold} needs a draft with a confidence head "
            f"(algo=dspark with algo.confidence_head=true); algo={cfg.algo.name} has none: set it to 0",
        ),
        (
            e.num_draft_tokens is None or 1 <= e.num_draft_tokens <= (draft_limit or e.num_draft_tokens),
            f"eval.num_draft_tokens={e.num_draft_tokens}: expected "
            + (
                "at least 1"
                if draft_limit is None
                else f"1 to {draft_limit} (a block of algo={cfg.algo.name})"
            )
            + ", or null (the draft's own)",
        ),
        (e.max_new_tokens >= 1, f"eval.max_new_tokens={e.max_new_tokens}: expected at least 1"),
        increasing("eval.serving.concurrency", e.serving.concurrency, empty_ok=True),
        increasing("eval.serving.profile_tokens", e.serving.profile_tokens, empty_ok=False),
        (
            e.serving.profile_context >= 1,
            f"eval.serving.profile_context={e.serving.profile_context}: expected at least 1",
        ),
        (e.serving.steps >= 1, f"eval.serving.steps={e.serving.steps}: expected at least 1"),
        (e.temperature >= 0, f"eval.temperature={e.temperature}: expected 0 (greedy) or more"),
        # export
        one_of("export.draft", cfg.export.draft, EXPORT_DRAFTS),
        # release
        one_of("release.init", cfg.release.init, RELEASE_INITS),
        (
            cfg.release.init != "released" or cfg.release.dir is not None,
            "release.init=released trains on from the draft released in release.dir, which is null: "
            "set release.dir=PATH, or release.init=scratch",
        ),
        (cfg.release.margin >= 0, f"release.margin={cfg.release.margin}: expected 0 or more (macro tau)"),
        (
            re.fullmatch(r"[A-Za-z0-9_-]+", cfg.release.alias) is not None
            and cfg.release.alias != "latest"
            and re.fullmatch(r"v\d+", cfg.release.alias) is None,
            f"release.alias={cfg.release.alias!r}: expected letters, digits, '_' or '-', neither 'latest' "
            "nor v<number> (MLflow reserves them)",
        ),
    ]
    problems = [message for ok, message in checks if not ok]
    # the algorithm, against the target's layers (export layouts included: Eagle3's fc reads three)
    problems += settings.problems(layer_ids, n_layers)
    return problems


def algo_settings(cfg: DictConfig):
    """The `algo` section as an instance of its algorithm's settings class (`DraftSpec.settings`)."""
    schema = draft_spec(str(cfg.algo.name)).settings
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg.algo))


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections (or plain values holding them, at any depth), used to tell
    whether a stage's outputs are still valid and to name the data folders."""
    blob = json.dumps(parts, sort_keys=True, default=_plain).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return str(value)
