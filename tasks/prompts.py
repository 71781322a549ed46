"""Stage `prompts`: gather the training prompts a target will answer.

    deepspec prompts                                            # mlabonne/open-perfectblend (hub)
    deepspec prompts prompts.source=builtin                     # the 48 built-in prompts, offline
    deepspec prompts prompts.source=data/my_prompts.jsonl prompts.heldout_fraction=0.05
    deepspec prompts prompts.source=HuggingFaceH4/ultrachat_200k prompts.split=train_sft \
        prompts.max_samples=20000

A source is "builtin", a local file (`.jsonl`; `.json`, `.parquet` or `.csv` read by `datasets`), or
a Hugging Face dataset id (or a local dataset folder) read with `datasets.load_dataset`. Rows hold
`conversations` or `messages`, a list of turns with `role` or `from` and `content` or `value` (a CSV
cell holds that list as JSON text); ShareGPT roles (human, gpt, chatgpt, ...) are renamed to user /
assistant, and system turns are kept.

Every row is checked. A malformed row does not stop the stage: it goes to `rejects.jsonl` with where
it came from (`source` and `line`, or `source`, `split` and `index`), the `reason`, naming the field,
and the `raw` row; the stage goes on with the good rows and fails only when none remains.

Output, in `<data_dir>/prompts/<source>-<key>/` (named by the prompts settings; `tasks/paths.py`):
`prompts.jsonl` and `heldout.jsonl`, one row a line,
`{"id", "source", "category", "conversations"}`, keeping the system and user turns: the assistant's
answers are dropped, since the regenerate stage writes the target's own. Rows with the same turns are
kept once; `max_samples` keeps the first N distinct rows in source order; a row is held out when a
hash of its turns, salted with `prompts.seed`, falls under `heldout_fraction`, so the split does not
depend on row order or on `max_samples`, and another seed draws another split. The counts (`rows`,
`heldout`, `rejected`, `duplicates`) are logged and sent to MLflow. `_DONE.json` is written last.

A local source file counts by its bytes (`prompts_digest`): when it changes, e.g. grows by the rows a
scheduled retraining picks up, the stage runs again into the same folder, and rows appended to the
source come after the earlier ones, so the regenerate and cache stages answer and build only the new.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.models.errors import DataError
from deepspec.tasks import artifacts, tracking
from deepspec.tasks.config import config_hash
from deepspec.tasks.files import (
    atomic_write_text,
    clear_done,
    mark_done,
    read_done,
    read_jsonl,
    sha256_file,
)
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import PromptsResult, from_record, to_record

log = logging.getLogger(__name__)

BUILTIN = Path(__file__).parent / "data" / "builtin_prompts.jsonl"
ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
DATA_FILE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}  # read by `datasets`
HELDOUT_SALT = "deepspec-heldout-v1"
MAX_LISTED_ERRORS = 20


def load_conversations(source: str, split: str = "train", rejects: list[dict] | None = None) -> list[dict]:
    """Rows `{"id", "source", "category", "conversations": [{"role", "content"}, ...]}`, all checked.

    `source` is "builtin", a local `.jsonl`, `.json`, `.parquet` or `.csv` file, or a dataset for
    `datasets.load_dataset` (a hub id or a local dataset folder); `split` applies to the last only.
    Each malformed row is appended to `rejects` (`{source, line | split, index, reason, raw}`) when a
    list is given; without one, malformed rows fail, all listed at once. A source without any row fails.
    """
    if source == "builtin":
        return _from_jsonl(BUILTIN, "builtin", rejects)
    path = Path(source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError(f"prompts.source={source!r}: no such file")
        return _from_jsonl(path, path.stem, rejects)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"prompts.source={source!r}: unsupported file type {path.suffix!r}; expected .jsonl, "
                f"{', '.join(DATA_FILE_BUILDERS)}, a dataset folder or a hub dataset id"
            )
        return _from_dataset(source, "train", rejects, builder=builder, default_source=path.stem)
    return _from_dataset(source, split, rejects)


def prepare_prompts(cfg: DictConfig) -> PromptsResult:
    """Write `prompts.jsonl`, `heldout.jsonl` and `rejects.jsonl` to the run's prompts folder
    (`run_paths(cfg).prompts_dir`, named by the prompts settings); skipped when they are there."""
    paths = run_paths(cfg)
    stage_dir = paths.prompts_dir
    fraction, limit = float(cfg.prompts.heldout_fraction), cfg.prompts.max_samples
    source, seed = str(cfg.prompts.source), int(cfg.prompts.seed)
    outputs = {"rows": paths.prompts, "heldout": paths.heldout, "rejected": paths.rejects}
    digest = prompts_digest(cfg)
    done = read_done(stage_dir, digest)
    if done and all(_count_lines(path) == done.get(count) for count, path in outputs.items()):
        log.info("prompts: %s already holds %d rows; skipping", outputs["rows"], done["rows"])
        return from_record(PromptsResult, done, skipped=True)

    rejects: list[dict] = []
    rows = load_conversations(source, str(cfg.prompts.split), rejects)
    clear_done(stage_dir)
    atomic_write_text(outputs["rejected"], _jsonl(rejects))
    if rejects:
        log.warning(
            "prompts: %d malformed rows set aside in %s, each with its reason; the first: %s",
            len(rejects),
            outputs["rejected"],
            _describe(rejects[0]),
        )
    if not rows:
        raise DataError(
            f"prompts.source={source!r}: none of its {len(rejects)} rows is usable; each is listed with "
            f"its reason in {outputs['rejected']} (the first: {_describe(rejects[0])})"
        )
    seen: set[str] = set()
    kept: list[dict] = []
    duplicates = 0
    for row in rows:
        turns = [t for t in row["conversations"] if t["role"] != "assistant"]
        key = prompt_key(row["conversations"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append({**row, "conversations": turns, "_key": key})
        if limit is not None and len(kept) >= int(limit):
            break
    _unique_ids(kept)
    train, heldout = [], []
    for row in kept:
        (heldout if _unit_hash(row.pop("_key"), seed) < fraction else train).append(row)

    atomic_write_text(outputs["rows"], _jsonl(train))
    atomic_write_text(outputs["heldout"], _jsonl(heldout))
    counts = {"rows": len(train), "heldout": len(heldout), "rejected": len(rejects), "duplicates": duplicates}
    result = PromptsResult(path=str(outputs["rows"]), source=source, **counts)
    mark_done(stage_dir, digest, **to_record(result))
    log.info(
        "prompts: %d rows, %d held out, %d malformed rows rejected, %d duplicates dropped -> %s",
        *counts.values(),
        outputs["rows"],
    )
    tracking.log_metrics(cfg, {f"prompts/{name}": value for name, value in counts.items()})
    return result


def prompts_digest(cfg: DictConfig) -> str:
    """What the prompts files depend on: the prompts settings and, for a local file, its bytes. A source
    file that grew (a scheduled retraining's new prompts) is read again into the same folder, keeping
    its rows in source order, so the later stages find the earlier rows unchanged and do only the new."""
    source = Path(str(cfg.prompts.source))
    if cfg.prompts.source == "builtin" or not source.is_file():
        return config_hash(cfg.prompts)  # a hub dataset is named by its id (and split)
    return config_hash(cfg.prompts, {"source_sha256": sha256_file(source)})


def _from_jsonl(path: Path, default_source: str, rejects: list[dict] | None) -> list[dict]:
    rows: list[dict] = []
    bad: list[dict] = []

    def unreadable(number: int, reason: str, text: str) -> None:
        bad.append({"source": str(path), "line": number, "reason": reason, "raw": text})

    for number, raw in read_jsonl(path, on_error=unreadable):
        where = {"source": str(path), "line": number}
        _collect(rows, bad, raw, where, f"{default_source}-{number:06d}", default_source)
    _settle(rows, bad, rejects, str(path))
    return rows


def _from_dataset(
    source: str,
    split: str,
    rejects: list[dict] | None,
    builder: str | None = None,
    default_source: str | None = None,
) -> list[dict]:
    import datasets

    try:
        if builder is None:
            dataset = datasets.load_dataset(source, split=split)
        else:
            dataset = datasets.load_dataset(builder, data_files=source, split=split)
    except Exception as err:  # the hub client raises many kinds; all mean the same to the user here
        hint = (
            "If the Hugging Face hub is unreachable from this machine, pass a local JSONL file instead: "
            "prompts.source=/path/to/prompts.jsonl"
            if builder is None
            else "Check that the file holds one conversation a row."
        )
        raise DataError(
            f"prompts.source={source!r} (split {split!r}): cannot load the dataset "
            f"({type(err).__name__}: {err}). {hint}"
        ) from err
    rows: list[dict] = []
    bad: list[dict] = []
    label = default_source or source
    for index, raw in enumerate(dataset):
        where = {"source": source, "split": split, "index": index}
        _collect(rows, bad, raw, where, f"{label}-{index:06d}", label)
    _settle(rows, bad, rejects, f"prompts.source={source!r} (split {split!r})")
    return rows


def _collect(rows: list, bad: list, raw: Any, where: dict, default_id: str, default_source: str) -> None:
    try:
        rows.append(normalize_row(raw, default_id, default_source))
    except DataError as err:
        bad.append({**where, "reason": str(err), "raw": raw})


def _settle(rows: list[dict], bad: list[dict], rejects: list[dict] | None, origin: str) -> None:
    """Hand the malformed rows to `rejects`, or fail listing them when there is no such list."""
    if not rows and not bad:
        raise DataError(f"{origin}: no rows")
    if rejects is not None:
        rejects.extend(bad)
    elif bad:
        listed = [_describe(b) for b in bad[:MAX_LISTED_ERRORS]]
        more = len(bad) - len(listed)
        tail = f"\n... and {more} more" if more else ""
        head = listed[0] if len(bad) == 1 else f"{len(bad)} bad rows in {origin}:\n" + "\n".join(listed)
        raise DataError(head + tail)


def _describe(reject: dict) -> str:
    """`<file>:N: reason` or `<dataset>[split] row N: reason`."""
    if "line" in reject:
        return f"{reject['source']}:{reject['line']}: {reject['reason']}"
    return f"{reject['source']}[{reject['split']}] row {reject['index']}: {reject['reason']}"


def prompt_key(conversations: list[dict]) -> str:
    """What identifies a prompt: its system and user turns, in order (assistant turns left out)."""
    turns = [[t["role"], t["content"]] for t in conversations if t["role"] != "assistant"]
    return json.dumps(turns, ensure_ascii=False)


def normalize_row(raw: Any, default_id: str, default_source: str) -> dict:
    """One checked, normalized row; a DataError names the field."""
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}")
    name = "conversations" if raw.get("conversations") is not None else "messages"
    turns = raw.get(name)
    if isinstance(turns, str):  # a CSV cell holds the turns as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise DataError(
                f"field '{name}': a string, but not a JSON list of turns ({err.msg} at column {err.colno})"
            ) from None
    if not isinstance(turns, list) or not turns:
        got = "nothing" if turns is None else repr(turns)[:60]
        raise DataError(
            f"field 'conversations' (or 'messages'): expected a non-empty list of turns, got {got}"
        )
    conversations = []
    for n, turn in enumerate(turns):
        field = f"{name}[{n}]"
        if not isinstance(turn, dict):
            raise DataError(f"field '{field}': expected an object with role and content, got {turn!r}"[:300])
        # Arrow-backed datasets give every turn all keys seen in the column, unused ones as None.
        role_key = "role" if turn.get("role") is not None else "from"
        role = turn.get(role_key)
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
            raise DataError(
                f"field '{field}.{role_key}': expected one of user/assistant/system, got {role!r} "
                f"(also accepted: {', '.join(k for k, v in ROLE_NAMES.items() if k != v)})"
            )
        content_key = "content" if turn.get("content") is not None else "value"
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"field '{field}.{content_key}': expected a string, got {type(content).__name__}")
        conversations.append({"role": ROLE_NAMES[role.lower()], "content": content})
    if not any(t["role"] == "user" for t in conversations):
        raise DataError(f"field '{name}': the conversation has no user turn")
    row = {
        "id": _or(raw.get("id"), default_id),
        "source": _or(raw.get("source"), default_source),
        "category": _or(raw.get("category"), "unknown"),
    }
    for key in ("id", "source", "category"):
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DataError(f"field '{key}': expected a string, got {type(value).__name__}")
        row[key] = str(value)
    row["conversations"] = conversations
    return row


def _or(value: Any, default: str) -> Any:
    return default if value is None else value


def _unique_ids(rows: list[dict]) -> None:
    """Later rows that repeat an id get `#2`, `#3`, ... so ids key the rows downstream."""
    counts: dict[str, int] = {}
    renamed = 0
    for row in rows:
        n = counts[row["id"]] = counts.get(row["id"], 0) + 1
        if n > 1:
            row["id"] = f"{row['id']}#{n}"
            renamed += 1
    if renamed:
        log.warning("prompts: %d rows repeat an earlier id; suffixed them with #2, #3, ...", renamed)


def _unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by the row's turns and the seed, so the split does not depend on row order."""
    digest = hashlib.sha256(f"{HELDOUT_SALT}\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@task(name="prompts", cache_policy=NO_CACHE)  # stages validate their own outputs
def prompts_task(cfg: DictConfig) -> PromptsResult:
    result = prepare_prompts(cfg)
    artifacts.publish(cfg, "prompts", result)
    return result
