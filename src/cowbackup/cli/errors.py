"""Errors the command line reports as one line, with the exit code each one carries.

Exit codes (documented in the README):

====  ==========================================================
0     success
1     the backup (or another operation) failed: I/O error, job error
2     bad usage: unknown option, bad value, missing or unsuitable file
130   interrupted (Ctrl-C / SIGINT / SIGTERM): the job was cancelled
====  ==========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error to print as ``cowbackup: MESSAGE`` and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
