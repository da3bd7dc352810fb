"""`cpmgr emulator`: an SLS-compatible consumer-group server for laptops, CI and tests.

The server lives in `app` (routes, signatures, faults), `state` (groups, heartbeats,
checkpoints), `faults` (seeded fault injection) and `http` (its small HTTP/1.1 server). This
module is its command line: `add_emulator_arguments` and `run_emulator_from_args`, wired into
`cpmgr emulator` and `python -m cpmgr.emulator`. Tests use `running_emulator(...)`.

Defaults worth knowing: the project is the first label of the Host header; with no
`--logstore` nothing is declared, so every API answers 404 until a logstore is declared (flag,
`--state` file, or `POST /_emulator/logstores`); without keys any signature, or none, is
accepted; the admin endpoints under `/_emulator/` are unsigned, never faulted, not counted;
a late-landing UpdateCheckPoint (`--late-rate`, `late` in POST /_emulator/faults) is applied
after its hold even if the client disconnected, answered only if the client still waits, and
dropped if the emulator stops first. It also serves STS AssumeRoleWithOIDC, the ECS metadata
paths and a credentials URI (`credentials`), issuing STS keys the SLS side accepts until they
expire (`SecurityTokenExpired` after).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from cpmgr.emulator.app import (
    EmulatorHandle,
    EmulatorOptions,
    GroupSpec,
    LogstoreSpec,
    parse_group,
    parse_latency,
    parse_listen,
    parse_logstore,
    running_emulator,
    start_emulator,
)
from cpmgr.emulator.faults import FaultSettings
from cpmgr.emulator.state import DEFAULT_GROUP_TIMEOUT, EmulatorState, OwnershipErrors
from cpmgr.errors import ConfigError

__all__ = [
    "EmulatorHandle",
    "EmulatorOptions",
    "EmulatorState",
    "FaultSettings",
    "GroupSpec",
    "LogstoreSpec",
    "OwnershipErrors",
    "add_emulator_arguments",
    "options_from_args",
    "run_emulator_from_args",
    "running_emulator",
    "serve",
    "start_emulator",
]

log = logging.getLogger(__name__)


def _argparse_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def add_emulator_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cpmgr emulator` options (docs/design.md, "The emulator")."""
    parser.add_argument(
        "--listen",
        required=True,
        type=_argparse_type(parse_listen),
        metavar="HOST:PORT",
        help="address to serve on (port 0: any free port)",
    )
    parser.add_argument(
        "--access-key-id",
        metavar="ID",
        help="verify v1/v4 signatures against this key (default: accept any)",
    )
    parser.add_argument("--access-key-secret", metavar="SECRET", help="the secret of that key")
    parser.add_argument(
        "--logstore",
        action="append",
        default=[],
        metavar="PROJECT/LOGSTORE:SHARDS",
        type=_argparse_type(parse_logstore),
        help="declare a logstore (repeatable); without any, every request is 404",
    )
    parser.add_argument(
        "--consumer-group",
        action="append",
        default=[],
        metavar="PROJECT/LOGSTORE/GROUP",
        type=_argparse_type(parse_group),
        help=f"create a group at start, timeout {DEFAULT_GROUP_TIMEOUT}s (repeatable)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the fault RNG (default: random, logged)"
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of requests answered 500 InternalServerError",
    )
    parser.add_argument(
        "--throttle-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share answered 503 ServerBusy or 403 WriteQuotaExceed",
    )
    parser.add_argument(
        "--reset-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share whose connection is dropped without an answer",
    )
    parser.add_argument(
        "--latency-ms",
        type=_argparse_type(parse_latency),
        default=(0.0, 0.0),
        metavar="MIN:MAX",
        help="delay before each answer, uniform in [MIN, MAX]",
    )
    parser.add_argument(
        "--late-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of UpdateCheckPoints held without an answer and applied --late-ms later",
    )
    parser.add_argument(
        "--late-ms",
        type=_argparse_type(parse_latency),
        default=(0.0, 0.0),
        metavar="MIN:MAX",
        help="how long a late UpdateCheckPoint is held, uniform in [MIN, MAX]",
    )
    parser.add_argument(
        "--write-rate",
        type=float,
        default=0.0,
        metavar="N",
        help="log groups per second appended to every read-write shard (steady; default 0)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="FILE",
        help="load groups and checkpoints from FILE at start, save them on exit",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, metavar="FILE", help="serve HTTPS with this PEM"
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, metavar="FILE", help="the private key (PEM)"
    )
    parser.add_argument(
        "--sts-lifetime",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long the STS keys it issues (OIDC, metadata, URI) live",
    )
    parser.add_argument(
        "--oidc-token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="AssumeRoleWithOIDC accepts only this file's current token (default: any)",
    )
    parser.add_argument(
        "--ecs-role-name",
        default="cpmgr-emulator-role",
        metavar="NAME",
        help="the RAM role the metadata service names",
    )


def options_from_args(args: argparse.Namespace) -> EmulatorOptions:
    """The options parsed by `add_emulator_arguments`; raises ConfigError on problems."""
    host, port = args.listen
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    faults = FaultSettings(
        error_rate=args.error_rate,
        throttle_rate=args.throttle_rate,
        reset_rate=args.reset_rate,
        latency_ms=args.latency_ms,
        late_rate=args.late_rate,
        late_ms=args.late_ms,
    )
    return EmulatorOptions(
        host=host,
        port=port,
        access_key_id=args.access_key_id,
        access_key_secret=args.access_key_secret,
        logstores=tuple(args.logstore),
        consumer_groups=tuple(args.consumer_group),
        seed=seed,
        faults=faults,
        state_file=args.state,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        sts_lifetime=args.sts_lifetime,
        oidc_token_file=args.oidc_token_file,
        ecs_role_name=args.ecs_role_name,
        write_rate=args.write_rate,
    )


async def serve(
    options: EmulatorOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    on_ready: Callable[[EmulatorHandle], None] | None = None,
) -> None:
    """Serve until `shutdown_trigger()` returns, then close (saving the state file)."""
    handle = await start_emulator(options)
    try:
        log.info(
            "emulator on %s: %d logstore(s), signatures %s, fault seed %d",
            handle.url,
            len(handle.state.logstores),
            "verified" if options.access_key_id else "not checked",
            options.seed,
        )
        if on_ready is not None:
            on_ready(handle)
        await shutdown_trigger()
    finally:
        await handle.close()


async def _serve_until_signal(options: EmulatorOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def announce(handle: EmulatorHandle) -> None:
        # One machine-readable line, so scripts using port 0 learn the address.
        print(f"cpmgr emulator listening on {handle.url}", flush=True)

    await serve(options, shutdown_trigger=stop.wait, on_ready=announce)


def run_emulator_from_args(args: argparse.Namespace) -> int:
    """Run `cpmgr emulator` in the foreground: 0 on a clean stop, 2 bad options, 1 cannot serve."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        options = options_from_args(args)
        asyncio.run(_serve_until_signal(options))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"cpmgr emulator: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cpmgr emulator: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
