"""Stage `regenerate`: the target writes its own answers to the prompts.

    deepspec regenerate                                          # the embedded SmolLM2 target, on CPU
    deepspec regenerate target=stories260k target.path=../shared/assets/models/stories260k \
        regen.max_new_tokens=32

A draft model must learn the target's distribution, so the assistant turns it trains on are sampled
from the target itself, with the target preset's sampling settings (`regen.temperature` and
`regen.max_new_tokens` override them; temperature 0 is greedy). Multi-turn prompts are answered turn
by turn: the answer to turn 1 becomes part of the prompt for turn 2. Prompts are rendered by
`deepspec.models.chat.render_prompt`, the same rendering the cache stage trains on, and generation
stops at eos or at the chat template's end-of-turn token.

Backend `hf`: in-process `model.generate`, batches of `regen.batch_size` rows in input order, left
padded. Each batch is seeded with `SEED + batch index`, so a batch samples the same answers whether it
runs in one go or after a restart.

Output: `<run_dir>/regen/answers.jsonl`, one row a line in input order: `{"id", "source", "category",
"conversations", "finish_reason", "completion_tokens"}`. `finish_reason` is "length" when any turn was
cut at `max_new_tokens` (or its prompt did not fit the model's context), else "stop";
`completion_tokens` sums the turns, stop tokens included. A prompt longer than the model's context
is left unanswered (a warning names the row) and ends the row. Each batch is appended and flushed as it
finishes, so a crash loses at most one batch: a re-run keeps the complete batches already written
(`_PARTIAL.json` records which configuration wrote them) and continues after them. `_DONE.json` is
written last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prefect import task
from tqdm import tqdm

from deepspec.models.chat import end_of_turn_ids, render_prompt
from deepspec.models.errors import ConfigError, DataError
from deepspec.models.target import load_target
from deepspec.tasks import tracking
from deepspec.tasks.config import config_hash, run_path
from deepspec.tasks.stage_io import atomic_write_text, clear_done, mark_done, read_done

log = logging.getLogger(__name__)

BACKENDS = ("hf",)
SEED = 0
PARTIAL_FILE = "_PARTIAL.json"


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,  # 0 turns top-k off; None would mean transformers' default of 50
        }


def regenerate(cfg: DictConfig) -> dict[str, Any]:
    """Answer every prompt in `<run_dir>/prompts/prompts.jsonl` with the target; returns the counts."""
    backend = str(cfg.regen.backend)
    if backend not in BACKENDS:
        raise ConfigError(
            f"regen.backend={backend!r} is not available in this release (the vllm and openai backends "
            f"come in a later one); available: {', '.join(BACKENDS)}"
        )
    sampling = _sampling(cfg)
    batch_size = int(cfg.regen.batch_size)
    if batch_size < 1:
        raise ConfigError(f"regen.batch_size={batch_size}: expected a positive count")
    prompts_path = run_path(cfg, "prompts", "prompts.jsonl")
    if not prompts_path.is_file():
        raise DataError(f"{prompts_path}: no such file; run the prompts stage first (deepspec prompts)")
    prompts = _read_jsonl(prompts_path)
    stage_dir = run_path(cfg, "regen")
    out_path = stage_dir / "answers.jsonl"
    digest = config_hash(cfg.target, cfg.regen)

    done = read_done(stage_dir, digest)
    if done and done.get("rows") == len(prompts) and _complete_ids(out_path) == [r["id"] for r in prompts]:
        log.info("regenerate: %s already holds %d answers; skipping", out_path, done["rows"])
        return {**{k: v for k, v in done.items() if k != "config_hash"}, "skipped": True}
    clear_done(stage_dir)
    answered = _resume(stage_dir, out_path, prompts, digest, batch_size)

    new_tokens, elapsed = 0, 0.0
    if len(answered) < len(prompts):
        new_tokens, elapsed = _answer_all(cfg, prompts, answered, out_path, sampling, batch_size)

    tokens_per_s = new_tokens / elapsed if elapsed > 0 else 0.0
    info = {
        "rows": len(answered),
        "output_tokens": sum(r["completion_tokens"] for r in answered),
        "truncated": sum(r["finish_reason"] == "length" for r in answered),
        "tokens_per_s": tokens_per_s,  # of this run's new answers; kept so a skipped re-run reports it
    }
    mark_done(stage_dir, digest, **info)
    log.info(
        "regenerate: %d answers, %d tokens (%d cut at max_new_tokens), %.1f tokens/s -> %s",
        info["rows"],
        info["output_tokens"],
        info["truncated"],
        tokens_per_s,
        out_path,
    )
    tracking.log_metrics(
        cfg,
        {
            "regen/rows": info["rows"],
            "regen/output_tokens": info["output_tokens"],
            "regen/tokens_per_s": tokens_per_s,
            "regen/truncated": info["truncated"],
        },
    )
    return {**info, "skipped": False}


def _answer_all(
    cfg: DictConfig,
    prompts: list[dict],
    answered: list[dict],
    out_path: Path,
    sampling: Sampling,
    batch_size: int,
) -> tuple[int, float]:
    """Answer the prompts after `answered`, appending each batch to `out_path` (and to `answered`)."""
    model, tokenizer = load_target(
        cfg.target.path, cfg.target.gguf_file, cfg.target.revision, cfg.target.dtype
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    render = {
        "use_chat_template": bool(cfg.target.use_chat_template),
        "chat_template_kwargs": OmegaConf.to_container(cfg.target.chat_template_kwargs, resolve=True) or None,
        "system_prompt": cfg.target.system_prompt,
    }
    stop_ids = end_of_turn_ids(
        tokenizer,
        use_chat_template=render["use_chat_template"],
        chat_template_kwargs=render["chat_template_kwargs"],
    )
    stop_ids += [i for i in _as_list(model.generation_config.eos_token_id) if i not in stop_ids]
    if not stop_ids:
        raise ConfigError(f"target.path={cfg.target.path!r}: the tokenizer has no eos or end-of-turn token")
    log.info(
        "regenerate: %d prompts (%d already answered), batch %d, %s, stop ids %s",
        len(prompts),
        len(answered),
        batch_size,
        sampling,
        stop_ids,
    )

    new_tokens, elapsed = 0, 0.0
    with (
        out_path.open("a", encoding="utf-8") as out,
        tqdm(total=len(prompts), initial=len(answered), unit="row", desc="regenerate") as bar,
    ):
        for start in range(len(answered), len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            torch.manual_seed(SEED + start // batch_size)
            began = time.perf_counter()
            rows = _answer_batch(model, tokenizer, batch, sampling, render, stop_ids, device)
            elapsed += time.perf_counter() - began
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            out.flush()
            os.fsync(out.fileno())
            answered += rows
            new_tokens += sum(r["completion_tokens"] for r in rows)
            bar.update(len(rows))

    return new_tokens, elapsed


def _sampling(cfg: DictConfig) -> Sampling:
    regen, target = cfg.regen, cfg.target
    sampling = Sampling(
        max_new_tokens=int(
            regen.max_new_tokens if regen.max_new_tokens is not None else target.max_new_tokens
        ),
        temperature=float(regen.temperature if regen.temperature is not None else target.temperature),
        top_p=float(target.top_p),
        top_k=int(target.top_k),
    )
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"regen.max_new_tokens={sampling.max_new_tokens}: expected a positive count")
    if sampling.temperature < 0:
        raise ConfigError(f"regen.temperature={sampling.temperature}: expected 0 (greedy) or more")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"target.top_p={sampling.top_p}: expected a value in (0, 1]")
    if sampling.top_k < 0:
        raise ConfigError(f"target.top_k={sampling.top_k}: expected 0 (off) or more")
    return sampling


@torch.no_grad()
def _answer_batch(
    model, tokenizer, batch: list[dict], sampling: Sampling, render: dict, stop_ids: list[int], device
) -> list[dict]:
    """Answer each row's user turns in order; the answer to turn k is in the prompt of turn k + 1."""
    rounds = [_rounds(row) for row in batch]
    conversations: list[list[dict]] = [[] for _ in batch]
    finish = ["stop"] * len(batch)
    tokens = [0] * len(batch)
    open_rows = set(range(len(batch)))
    limit = getattr(model.config, "max_position_embeddings", None)
    for turn in range(max(len(r) for r in rounds)):
        active, prompts = [], []
        for i in sorted(open_rows):
            if turn >= len(rounds[i]):
                continue
            conversations[i] += rounds[i][turn]
            ids = render_prompt(tokenizer, conversations[i], **render)
            if limit is not None and len(ids) >= limit:
                log.warning(
                    "regenerate: row %s turn %d: the prompt has %d tokens, the model's context %d; "
                    "not answering it or later turns",
                    batch[i]["id"],
                    turn + 1,
                    len(ids),
                    limit,
                )
                # The unanswered user turn stays: it has nothing to mask, and the row keeps its place.
                finish[i] = "length"
                open_rows.discard(i)
                continue
            active.append(i)
            prompts.append(ids)
        if not active:
            continue
        for i, new in zip(
            active, _generate(model, tokenizer, prompts, sampling, stop_ids, device), strict=True
        ):
            stop_at = next((k for k, t in enumerate(new) if t in stop_ids), None)
            kept = new if stop_at is None else new[:stop_at]
            conversations[i].append(
                {"role": "assistant", "content": tokenizer.decode(kept, skip_special_tokens=True)}
            )
            tokens[i] += len(new) if stop_at is None else stop_at + 1
            if stop_at is None:
                finish[i] = "length"
    return [
        {
            "id": row["id"],
            "source": row.get("source"),
            "category": row.get("category"),
            "conversations": conversations[i],
            "finish_reason": finish[i],
            "completion_tokens": tokens[i],
        }
        for i, row in enumerate(batch)
    ]


