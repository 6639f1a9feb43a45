"""NBD URIs, as libnbd writes and reads them (the NBD URI specification in the nbd repository).

::

    nbd://HOST[:PORT]/EXPORT          plain TCP (default port 10809)
    nbds://HOST[:PORT]/EXPORT         TCP with TLS required
    nbd+unix:///EXPORT?socket=PATH    Unix domain socket
    nbds+unix:///EXPORT?socket=PATH   Unix domain socket with TLS

The export name is the path without its leading ``/``, percent-decoded; an empty path names the default
export ``""``.  IPv6 hosts are bracketed (``nbd://[::1]:10809/``).  Query parameters other than ``socket``
and ``tls-certificates`` are refused rather than ignored, so a typo never silently changes the meaning.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

NBD_DEFAULT_PORT = 10809

_SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}


class URIError(ValueError):
    """A string that is not a valid NBD URI; the message says what is wrong."""


@dataclass(frozen=True)
class NBDAddress:
    """Where an NBD export is: a TCP host/port or a Unix socket path, an export name, TLS or not."""

    export: str = ""
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    #: Check the server's certificate (QEMU's ``verify-peer`` of the client's ``tls-creds-x509``).
    tls_verify_peer: bool = True

    def to_uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        export = urllib.parse.quote(self.export, safe="")
        query: dict[str, str] = {}
        if self.tls_certificates:
            query["tls-certificates"] = self.tls_certificates
        if self.socket is not None:
            query = {"socket": self.socket, **query}
            return f"{scheme}+unix:///{export}?{urllib.parse.urlencode(query, safe='/')}"
        host = self.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.port == NBD_DEFAULT_PORT else f":{self.port}"
        suffix = f"?{urllib.parse.urlencode(query, safe='/')}" if query else ""
        return f"{scheme}://{host}{port}/{export}{suffix}"

    def server_options(self) -> dict[str, str]:
        """The ``server`` option of QEMU's nbd driver (``SocketAddress``) for this address."""
        if self.socket is not None:
            return {"type": "unix", "path": self.socket}
        return {"type": "inet", "host": self.host or "localhost", "port": str(self.port)}


def is_nbd_uri(text: str) -> bool:
    return text.split("://", 1)[0] in _SCHEMES and "://" in text


def parse_uri(text: str) -> NBDAddress:
    """Parse an NBD URI.  Raises :class:`URIError` with the reason."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in _SCHEMES:
        raise URIError(f"'{text}': unknown scheme '{parts.scheme}' (use nbd, nbds, nbd+unix or nbds+unix)")
    tls, unix = _SCHEMES[parts.scheme]
    if parts.fragment:
        raise URIError(f"'{text}': NBD URIs have no fragment")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as err:
        raise URIError(f"'{text}': bad query string: {err}") from None
    for key, values in query.items():
        if key not in ("socket", "tls-certificates"):
            raise URIError(f"'{text}': unsupported query parameter '{key}'")
        if len(values) != 1:
            raise URIError(f"'{text}': query parameter '{key}' given {len(values)} times")
    certs = query.get("tls-certificates", [None])[0]
    if unix:
        if parts.netloc:
            raise URIError(
                f"'{text}': a Unix socket URI has no host (write {parts.scheme}:///export?socket=...)"
            )
        socket = query.get("socket", [None])[0]
        if not socket:
            raise URIError(f"'{text}': missing ?socket=PATH")
        return NBDAddress(export=export, socket=socket, tls=tls, tls_certificates=certs)
    if "socket" in query:
        raise URIError(f"'{text}': ?socket= needs the {parts.scheme}+unix scheme")
    try:
        port = parts.port
    except ValueError:
        raise URIError(f"'{text}': invalid port") from None
    host = parts.hostname
    if not host:
        raise URIError(f"'{text}': missing host")
    return NBDAddress(
        export=export, host=host, port=port or NBD_DEFAULT_PORT, tls=tls, tls_certificates=certs
    )
