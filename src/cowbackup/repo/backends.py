"""Choose the storage backend for a repository location."""

from __future__ import annotations

from cowbackup.repo.errors import RepoUsageError
from cowbackup.repo.store import Store
from cowbackup.repo.store_local import LocalStore


def open_store(location: str, sync_level: str = "filesystem") -> Store:
    """The backend for ``location``: a directory path (``s3://`` is the S3 issue's work)."""
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise RepoUsageError(f"repository location '{location}': the '{scheme}' scheme is not supported")
    return LocalStore(location, sync_level)
