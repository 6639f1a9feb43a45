"""``cowbackup``: the command-line entry point.

Subcommands live in their own modules; this one parses arguments, sets up logging and turns errors into
one line on stderr and an exit code (see :mod:`cowbackup.cli.errors`).  No traceback reaches the user
unless ``--debug`` is given.

A command imports only the modules that define it: ``cowbackup backup --qmp ... --repo ...`` runs every
night and should not pay for the daemon, the NBD server or the demo (:data:`COMMANDS`).  The whole parser
is built only for help and for a command nobody defines (the error lists them all).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cowbackup import __version__
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage + message and exits 2; keep that, but in our one-line style.
        self.print_usage(sys.stderr)
        sys.stderr.write(f"cowbackup: {message}\n")
        raise SystemExit(EXIT_USAGE)


# Each adder imports its module when called, so that a command loads only its own.


def _add_backup(sub: Any) -> None:
    from cowbackup.cli import backup

    backup.add_parser(sub)


def _add_bitmap(sub: Any) -> None:
    from cowbackup.cli import bitmap_cmd

    bitmap_cmd.add_parser(sub)


def _add_daemon(sub: Any) -> None:
    from cowbackup.cli import daemon_cmd

    daemon_cmd.add_parser(sub)


def _add_demo(sub: Any) -> None:
    from cowbackup.cli import demo

    demo.add_parser(sub)


def _add_live(sub: Any) -> None:
    from cowbackup.cli import live

    live.add_parsers(sub)


def _add_pull(sub: Any) -> None:
    from cowbackup.cli import pull

    pull.add_parser(sub)


def _add_repo(sub: Any) -> None:
    from cowbackup.cli import repo_cmd

    repo_cmd.add_parsers(sub)


def _add_restore(sub: Any) -> None:
    from cowbackup.cli import repo_backup

    repo_backup.add_restore_parser(sub)


def _add_serve(sub: Any) -> None:
    from cowbackup.cli import serve

    serve.add_parser(sub)


#: Who registers which commands, in the order help lists them; the second field names the commands
#: whose parsers an adder extends as well (``live`` adds the bitmap options to ``backup``'s).
#: tests/unit/test_cli_commands.py checks this table against the parsers the adders really build.
COMMANDS: tuple[tuple[Callable[[Any], None], tuple[str, ...]], ...] = (
    (_add_backup, ("backup",)),
    (_add_bitmap, ("bitmap",)),
    (_add_daemon, ("daemon",)),
    (_add_demo, ("demo",)),
    (_add_live, ("jobs", "job", "qmp", "backup")),
    (_add_pull, ("pull",)),
    (_add_repo, ("repo", "snapshots", "forget", "gc", "verify")),
    (_add_restore, ("restore",)),
    (_add_serve, ("serve",)),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or -- given ``command`` -- one that knows only what it needs (and
    the commands registered beside it)."""
    parser = _Parser(prog="cowbackup", description="Live, point-in-time block-device backups.")
    parser.add_argument("--version", action="version", version=f"cowbackup {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add, commands in COMMANDS:
        if command is None or command in commands:
            add(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if it surely is one: the first word that is not an option (the
    top-level options take no values).  None when the whole parser is wanted: help, ``--version``, an
    unknown command, ``--``."""
    known = {c for _, commands in COMMANDS for c in commands}
    for word in argv:
        if word == "--" or word.startswith(("--h", "--vers")):
            return None
        if word.startswith("-") and word != "-":
            if not word.startswith("--") and "h" in word:  # -h, or -vh
                return None
            continue
        return word if word in known else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(words))
    args = parser.parse_args(words)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from cowbackup.block.errors import BlockError
    from cowbackup.repo.errors import RepoError

    try:
        code: int = args.func(args)
        return code
    except CliError as err:
        sys.stderr.write(f"cowbackup: {err.message}\n")
        return err.exit_code
    except RepoError as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        return err.exit_code
    except BlockError as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        return EXIT_USAGE
    except OSError as err:
        sys.stderr.write(f"cowbackup: {err.strerror or err}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("cowbackup: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        # A JobError can only come from a command that loaded the jobs layer; the others (most repository
        # commands) are spared importing it just to name it here.
        jobs = sys.modules.get("cowbackup.jobs.job")
        if jobs is not None and isinstance(err, jobs.JobError):
            sys.stderr.write(f"cowbackup: {err}\n")
            return EXIT_USAGE
        # A bug: one line unless --debug asks for the traceback.
        if args.debug:
            raise
        sys.stderr.write(f"cowbackup: internal error: {type(err).__name__}: {err} (--debug shows more)\n")
        return EXIT_FAILED
