"""systemd's readiness protocol (sd_notify) in a few lines: one datagram to $NOTIFY_SOCKET.

`Type=notify` units learn READY=1 once the socket listens and STOPPING=1 when the drain
starts, so units ordered after cpmgr start only when they can connect. Outside systemd
(no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]

log = logging.getLogger(__name__)


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; whether it was sent."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        # Readiness is advisory for the daemon itself: a missing manager must not stop it.
        log.warning("could not notify the service manager at %s: %s", address, exc)
        return False
    return True
