"""The HTTP side: /metrics, /healthz, /readyz and /status. It only reports; it owns no work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cpmgr.config import split_listen

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]


MetricsSource = Callable[[], AsyncGenerator[bytes, None]]


def metrics_handler(
    render: MetricsSource,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """/metrics: `render` reads the store a chunk per loop turn and yields the text in parts,
    each sent as it comes (a chunked response, waiting while the client is slow), so a large
    scrape never holds the event loop. Concurrent scrapes wait for one another's reading of
    the store, not for one another's client."""
    lock = asyncio.Lock()

    async def scrape(request: web.Request) -> web.StreamResponse:
        async with contextlib.aclosing(render()) as parts:
            async with lock:
                first = await anext(parts)  # the store read, before the status line is sent
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE_LATEST})
            await response.prepare(request)
            await response.write(first)
            async for part in parts:
                await response.write(part)
            await response.write_eof()
        return response

    return scrape


def build_app(
    *,
    status: StatusSource,
    ready: Callable[[], bool],
    render: MetricsSource,
) -> web.Application:
    """The aiohttp application; `ready` and `status` are read on every request, `render`
    produces every scrape of /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.json_response({"ready": True})
        return web.json_response({"ready": False}, status=503)

    async def status_page(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(render))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_page)
    return app


class WebServer:
    """Serves the app on `listen` (host:port); `port` is the bound port (useful with :0)."""

    def __init__(self, listen: str, app: web.Application) -> None:
        self.host, self.requested_port = split_listen(listen)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._site: web.TCPSite | None = None
        self.port = 0

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.requested_port)
        await self._site.start()
        server = self._site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port
        log.info("HTTP on %s:%d: /metrics /healthz /readyz /status", self.host, self.port)

    async def close(self) -> None:
        await self._runner.cleanup()
