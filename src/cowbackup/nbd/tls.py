"""x509 TLS credentials laid out like QEMU's ``tls-creds-x509`` directory.

::

    DIR/ca-cert.pem        the CA that signed the peer's certificate
    DIR/server-cert.pem    this server's certificate       (server endpoint)
    DIR/server-key.pem     and its private key
    DIR/client-cert.pem    this client's certificate       (client endpoint, optional)
    DIR/client-key.pem     and its private key

``verify_peer`` (QEMU's ``verify-peer``, default on) makes a server demand a client certificate signed
by the CA, and a client verify the server's against the CA (off: any certificate is taken, as QEMU and
libnbd do with verify-peer off -- encrypted, but not authenticated).  Missing or unreadable files give one
clear :class:`TLSError` at start-up, not a failed handshake later.
"""

from __future__ import annotations

import os
import ssl


class TLSError(Exception):
    """The credentials directory is unusable; the message names the file and the reason."""


def _file(directory: str, name: str, required: bool = True) -> str | None:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        return path
    if required:
        raise TLSError(f"TLS credentials: '{path}' is missing")
    return None


def server_context(directory: str, *, verify_peer: bool = True) -> ssl.SSLContext:
    """An SSL context for serving NBD with the x509 credentials in ``directory``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = _file(directory, "server-cert.pem")
    key = _file(directory, "server-key.pem")
    assert cert is not None and key is not None
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer:
            ca = _file(directory, "ca-cert.pem")
            assert ca is not None
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"TLS credentials in '{directory}': {err}") from err
    return ctx


def client_context(
    directory: str, *, hostname_check: bool = False, verify_peer: bool = True
) -> ssl.SSLContext:
    """An SSL context for connecting to an NBD server that presents a certificate signed by our CA.

    The chain is checked unless ``verify_peer`` is off.  The host name is checked when
    ``hostname_check`` is set: the NBD client sets it for TCP addresses (QEMU checks the host or IP
    against the certificate there) and for an explicit ``tls-hostname``, not for Unix sockets, which
    have no host name.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = hostname_check and verify_peer
    if not verify_peer:
        ctx.verify_mode = ssl.CERT_NONE
    ca = _file(directory, "ca-cert.pem")
    assert ca is not None
    try:
        ctx.load_verify_locations(ca)
        cert = _file(directory, "client-cert.pem", required=False)
        key = _file(directory, "client-key.pem", required=False)
        if cert and key:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"TLS credentials in '{directory}': {err}") from err
    return ctx
