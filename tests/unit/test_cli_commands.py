"""The CLI builds only the parser a command needs: the table that says which adder registers which
command must match what the adders really build, and a command's lone parser must be the whole one's."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cowbackup.cli.main import COMMANDS, build_parser, command_of


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _shape(parser: argparse.ArgumentParser) -> list[tuple[object, ...]]:
    return [
        (tuple(a.option_strings), a.dest, a.default, a.nargs, a.choices is not None, a.help)
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction)
    ]


def test_table_names_every_command_of_the_whole_parser() -> None:
    listed = {c for _, commands in COMMANDS for c in commands}
    assert listed == set(_commands(build_parser()))


@pytest.mark.parametrize("command", sorted({c for _, commands in COMMANDS for c in commands}))
def test_a_command_alone_parses_as_in_the_whole_parser(command: str) -> None:
    whole = _commands(build_parser())[command]
    alone = _commands(build_parser(command))[command]
    assert _shape(alone) == _shape(whole)
    assert alone.format_help() == whole.format_help()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["backup", "--qmp", "s", "disk"], "backup"),
        (["-v", "--debug", "-vv", "restore", "--repo", "r"], "restore"),
        (["repo", "init", "x"], "repo"),
        ([], None),
        (["-h"], None),
        (["-vh", "backup"], None),
        (["--help"], None),
        (["--version"], None),
        (["nosuchcommand"], None),
        (["--", "backup"], None),
    ],
)
def test_command_of(argv: list[str], expected: str | None) -> None:
    assert command_of(argv) == expected


def test_backup_loads_neither_the_daemon_nor_nbd_nor_rich() -> None:
    """``backup --qmp --repo`` runs nightly: its start-up is the interpreter and what it really uses."""
    code = (
        "import sys\n"
        "from cowbackup.cli.main import build_parser\n"
        "build_parser('backup')\n"
        "import cowbackup.cli.live_repo\n"
        "heavy = ['cowbackup.daemon', 'cowbackup.nbd.client_conn', 'cowbackup.block.drivers.qcow2', 'rich',\n"
        "         'cowbackup.repo.writer', 'cowbackup.jobs', 'cowbackup.cli.serve', 'boto3']\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
