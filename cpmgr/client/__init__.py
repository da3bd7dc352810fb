"""A client library for consumers: the socket protocol of docs/protocol.md, sync and asyncio.

`CpmgrClient` (blocking, one connection, `pipeline()` to send many requests in one write) and
`AsyncCpmgrClient` (concurrent calls share one connection; answers are matched in order) both
reconnect with exponential backoff when the connection is lost, and resend the requests that
were not answered: every op is safe to repeat (an equal checkpoint is a no-op). `join()` makes
a member of a membership group on a connection of its own, which yields typed events.
Refusals raise `CpmgrProtocolError` with the protocol code; an unreachable daemon raises
`CpmgrUnavailable`.

Both shells are thin: `core` is the protocol without I/O (bytes in, replies and events out),
`ops` says once what each operation sends and returns, `events` types the membership events.

Decisions where the contract is silent:
- `join()` opens a connection for the member alone and never reconnects it: a new connection
  is not a member, so a drop ends the membership with a client-made `Lost` event (reason
  `disconnected`, every shard the member held) and the iteration ends; the consumer joins again.
- Closing a member without `leave()` is the daemon's disconnect path (pending checkpoints
  committed within `release_timeout`, then the shards released): safe, just not confirmed.
- A known event kind with a missing or mistyped field is an out-of-step stream (the connection
  is closed); an unknown kind is passed on as `OtherEvent`.
- Events on a plain client's connection (possible only after a raw `call("join")`) are ignored.
"""

from __future__ import annotations

from cpmgr.backoff import backoff_delay
from cpmgr.client.aio import AsyncCpmgrClient, AsyncMember, Joining
from cpmgr.client.core import (
    DEFAULT_SOCKET_PATH,
    Answer,
    ClientCore,
    CpmgrClientError,
    CpmgrProtocolError,
    CpmgrUnavailable,
    Reply,
    default_socket_path,
)
from cpmgr.client.events import Assigned, Ended, Lost, MemberEvent, OtherEvent, Revoked
from cpmgr.client.ops import Checkpoints, build_request
from cpmgr.client.sync import CpmgrClient, Member, Pipeline

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "Answer",
    "Assigned",
    "AsyncCpmgrClient",
    "AsyncMember",
    "Checkpoints",
    "ClientCore",
    "CpmgrClient",
    "CpmgrClientError",
    "CpmgrProtocolError",
    "CpmgrUnavailable",
    "Ended",
    "Joining",
    "Lost",
    "Member",
    "MemberEvent",
    "OtherEvent",
    "Pipeline",
    "Reply",
    "Revoked",
    "backoff_delay",
    "build_request",
    "default_socket_path",
]
