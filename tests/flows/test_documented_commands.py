"""Every `deepspec ...` command the docs tell a user to type (the README, the comments of conf/ files, the
docstrings of the stage modules) parses and composes as written: a renamed key or preset fails here,
naming the file and line. (The pipeline tests run such commands end to end on stories260k.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deepspec.flows.cli import build_parser
from deepspec.tasks.config import compose

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


COMMANDS = documented_commands()


def test_the_docs_hold_commands_to_check():
    where = {place.split(":")[0] for place, _ in COMMANDS}
    assert len(COMMANDS) > 30 and "README.md" in where and "conf/config.yaml" in where


@pytest.mark.parametrize("place, argv", COMMANDS, ids=[place for place, _ in COMMANDS])
def test_documented_command_composes(place, argv):
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0, place
        return
    args = build_parser().parse_args(argv)
    if args.command in ("convert-eval", "report"):  # no config; see test_eval_sources.py, test_report.py
        return
    compose(args.overrides, args.config_name)
