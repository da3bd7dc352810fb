"""The client's sans-I/O core: requests become bytes, bytes become replies and events.

`ClientCore` holds one connection's protocol state and does no I/O, as h11 and wsproto do: the
blocking and asyncio shells feed it the bytes they read and write the bytes it returns. It
frames lines (each byte is scanned once however the stream is split), matches answers to the
requests in order (checking echoed ids), and routes event lines (an `event` field and no `ok`
field) out as typed events, never to a waiting request.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypedDict

from cpmgr.backoff import backoff_delay
from cpmgr.client.events import MemberEvent, parse_event
from cpmgr.errors import CpmgrError

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MAX_ANSWER_BYTES",
    "Answer",
    "AsyncClosing",
    "ClientCore",
    "Closing",
    "ConnectOptions",
    "CpmgrClientError",
    "CpmgrProtocolError",
    "CpmgrUnavailable",
    "Received",
    "Reply",
    "Settings",
    "checked",
    "default_socket_path",
    "failure",
    "read_timeout",
    "strip_id",
]

DEFAULT_SOCKET_PATH: Final = "/run/cpmgr/cpmgr.sock"
SOCKET_ENV: Final = "CPMGR_SOCKET"
# Answers to `get` on a big group can be long; the daemon's own lines are trusted.
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024

Answer = dict[str, Any]


class CpmgrClientError(CpmgrError):
    """Root of the client's errors."""


class CpmgrProtocolError(CpmgrClientError):
    """The daemon answered `ok:false`; `answer` is the whole answer."""

    def __init__(self, code: str, message: str, answer: Answer) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.answer = answer

    @property
    def dropped(self) -> bool | None:
        """For a failed `wait` or `release`: whether the value was given up (None if not said)."""
        error = self.answer.get("error")
        value = error.get("dropped") if isinstance(error, dict) else None
        return value if isinstance(value, bool) else None


class CpmgrUnavailable(CpmgrClientError):
    """The daemon could not be reached, or did not answer in time."""


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """`$CPMGR_SOCKET` if set and non-empty, else /run/cpmgr/cpmgr.sock."""
    value = (os.environ if env is None else env).get(SOCKET_ENV, "")
    return value or DEFAULT_SOCKET_PATH


class ConnectOptions(TypedDict, total=False):
    """How both clients reach the daemon (the defaults are in `Settings`)."""

    timeout: float | None  # seconds to wait for an answer (plus a request's own), None: ever
    reconnect_attempts: int  # tries after the first, per call, with backoff
    initial_backoff: float
    max_backoff: float
    rng: Callable[[], float]  # for the backoff's jitter, like random.random


class Settings:
    """Where the daemon is, how long to wait for its answers, and how to retry a connect."""

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float | None = 60.0,
        reconnect_attempts: int = 3,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.path = path if path is not None else default_socket_path()
        self._timeout = timeout
        self._attempts = reconnect_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._rng = rng

    def _delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (exponential, full jitter)."""
        return backoff_delay(
            attempt, initial=self._initial_backoff, maximum=self._max_backoff, rng=self._rng
        )


class Closing:
    """`with x:` closes x at the end."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class AsyncClosing:
    """`async with x:` closes x at the end."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError


# --- answers ---------------------------------------------------------------------------------


def failure(answer: Answer) -> CpmgrProtocolError | None:
    """The error an `ok:false` answer stands for, None for a success."""
    if answer.get("ok") is True:
        return None
    error = answer.get("error")
    error = error if isinstance(error, dict) else {}
    return CpmgrProtocolError(
        str(error.get("code", "Unknown")), str(error.get("message", "")), answer
    )


def checked(answer: Answer) -> Answer:
    """The answer if it is a success; raises its CpmgrProtocolError otherwise."""
    error = failure(answer)
    if error is not None:
        raise error
    return answer


def strip_id(answer: Answer) -> Answer:
    """The answer without the `id` the client added."""
    return {k: v for k, v in answer.items() if k != "id"}


def read_timeout(base: float | None, payload: Mapping[str, object]) -> float | None:
    """How long to wait for an answer: a request's own `timeout` is added to the base."""
    if base is None:
        return None
    extra = payload.get("timeout")
    return base + (float(extra) if isinstance(extra, int | float) else 0.0)


