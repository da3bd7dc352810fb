"""The socket-client subcommands (docs/protocol.md, "Clients"): commit, flush, get, status,
members; and `join` (cpmgr/joincli.py).

Each prints a human table by default, or the daemon's answer as JSON with `--json` (without
the request id the client adds). Exit codes: 0 ok, 1 the daemon answered `ok:false`, 2 bad
usage (argparse), 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from cpmgr.client import (
    Answer,
    CpmgrClient,
    CpmgrClientError,
    CpmgrUnavailable,
    build_request,
    default_socket_path,
)
from cpmgr.joincli import add_join_command

__all__ = ["CLIENT_COMMANDS", "add_client_commands", "run_client_command"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_UNREACHABLE: Final = 3
CLIENT_COMMANDS: Final = ("commit", "flush", "get", "status", "members")
# Enough to ride out a daemon restart, short enough that "not running" is reported quickly.
_RECONNECT_ATTEMPTS: Final = 2
_ANSWER_TIMEOUT: Final = 60.0  # for requests the daemon answers at once
EXIT_INTERRUPTED: Final = 130  # the shell's code for SIGINT
_AFTER_2001: Final = 1_000_000_000  # Unix seconds of 2001-09-09: any update time is later


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0: {text!r}")
    return value


def _shard(text: str) -> int:
    # Digits only: int() would also take "1_0", " +2" or "-1".
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"not a shard number (digits, >= 0): {text!r}")
    return int(text)


def _add_common(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="daemon socket (default: $CPMGR_SOCKET, else /run/cpmgr/cpmgr.sock)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    parser.set_defaults(handler=run_client_command, client_command=name)


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add commit, flush, get, status and members (each sets `handler=run_client_command`),
    and join."""
    commit = subparsers.add_parser("commit", help="hand a checkpoint to the daemon")
    commit.add_argument("group", help="a group name from the daemon's config (groups[].name)")
    commit.add_argument("shard", type=_shard, help="the SLS shard id (digits)")
    commit.add_argument("checkpoint", help="the shard's cursor, base64 as SLS gives it")
    commit.add_argument("--consumer", help="consumer name (default: the group's)")
    commit.add_argument("--force", action="store_true", help="allow moving backwards")
    commit.add_argument("--wait", action="store_true", help="return once committed to SLS")
    commit.add_argument(
        "--timeout", type=_seconds, metavar="S", help="how long --wait waits (needs --wait)"
    )
    _add_common(commit, "commit")
    commit.set_defaults(validate=lambda args: _check_commit(commit, args))

    flush = subparsers.add_parser("flush", help="commit everything pending now")
    flush.add_argument("group", nargs="?", help="only this group (default: every group)")
    flush.add_argument(
        "--timeout", type=_seconds, metavar="S", help="default: the daemon's commit.wait_timeout"
    )
    _add_common(flush, "flush")

    get = subparsers.add_parser("get", help="show a group's checkpoints")
    get.add_argument("group", help="a group name from the daemon's config")
    get.add_argument("shard", nargs="?", type=_shard, help="only this shard (default: every one)")
    get.add_argument("--remote", action="store_true", help="also ask SLS (GetCheckPoint)")
    _add_common(get, "get")

    status = subparsers.add_parser("status", help="show the daemon's status")
    _add_common(status, "status")

    members = subparsers.add_parser("members", help="show the members joined on the daemon")
    members.add_argument("group", nargs="?", help="only this group")
    _add_common(members, "members")

    add_join_command(subparsers)