def _rounds(row: dict) -> list[list[dict]]:
    """The turns to add before each answer: any system turns, then one user turn. Old answers are dropped."""
    rounds, pending = [], []
    for turn in row["conversations"]:
        if turn["role"] == "assistant":
            continue
        pending.append({"role": turn["role"], "content": turn["content"]})
        if turn["role"] == "user":
            rounds.append(pending)
            pending = []
    return rounds


def _generate(
    model, tokenizer, prompts: list[list[int]], sampling: Sampling, stop_ids: list[int], device
) -> list[list[int]]:
    """New token ids for each prompt (left padded together), up to and including a stop token."""
    width = max(len(p) for p in prompts)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        eos_token_id=stop_ids,
        pad_token_id=pad,
        **sampling.generate_kwargs(),
    )
    return [row[width:].tolist() for row in out]


def _resume(stage_dir: Path, out_path: Path, prompts: list[dict], digest: str, batch_size: int) -> list[dict]:
    """The answers a previous run of this configuration committed, whole batches only.

    The file is cut to them; anything after (a partial batch, a partial line) is answered again.
    """
    partial = stage_dir / PARTIAL_FILE
    kept: list[tuple[dict, int]] = []
    if (
        out_path.is_file()
        and partial.is_file()
        and json.loads(partial.read_text()).get("config_hash") == digest
    ):
        for row, end in _complete_rows(out_path):
            if len(kept) >= len(prompts) or row.get("id") != prompts[len(kept)]["id"]:
                break
            kept.append((row, end))
        if len(kept) < len(prompts):  # a batch runs again whole, with its seed
            kept = kept[: len(kept) // batch_size * batch_size]
        if kept:
            log.info("regenerate: resuming after %d answers already in %s", len(kept), out_path)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with out_path.open("a+b") as f:
        f.truncate(kept[-1][1] if kept else 0)
    if not kept:
        atomic_write_text(partial, json.dumps({"config_hash": digest}))
    return [row for row, _ in kept]


def _complete_rows(path: Path) -> list[tuple[dict, int]]:
    """Rows of the complete lines of a JSONL file with the byte offset where each ends, stopping at a
    partial or unreadable line."""
    rows, end = [], 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append((json.loads(line), end + len(line)))
            except json.JSONDecodeError:
                break
            end += len(line)
    return rows


def _complete_ids(path: Path) -> list[str] | None:
    return [row.get("id") for row, _ in _complete_rows(path)] if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {number}: not valid JSON ({err.msg}); rerun the prompts stage"
                ) from err
    return rows


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


@task(name="regenerate")
def regenerate_task(cfg: DictConfig) -> dict[str, Any]:
    return regenerate(cfg)
