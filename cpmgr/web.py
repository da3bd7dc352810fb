"""The HTTP side: /metrics, /healthz, /readyz and /status. It only reports; it owns no work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cpmgr.config import split_listen

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]


def metrics_handler(
    render: Callable[[], Awaitable[bytes]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """/metrics: `render` reads the store a chunk per loop turn, so a large scrape never
    holds the event loop; concurrent scrapes wait for one another."""
    lock = asyncio.Lock()

    async def scrape(_: web.Request) -> web.Response:
        async with lock:
            body = await render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return scrape


def build_app(
    *,
    status: StatusSource,
    ready: Callable[[], bool],
    render: Callable[[], Awaitable[bytes]],
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
