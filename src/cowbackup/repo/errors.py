"""Errors of the repository, grouped by what the caller can do next.

::

    RepoError                      (exit 1 unless said otherwise)
     +-- RepoUsageError            the request makes no sense: fix the command line (exit 2)
     |    +-- NotARepository       no config object where the repository should be
     |    +-- UnsupportedFormat    a newer format version, or an option this version cannot read
     |    +-- WrongPassphrase      the key cannot be unwrapped with this passphrase (exit 2)
     |    +-- SnapshotNotFound     no snapshot (or several) match an id or prefix
     +-- CorruptObject             an object is truncated, altered or malformed; names the object
     +-- MissingObject             an object a snapshot needs is not in the store
     +-- StoreError                the storage backend failed (I/O error, full disk, ...)
     +-- ConcurrentChange          another process changed the repository in a way this one cannot
                                   work around (e.g. a gc removed a chunk this backup reused); retry
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class RepoError(Exception):
    """Root of the repository's errors; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class RepoUsageError(RepoError):
    exit_code = EXIT_USAGE


class NotARepository(RepoUsageError):
    pass


class UnsupportedFormat(RepoUsageError):
    pass


class WrongPassphrase(RepoUsageError):
    pass


class SnapshotNotFound(RepoUsageError):
    pass


class CorruptObject(RepoError):
    """``name`` is the object's name in the store; the message says what is wrong with it."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"object '{name}' is corrupt: {problem}")
        self.name = name
        self.problem = problem


class MissingObject(RepoError):
    def __init__(self, name: str) -> None:
        super().__init__(f"object '{name}' is missing from the repository")
        self.name = name


class StoreError(RepoError):
    pass


class ConcurrentChange(RepoError):
    pass


def first_repo_error(group: ExceptionGroup[Exception]) -> Exception:
    """What to raise for the failures of a group of tasks: the first repository error among them (a
    failing store fails every task in flight the same way), else the group itself."""
    for err in group.exceptions:
        if isinstance(err, ExceptionGroup):
            err = first_repo_error(err)
        if isinstance(err, RepoError):
            return err
    return group
