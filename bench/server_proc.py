"""One server under test in its own process, with the event-loop lag probe beside it.

    python bench/server_proc.py daemon --config FILE
    python bench/server_proc.py baseline --kind streams|protocol --socket PATH

`daemon` runs `cpmgr.daemon.run` (the same entry `cpmgr run` uses) with a config file; `baseline`
runs one of the bare servers of bench/baseline.py. Both run alone in this process, so the parent
reads their CPU time and memory from /proc, and every server under test gets the same footing.

Once serving it prints `ready {"pid": ..., "http": URL or null}`. Then it reads commands on
stdin, one per line, and answers each with one line:
- `lag-start`: begin a lag window (`ok`);
- `lag-stop`: end it, print the window's lateness summary as JSON (`bench/lagprobe.py`);
- `stop` or end of input: shut down (the daemon drains as on SIGTERM), print `stopped CODE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from baseline import running_baseline
from lagprobe import LagProbe

from cpmgr.config import load_config
from cpmgr.daemon import Daemon, run


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _serve_commands(probe: LagProbe) -> None:
    """Answer commands until `stop` or end of input."""
    reader = await _stdin_reader()
    while True:
        command = (await reader.readline()).decode().strip()
        if command in ("", "stop"):
            return
        if command == "lag-start":
            probe.start()
            _say("ok")
        elif command == "lag-stop":
            _say(json.dumps((await probe.stop()).as_json()))
        else:
            _say(f"error unknown command {command!r}")


async def _run_daemon(config_path: str, probe: LagProbe) -> int:
    config = load_config(config_path)
    started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()

    async def shutdown_trigger() -> None:
        daemon = await started
        web = daemon.web
        http = f"http://127.0.0.1:{web.port}" if web is not None else None
        _say("ready " + json.dumps({"pid": os.getpid(), "http": http}))
        await _serve_commands(probe)

    return await run(
        config,
        config_path=config_path,
        shutdown_trigger=shutdown_trigger,
        started=started.set_result,
        own_process=True,  # as `cpmgr run` does
    )


async def _run_baseline(kind: str, socket_path: str, probe: LagProbe) -> int:
    assert kind in ("streams", "protocol")
    async with running_baseline(kind, socket_path):
        _say("ready " + json.dumps({"pid": os.getpid(), "http": None}))
        await _serve_commands(probe)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    daemon = sub.add_parser("daemon")
    daemon.add_argument("--config", required=True)
    baseline = sub.add_parser("baseline")
    baseline.add_argument("--kind", choices=("streams", "protocol"), required=True)
    baseline.add_argument("--socket", required=True)
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    probe = LagProbe()
    if args.what == "daemon":
        code = await _run_daemon(args.config, probe)
    else:
        code = await _run_baseline(args.kind, args.socket, probe)
    with contextlib.suppress(Exception):
        await probe.stop()
    _say(f"stopped {code}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
