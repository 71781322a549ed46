"""How a stage marks its outputs complete, so that a re-run can skip it after checking them.

A stage writes its outputs, then `mark_done` writes `_DONE.json` last (atomically) with the hash of the
config that produced them and whatever counts let `check_done` validate the outputs again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE_FILE = "_DONE.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
