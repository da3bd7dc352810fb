"""`python -m cpmgr.emulator --listen HOST:PORT ...`: the emulator without the cpmgr CLI."""

from __future__ import annotations

import argparse

from cpmgr.emulator import add_emulator_arguments, run_emulator_from_args

parser = argparse.ArgumentParser(
    prog="python -m cpmgr.emulator", description="SLS-compatible consumer-group emulator"
)
add_emulator_arguments(parser)
raise SystemExit(run_emulator_from_args(parser.parse_args()))
