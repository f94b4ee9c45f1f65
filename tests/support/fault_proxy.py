"""A fault-injecting HTTP/1.1 proxy for S3 traffic, of our own: asyncio in a background thread.

Put it between boto3 and the S3 server (``ACTMAP_S3_ENDPOINT_URL=proxy.url``). It parses every
request of every keep-alive connection (Content-Length or chunked bodies), answers
``Expect: 100-continue`` itself (a proxy may: RFC 9110 §10.1.1) and forwards the request without
that header (botocore never signs ``Expect``), one persistent upstream connection per client
connection. For a fraction ``fault_rate`` of requests (seeded RNG; both it and ``kinds`` may be
changed at any time from the test thread) it injects one fault of a kind drawn from ``kinds``:

``slowdown``      503 SlowDown with S3's error XML, after reading the whole request
``internal``      500 InternalError, likewise
``reset_before``  the whole request is read, then the client connection is reset (RST): the
                  server never sees the request
``reset_after``   the request is forwarded and the server's whole answer read, then the client
                  connection is reset: the server did the work, the client never hears of it
``stall``         the request is held ``stall_s`` seconds (longer than the client's read
                  timeout), then forwarded, and the answer sent to whoever is still listening;
                  at most ``max_stalls`` of them, so that a test's time stays bounded
``bitflip``       one bit of the request body is flipped before forwarding (requests with a
                  body only); a server that checks Content-MD5 must refuse it (400 BadDigest)

Everything is counted (``stats()``): requests seen by method, faults by kind, what the server
answered to bit-flipped requests, and proxy-side errors that were not injected (``upstream_errors``,
which a test can require to be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Self

from tests.support.ports import LOOPBACK

KINDS = ("slowdown", "internal", "reset_before", "reset_after", "stall", "bitflip")

_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}
_MAX_HEAD = 64 * 1024
_CODE = re.compile(rb"<Code>([^<]*)</Code>")


class _ClientGoneError(Exception):
    """The client closed or reset its connection."""


class _UpstreamError(Exception):
    """The S3 server could not be reached or its answer could not be read."""


@dataclass
class ProxyStats:
    """A snapshot of the proxy's counters."""

    requests: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    forwarded: int = 0
    upstream_status: Counter[int] = field(default_factory=Counter)
    bitflip_answers: Counter[str] = field(default_factory=Counter)  # "400 BadDigest", ...
    upstream_errors: int = 0

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def chunked(self) -> bool:
        return "chunked" in (self.header("transfer-encoding") or "").lower()

    def wire(self) -> bytes:
        """The request as forwarded: without Expect (answered here), the body re-framed."""
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() != "expect"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not self.chunked:
            return head + self.body
        chunk = f"{len(self.body):x}\r\n".encode() + self.body + b"\r\n" if self.body else b""
        trailers = "".join(f"{k}: {v}\r\n" for k, v in self.trailers).encode("latin-1")
        return head + chunk + b"0\r\n" + trailers + b"\r\n"