# --- the connection's state ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request (`ok:false` included), with the request it answers."""

    request_id: int
    payload: Mapping[str, object]
    answer: Answer


Received = Reply | MemberEvent


class ClientCore:
    """One connection's protocol state: requests -> bytes, bytes -> replies and events."""

    def __init__(self, *, max_line_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._waiting: deque[tuple[int, Mapping[str, object]]] = deque()
        self.refused: Answer | None = None

    @property
    def waiting(self) -> int:
        """How many requests sent have no answer yet."""
        return len(self._waiting)

    def send(self, payloads: Sequence[Mapping[str, object]]) -> tuple[list[int], bytes]:
        """The ids and the pipelined bytes of these requests; each now waits for its answer."""
        ids = [next(self._ids) for _ in payloads]
        self._waiting.extend(zip(ids, payloads, strict=True))
        return ids, b"".join(_encode(p, i) for p, i in zip(payloads, ids, strict=True))

    def receive(self, data: bytes) -> list[Received]:
        """Replies and events, in the order their lines arrived, for the bytes read.

        Raises CpmgrClientError when the stream is out of step (a line that is not JSON, an
        answer to no request, an unexpected id, a line too long): nothing more on that
        connection can be trusted.
        """
        self._buffer += data
        received: list[Received] = []
        start = 0
        while self.refused is None:
            end = self._buffer.find(b"\n", max(start, self._scanned))
            if end < 0:
                break
            received += self._line(bytes(self._buffer[start:end]))
            start = end + 1
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._scanned > self._max_line_bytes:
            raise CpmgrClientError("answer line too long")
        return received

    def unanswered(self) -> list[Mapping[str, object]]:
        """The connection is gone: the requests it did not answer, in order (to send again)."""
        payloads = [payload for _, payload in self._waiting]
        self._waiting.clear()
        self._buffer.clear()
        self._scanned = 0
        return payloads

    def _line(self, line: bytes) -> list[Received]:
        if not line.strip():
            return []
        obj = _decode(line)
        if "event" in obj and "ok" not in obj:
            try:
                return [parse_event(obj)]
            except ValueError as exc:
                raise CpmgrClientError(str(exc)) from None
        if not self._waiting:
            raise CpmgrClientError("the daemon answered a request never sent")
        request_id, payload = self._waiting.popleft()
        _check_id(obj, request_id)
        reply = Reply(request_id, payload, obj)
        if not _is_connection_level(obj):
            return [reply]
        # The daemon closes the connection after this line: it answers every request.
        self.refused = obj
        rest = [Reply(i, p, obj) for i, p in self._waiting]
        self._waiting.clear()
        return [reply, *rest]


def _encode(payload: Mapping[str, object], request_id: int) -> bytes:
    return json.dumps({**payload, "id": request_id}, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> Answer:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise CpmgrClientError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise CpmgrClientError(f"the daemon sent an answer that is not an object: {obj!r}")
    return obj


def _check_id(answer: Answer, request_id: int) -> None:
    # An answer without an id is for a line the daemon could not read as an object: it still
    # comes in order. Any other id means the stream is out of step.
    if "id" in answer and answer["id"] != request_id:
        raise CpmgrClientError(f"answer for request {answer['id']!r}, expected {request_id}")


def _is_connection_level(answer: Answer) -> bool:
    """An id-less Forbidden ends the connection for every request, not only one."""
    error = answer.get("error")
    return "id" not in answer and isinstance(error, dict) and error.get("code") == "Forbidden"
