"""Fault-injecting HTTP/1.1 (or HTTPS) reverse proxy on 127.0.0.1 for tests.

One FaultProxy sits between the tool and one Orthanc server. Rules select requests
by method and path regex and then return an error status, reset the connection,
cut the response body with a clean close, delay, or run a callback before the
request is forwarded. Bodies are relayed piece by piece, never buffered whole.

Every client connection carries exactly one request. The proxy responds with
`Connection: close` and asks the upstream server for the same, so a request's end
is known from its framing (Content-Length or chunked) and a response's end from
its framing or from the upstream close.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

PIECE_SIZE = 64 * 1024
MAX_HEAD_SIZE = 64 * 1024
SOCKET_TIMEOUT = 120.0


class _ConnectionEnded(Exception):
    """Raised when a peer closes before a complete HTTP message arrived."""


@dataclass
class RequestRecord:
    """One request the proxy received, before any fault applied."""

    method: str
    target: str
    time: float


@dataclass
class Rule:
    """Fault applied to requests whose method and target match.

    `method` None matches every method. `path` is a regex searched in the request
    target (path and query). The first `skip` matching requests pass unchanged,
    and the fault then applies to at most `count` requests (None: every later one).
    `status` responds without forwarding, with `body` of type `content_type` when
    given (else a JSON error in Orthanc's format).
    Byte limits count bytes after the message head as sent on the wire, so for a
    chunked body they include the chunk framing.
    `response_delay` holds the response for that many seconds after its head
    arrived from upstream. Orthanc 1.10.1 builds a POST /instances or
    /tools/bulk-delete response after the work is done (observed here: every
    instance stored or deleted by then), so once `upstream_responded` counts
    such a request, the server is done with it while the client still waits.
    """

    method: str | None = None
    path: str = ""
    count: int | None = None
    skip: int = 0
    status: int | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    reset_request_after: int | None = None
    reset_response_after: int | None = None
    cut_response_after: int | None = None
    delay: float = 0.0
    response_delay: float = 0.0
    chunk_delay: float = 0.0
    before_forward: Callable[[str, str], None] | None = None
    seen: int = 0
    applied: int = 0
    forwarded: int = 0
    upstream_responded: int = 0
    responded: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._pattern.search(target) is not None


class _BufferedSocket:
    """Socket reader with a small look-ahead buffer for parsing HTTP framing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(PIECE_SIZE)
        if not data:
            return False
        self.buffer += data
        return True

    def read_until(self, marker: bytes, limit: int = MAX_HEAD_SIZE) -> bytes:
        while marker not in self.buffer:
            if len(self.buffer) > limit:
                raise _ConnectionEnded(f"no {marker!r} within {limit} bytes")
            if not self._fill():
                raise _ConnectionEnded("peer closed before the end of a line")
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_some(self, size: int) -> bytes:
        """Return up to `size` bytes, or b"" when the peer closed."""
        if not self.buffer and not self._fill():
            return b""
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def iter_exact(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining > 0:
            data = self.read_some(min(remaining, PIECE_SIZE))
            if not data:
                raise _ConnectionEnded(f"peer closed with {remaining} bytes missing")
            remaining -= len(data)
            yield data

    def iter_chunked(self) -> Iterator[bytes]:
        """Yield a chunked body as raw wire bytes, framing included."""
        while True:
            size_line = self.read_until(b"\r\n")
            yield size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            yield from self.iter_exact(size)
            yield self.read_until(b"\r\n")
        while True:
            trailer_line = self.read_until(b"\r\n")
            yield trailer_line
            if trailer_line == b"\r\n":
                return

    def iter_until_close(self) -> Iterator[bytes]:
        while data := self.read_some(PIECE_SIZE):
            yield data


@dataclass
class _Head:
    start_line: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def without(self, *names: str) -> list[tuple[str, str]]:
        lowered = {name.lower() for name in names}
        return [(k, v) for k, v in self.headers if k.lower() not in lowered]


def _read_head(reader: _BufferedSocket) -> _Head:
    raw = reader.read_until(b"\r\n\r\n").decode("iso-8859-1")
    lines = raw.split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return _Head(lines[0], headers)


def _encode_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("iso-8859-1")


def _iter_body(reader: _BufferedSocket, head: _Head, until_close: bool):
    """Yield a message body as raw wire bytes according to its framing."""
    encoding = (head.get("Transfer-Encoding") or "").lower()
    if "chunked" in encoding:
        return reader.iter_chunked()
    length = head.get("Content-Length")
    if length is not None:
        return reader.iter_exact(int(length))
    if until_close:
        return reader.iter_until_close()
    return iter(())


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """Yield a 127.0.0.1 port that refuses connections until the block ends.

    The port stays bound without listening, so no other process, such as a
    server of a test run in parallel, can take it and respond in its place.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer receives a TCP RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _close_cleanly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Reverse proxy from a free 127.0.0.1 port to one upstream HTTP server.

    Use as a context manager; `url` is the address to give the tool instead of
    the upstream server's URL.
    """

    def __init__(
        self, upstream_url: str, tls_context: ssl.SSLContext | None = None
    ) -> None:
        """`tls_context`, a server-side SSLContext, makes the proxy serve HTTPS."""
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(
                f"upstream URL {upstream_url!r} is invalid: use http://HOST:PORT"
            )
        self.upstream = (parts.hostname, parts.port)
        self.tls_context = tls_context
        self.rules: list[Rule] = []
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        scheme = "http" if self.tls_context is None else "https"
        self.url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}"
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="faultproxy-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        """Stop accepting, close every open connection and join the threads."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._condition:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=5)

    def add_rule(self, method: str | None = None, path: str = "", **fault) -> Rule:
        """Append a rule. Earlier rules take precedence. See Rule for the fields."""
        rule = Rule(method=method, path=path, **fault)
        with self._condition:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._condition:
            self.rules.clear()

    def count(self, method: str | None = None, path: str = "") -> int:
        """Return how many received requests match `method` and the `path` regex."""
        probe = Rule(method=method, path=path)
        with self._condition:
            return sum(probe.matches(r.method, r.target) for r in self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Block until `predicate()` is true, or raise TimeoutError after `timeout` s.

        The predicate is evaluated whenever the proxy updates a counter.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"proxy condition not met within {timeout} s")
                self._condition.wait(remaining)

    def _notify(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(SOCKET_TIMEOUT)
        with self._condition:
            self._sockets.add(sock)
        return sock

    def _untrack(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._condition:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            if self.tls_context is not None:
                client.settimeout(SOCKET_TIMEOUT)
                client = self.tls_context.wrap_socket(client, server_side=True)
            self._track(client)
            upstream = self._handle(client)
        except (OSError, _ConnectionEnded, ValueError) as error:
            if not self._stopping.is_set():
                with self._condition:
                    self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            self._untrack(upstream)
            self._untrack(client)
            self._notify()

    def _select_rule(self, method: str, target: str) -> Rule | None:
        """Count the request on every matching rule and return the one that applies."""
        selected = None
        with self._condition:
            self.requests.append(RequestRecord(method, target, time.time()))
            for rule in self.rules:
                if not rule.matches(method, target):
                    continue
                index = rule.seen
                rule.seen += 1
                active = index >= rule.skip and (
                    rule.count is None or rule.applied < rule.count
                )
                if active and selected is None:
                    rule.applied += 1
                    selected = rule
            self._condition.notify_all()
        return selected

    def _handle(self, client: socket.socket) -> socket.socket | None:
        """Serve one request and return the upstream socket for the caller to close."""
        reader = _BufferedSocket(client)
        head = _read_head(reader)
        method, target, _ = head.start_line.split(" ", 2)
        rule = self._select_rule(method, target)
        fault = rule or Rule()
        if (head.get("Expect") or "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _iter_body(reader, head, until_close=False)

        if fault.status is not None:
            for _ in body:
                pass
            self._send_error_response(
                client, fault.status, body=fault.body, content_type=fault.content_type
            )
            return None
        if fault.delay and self._stopping.wait(fault.delay):
            return None
        if fault.before_forward is not None:
            self._run_callback(fault.before_forward, method, target)

        try:
            upstream = self._track(socket.create_connection(self.upstream, timeout=10))
        except OSError as error:
            self._send_error_response(client, 502, f"upstream unreachable: {error}")
            return None
        headers = head.without("Connection", "Keep-Alive", "Expect")
        headers.append(("Connection", "close"))
        upstream.sendall(_encode_head(head.start_line, headers))
        if self._relay(body, upstream, fault.reset_request_after, fault.chunk_delay):
            _reset(client)
            _reset(upstream)
            return upstream
        self._count(fault, "forwarded")
        self._relay_response(method, client, upstream, fault)
        return upstream

    def _run_callback(self, callback, method: str, target: str) -> None:
        """Run a before_forward callback, recording an error instead of raising it."""
        try:
            callback(method, target)
        except Exception as error:  # noqa: BLE001 - any test callback error
            with self._condition:
                self.errors.append(f"before_forward failed: {error!r}")

    def _count(self, rule: Rule, counter: str) -> None:
        with self._condition:
            setattr(rule, counter, getattr(rule, counter) + 1)
            self._condition.notify_all()

    def _relay_response(
        self, method: str, client: socket.socket, upstream: socket.socket, fault: Rule
    ) -> None:
        reader = _BufferedSocket(upstream)
        head = _read_head(reader)
        while head.start_line.split(" ")[1].startswith("1"):
            head = _read_head(reader)
        self._count(fault, "upstream_responded")
        if fault.response_delay and self._stopping.wait(fault.response_delay):
            return
        status = int(head.start_line.split(" ")[1])
        headers = head.without("Connection", "Keep-Alive")
        headers.append(("Connection", "close"))
        client.sendall(_encode_head(head.start_line, headers))

        if method.upper() == "HEAD" or status in (204, 304):
            body = iter(())
        else:
            body = _iter_body(reader, head, until_close=True)
        reset_limit = fault.reset_response_after
        limit = reset_limit if reset_limit is not None else fault.cut_response_after
        if self._relay(body, client, limit, fault.chunk_delay):
            if reset_limit is not None:
                _reset(client)
            else:
                _close_cleanly(client)
            return
        self._count(fault, "responded")
        _close_cleanly(client)

    def _relay(
        self,
        pieces: Iterator[bytes],
        destination: socket.socket,
        limit: int | None,
        chunk_delay: float,
    ) -> bool:
        """Copy pieces to destination and return True once `limit` bytes were sent."""
        sent = 0
        for piece in pieces:
            if limit is not None and sent + len(piece) >= limit:
                destination.sendall(piece[: limit - sent])
                return True
            destination.sendall(piece)
            sent += len(piece)
            if chunk_delay and self._stopping.wait(chunk_delay):
                return False
        return False

    def _send_error_response(
        self,
        client: socket.socket,
        status: int,
        message: str = "",
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        if body is None:
            text = message or f"fault injected by the test proxy: HTTP {status}"
            body = json.dumps({"HttpStatus": status, "Message": text}).encode()
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        client.sendall(_encode_head(f"HTTP/1.1 {status} Injected", headers) + body)
        _close_cleanly(client)
