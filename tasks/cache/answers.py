"""The regenerated answers as training sees them: rows read with their line numbers, rendered to token
ids and a loss mask exactly one way, so the cache build and online training train on the same tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from deepspec.models.chat import render_conversation
from deepspec.models.errors import DataError
from deepspec.tasks.files import read_jsonl
from deepspec.tasks.paths import rendering


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Rows {id, line, heldout, conversations: [{role, content}, ...]}; DataError naming the line and
    field. `heldout` marks the answers to held-out prompts: validation reads them, training never."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the regenerate stage first")
    rows = []
    for line, row in read_jsonl(path):
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in turns
        ):
            raise DataError(
                f"{path}:{line}: field 'conversations' must be a list of {{role, content}} strings"
            )
        rows.append(
            {
                "id": str(row.get("id", f"line-{line}")),
                "line": line,
                "heldout": row.get("heldout") is True,
                "conversations": turns,
            }
        )
    return rows


def render_options(cfg: DictConfig) -> dict[str, Any]:
    """The `render_conversation` arguments: the target's rendering, cut at the cache's length."""
    return {**rendering(cfg), "max_length": int(cfg.storage.max_length)}


def render(
    tokenizer, row: dict[str, Any], options: dict[str, Any], path: Path
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one answers row; a DataError names `path`, its line and id."""
    try:
        rendered = render_conversation(tokenizer, row["conversations"], **options)
    except DataError as err:
        raise DataError(f"{path}:{row['line']} (id {row['id']}): {err}") from err
    return rendered.input_ids, rendered.loss_mask
