"""How large a target cache will be, per token and in total, before anything is built.

    deepspec estimate-cache target=qwen3_4b                 # tokens from the run's answers.jsonl
    deepspec estimate-cache target=qwen3_4b --tokens 1.2e9  # or given

A DeepSpec cache stores per token the input id (int32, 4 bytes), the loss mask (1 bit, packed) and the
features of the captured layers in the chosen encoding (`encoding.py`); the draft learns from the
target's own answer tokens, so no teacher distribution or final hidden state is stored. Upstream
(deepseek-ai/DeepSpec) stores int32 ids, a uint8 attention mask, a uint8 loss mask and bf16 features of
the L captured layers plus the final hidden state: 6 + 2 d (L + 1) bytes, 30,726 for Qwen3-4B
(d = 2560, L = 5). Arrow framing adds about `SAMPLE_OVERHEAD_BYTES` a sample and `SHARD_OVERHEAD_BYTES`
a shard, counted in totals when the number of samples is known (under 0.1% for samples of 1,000 tokens).

The target's hidden size comes from `target.hidden_size`, else from its checkpoint's config. Tokens are
counted by rendering every answer (up to `MAX_ROWS_TOKENIZED`, evenly spaced, then extrapolated) with the
target's tokenizer and chat template exactly as the cache stage does; without a loadable tokenizer they
are estimated at `CHARS_PER_TOKEN` characters a token, and the result says so.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig

from deepspec.models.errors import ConfigError
from deepspec.tasks.cache.answers import read_answers, render, render_options
from deepspec.tasks.cache.encoding import ENCODINGS, get_encoding
from deepspec.tasks.paths import run_paths

log = logging.getLogger(__name__)

ID_BYTES = 4  # int32 input ids
MASK_BYTES = 1 / 8  # the loss mask, packed 8 tokens to a byte
SAMPLE_OVERHEAD_BYTES = 600  # Arrow record batch framing, sample id, offsets, padding (measured: 520-530)
SHARD_OVERHEAD_BYTES = 1300  # Arrow file header, schema with its metadata, footer (measured: 1,270-1,300)
CHARS_PER_TOKEN = 4
MAX_ROWS_TOKENIZED = 20_000


def upstream_bytes_per_token(hidden_size: int, num_layers: int) -> int:
    """Upstream's layout: int32 id, uint8 attention and loss masks, bf16 features of L layers + final."""
    return 4 + 1 + 1 + 2 * hidden_size * (num_layers + 1)


def target_geometry(cfg: DictConfig) -> tuple[int, int | None]:
    """(hidden_size, num_hidden_layers) from the target preset, else from the checkpoint's config."""
    hidden, layers = cfg.target.hidden_size, cfg.target.num_hidden_layers
    if hidden is None:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                str(cfg.target.path), gguf_file=cfg.target.gguf_file, revision=cfg.target.revision
            ).get_text_config()
        except Exception as err:  # missing directory, no network, unknown architecture, ...
            raise ConfigError(
                f"target.hidden_size is not set and the config of target.path={cfg.target.path!r} cannot be "
                f"loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); set "
                "target.hidden_size (and target.num_hidden_layers) in the preset or as an override"
            ) from err
        hidden = int(config.hidden_size)
        layers = layers if layers is not None else int(config.num_hidden_layers)
    layer_ids = [int(i) for i in cfg.target.layer_ids]
    if not layer_ids:
        raise ConfigError("target.layer_ids is empty: capture at least one layer")
    if layers is not None and not all(0 <= i < layers for i in layer_ids):
        raise ConfigError(f"target.layer_ids={layer_ids}: each must be in [0, {layers - 1}] for this target")
    return int(hidden), (int(layers) if layers is not None else None)


def estimate(cfg: DictConfig, tokens: int | None = None, samples: int | None = None) -> dict[str, Any]:
    """Bytes per token of every encoding and of upstream's layout, ratios to upstream, and totals.

    Totals need `tokens`; with `samples` they include the Arrow framing of samples and shards.
    """
    get_encoding(cfg.storage.encoding)  # an unknown configured encoding fails here, listing the choices
    hidden, layers = target_geometry(cfg)
    captured = len(cfg.target.layer_ids)
    feature_dim = captured * hidden
    upstream = upstream_bytes_per_token(hidden, captured)

    framing = 0
    if samples:
        shards = math.ceil(samples / max(1, int(cfg.storage.samples_per_shard)))
        framing = samples * SAMPLE_OVERHEAD_BYTES + shards * SHARD_OVERHEAD_BYTES

    def row(per_token: float, features: float, ours: bool = True) -> dict[str, Any]:
        total = None
        if tokens is not None:
            total = math.ceil(tokens * per_token + framing * ours)
        return {
            "bytes_per_token": per_token,
            "features": features,
            "ratio": per_token / upstream,
            "total_bytes": total,
        }

    layouts = {"upstream": row(upstream, 2 * hidden * (captured + 1), ours=False)}
    for name in ENCODINGS:
        features = get_encoding(name, cfg.target.layer_ids).bytes_per_token(feature_dim)
        layouts[name] = row(ID_BYTES + MASK_BYTES + features, features)
    return {
        "target": str(cfg.target.name),
        "target_path": str(cfg.target.path),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_ids": [int(i) for i in cfg.target.layer_ids],
        "feature_dim": feature_dim,
        "encoding": str(cfg.storage.encoding),
        "tokens": tokens,
        "samples": samples,
        "layouts": layouts,
    }


