"""`cpmgr join GROUP CONSUMER`: a membership as lines, the building block of a shell consumer.

Stdout gets one JSON line per event (`{"event":...}`, as the daemon sends it) and one JSON
answer line per command read from stdin (`{"ok":...}`, without the request id), in the order
they happened; the first line is the answer to the join itself. Stdin takes one command a line:

    commit SHARD CHECKPOINT [wait] [force]
    release SHARD
    assignment
    flush
    leave
    {"op": ...}        any request as JSON; `group` is filled in when absent

A line that is none of these is answered `{"ok":false,"error":{"code":"BadRequest",...}}`
without reaching the daemon, so every command line gets exactly one answer line. End of stdin
leaves the group (its answer is the last line). Exit codes: 0 after a successful leave, 1 if
the join or the final leave was refused, 3 if the daemon could not be reached or the joined
connection dropped (a `lost` event with reason `disconnected` is printed first), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import sys
from collections.abc import Mapping
from typing import Final, TextIO

from cpmgr.client import (
    CpmgrClient,
    CpmgrClientError,
    CpmgrProtocolError,
    Member,
    build_request,
    default_socket_path,
)

__all__ = ["add_join_command", "run_join"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130
_READ_BYTES: Final = 65536
# A command line longer than this is refused, like the daemon refuses a long request line.
_MAX_COMMAND_BYTES: Final = 1 << 20
_DIGITS = re.compile(r"[0-9]+")


def add_join_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `join GROUP CONSUMER`; it sets `handler=run_join`."""
    join = subparsers.add_parser(
        "join",
        help="join a membership group; events out, commands in, as JSON lines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    join.add_argument("group", help="a configured group with a membership block")
    join.add_argument("consumer", help="this member's name, unique in the SLS consumer group")
    join.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="daemon socket (default: $CPMGR_SOCKET, else /run/cpmgr/cpmgr.sock)",
    )
    join.set_defaults(handler=run_join)


def run_join(
    args: argparse.Namespace,
    *,
    stdin: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Join, then relay events and commands until stdin ends or the membership does."""
    session = _Session(
        args.group, stdin if stdin is not None else sys.stdin.fileno(), out or sys.stdout
    )
    err = err or sys.stderr
    try:
        with CpmgrClient(args.socket or default_socket_path(), reconnect_attempts=2) as client:
            return session.run(client, args.consumer)
    except KeyboardInterrupt:
        print("cpmgr: interrupted", file=err)
        return EXIT_INTERRUPTED
    except CpmgrProtocolError as exc:
        session.answer(exc.answer)
        print(f"cpmgr: {exc}", file=err)
        return EXIT_REFUSED
    except CpmgrClientError as exc:
        session.flush_events()
        print(f"cpmgr: the daemon could not be reached: {exc}", file=err)
        return EXIT_UNREACHABLE


class _Session:
    """One joined member relayed to stdout, fed commands from stdin."""

    def __init__(self, group: str, stdin: int, out: TextIO) -> None:
        self.group = group
        self.stdin = stdin
        self.out = out
        self.member: Member | None = None
        self.left = False  # a leave was answered ok
        self._pending = b""

    def run(self, client: CpmgrClient, consumer: str) -> int:
        with client.join(self.group, consumer) as member:
            self.member = member
            self.answer({"ok": True, "group": member.group, "consumer": member.consumer})
            return self._relay(member)

    def _relay(self, member: Member) -> int:
        selector = selectors.PollSelector()  # epoll refuses a regular file as stdin
        selector.register(member, selectors.EVENT_READ)
        selector.register(self.stdin, selectors.EVENT_READ)
        with selector:
            while not member.ended:
                # Events read along with an answer wait in the member, not in the socket.
                self.flush_events()
                ready = [key.fileobj for key, _ in selector.select()]
                if self.stdin in ready and not self._read_commands():
                    return self._leave(member)
        self.flush_events()
        return EXIT_OK if self.left else EXIT_UNREACHABLE

    def _read_commands(self) -> bool:
        """Run the complete lines stdin has; False at its end."""
        chunk = os.read(self.stdin, _READ_BYTES)
        if not chunk:
            return False
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._command(line.decode("utf-8", errors="replace"))
        if len(self._pending) > _MAX_COMMAND_BYTES:
            self._pending = b""
            self.answer(_refusal("BadRequest", "command line too long"))
        return True

    def _command(self, line: str) -> None:
        if not line.strip() or self.member is None:
            return
        payload = _parse_command(line, self.group)
        if isinstance(payload, str):
            self.answer(_refusal("BadRequest", payload))
        elif self.member.ended:  # lines after a leave, in the same read
            self.answer(_refusal("NotMember", "the membership is over"))
        else:
            self._send(self.member, payload)

    def _leave(self, member: Member) -> int:
        if not member.ended:
            self._send(member, build_request("leave", group=self.group))
        return EXIT_OK if self.left else EXIT_REFUSED

    def _send(self, member: Member, payload: dict[str, object]) -> None:
        answer = member.request(payload)
        for event in member.read_events():  # the events that came before this answer
            self._line(event.raw)
        self.answer(answer)
        self.left = self.left or (payload.get("op") == "leave" and answer.get("ok") is True)

    def flush_events(self) -> None:
        """Print every event that has arrived, without waiting for more."""
        if self.member is None:
            return
        while (event := self.member.next_event(timeout=0)) is not None:
            self._line(event.raw)

    def answer(self, answer: Mapping[str, object]) -> None:
        self._line({k: v for k, v in answer.items() if k != "id"})

    def _line(self, obj: Mapping[str, object]) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.out.flush()


def _refusal(code: str, message: str) -> dict[str, object]:
    return {"ok": False, "error": {"code": code, "message": message}}


def _parse_command(line: str, group: str) -> dict[str, object] | str:
    """The request a command line stands for, or what is wrong with it."""
    if line.lstrip().startswith("{"):
        return _json_command(line, group)
    words = line.split()
    name, rest = words[0], words[1:]
    if name == "commit" and len(rest) >= 2 and set(rest[2:]) <= {"wait", "force"}:
        if not _DIGITS.fullmatch(rest[0]):
            return f"not a shard number: {rest[0]!r}"
        flags = set(rest[2:])
        return build_request(
            "commit",
            group=group,
            shard=int(rest[0]),
            checkpoint=rest[1],
            wait="wait" in flags,
            force="force" in flags,
        )
    if name == "release" and len(rest) == 1 and _DIGITS.fullmatch(rest[0]):
        return build_request("release", group=group, shard=int(rest[0]))
    if name in ("assignment", "flush", "leave") and not rest:
        return build_request(name, group=group)
    return (
        f"unknown command {line.strip()[:100]!r}: commit SHARD CHECKPOINT [wait] [force], "
        "release SHARD, assignment, flush, leave, or a JSON request"
    )


def _json_command(line: str, group: str) -> dict[str, object] | str:
    try:
        obj = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    obj.setdefault("group", group)
    obj.pop("id", None)  # the client numbers its own requests
    return obj
