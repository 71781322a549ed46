"""Files the stages write and read on local disk: atomic writes, JSONL with file:line errors, sha256,
and the completion record that lets a re-run skip a stage.

A stage writes its outputs, then `mark_done` writes `_DONE.json` last (atomically) with the hash of the
config that produced them and whatever counts let the stage validate its outputs again (`read_done`).
Remote cache shards are written through fsspec instead (`tasks/cache/format.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deepspec.models.errors import DataError

log = logging.getLogger(__name__)

DONE_FILE = "_DONE.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, through a temporary file, fsynced, then renamed: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line. A line that is not JSON raises DataError naming
    `path:line`, or, with `on_error`, is handed to it as that message and skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"{path}:{number}: not valid JSON ({err.msg})"
                if on_error is None:
                    raise DataError(message) from err
                on_error(message)
                continue
            yield number, value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def mark_done(stage_dir: Path, config_hash: str, **info: Any) -> None:
    atomic_write_text(stage_dir / DONE_FILE, json.dumps({"config_hash": config_hash, **info}, indent=2))


def read_done(stage_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The completion record if the stage finished with this config, else None (and why, in the log)."""
    path = stage_dir / DONE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("config_hash") != config_hash:
        log.info("%s was made with another configuration; redoing the stage", stage_dir)
        return None
    return record


def clear_done(stage_dir: Path) -> None:
    (stage_dir / DONE_FILE).unlink(missing_ok=True)
