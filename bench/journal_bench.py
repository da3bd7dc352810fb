"""Throughput of Journal.record_accepted with fsync always, batch and never, on a temp dir.

    python bench/journal_bench.py [--records N] [--concurrency C] [--dir PATH]

Each mode gets a fresh directory; `concurrency` writers commit one checkpoint each at a time, as
many consumers on the socket would. Prints records/s and the number of fsyncs per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from cpmgr.journal import FSYNC_MODES, FsyncMode, Journal


async def run_mode(directory: Path, mode: FsyncMode, records: int, concurrency: int) -> None:
    fsyncs = 0

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        os.fsync(fd)

    journal = Journal(directory, fsync=mode, fsync_fn=counting_fsync)
    journal.open()
    await journal.start()
    per_writer = records // concurrency

    async def writer(index: int) -> None:
        for i in range(per_writer):
            await journal.record_accepted([("bench", index, f"{i:020d}", f"consumer-{index}")])
            await asyncio.sleep(0)  # a consumer's next line arrives in a later loop turn

    started = time.perf_counter()
    await asyncio.gather(*(writer(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - started
    await journal.close()
    done = per_writer * concurrency
    print(
        f"{mode:>6}: {done / elapsed:12,.0f} records/s  "
        f"({done} records, {concurrency} writers, {elapsed:.2f} s, {fsyncs} fsyncs)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp dirs")
    args = parser.parse_args()
    for mode in FSYNC_MODES:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            await run_mode(Path(tmp), mode, args.records, args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