def _check_commit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--timeout` bounds the wait only: without `--wait` it would be silently ignored, and
    making it imply `--wait` would turn a quick hand-over into a call that blocks on SLS."""
    if args.timeout is not None and not args.wait:
        parser.error("--timeout only applies with --wait (add --wait, or drop --timeout)")


def _payload(args: argparse.Namespace) -> dict[str, object]:
    command: str = args.client_command
    if command == "commit":
        return build_request(
            "commit",
            group=args.group,
            shard=args.shard,
            checkpoint=args.checkpoint,
            consumer=args.consumer,
            force=args.force,
            wait=args.wait,
            timeout=args.timeout,
        )
    if command == "flush":
        return build_request("flush", group=args.group, timeout=args.timeout)
    if command == "get":
        return build_request("get", group=args.group, shard=args.shard, remote=args.remote)
    if command == "members":
        return build_request("members", group=args.group)
    return build_request("status")


def run_client_command(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one socket-client subcommand; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = args.socket or default_socket_path()
    # A `wait` or `flush` may take as long as the daemon's own bound (commit.wait_timeout, or
    # --timeout): wait for its answer rather than call a busy daemon unreachable.
    waits = args.client_command == "flush" or (args.client_command == "commit" and args.wait)
    try:
        with CpmgrClient(
            path, timeout=None if waits else _ANSWER_TIMEOUT, reconnect_attempts=_RECONNECT_ATTEMPTS
        ) as client:
            answer = client.exchange([_payload(args)])[0]
    except KeyboardInterrupt:
        print("cpmgr: interrupted", file=err)
        return EXIT_INTERRUPTED
    except CpmgrUnavailable as exc:
        print(f"cpmgr: the daemon could not be reached: {exc}", file=err)
        return EXIT_UNREACHABLE
    except CpmgrClientError as exc:
        print(f"cpmgr: {exc}", file=err)
        return EXIT_UNREACHABLE
    answer = {k: v for k, v in answer.items() if k != "id"}
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=False), file=out)
    elif answer.get("ok") is True:
        _RENDERERS[args.client_command](args, answer, out)
    else:
        _render_error(answer, err)
    return EXIT_OK if answer.get("ok") is True else EXIT_REFUSED


# --- human output ---------------------------------------------------------------------------


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _time(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return "-"
    stamp = datetime.fromtimestamp(value, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _remote_seconds(value: object) -> float | None:
    """SLS's updateTime as Unix seconds: it is sent in microseconds (the documented example,
    the emulator); a value in milliseconds or seconds is recognised by its size."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return None
    for divisor in (1_000_000, 1_000):
        if value >= _AFTER_2001 * divisor:
            return value / divisor
    return float(value)


def _error_text(error: object) -> str:
    if not isinstance(error, Mapping):
        return "-"
    return f"{error.get('code')}: {error.get('message')}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
    return "\n".join(lines)


def _render_commit(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    verb = "committed" if args.wait else "accepted"
    print(f"{verb}: {args.group} shard {args.shard} = {args.checkpoint}", file=out)


def _render_flush(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    print(f"committed {answer.get('committed', 0)} shard(s)", file=out)


def _render_get(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    headers = ["GROUP", "SHARD", "PENDING", "COMMITTED", "COMMITTED_AT", "LAST_ERROR"]
    headers += ["LAG", "LAG_SECONDS", "LAG_STATE"]
    if args.remote:
        headers += ["REMOTE", "REMOTE_UPDATED", "REMOTE_CONSUMER"]
    rows = [_shard_row(entry, remote=args.remote) for entry in answer.get("shards", [])]
    print(_table(headers, rows), file=out)


def _shard_row(entry: Mapping[str, Any], *, remote: bool) -> list[str]:
    row = [
        _text(entry.get("group")),
        _text(entry.get("shard")),
        _text(entry.get("pending")),
        _text(entry.get("committed")),
        _time(entry.get("committed_at")),
        _error_text(entry.get("last_error")),
        *_lag_cells(entry.get("lag"), "state"),
    ]
    if remote:
        info = entry.get("remote")
        info = info if isinstance(info, Mapping) else {}
        row += [
            _text(info.get("checkpoint") or None),
            _time(_remote_seconds(info.get("update_time"))),
            _text(info.get("consumer") or None),
        ]
    return row


def _lag_cells(lag: object, last: str) -> list[str]:
    """Log groups, seconds and `last` (a shard's state, a group's stalled count) of a `lag`
    object; dashes before the first reading."""
    if not isinstance(lag, Mapping):
        return ["-", "-", "-"]
    return [_text(lag.get("log_groups")), _text(lag.get("seconds")), _text(lag.get(last))]


def _render_status(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    uptime = answer.get("uptime_seconds")
    print(f"cpmgr {_text(answer.get('version'))}, up {_text(uptime)}s", file=out)
    for key in ("ready", "shutting_down"):
        if key in answer:
            print(f"{key}: {str(answer[key]).lower()}", file=out)
    credentials = answer.get("credentials")
    if isinstance(credentials, Mapping):
        print(_credentials_line(credentials), file=out)
    groups = answer.get("groups")
    groups = groups if isinstance(groups, Mapping) else {}
    rows = [
        [
            name,
            _text(info.get("pending")),
            _text(info.get("tracked")),
            _text(info.get("failures")),
            _time(info.get("last_success")),
            *_lag_cells(info.get("lag"), "stalled"),
        ]
        for name, info in groups.items()
    ]
    headers = ["GROUP", "PENDING", "TRACKED", "FAILURES", "LAST_SUCCESS"]
    headers += ["LAG", "LAG_SECONDS", "STALLED"]
    print(_table(headers, rows), file=out)


def _credentials_line(info: Mapping[str, Any]) -> str:
    """`credentials: oidc (auto), key id STS.x, expires ..., usable` and the last failure."""
    line = f"credentials: {_text(info.get('source'))} ({_text(info.get('chosen_by'))})"
    line += f", key id {_text(info.get('access_key_id'))}"
    if info.get("expires_at"):
        line += f", expires {_text(info.get('expires_at'))}"
    line += ", usable" if info.get("valid") else ", NOT usable"
    if info.get("refresh_failures"):
        line += f"; {_text(info.get('refresh_failures'))} failed refresh(es)"
        line += f", last: {_text(info.get('last_error'))}"
    return line


def _render_members(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    headers = ["GROUP", "CONSUMER", "HELD", "RELEASING", "LAST_HEARTBEAT"]
    rows = [_member_row(m) for m in answer.get("members", []) if isinstance(m, Mapping)]
    print(_table(headers, rows), file=out)


def _member_row(member: Mapping[str, Any]) -> list[str]:
    shards = member.get("shards")
    entries = [s for s in shards if isinstance(s, Mapping)] if isinstance(shards, list) else []

    def listed(state: str) -> str:
        return ",".join(str(s.get("shard")) for s in entries if s.get("state") == state) or "-"

    return [
        _text(member.get("group")),
        _text(member.get("consumer")),
        listed("held"),
        listed("releasing"),
        _time(member.get("last_heartbeat")),
    ]


def _render_error(answer: Answer, err: TextIO) -> None:
    error = answer.get("error")
    error = error if isinstance(error, Mapping) else {}
    line = f"cpmgr: {error.get('code', 'Unknown')}: {error.get('message', '')}"
    if isinstance(error.get("dropped"), bool):
        line += " (value dropped)" if error["dropped"] else " (value still pending)"
    print(line, file=err)
    if "committed" in answer:
        print(f"committed {answer['committed']} shard(s)", file=err)
    failed = answer.get("failed")
    if isinstance(failed, list) and failed:
        rows = [
            [
                _text(f.get("group")),
                _text(f.get("shard")),
                _text(f.get("code")),
                "yes" if f.get("dropped") else "no",
                _text(f.get("message")),
            ]
            for f in failed
            if isinstance(f, Mapping)
        ]
        print(_table(["GROUP", "SHARD", "CODE", "DROPPED", "MESSAGE"], rows), file=err)


Renderer = Callable[[argparse.Namespace, Answer, TextIO], None]
_RENDERERS: Final[dict[str, Renderer]] = {
    "commit": _render_commit,
    "flush": _render_flush,
    "get": _render_get,
    "status": _render_status,
    "members": _render_members,
}
