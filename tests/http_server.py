"""A real HTTP server on 127.0.0.1 for download tests: serves in-memory files, honours
"Range: bytes=N-", and can misbehave on request (cut a body short, ignore Range)."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    body: bytes
    cut_after: int | None = None  # on the first request only, close the connection after this many bytes
    ignore_range: bool = False  # answer 200 with the whole body even when a Range is asked for


@dataclass
class Request:
    path: str
    range: str | None
    status: int


@dataclass
class ServerState:
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RangeHandler(BaseHTTPRequestHandler):
    server: "TestServer"

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        state = self.server.state
        served = state.files.get(self.path)
        range_header = self.headers.get("Range")
        if served is None:
            self._record(range_header, 404)
            self.send_error(404)
            return
        body, start, status = served.body, 0, 200
        if range_header is not None and not served.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, f"client sent an unsupported Range header {range_header!r}"
            start, status = int(match.group(1)), 206
            if start >= len(body):
                self._record(range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self._record(range_header, status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        payload = body[start:]
        with state.lock:
            cut, served.cut_after = served.cut_after, None
        if cut is not None:
            # Promise the full length, send less, then hang up: a truncated body.
            payload = payload[:cut]
            self.close_connection = True
        self.wfile.write(payload)

    def _record(self, range_header: str | None, status: int) -> None:
        with self.server.state.lock:
            self.server.state.requests.append(Request(self.path, range_header, status))

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass


class TestServer(ThreadingHTTPServer):
    __test__ = False  # not a pytest test class
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.state = ServerState()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, **behaviour: object) -> str:
        self.state.files[path] = Served(body, **behaviour)  # type: ignore[arg-type]
        return self.url(path)


@contextmanager
def running_server() -> Iterator[TestServer]:
    """A TestServer answering on a background thread; test modules wrap it in their `server` fixture."""
    httpd = TestServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port_url(name: str) -> str:
    # Bind to a free port, then release it: connecting there is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