class FaultProxy:
    """See the module docstring. ``with FaultProxy(host, port) as proxy: ... proxy.url ...``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int = 0,
        fault_rate: float = 0.0,
        kinds: Iterable[str] | Mapping[str, float] = KINDS,
        stall_s: float = 12.0,
        max_stalls: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.fault_rate = fault_rate
        self.kinds = kinds  # the setter normalizes to a weight mapping
        self.stall_s = stall_s
        self.max_stalls = max_stalls
        self.port: int | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- configuration ---------------------------------------------------------------------------

    @property
    def kinds(self) -> dict[str, float]:
        return dict(self._kinds)

    @kinds.setter
    def kinds(self, value: Iterable[str] | Mapping[str, float]) -> None:
        weights = dict(value) if isinstance(value, Mapping) else dict.fromkeys(value, 1.0)
        unknown = set(weights) - set(KINDS)
        if unknown or not weights:
            raise ValueError(f"fault kinds {sorted(unknown) or 'none'}; expected some of {KINDS}")
        self._kinds = weights

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy has not been started")
        return f"http://{LOOPBACK}:{self.port}"

    def stats(self) -> ProxyStats:
        with self._lock:
            s = self._stats
            return ProxyStats(
                s.requests,
                Counter(s.by_method),
                Counter(s.faults),
                s.forwarded,
                Counter(s.upstream_status),
                Counter(s.bitflip_answers),
                s.upstream_errors,
            )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, LOOPBACK, 0, limit=_MAX_HEAD), loop
        ).result(timeout=10)
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- one client connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                request = await _read_head(reader)
                if request is None:
                    break
                kind = self._draw(request)
                if (request.header("expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                await _read_body(reader, request)
                if kind == "bitflip":
                    bit = self._rng.randrange(len(request.body) * 8)
                    flipped = bytearray(request.body)
                    flipped[bit // 8] ^= 1 << (bit % 8)
                    request.body = bytes(flipped)
                if kind in _ERRORS:
                    writer.write(_error_response(kind, request))
                    await writer.drain()
                    continue
                if kind == "reset_before":
                    _reset(writer)
                    return
                if kind == "stall":
                    await asyncio.sleep(self.stall_s)
                upstream, response, status, close = await self._forward(upstream, request)
                if kind == "bitflip":
                    match = _CODE.search(response)
                    with self._lock:
                        self._stats.bitflip_answers[f"{status} {match[1].decode() if match else '-'}"] += 1
                if kind == "reset_after":
                    _reset(writer)
                    return
                writer.write(response)
                await writer.drain()
                if close or (request.header("connection") or "").lower() == "close":
                    break
        except _UpstreamError:  # the server could not be reached or answered nonsense: not injected
            with self._lock:
                self._stats.upstream_errors += 1
            _reset(writer)
        except (
            _ClientGoneError,
            OSError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            _reset(writer)  # the client went away or sent something that is not HTTP/1.1
        except asyncio.CancelledError:  # stop(); not re-raised: asyncio would log it as an error
            _reset(writer)
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()
            self._connections.discard(task)

    def _draw(self, request: _Request) -> str | None:
        """Count the request and decide its fault (None: forward it untouched)."""
        has_body = request.chunked or int(request.header("content-length") or 0) > 0
        with self._lock:
            self._stats.requests += 1
            self._stats.by_method[request.method] += 1
            if self._rng.random() >= self.fault_rate:
                return None
            stalls_left = self.max_stalls is None or self._stats.faults["stall"] < self.max_stalls
            kinds = {
                k: w
                for k, w in self._kinds.items()
                if w > 0 and (k != "stall" or stalls_left) and (k != "bitflip" or has_body)
            }
            if not kinds:
                return None
            kind = self._rng.choices(list(kinds), weights=list(kinds.values()))[0]
            self._stats.faults[kind] += 1
            return kind

    async def _forward(
        self, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, request: _Request
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, bytes, int, bool]:
        """Send the request upstream and read the whole answer.

        Returns the upstream connection to keep (None once the server closed it), the answer,
        its status, and whether the client connection must be closed after it. A kept connection
        the server has meanwhile closed is replaced once, before any answer byte was read.
        """
        reused = upstream is not None
        with self._lock:
            self._stats.forwarded += 1
        while True:
            try:
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream, limit=_MAX_HEAD)
                ureader, uwriter = upstream
                uwriter.write(request.wire())
                await uwriter.drain()
                response, status, close = await _read_response(ureader, request.method)
                break
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                if upstream is not None:
                    upstream[1].close()
                    upstream = None
                stale = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                if reused and (stale or isinstance(exc, ConnectionResetError | BrokenPipeError)):
                    reused = False
                    continue
                raise _UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._stats.upstream_status[status] += 1
        if close:
            upstream[1].close()
            return None, response, status, True
        return upstream, response, status, False


# -- HTTP/1.1 framing ----------------------------------------------------------------------------


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return headers


async def _read_head(reader: asyncio.StreamReader) -> _Request | None:
    """The next request's line and headers; None if the client closed between requests."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _ClientGoneError("client closed mid-request") from exc
        return None
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    method, target, version = lines[0].split(" ", 2)
    return _Request(method, target, version, _parse_headers(lines[1:]))


async def _read_body(reader: asyncio.StreamReader, request: _Request) -> None:
    if request.chunked:
        request.body, request.trailers = await _read_chunked(reader)
    else:
        request.body = await reader.readexactly(int(request.header("content-length") or 0))


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[str, str]]]:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
    trailer_lines = []
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        trailer_lines.append(line.decode("latin-1").rstrip("\r\n"))
    return bytes(body), _parse_headers(trailer_lines)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[bytes, int, bool]:
    """The server's whole final answer as raw bytes (interim 1xx answers skipped), its status, and
    whether the connection must be closed after it."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split(" ", 2)[1])
        if not 100 <= status < 200:
            break
    headers = {k.lower(): v for k, v in _parse_headers(lines[1:])}
    close = headers.get("connection", "").lower() == "close"
    if method == "HEAD" or status in (204, 304):
        return head, status, close
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    raw += line
                raw += b"\r\n"
                break
            raw += await reader.readexactly(size + 2)
        return head + bytes(raw), status, close
    if "content-length" in headers:
        return head + await reader.readexactly(int(headers["content-length"])), status, close
    return head + await reader.read(), status, True  # delimited by the end of the connection


def _error_response(kind: str, request: _Request) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    request_id = uuid.uuid4().hex[:16].upper()
    resource = request.target.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: actmap-fault-proxy\r\n\r\n"
    ).encode()
    return head if request.method == "HEAD" else head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER 0, then drop the transport without flushing."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
