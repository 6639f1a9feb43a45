"""``cowbackup``: the command-line entry point.

Subcommands live in their own modules; this one parses arguments, sets up logging and turns errors into
one line on stderr and an exit code (see :mod:`cowbackup.cli.errors`).  No traceback reaches the user
unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cowbackup import __version__
from cowbackup.block.errors import BlockError
from cowbackup.cli import backup, bitmap_cmd, daemon_cmd, demo, live, pull, repo_backup, repo_cmd, serve
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliError
from cowbackup.jobs.job import JobError
from cowbackup.repo.errors import RepoError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage + message and exits 2; keep that, but in our one-line style.
        self.print_usage(sys.stderr)
        sys.stderr.write(f"cowbackup: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cowbackup", description="Live, point-in-time block-device backups.")
    parser.add_argument("--version", action="version", version=f"cowbackup {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    backup.add_parser(sub)
    bitmap_cmd.add_parser(sub)
    daemon_cmd.add_parser(sub)
    demo.add_parser(sub)
    live.add_parsers(sub)
    pull.add_parser(sub)
    repo_cmd.add_parsers(sub)
    repo_backup.add_restore_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except CliError as err:
        sys.stderr.write(f"cowbackup: {err.message}\n")
        return err.exit_code
    except RepoError as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        return err.exit_code
    except (BlockError, JobError) as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        return EXIT_USAGE
    except OSError as err:
        sys.stderr.write(f"cowbackup: {err.strerror or err}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("cowbackup: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        # A bug: one line unless --debug asks for the traceback.
        if args.debug:
            raise
        sys.stderr.write(f"cowbackup: internal error: {type(err).__name__}: {err} (--debug shows more)\n")
        return EXIT_FAILED
