"""The listening side of the consumer socket: the socket file, accepting connections in bounded
batches, refusing them with one error line, and the peer's uid. No request handling."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Final

from cpmgr.errors import CpmgrError

__all__ = ["Acceptor", "QuietLog", "Refusals", "bind", "fd_ceiling", "peer_uid"]

log = logging.getLogger(__name__)

_PROBE_TIMEOUT: Final = 1.0
_PEERCRED: Final = struct.Struct("3i")
_LOG_EVERY: Final = 60.0
_BACKLOG: Final = 1024
_ACCEPT_BATCH: Final = 64
_REFUSAL_DRAIN_READS: Final = 4  # at most this many reads of what a refused peer sent
_MAX_LINGERING: Final = 64  # refused connections kept half-open at once
_LINGER: Final = 1.0  # seconds a refused connection is kept half-open at most
_ACCEPT_PAUSE: Final = 0.5  # after accept() failed for want of descriptors or memory


# --- the socket file ------------------------------------------------------------------------


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody answers on; refuse a live socket or a non-socket file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise CpmgrError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a full accept backlog: somebody is listening
    except OSError as exc:
        raise CpmgrError(f"cannot check the existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise CpmgrError(f"{path}: another process is already listening (is cpmgr running?)")


def bind(path: str, mode: int) -> socket.socket:
    """A listening-ready Unix socket at `path` with permissions `mode`."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask is process-wide, but this runs at startup before any thread creates files.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise CpmgrError(f"cannot bind the socket {path}: {exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), if known."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


class Refusals:
    """Refused connections: one error line, then closed. A few are kept half-open briefly, read
    and discarded until the peer closes: closing a Unix socket with unread input resets it, and
    a peer still sending could lose the line. Beyond that few, or when descriptors run short,
    they are closed at once."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}

    def refuse(self, conn: socket.socket, line: bytes, *, linger: bool) -> None:
        try:
            conn.send(line)  # one short line into an empty socket buffer
            if not linger or len(self._open) >= _MAX_LINGERING:
                raise BlockingIOError
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            _drain_and_close(conn)
            return
        fd = conn.fileno()
        self._loop.add_reader(fd, self._readable, fd)
        self._open[fd] = (conn, self._loop.call_later(_LINGER, self._close, fd))

    def _readable(self, fd: int) -> None:
        conn = self._open[fd][0]
        try:
            if conn.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn, timer = self._open.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self._open):
            self._close(fd)


def _drain_and_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        for _ in range(_REFUSAL_DRAIN_READS):
            if not conn.recv(65536):
                break
    conn.close()


def fd_ceiling(reserve: int) -> int:
    """The lowest descriptor number a consumer connection may not have."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2**31
    return max(soft - reserve, 16)


class QuietLog:
    """Logs a warning per reason at most once per `every` seconds, with how many it held back."""

    def __init__(self, every: float = _LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def warning(self, reason: str, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next.get(reason, 0.0):
            self._held[reason] += 1
            return
        self._next[reason] = now + self._every
        held = self._held.pop(reason, 0)
        suffix = f" ({held} more like it in the last {self._every:g}s)" if held else ""
        log.warning(message + suffix, *args)


class Acceptor:
    """Accepts connections itself: a refusal costs an accept, a send and a close (no transport),
    and running out of descriptors pauses accepting for a while instead of spinning."""

    def __init__(
        self, sock: socket.socket, on_accept: Callable[[socket.socket], None], quiet: QuietLog
    ) -> None:
        self._sock = sock
        self._on_accept = on_accept
        self._quiet = quiet
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        self._sock.setblocking(False)
        self._sock.listen(max(_BACKLOG, socket.SOMAXCONN))
        self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def _accept_some(self) -> None:
        # A bounded batch per wake-up, so a flood of connects cannot hold the loop.
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(exc)
                return
            self._on_accept(conn)

    def _pause(self, exc: OSError) -> None:
        self._quiet.warning(
            "accept",
            "cannot accept a socket connection (%s): accepting again in %gs",
            exc.strerror or exc,
            _ACCEPT_PAUSE,
        )
        self._loop.remove_reader(self._sock.fileno())
        self._timer = self._loop.call_later(_ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
