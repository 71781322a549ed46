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
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from deepspec.models.errors import DataError

log = logging.getLogger(__name__)

DONE_FILE = "_DONE.json"
T = TypeVar("T")


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


def read_jsonl(
    path: Path, on_error: Callable[[int, str, str], None] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line. A line that is not JSON raises DataError naming
    `path:line`, or, with `on_error`, is handed to it as (line number, reason, text) and skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")  # without it, a cut-off line's error points past its end
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                reason = f"not valid JSON ({err.msg} at column {err.colno})"
                if on_error is None:
                    raise DataError(f"{path}:{number}: {reason}") from err
                on_error(number, reason, text)
                continue
            yield number, value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_read_once_lock = threading.Lock()
_read_once: dict[Callable, tuple[tuple, Any, str]] = {}  # parser -> (file identity, parsed, sha256)


def read_once(path: Path, parse: Callable[[Path], T]) -> tuple[T, str]:
    """`parse(path)` and the file's sha256, computed once per process while the file stays unchanged
    (same path, size and modification time), and at most one file per parser. Shard tasks running in
    threads of one process share it; the lock makes the first of them do the reading."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _read_once_lock:
        held = _read_once.get(parse)
        if held is None or held[0] != key:
            held = (key, parse(Path(path)), sha256_file(path))
            _read_once[parse] = held
        return held[1], held[2]


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
