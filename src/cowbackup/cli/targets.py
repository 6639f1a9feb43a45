"""Sources and targets of ``cowbackup backup``, shared by the one-shot backup and ``backup --qmp``.

Preparing TARGET (created sparse, or checked and truncated; a qcow2 image with ``--target-format
qcow2``; an NBD URI used as it is), probing SOURCE's format, checking an NBD target once it is open, and
the summary line of what a finished backup wrote.  :mod:`cowbackup.cli.backup` and
:mod:`cowbackup.cli.live` both import this module; it imports neither.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from cowbackup.cli.errors import UsageError
from cowbackup.cli.progress import JsonReporter, Reporter
from cowbackup.nbd.uri import is_nbd_uri


def target_options(
    path: str, size: int, force: bool, fmt: str = "raw", backing_file: str | None = None
) -> dict[str, Any]:
    """Prepare TARGET: create it sparse, or check and truncate an existing one.

    An NBD URI is only turned into options: the export exists already (its size is checked once open).
    With ``fmt`` qcow2 a regular-file TARGET is (re)created as an empty qcow2 image of ``size`` bytes,
    over ``backing_file`` if given (see :func:`_qcow2_target`).  UsageError for a combination that
    makes no sense or a TARGET that must not be overwritten.
    """
    from cowbackup.block.drivers.file import create_file

    if backing_file is not None and fmt != "qcow2":
        raise UsageError("--backing-file needs --target-format qcow2")
    if is_nbd_uri(path):
        if fmt != "raw":
            raise UsageError("--target-format qcow2 needs a file TARGET, not an NBD URI")
        return _nbd_options(path)
    if fmt == "qcow2":
        return _qcow2_target(path, size, force, backing_file)

    try:
        st = os.stat(path)
    except FileNotFoundError:
        create_file(path, size)
        return {"driver": "file", "filename": path}
    if stat.S_ISBLK(st.st_mode):
        if not force:
            raise UsageError(f"target '{path}' is a block device; use --force to overwrite it")
        return {"driver": "raw", "size": size, "file": {"driver": "host_device", "filename": path}}
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"target '{path}' is neither a regular file nor a block device")
    if st.st_size > 0 and not force:
        raise UsageError(f"target '{path}' exists and is not empty; use --force to overwrite it")
    create_file(path, size)  # truncates: a fresh sparse file reads as zeros
    return {"driver": "file", "filename": path}


def _qcow2_target(path: str, size: int, force: bool, backing_file: str | None = None) -> dict[str, Any]:
    """Create TARGET as an empty qcow2 image of ``size`` bytes; its blockdev-add options.

    With ``backing_file`` (a qcow2 image; a relative name is stored as given and means a file in
    TARGET's directory, as ``qemu-img create -b`` has it) the header names it with backing format
    qcow2, and the options say ``backing: null``: a backup job writes only what it copies and never
    reads the target, so the chain is left closed until someone reads through it.
    """
    from cowbackup.block.drivers.qcow2 import create_image

    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"target '{path}' must be a regular file for --target-format qcow2")
        if st.st_size > 0 and not force:
            raise UsageError(f"target '{path}' exists and is not empty; use --force to overwrite it")
    if backing_file is not None:
        where = os.path.join(os.path.dirname(os.path.abspath(path)), backing_file)
        if os.path.realpath(where) == os.path.realpath(path):
            raise UsageError(f"backing file '{backing_file}' is TARGET itself")
        if probe_format(where, what="backing file") != "qcow2":
            raise UsageError(f"backing file '{backing_file}' ({where}) is not a qcow2 image")
    create_image(path, size, backing_file=backing_file, backing_fmt="qcow2" if backing_file else None)
    options: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": path}}
    if backing_file is not None:
        options["backing"] = None
    return options


def probe_format(path: str, what: str = "source") -> str:
    """qemu-img's probe, reduced to what we read: the qcow2 magic, else raw.  UsageError naming
    ``what`` if ``path`` cannot be read."""
    from cowbackup.block.drivers.qcow2.format import QCOW_MAGIC

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UsageError(f"cannot read {what} '{path}': {err.strerror}") from None
    return "qcow2" if len(magic) == 4 and int.from_bytes(magic, "big") == QCOW_MAGIC else "raw"


def source_options(path: str, fmt: str | None = None) -> dict[str, Any]:
    """Options of SOURCE; ``fmt`` None probes the file (never done when the user says raw)."""
    if is_nbd_uri(path):
        if fmt == "qcow2":
            raise UsageError("--source-format qcow2 needs a file SOURCE, not an NBD URI")
        return {**_nbd_options(path), "read-only": True}
    if not os.path.exists(path):
        raise UsageError(f"source '{path}' does not exist")
    driver = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    if fmt is None:
        fmt = probe_format(path)
    return {"driver": fmt, "read-only": True, "file": {"driver": driver, "filename": path}}


def check_nbd_target(uri: str, size: int, source_size: int, read_only: bool) -> None:
    """An NBD target is used as it is: it must be writable and exactly as large as the source."""
    if read_only:
        raise UsageError(f"target '{uri}' is a read-only NBD export")
    if size != source_size:
        raise UsageError(
            f"target '{uri}' has {size} bytes but the source has {source_size}; "
            "an NBD target must exist with the source's size"
        )


def summary(args: argparse.Namespace, reporter: Reporter, length: int, elapsed: float) -> None:
    try:
        # Unknown (-1) for an NBD target: what the remote side allocates is its business.
        allocated = -1 if is_nbd_uri(args.target) else os.stat(args.target).st_blocks * 512
    except OSError:
        allocated = -1
    rate = length / elapsed if elapsed > 0 else 0.0
    if isinstance(reporter, JsonReporter):
        reporter.result({"bytes": length, "seconds": elapsed, "rate": rate, "allocated": allocated})
        return
    mib = 1024 * 1024
    where = f"; target allocates {allocated / mib:.1f} MiB" if allocated >= 0 else ""
    sys.stderr.write(
        f"cowbackup: backed up {length / mib:.1f} MiB in {elapsed:.2f} s ({rate / mib:.1f} MiB/s){where}\n"
    )


def _nbd_options(uri: str) -> dict[str, Any]:
    # Imported here: the NBD driver brings the NBD client, which only NBD targets and sources need.
    from cowbackup.block.drivers.nbd import nbd_options_from_uri

    return nbd_options_from_uri(uri)
