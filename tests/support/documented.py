"""Every `deepspec ...` command the docs tell a user to type: the README, the comments of conf/ files, the
docstrings of the stage modules and the deployments (`tests/flows/test_documented_commands.py` composes
them all; tests that run one as written find it here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["README.md", "conf/**/*.yaml", "tasks/**/*.py", "flows/*.py", "deployments/*.yaml"]
COMMAND = re.compile(r"^\s*(?:#\s*)?(deepspec\s.*)$")


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv after `deepspec`) of every documented command, continuation lines joined."""
    found = []
    for pattern in SOURCES:
        for path in sorted(REPO.glob(pattern)):
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                match = COMMAND.match(line)
                if match is None:
                    continue
                text, following = match.group(1), number
                while text.rstrip().endswith("\\"):  # a command continued on the next line
                    text = text.rstrip()[:-1] + " " + lines[following].lstrip("# ").strip()
                    following += 1
                for command in text.split(";"):
                    words = shlex.split(command, comments=True)
                    if words and words[0] == "deepspec":
                        found.append((f"{path.relative_to(REPO)}:{number}", words[1:]))
    return found
