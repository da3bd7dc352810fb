"""The HTTP side: /metrics, /healthz, /readyz and /status. It only reports; it owns no work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from cpmgr.config import split_listen
from cpmgr.metrics import StoreFigures, render

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]


def metrics_handler(
    registry: CollectorRegistry, capture: Callable[[], Awaitable[StoreFigures]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """/metrics: the store's figures are captured on the loop a chunk at a time, then the
    exposition is rendered in a thread, so a large scrape never holds the event loop.
    Concurrent scrapes share one rendering."""
    lock = asyncio.Lock()

    async def scrape(_: web.Request) -> web.Response:
        async with lock:
            figures = await capture()
            body = await asyncio.to_thread(render, registry, figures)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return scrape


def build_app(
    registry: CollectorRegistry,
    *,
    status: StatusSource,
    ready: Callable[[], bool],
    capture: Callable[[], Awaitable[StoreFigures]],
) -> web.Application:
    """The aiohttp application; `ready` and `status` are read on every request, `capture`
    reads the store's figures for every scrape."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.json_response({"ready": True})
        return web.json_response({"ready": False}, status=503)

    async def status_page(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry, capture))
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
