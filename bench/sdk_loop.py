"""The official aliyun-log-python-sdk committing checkpoints one after another, as a consumer
without cpmgr would: `LogClient.update_check_point` in a loop, in its own process.

    python bench/sdk_loop.py --endpoint URL --project P --logstore L --group G
                             --key-id ID --key-secret SECRET --shards N --seconds S --first F

It commits shards 0, 1, 2, ... (wrapping at N) with cursor F + shard until S seconds have passed
and prints one JSON line: {"calls", "seconds", "cpu"} (its own CPU seconds over the loop).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence

from loadgen import cursor


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("endpoint", "project", "logstore", "group", "key-id", "key-secret"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # the SDK still uses deprecated APIs
    from aliyun.log import LogClient  # noqa: PLC0415 (after the warnings filter)

    client = LogClient(args.endpoint, args.key_id, args.key_secret)
    client._isRowIp = True  # the SDK's own switch to reach an address with a port
    calls = 0
    started, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - started < args.seconds:
        shard = calls % args.shards
        client.update_check_point(
            args.project, args.logstore, args.group, shard, cursor(args.first + shard)
        )
        calls += 1
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    print(json.dumps({"calls": calls, "seconds": seconds, "cpu": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
