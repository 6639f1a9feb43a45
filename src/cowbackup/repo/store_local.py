"""The local-directory backend: one file per object under a root directory.

Writes go to a temporary file in the object's directory, ``.tmp-<pid>-<random>`` (names starting with
``.`` are never listed), then are renamed into place (``put``) or hard-linked (``put_if_absent``:
``link`` fails if the name exists, which makes it atomic even between processes).  A writer killed
mid-write leaves its temporary file; :meth:`LocalStore.remove_partial_writes` (run by gc) removes those
whose process is gone.  ``sync_level`` decides when data reaches the
disk (as Proxmox Backup Server's datastore option):

* ``file``: every object and its directory entry are fsynced as they are written;
* ``filesystem`` (default): objects written with ``durable=False`` are not fsynced one by one;
  :meth:`LocalStore.sync` runs ``syncfs`` on the repository's filesystem before a commit;
* ``none``: nothing is fsynced (tests, tmpfs); a crash may lose or truncate recent objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator

from cowbackup.repo.errors import MissingObject, RepoUsageError, StoreError
from cowbackup.repo.store import ObjectInfo, RequestCounts, Store, check_name, check_size

SYNC_LEVELS = ("none", "file", "filesystem")

_libc = ctypes.CDLL(None, use_errno=True)

_TMP_PREFIX = ".tmp-"
#: A temporary file this old is abandoned whoever wrote it (a writer on another host sharing the
#: directory, whose pid means nothing here; or a pid reused since).  Writes take seconds, not hours.
_TMP_ABANDONED = 3600.0


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _store_error(err: OSError, what: str) -> StoreError:
    if err.errno == errno.ENOSPC:
        return StoreError(f"{what}: no space left on the repository's device")
    return StoreError(f"{what}: {err.strerror or err}")


def _pid_runs(text: str) -> bool:
    """True if ``text`` is the pid of a process on this machine (or not a pid we can judge)."""
    if not text.isdigit():
        return True  # an older name without a pid: only its age can tell
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class LocalStore(Store):
    def __init__(self, root: str, sync_level: str = "filesystem") -> None:
        if sync_level not in SYNC_LEVELS:
            raise RepoUsageError(f"unknown sync level '{sync_level}' (choose from {', '.join(SYNC_LEVELS)})")
        self.root = os.path.abspath(root)
        self.location = self.root
        self.sync_level = sync_level
        self.requests = RequestCounts()
        self._made_dirs: set[str] = set()
        #: Directories (relative names) checked to be real directories, not links.
        self._real_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        """The file of ``name``.  Its directories inside the root must be real directories, not symbolic
        links: whoever can write into a repository must not steer a delete (gc) or a write outside it."""
        check_name(name)
        directory = name.rpartition("/")[0]
        if directory and directory not in self._real_dirs:
            path = self.root
            for part in directory.split("/"):
                path = os.path.join(path, part)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    break  # created by us later, as a directory
                if not stat.S_ISDIR(st.st_mode):
                    raise StoreError(f"'{path}' is not a directory (a symbolic link?): refusing '{name}'")
            else:
                self._real_dirs.add(directory)
        return os.path.join(self.root, name)

    def get(self, name: str, *, limit: int | None = None) -> bytes:
        self.requests.add("get")
        try:
            with open(os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                check_size(name, os.fstat(f.fileno()).st_size, limit)
                return f.read()
        except FileNotFoundError:
            raise MissingObject(name) from None
        except OSError as err:
            raise _store_error(err, f"cannot read '{name}'") from err

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.requests.add("get")
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise MissingObject(name) from None
        except OSError as err:
            raise _store_error(err, f"cannot read '{name}'") from err
        try:
            return os.pread(fd, length, offset)
        except OSError as err:
            raise _store_error(err, f"cannot read '{name}'") from err
        finally:
            os.close(fd)

    def _makedirs(self, directory: str) -> None:
        if directory in self._made_dirs:
            return
        os.makedirs(directory, exist_ok=True)
        self._made_dirs.add(directory)

    def _write_temp(self, path: str, data: bytes | bytearray | memoryview, durable: bool) -> str:
        directory = os.path.dirname(path)
        self._makedirs(directory)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.sync_level == "file" or (durable and self.sync_level != "none"):
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _sync_dir(self, path: str, durable: bool) -> None:
        if self.sync_level == "file" or (durable and self.sync_level != "none"):
            fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
        self.requests.add("put")
        path = self._path(name)
        try:
            tmp = self._write_temp(path, data, durable)
            os.replace(tmp, path)
            self._sync_dir(path, durable)
        except OSError as err:
            raise _store_error(err, f"cannot write '{name}'") from err

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> bool:
        self.requests.add("put")  # one conditional PUT on S3, whether or not it creates the object
        path = self._path(name)
        if os.path.exists(path):
            return False
        try:
            tmp = self._write_temp(path, data, durable)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            self._sync_dir(path, durable)
            return True
        except OSError as err:
            raise _store_error(err, f"cannot write '{name}'") from err

    def stat(self, name: str) -> ObjectInfo | None:
        self.requests.add("stat")
        try:
            st = os.lstat(self._path(name))
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _store_error(err, f"cannot stat '{name}'") from err
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.requests.paged(self._list(prefix))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            check_name(prefix.rstrip("/"))
        base = os.path.join(self.root, prefix) if prefix.endswith("/") or not prefix else None
        if base is None:
            # A prefix inside a name: list its directory and filter.
            head, _, _tail = prefix.rpartition("/")
            yield from (
                info
                for info in self._walk(os.path.join(self.root, head), head)
                if info.name.startswith(prefix)
            )
            return
        yield from self._walk(base, prefix.rstrip("/"))

    def _walk(self, directory: str, relative: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        except OSError as err:
            raise _store_error(err, f"cannot list '{relative or '/'}'") from err
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(entry.path, name)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield ObjectInfo(name, st.st_size, st.st_mtime)
            except FileNotFoundError:
                continue  # deleted while we listed

    def delete(self, names: Iterable[str]) -> None:
        count = 0
        for name in names:
            count += 1
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
            except OSError as err:
                raise _store_error(err, f"cannot delete '{name}'") from err
        self.requests.deleted(count)

    def remove_partial_writes(self) -> int:
        """Unlink temporary files whose writer is gone (its pid does not run here) or that are older than
        an hour.  Should a live writer's file go after all (a writer on another host, or a pid reused),
        that writer's request fails with a StoreError: no object is ever damaged."""
        freed = 0
        now = time.time()
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(_TMP_PREFIX):
                    continue
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                    if (
                        _pid_runs(name[len(_TMP_PREFIX) :].partition("-")[0])
                        and now - st.st_mtime < _TMP_ABANDONED
                    ):
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # its writer renamed or removed it meanwhile
                except OSError as err:
                    raise _store_error(err, f"cannot remove the temporary file '{path}'") from err
                freed += st.st_size
        return freed

    def sync(self) -> None:
        if self.sync_level == "none":
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        except OSError as err:
            raise _store_error(err, "cannot sync the repository") from err
        finally:
            os.close(fd)
