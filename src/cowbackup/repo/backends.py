"""Choose the storage backend for a repository location."""

from __future__ import annotations

from cowbackup.repo.errors import RepoUsageError
from cowbackup.repo.store import Store
from cowbackup.repo.store_local import LocalStore


def open_store(location: str, sync_level: str = "filesystem", *, endpoint_url: str | None = None) -> Store:
    """The backend for ``location``: ``s3://BUCKET[/PREFIX]`` (S3 at ``endpoint_url``, else
    ``$COWBACKUP_S3_ENDPOINT`` / ``$AWS_ENDPOINT_URL``, else AWS), or a directory path.

    ``sync_level`` matters to a directory only (an S3 store has acknowledged every object it stored);
    ``endpoint_url`` to S3 only.  RepoUsageError for an unknown scheme, and for an S3 location whose
    endpoint, credentials or bucket are wrong.
    """
    if location.startswith("s3://"):
        # Imported here: boto3 takes a while to import, and local repositories never need it.
        from cowbackup.repo.store_s3 import S3Store

        return S3Store(location, endpoint_url=endpoint_url)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise RepoUsageError(
            f"repository location '{location}': the '{scheme}' scheme is not supported (a directory or s3://)"
        )
    if endpoint_url:
        raise RepoUsageError(f"--endpoint-url is for s3:// repositories, not the directory '{location}'")
    return LocalStore(location, sync_level)
