"""Where a repository's local caches live: one directory per repository id, one file or folder per
location inside it (two copies of a repository share its id, not their contents).

``$COWBACKUP_CACHE_DIR/<repository id>`` (default ``$XDG_CACHE_HOME/cowbackup/<id>``, or
``~/.cache/cowbackup/<id>``).  Nothing here is part of the repository: every cache is safe to delete.
"""

from __future__ import annotations

import hashlib
import os


def cache_dir(repo_id: str) -> str:
    """The cache directory of the repository with id ``repo_id`` (not created here)."""
    base = os.environ.get("COWBACKUP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cowbackup"
    )
    return os.path.join(base, repo_id)


def location_tag(location: str) -> str:
    """``<L>``: the first 16 hex digits of SHA-256 of a store's location, naming its caches."""
    return hashlib.sha256(location.encode()).hexdigest()[:16]
