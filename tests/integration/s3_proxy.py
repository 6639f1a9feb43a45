"""A fault-injecting HTTP/1.1 proxy in front of radosgw: a store that throttles, drops connections, is
slow, or returns truncated bodies.

Every request is logged (``requests``: to count what a command costs), then, in this order:

* ``slowdown``: answered ``503 SlowDown`` (S3's throttling reply) without reaching radosgw;
* ``reset_before``: the connection is reset (RST) before the request is forwarded;
* ``delay``: forwarded after ``delay_seconds``;
* ``reset_after``: forwarded -- radosgw carries it out -- and then the connection is reset instead of
  answering (the client cannot know that its PUT or DELETE happened);
* GETs whose path contains a word of ``truncate``: the body is cut off after half (``budget`` times, then
  they pass; -1: always).

The first four are probabilities (0 to 1) drawn from one seeded generator, applied only to requests
whose path contains ``only`` (every request when it is empty).  ``injected`` counts what was done.  When
radosgw cannot be reached, the client's connection is reset (a load balancer whose backend is gone).
Requests are forwarded with their own Host header, so that S3 signatures still match.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from typing import Any


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 14) -> None:
        self.truncate: set[str] = set()
        self.budget = -1
        self.cut = 0
        self.slowdown = 0.0
        self.reset_before = 0.0
        self.reset_after = 0.0
        self.delay = 0.0
        self.delay_seconds = 0.05
        self.only = ""
        #: (method, path) of every request, in order of arrival.
        self.requests: list[tuple[str, str]] = []
        #: How many times each fault was injected ("slowdown", "reset_before", ...).
        self.injected: collections.Counter[str] = collections.Counter()
        #: (fault, method, path) of every request a fault was injected into.
        self.faults: list[tuple[str, str, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._draw(self.command, self.path)
                if fault == "slowdown":
                    self._slow_down()
                    return
                if fault == "reset_before":
                    self._reset()
                    return
                if fault == "delay":
                    time.sleep(proxy.delay_seconds)  # the injected latency itself
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        upstream.putheader(k, v)
                    upstream.endheaders(body)
                    reply = upstream.getresponse()
                    data = reply.read()
                except OSError:
                    self._reset()
                    return
                finally:
                    upstream.close()
                if fault == "reset_after":
                    self._reset()
                    return
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD's Content-Length is the object's size, though no body follows.
                size = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", size or str(len(data)))
                if self.command == "GET" and data and proxy._should_cut(self.path):
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _slow_down(self) -> None:
                body = (
                    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>"
                )
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _draw(self, method: str, path: str) -> str:
        """Log the request; the fault to inject into it ("" for none)."""
        with self._lock:
            self.requests.append((method, path))
            if self.only and self.only not in path:
                return ""
            for fault in ("slowdown", "reset_before", "delay", "reset_after"):
                if self._rng.random() < getattr(self, fault):
                    self.injected[fault] += 1
                    self.faults.append((fault, method, path))
                    return fault
            return ""

    def _should_cut(self, path: str) -> bool:
        with self._lock:
            if not any(word in path for word in self.truncate) or self.budget == 0:
                return False
            self.budget -= 1 if self.budget > 0 else 0
            self.cut += 1
            self.injected["truncate"] += 1
            return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
