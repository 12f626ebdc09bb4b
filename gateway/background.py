"""A :class:`Gateway` on its own event loop in a daemon thread.

The gateway is async and bound to the loop it was started on (its OpenFGA and
audit connections are). Synchronous callers (scripts, LangChain's ``invoke``,
notebook cells, whose thread already runs the kernel's loop and so must not block
on it) need a loop that keeps running while they wait. :class:`BackgroundGateway`
owns one: ``call`` blocks the calling thread until a coroutine finishes on the
gateway's loop, ``acall`` awaits it from any other loop, and ``serve_http`` puts
the HTTP API on a loopback port, served by uvicorn on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from langchain_core.embeddings import Embeddings

from gateway.service import Gateway
from gateway.settings import Settings

T = TypeVar("T")


class BackgroundGateway:
    """Start with :meth:`start`; use as a context manager or call :meth:`close`.

    Not closing it leaves no server behind (the loop thread is a daemon, and a
    managed OpenFGA dies with its parent), but skips a clean shutdown.
    """

    def __init__(
        self, gateway: Gateway, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.gateway = gateway
        self.loop = loop
        self._thread = thread
        self._servers: list[tuple[Any, asyncio.Future[None]]] = []
        self.url: str | None = None

    @classmethod
    def start(
        cls, settings: Settings, *, embeddings: Embeddings | None = None
    ) -> BackgroundGateway:
        """Start a loop thread and a gateway on it (OpenFGA, stores, audit)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=_run_forever, args=(loop,), name="scopegate-gateway", daemon=True
        )
        thread.start()
        future = asyncio.run_coroutine_threadsafe(Gateway.start(settings, embeddings), loop)
        try:
            gateway = future.result()
        except BaseException:
            _stop_loop(loop, thread)
            raise
        return cls(gateway, loop, thread)

    def _on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the gateway's loop and wait for it (from any other thread)."""
        if self._on_loop_thread():
            coro.close()
            raise RuntimeError("BackgroundGateway.call() would block the gateway's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the gateway's loop from whatever loop is running here."""
        if asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def mint_token(self, **claims: Any) -> str:
        """:meth:`Gateway.mint_token` (pure: no loop needed)."""
        return self.gateway.mint_token(**claims)

    def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the HTTP API (uvicorn) on the gateway's loop; returns its base URL.

        ``port=0`` binds a free port: the socket is bound here, before uvicorn starts,
        so the URL is known and no other process can take the port in between.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound_port = sock.getsockname()[1]
        self.call(self._start_server(sock))
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def _start_server(self, sock: socket.socket) -> None:
        import uvicorn

        from gateway.api import create_app

        app = create_app(self.gateway.settings, gateway=self.gateway)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started serving")
            await asyncio.sleep(0.01)
        self._servers.append((server, task))

    async def _shutdown(self) -> None:
        for server, task in self._servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        self._servers.clear()
        await self.gateway.close()

    def close(self) -> None:
        """Stop serving, close the gateway (and its managed OpenFGA), stop the loop."""
        if self.loop.is_closed():
            return
        try:
            self.call(self._shutdown())
        finally:
            _stop_loop(self.loop, self._thread)

    def __enter__(self) -> BackgroundGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Worker threads of the default executor started the managed OpenFGA child
        # (whose death signal follows its parent thread), so they go last.
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
