"""Every `deepspec ...` command the docs tell a user to type (the README, the comments of conf/ files, the
docstrings of the stage modules) parses and composes as written: a renamed key or preset fails here,
naming the file and line. (The pipeline tests run such commands end to end on stories260k.)"""

from __future__ import annotations

import pytest
from support.documented import documented_commands

from deepspec.flows.cli import build_parser
from deepspec.tasks.config import compose

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
