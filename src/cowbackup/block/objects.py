"""User-created objects, as QEMU's ``object-add`` / ``object-del`` / ``--object`` make them.

The one type a backup daemon needs is ``tls-creds-x509``: the NBD server (``nbd-server-start
tls-creds=ID``) and the ``nbd`` block driver (``blockdev-add ... tls-creds=ID``) name their x509
credentials by object id, so a script written for qemu-storage-daemon works unchanged::

    --object tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server
    --nbd-server addr.type=unix,addr.path=/run/nbd.sock,tls-creds=tls0

Properties: ``dir`` (a directory laid out as :mod:`cowbackup.nbd.tls` describes), ``endpoint``
(``client``, QEMU's default, or ``server``), ``verify-peer`` (default on: a server demands a client
certificate, a client checks the server's) and ``sanity-check`` (accepted; the files are always loaded
and checked when the object is made).  ``priority``, ``passwordid`` and ``loaded`` are refused: we load
only unencrypted keys with the system's TLS defaults.

Where QEMU takes an id, cowbackup also takes a credentials *directory*, when no object has that id:
scripts of ours written before objects existed keep working, and an NBD URI's ``tls-certificates=DIR``
can become a node's ``tls-creds``.

As in QEMU, deleting an object that the NBD server uses succeeds: the server keeps the credentials it
started with.  Messages are QEMU's.

The registry belongs to the block graph (``BlockGraph.objects``), whose nodes name objects, so it lives
in the block layer and imports nothing above it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cowbackup.block.errors import BlockError
from cowbackup.block.options import Options
from cowbackup.ids import is_wellformed_id

__all__ = ["ObjectRegistry", "TLSCredsX509"]

Endpoint = Literal["client", "server"]

_REFUSED = ("priority", "passwordid", "loaded")


@dataclass(frozen=True)
class TLSCredsX509:
    """One ``tls-creds-x509`` object: where its files are and which side of a connection it is for."""

    id: str
    dir: str
    endpoint: Endpoint = "client"
    verify_peer: bool = True


def _check_files(creds: TLSCredsX509) -> None:
    """QEMU loads the files when the object is made: missing ones are an error there, not later."""
    needed = ["ca-cert.pem"]
    if creds.endpoint == "server":
        needed += ["server-cert.pem", "server-key.pem"]
    for name in needed:
        path = os.path.join(creds.dir, name)
        if not os.access(path, os.R_OK):
            reason = os.strerror(errno.ENOENT if not os.path.exists(path) else errno.EACCES)
            raise BlockError(f"Unable to access credentials {path}: {reason}")


class ObjectRegistry:
    """The daemon's objects by id (QEMU's ``/objects``).  Event-loop thread only."""

    def __init__(self) -> None:
        self._objects: dict[str, TLSCredsX509] = {}

    def __contains__(self, object_id: str) -> bool:
        return object_id in self._objects

    def add(self, props: Mapping[str, Any]) -> TLSCredsX509:
        """``object-add``: ``props`` as QMP gives them (``qom-type``, ``id`` and the type's properties).

        Values may also be the strings of a command line (``verify-peer=off``).
        """
        opts = Options(props)
        qom_type = opts.get_str("qom-type")
        object_id = opts.get_str("id")
        if qom_type != "tls-creds-x509":
            raise BlockError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if not is_wellformed_id(object_id):
            raise BlockError("Parameter 'id' expects an identifier")
        for key in _REFUSED:
            if opts.has(key):
                raise BlockError(f"Parameter '{key}' is not supported by cowbackup")
        endpoint = opts.get_enum("endpoint", ("client", "server"), "client")
        verify_peer = opts.get_bool("verify-peer", True)
        opts.get_bool("sanity-check", True)
        directory = opts.get_str("dir", None)
        opts.finish()
        if object_id in self._objects:
            raise BlockError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
        if directory is None:
            raise BlockError("Missing 'dir' property value")
        creds = TLSCredsX509(object_id, directory, endpoint, verify_peer)
        _check_files(creds)
        self._objects[object_id] = creds
        return creds

    def delete(self, object_id: str) -> None:
        """``object-del``."""
        if self._objects.pop(object_id, None) is None:
            raise BlockError(f"object '{object_id}' not found")

    def tls_creds(self, ref: str, endpoint: Endpoint) -> TLSCredsX509:
        """The credentials ``ref`` names for ``endpoint``: an object id, or (ours) a directory."""
        creds = self._objects.get(ref)
        if creds is None:
            # An id never contains '/'; a directory might not ("pki"), but then it exists.
            if "/" in ref or os.path.isdir(ref):
                return TLSCredsX509(ref, ref, endpoint)
            raise BlockError(f"No TLS credentials with id '{ref}'")
        if creds.endpoint != endpoint:
            raise BlockError(f"Expected TLS credentials for a {endpoint} endpoint")
        return creds
