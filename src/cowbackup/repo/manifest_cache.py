"""The local cache of snapshot manifests: a manifest read once is not read from the store again.

One folder per repository id and location, one file per snapshot::

    <cache dir>/manifests-<L>/<snapshot id>
        line 1   JSON {"snapshot": SID, "size": N, "mtime": T} and "\\n"
        then     exactly N bytes: the manifest object as stored

``size`` and ``mtime`` are what the store's listing said of ``snapshots/SID`` when the copy was taken
(its stored size and store time).  This module only keeps bytes; it trusts none of them:

* an entry is handed out only for the very object a listing shows now -- same id, same stored size,
  same store time -- so a snapshot forgotten and written again under its id is read afresh;
* the caller (:class:`~cowbackup.repo.repository.Repository`) checks what it gets as it checks a
  manifest from the store, MAC included, and uses the cache only when it holds the MAC key: a key-less
  reader cannot tell a tampered copy from the store's, so it never reads one;
* the listing is the truth for which snapshots exist: :meth:`ManifestCache.retain` drops the entries of
  ids it no longer shows, and no entry is ever looked up for an id it does not show.

Anything wrong with a file -- missing, unreadable, not a regular file, too large, a header that does
not match, a short body -- is a miss, never an error.  Several processes may share the folder: every
write goes to a temporary file (a name starting with ``.``) renamed over the entry, so a reader sees a
whole entry or none; two writers of one entry write the same bytes, or the later listing's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import time

from cowbackup.repo.cachedir import cache_dir, location_tag
from cowbackup.repo.manifest import MAX_MANIFEST_SIZE, is_snapshot_id
from cowbackup.repo.store import ObjectInfo

log = logging.getLogger(__name__)

#: The longest header line read (a valid one is about 100 bytes).
MAX_HEADER = 4096
#: A temporary file this old was left by a writer that died: the next :meth:`ManifestCache.retain`
#: removes it.
STALE_TEMPORARY = 3600.0


class ManifestCache:
    """The cached manifests of one repository at one location (see the module docstring).

    Every method works on the folder alone, so one object may serve several threads, and several
    processes may share the folder.  (``_warned`` only quiets repeated warnings; a race on it costs a
    second warning at most.)
    """

    def __init__(self, repo_id: str, location: str) -> None:
        self.path = os.path.join(cache_dir(repo_id), f"manifests-{location_tag(location)}")
        self._warned = False

    def load(self, snapshot_id: str, listed: ObjectInfo) -> bytes | None:
        """The stored bytes of ``snapshots/<snapshot_id>`` kept when the listing showed it as
        ``listed`` now does, or None (a miss: absent, stale, or anything wrong with the file)."""
        if not is_snapshot_id(snapshot_id) or listed.size > MAX_MANIFEST_SIZE:
            return None
        try:
            fd = os.open(os.path.join(self.path, snapshot_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_HEADER + MAX_MANIFEST_SIZE:
                    return None
                header = json.loads(f.readline(MAX_HEADER))
                if header != _header(snapshot_id, listed):
                    return None
                body = f.read(listed.size + 1)
        except (OSError, ValueError, RecursionError):
            return None
        return body if len(body) == listed.size else None

    def save(self, snapshot_id: str, listed: ObjectInfo, stored: bytes) -> None:
        """Keep ``stored``, the bytes read from ``snapshots/<snapshot_id>`` that the listing showed as
        ``listed``.  A file that cannot be written is only logged: the cache is an optimisation."""
        if not is_snapshot_id(snapshot_id) or len(stored) != listed.size:
            return  # changed between the listing and the read: nothing to tie the copy to
        tmp = os.path.join(self.path, f".{snapshot_id}.{secrets.token_hex(8)}.tmp")
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(_header(snapshot_id, listed)).encode() + b"\n")
                f.write(stored)
            os.replace(tmp, os.path.join(self.path, snapshot_id))
        except OSError as err:
            # One warning per command: a folder we cannot write would fail for every manifest alike.
            log.log(logging.DEBUG if self._warned else logging.WARNING, "manifest cache: not saved: %s", err)
            self._warned = True
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def retain(self, snapshot_ids: set[str]) -> None:
        """Drop every entry whose id is not in ``snapshot_ids`` (the ids a listing shows now), and the
        temporary files of writers that died.  Other names in the folder are left alone."""
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            name = entry.name
            try:
                if is_snapshot_id(name):
                    drop = name not in snapshot_ids
                else:
                    drop = (
                        name.startswith(".")
                        and name.endswith(".tmp")
                        and now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY
                    )
                if drop:
                    os.unlink(entry.path)
            except OSError:
                continue  # gone already (another process pruned it), or not ours to remove


def _header(snapshot_id: str, listed: ObjectInfo) -> dict[str, object]:
    return {"snapshot": snapshot_id, "size": listed.size, "mtime": listed.mtime}
