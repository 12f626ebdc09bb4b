"""A small HTTP/1.1-aware TCP proxy that injects faults between the gateway and a server.

It runs its own event loop in a background thread, so the faults hit real sockets
whatever the code under test does with its own loop. Put it in front of OpenFGA or a
Chroma server, point the gateway at :attr:`FaultProxy.url`, and change
:attr:`FaultProxy.fault` at any time::

    with FaultProxy(port=openfga.http_port) as proxy:
        proxy.set(Fault.latency(3.0, path="/batch-check"))
        ...
        proxy.clear()

Requests are read whole (head and body, ``Content-Length`` or chunked) and forwarded
byte for byte; responses are read whole and passed back byte for byte unless a fault
applies to that request. Every fault change closes the open connections, so no
keep-alive connection carries the old behaviour. What passed through is recorded in
:attr:`FaultProxy.seen`, each request with its headers (names lower-cased).

Faults (each may be limited to request paths containing ``path``, and with
``Fault.matching(part, fault)`` to requests whose body contains ``part``):

- ``latency(s)``: answer ``s`` seconds late.
- ``blackhole()``: read the request, never answer.
- ``drop()``: close the connection without answering.
- ``reset()``: read the request, then reset the connection (RST).
- ``truncate(n)``: send only the first ``n`` bytes of the real answer, then close.
- ``corrupt(fn)``: send ``fn(raw answer bytes)`` (a broken status line, garbled JSON).
- ``respond(status, body)``: answer with a canned response instead of asking upstream.
- ``rewrite(fn)``: ask upstream, then answer ``fn(status, body) -> (status, body)``.
- ``hold(event)``: read the request, forward it only once ``event`` (a
  ``threading.Event``) is set, then answer normally: the request reaches the server
  after whatever the test does meanwhile.

``Fault.after(n, fault)`` lets the first ``n`` matching requests through untouched (counted
from the last :meth:`FaultProxy.set`), so a fault can hit the second or third write of
an operation rather than its first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

Rewrite = Callable[[int, bytes], tuple[int, bytes]]
Paths = str | tuple[str, ...] | None
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Fault:
    kind: str = "none"
    # Only requests whose path contains this (or, for a tuple, any of these).
    path: Paths = None
    seconds: float = 0.0
    limit: int = 0
    transform: Callable[[bytes], bytes] | None = None
    status: int = 200
    body: bytes = b""
    rewrite_fn: Rewrite | None = None
    # Matching requests let through untouched before the fault applies.
    skip: int = 0
    gate: threading.Event | None = None
    # Only requests whose body contains this.
    body_part: bytes | None = None

    @staticmethod
    def none() -> Fault:
        return Fault()

    @staticmethod
    def latency(seconds: float, path: Paths = None) -> Fault:
        return Fault("latency", path, seconds=seconds)

    @staticmethod
    def blackhole(path: Paths = None) -> Fault:
        return Fault("blackhole", path)

    @staticmethod
    def drop(path: Paths = None) -> Fault:
        return Fault("drop", path)

    @staticmethod
    def reset(path: Paths = None) -> Fault:
        return Fault("reset", path)

    @staticmethod
    def truncate(limit: int, path: Paths = None) -> Fault:
        return Fault("truncate", path, limit=limit)

    @staticmethod
    def corrupt(transform: Callable[[bytes], bytes], path: Paths = None) -> Fault:
        return Fault("corrupt", path, transform=transform)

    @staticmethod
    def respond(status: int, body: bytes | str | Any, path: Paths = None) -> Fault:
        raw = (
            body
            if isinstance(body, bytes)
            else (body if isinstance(body, str) else json.dumps(body)).encode()
        )
        return Fault("respond", path, status=status, body=raw)

    @staticmethod
    def rewrite(fn: Rewrite, path: Paths = None) -> Fault:
        return Fault("rewrite", path, rewrite_fn=fn)

    @staticmethod
    def hold(release: threading.Event, path: Paths = None) -> Fault:
        return Fault("hold", path, gate=release)

    @staticmethod
    def matching(part: bytes, fault: Fault) -> Fault:
        """``fault``, for requests whose body contains ``part`` only."""
        return dataclasses.replace(fault, body_part=part)

    @staticmethod
    def after(passed: int, fault: Fault) -> Fault:
        """``fault``, once ``passed`` matching requests have gone through untouched."""
        return dataclasses.replace(fault, skip=passed)

    def applies(self, path: str, body: bytes = b"") -> bool:
        if self.kind == "none":
            return False
        if self.body_part is not None and self.body_part not in body:
            return False
        if self.path is None:
            return True
        wanted = (self.path,) if isinstance(self.path, str) else self.path
        return any(part in path for part in wanted)


@dataclass
class Message:
    """One request or response as read off the wire: raw bytes plus what was parsed."""

    raw: bytes
    first_line: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool = True


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    status: int | None = None
    fault: str = "none"
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class UpstreamGone(Exception):
    """The upstream server refused or dropped the connection."""


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class FaultProxy:
    """Listen on a free loopback port and forward to ``host:port`` with injected faults."""

    def __init__(self, port: int, host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.upstream = (host, port)
        self.fault = Fault.none()
        self.seen: list[Seen] = []
        self.faults_injected = 0
        self._let_through = 0  # matching requests passed since the last set() (Fault.skip)
        self.listen_port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()

    # -- control (any thread) ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", self.listen_port, limit=_MAX_HEAD)
            )
            self.listen_port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def set(self, fault: Fault) -> None:
        """Switch to ``fault`` and close every open connection."""
        with self._lock:
            self.fault = fault
            self._let_through = 0
        self._call(self._close_all())

    def clear(self) -> None:
        self.set(Fault.none())

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        """Forward to another upstream (a restarted server on a new port)."""
        with self._lock:
            self.upstream = (host, port)
        self._call(self._close_all())

    def requests(self, path: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path in s.path]

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            return None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy (its own loop) --------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()

    async def _close_all(self) -> None:
        for conn in list(self._conns):
            _close(conn)
            for task in conn.tasks:
                task.cancel()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        current = asyncio.current_task()
        if current is not None:
            conn.tasks.add(current)
        self._conns.add(conn)
        try:
            while True:
                request = await _read_message(reader, is_request=True)
                if request is None:
                    return
                if not await self._exchange(conn, request):
                    return
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            UpstreamGone,
            asyncio.CancelledError,  # the fault changed: this connection is closed
        ):
            return
        finally:
            self._conns.discard(conn)
            _close(conn)

    async def _exchange(self, conn: _Conn, request: Message) -> bool:
        """Answer one request; False when the client connection must close."""
        method, path = [*request.first_line.split(" "), "", ""][:2]
        with self._lock:
            fault = self.fault
        seen = Seen(method, path, request.body, headers=dict(request.headers))
        with self._lock:
            self.seen.append(seen)
        if not fault.applies(path, request.body) or self._lets_through(fault):
            response = await self._forward(conn, request, method)
            seen.status = _status(response.first_line)
            conn.writer.write(response.raw)
            await conn.writer.drain()
            return request.keep_alive and response.keep_alive
        seen.fault = fault.kind
        self.faults_injected += 1
        return await self._inject(conn, request, method, fault, seen)

    def _lets_through(self, fault: Fault) -> bool:
        """Whether this matching request is one of the ``fault.skip`` first ones."""
        with self._lock:
            if fault is not self.fault or self._let_through >= fault.skip:
                return False
            self._let_through += 1
            return True

    async def _inject(
        self, conn: _Conn, request: Message, method: str, fault: Fault, seen: Seen
    ) -> bool:
        writer = conn.writer
        if fault.kind == "drop":
            return False
        if fault.kind == "blackhole":
            await asyncio.sleep(3600)
            return False
        if fault.kind == "reset":
            _reset(writer)
            return False
        if fault.kind == "respond":
            writer.write(_response(fault.status, fault.body))
            await writer.drain()
            return False
        if fault.kind == "hold" and fault.gate is not None:
            await asyncio.to_thread(fault.gate.wait, 60)
        response = await self._forward(conn, request, method)
        seen.status = _status(response.first_line)
        if fault.kind == "hold":
            writer.write(response.raw)
        elif fault.kind == "latency":
            await asyncio.sleep(fault.seconds)
            writer.write(response.raw)
        elif fault.kind == "truncate":
            writer.write(response.raw[: fault.limit])
            await writer.drain()
            return False
        elif fault.kind == "corrupt" and fault.transform is not None:
            writer.write(fault.transform(response.raw))
            await writer.drain()
            return False
        elif fault.kind == "rewrite" and fault.rewrite_fn is not None:
            status, body = fault.rewrite_fn(_status(response.first_line), response.body)
            writer.write(_response(status, body))
            await writer.drain()
            return False
        await writer.drain()
        return request.keep_alive and response.keep_alive

    async def _forward(self, conn: _Conn, request: Message, method: str) -> Message:
        for attempt in (1, 2):
            if conn.upstream is None:
                with self._lock:
                    host, port = self.upstream
                try:
                    conn.upstream = await asyncio.open_connection(host, port, limit=_MAX_HEAD)
                except OSError as exc:
                    raise UpstreamGone(str(exc)) from exc
            reader, writer = conn.upstream
            try:
                writer.write(request.raw)
                await writer.drain()
                response = await _read_message(reader, is_request=False, method=method)
            except (ConnectionError, asyncio.IncompleteReadError):
                response = None
            if response is not None:
                if not response.keep_alive:
                    writer.close()
                    conn.upstream = None
                return response
            # The upstream closed a kept-alive connection (or died): one fresh try.
            writer.close()
            conn.upstream = None
            if attempt == 2:
                raise UpstreamGone("upstream closed the connection")
        raise AssertionError("unreachable")


# -- HTTP/1.1 framing ---------------------------------------------------------------------------


async def _read_message(
    reader: asyncio.StreamReader, *, is_request: bool, method: str = "GET"
) -> Message | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raw = bytearray(head)
    body = bytearray()
    status = None if is_request else _status(lines[0])
    no_body = not is_request and (method == "HEAD" or status in (204, 304) or (status or 0) < 200)
    if no_body:
        pass
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            body += chunk[:-2]
            if size == 0:
                break
    elif "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
        raw += data
        body += data
    elif not is_request:
        data = await reader.read()  # delimited by the connection closing
        raw += data
        body += data
        headers["connection"] = "close"
    keep_alive = headers.get("connection", "").lower() != "close"
    return Message(bytes(raw), lines[0], headers, bytes(body), keep_alive)


def _status(first_line: str) -> int:
    parts = first_line.split(" ")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return 0


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(conn: _Conn) -> None:
    with contextlib.suppress(Exception):
        conn.writer.close()
    if conn.upstream is not None:
        with contextlib.suppress(Exception):
            conn.upstream[1].close()
        conn.upstream = None


# -- handy transforms ----------------------------------------------------------------------------


def bad_status_line(raw: bytes) -> bytes:
    """Replace the status line with one no HTTP client can parse."""
    _, _, rest = raw.partition(b"\r\n")
    return b"HTTP/1.1 5x3 ???\r\n" + rest


def garble_json(raw: bytes) -> bytes:
    """Same length, but the body is no longer JSON (its braces become angle brackets)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    return head + sep + body.replace(b"{", b"<").replace(b"}", b">")


def drop_half_of_results(status: int, body: bytes) -> tuple[int, bytes]:
    """A BatchCheck answer that silently leaves out half of the items."""
    data = json.loads(body)
    result = data.get("result", {})
    data["result"] = dict(list(result.items())[: len(result) // 2])
    return status, json.dumps(data).encode()


def error_one_item(status: int, body: bytes) -> tuple[int, bytes]:
    """A BatchCheck answer where one item carries an error instead of a verdict."""
    data = json.loads(body)
    result = data.get("result", {})
    if result:
        first = next(iter(result))
        result[first] = {"error": {"input_error": "validation_error", "message": "injected"}}
    return status, json.dumps(data).encode()


def rename_correlation_ids(status: int, body: bytes) -> tuple[int, bytes]:
    """Every item answered allowed, but under correlation ids nobody asked about."""
    data = json.loads(body)
    result = data.get("result", {})
    data["result"] = {f"x-{cid}": {"allowed": True} for cid in result}
    return status, json.dumps(data).encode()


def truncate_json(status: int, body: bytes) -> tuple[int, bytes]:
    """A 200 whose JSON body stops half way (Content-Length matching what is sent)."""
    return status, body[: max(1, len(body) // 2)]