# ----------------------------------------------------------------------------------------------------
# Counting tokens


def count_tokens(cfg: DictConfig, max_rows: int = MAX_ROWS_TOKENIZED) -> dict[str, Any] | None:
    """{tokens, samples, how} for the run's answers (`run_paths(cfg).answers`), or None when they do not
    exist yet."""
    path = run_paths(cfg).answers
    if not path.is_file():
        return None
    rows = read_answers(path)
    max_length = int(cfg.storage.max_length)
    if not rows:
        return {"tokens": 0, "samples": 0, "how": f"{path} is empty"}
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(cfg.target.path), gguf_file=cfg.target.gguf_file, revision=cfg.target.revision
        )
    except Exception as err:  # no network, no such directory, ...
        chars = [sum(len(t["content"]) for t in row["conversations"]) for row in rows]
        tokens = sum(min(max_length, math.ceil(c / CHARS_PER_TOKEN)) for c in chars)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return {
            "tokens": tokens,
            "samples": len(rows),
            "how": f"estimated at {CHARS_PER_TOKEN} characters a token from {path}: the target tokenizer "
            f"could not be loaded ({reason[:200]})",
        }
    step = max(1, math.ceil(len(rows) / max_rows))
    chosen = rows[::step]
    options = render_options(cfg)
    tokens = kept = 0
    for row in chosen:
        input_ids, loss_mask = render(tokenizer, row, options, path)
        if any(loss_mask):  # the cache stage drops conversations with nothing to learn
            tokens += len(input_ids)
            kept += 1
    how = f"{path}, rendered with the target tokenizer"
    if step > 1:
        how += f" (1 conversation in {step} of {len(rows):,}, extrapolated)"
        tokens, kept = round(tokens * len(rows) / len(chosen)), round(kept * len(rows) / len(chosen))
    return {"tokens": tokens, "samples": kept, "how": how}


# ----------------------------------------------------------------------------------------------------
# The table


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _number(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.3f}"


def format_table(result: dict[str, Any], how: str | None = None) -> str:
    """The estimate as the lines `deepspec estimate-cache` prints."""
    layers = result["num_hidden_layers"]
    lines = [
        f"target {result['target']} ({result['target_path']}): hidden size {result['hidden_size']:,}"
        + (f", {layers} layers" if layers is not None else "")
        + f"; {len(result['layer_ids'])} captured layers {result['layer_ids']} = "
        f"{result['feature_dim']:,} features a token",
        f"tokens: {result['tokens']:,}" + (f" ({how})" if how else "")
        if result["tokens"] is not None
        else "tokens: unknown (no answers for this run yet; pass --tokens N for totals)",
        f"DeepSpec stores per token: input id {ID_BYTES} B (int32), loss mask {MASK_BYTES} B (1 bit), "
        "features in the encoding below",
        f"upstream: 6 + 2 d (L + 1) = 6 + 2 x {result['hidden_size']:,} x ({len(result['layer_ids'])} + 1) "
        "(int32 id, uint8 attention and loss masks, bf16 features of L layers and the final hidden state)",
        "",
        f"{'layout':<16}{'bytes/token':>14}{'features':>14}{'x upstream':>12}{'total':>14}",
    ]
    for name, row in result["layouts"].items():
        total = human_bytes(row["total_bytes"]) if row["total_bytes"] is not None else "-"
        mark = " *" if name == result["encoding"] else ""
        lines.append(
            f"{name:<16}{_number(row['bytes_per_token']):>14}{_number(row['features']):>14}"
            f"{row['ratio']:>12.3f}{total:>14}{mark}"
        )
    lines.append(f"* storage.encoding={result['encoding']} (choose with storage.encoding=NAME)")
    if result["tokens"] is not None:
        framing = (
            f"including Arrow framing ({SAMPLE_OVERHEAD_BYTES} B for each of {result['samples']:,} samples, "
            f"{SHARD_OVERHEAD_BYTES:,} B a shard)"
            if result["samples"]
            else f"plus about {SAMPLE_OVERHEAD_BYTES} B of Arrow framing per sample"
        )
        lines.append(f"totals in decimal units, {framing}")
    return "\n".join(lines)


def estimate_cache(cfg: DictConfig, tokens: int | None = None) -> str:
    """What `deepspec estimate-cache` prints: tokens given, else counted from the run's answers."""
    how, samples = ("--tokens", None) if tokens is not None else (None, None)
    if tokens is None:
        counted = count_tokens(cfg)
        if counted is not None:
            tokens, samples, how = counted["tokens"], counted["samples"], counted["how"]
    return format_table(estimate(cfg, tokens, samples), how)
