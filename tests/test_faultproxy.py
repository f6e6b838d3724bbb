"""Tests of the fault-injecting proxy against a small local HTTP server."""

import contextlib
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from faultproxy import FaultProxy, closed_port

STREAM_PART = b"x" * 50_000


class _UpstreamHandler(BaseHTTPRequestHandler):
    """Echo server: /echo returns the body's size and SHA-256, /stream sends a
    close-delimited body in two parts, /bytes a Content-Length body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:
        body = self._read_body()
        self.server.received.append(body)
        reply = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self) -> None:
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(STREAM_PART)
            self.wfile.flush()
            self.server.release_second_part.wait(10)
            self.wfile.write(STREAM_PART)
            self.close_connection = True
            return
        body = b"y" * 10_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
    server.received = []
    server.release_second_part = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release_second_part.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream):
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
        yield proxy


def _pieces(count: int, size: int):
    for index in range(count):
        yield bytes([index % 256]) * size


def test_forward_chunked_request_body(proxy):
    expected = b"".join(_pieces(20, 10_000))
    reply = requests.post(f"{proxy.url}/echo", data=_pieces(20, 10_000), timeout=10)
    assert reply.status_code == 200
    assert reply.text == f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"
    assert proxy.errors == []


def test_forward_content_length_response(proxy):
    reply = requests.get(f"{proxy.url}/bytes", timeout=10)
    assert reply.content == b"y" * 10_000


def test_stream_response_without_buffering(proxy, upstream):
    with requests.get(f"{proxy.url}/stream", stream=True, timeout=10) as reply:
        first = reply.raw.read(len(STREAM_PART))
        upstream.release_second_part.set()
        rest = reply.raw.read()
    assert first == STREAM_PART
    assert rest == STREAM_PART


def test_status_rule_applies_count_times(proxy):
    rule = proxy.add_rule("GET", r"^/bytes$", status=503, count=1)
    first = requests.get(f"{proxy.url}/bytes", timeout=10)
    second = requests.get(f"{proxy.url}/bytes", timeout=10)
    assert first.status_code == 503
    assert second.status_code == 200
    assert rule.seen == 2
    assert rule.applied == 1


def test_status_rule_sends_given_body(proxy):
    proxy.add_rule("POST", "/echo", status=200, body=b"<html>not JSON</html>")
    reply = requests.post(f"{proxy.url}/echo", data=b"a", timeout=10)
    assert reply.status_code == 200
    assert reply.content == b"<html>not JSON</html>"


def test_status_rule_skips_first_match(proxy):
    proxy.add_rule("POST", "/echo", status=500, skip=1)
    first = requests.post(f"{proxy.url}/echo", data=b"a", timeout=10)
    second = requests.post(f"{proxy.url}/echo", data=_pieces(3, 1000), timeout=10)
    assert first.status_code == 200
    assert second.status_code == 500


def test_cut_response_looks_like_clean_end(proxy, upstream):
    upstream.release_second_part.set()
    proxy.add_rule("GET", "/stream", cut_response_after=1000)
    reply = requests.get(f"{proxy.url}/stream", timeout=10)
    assert reply.status_code == 200
    assert reply.content == STREAM_PART[:1000]


def test_reset_response_raises_connection_error(proxy, upstream):
    upstream.release_second_part.set()
    proxy.add_rule("GET", "/stream", reset_response_after=1000)
    with pytest.raises(requests.exceptions.RequestException):
        _ = requests.get(f"{proxy.url}/stream", timeout=10).content


def test_reset_request_body_midway(proxy, upstream):
    rule = proxy.add_rule("POST", "/echo", reset_request_after=5000)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"{proxy.url}/echo", data=_pieces(200, 10_000), timeout=10)
    assert rule.applied == 1
    assert rule.forwarded == 0


def test_callback_runs_before_forwarding(proxy, upstream):
    received_before = []
    proxy.add_rule(
        "POST",
        "/echo",
        before_forward=lambda method, target: received_before.append(
            len(upstream.received)
        ),
    )
    requests.post(f"{proxy.url}/echo", data=b"abc", timeout=10)
    assert received_before == [0]
    assert upstream.received == [b"abc"]


def test_response_delay_holds_after_upstream(proxy, upstream):
    rule = proxy.add_rule("POST", "^/echo", response_delay=60)

    def post() -> None:
        # Stopping the proxy at teardown drops the held response.
        with contextlib.suppress(requests.RequestException):
            requests.post(f"{proxy.url}/echo", data=b"abc", timeout=20)

    client = threading.Thread(target=post, daemon=True)
    client.start()

    proxy.wait_until(lambda: rule.upstream_responded == 1, timeout=10)
    client.join(timeout=1)

    assert upstream.received == [b"abc"]
    assert client.is_alive(), "the client got the response within the delay"
    assert rule.responded == 0


def test_requests_recorded_and_counted(proxy):
    requests.get(f"{proxy.url}/bytes?x=1", timeout=10)
    requests.post(f"{proxy.url}/echo", data=b"1", timeout=10)
    assert [(r.method, r.target) for r in proxy.requests] == [
        ("GET", "/bytes?x=1"),
        ("POST", "/echo"),
    ]
    assert proxy.count("POST", "^/echo") == 1


def test_unreachable_upstream_answers_502():
    with closed_port() as port, FaultProxy(f"http://127.0.0.1:{port}") as proxy:
        reply = requests.get(f"{proxy.url}/system", timeout=10)
    assert reply.status_code == 502


def test_stop_closes_listening_port(upstream):
    proxy = FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}")
    proxy.start()
    url = proxy.url
    proxy.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{url}/bytes", timeout=2)
