"""Command line: argv -> config -> the daemon or a socket client; typed errors -> exit codes."""

from __future__ import annotations

import argparse
import sys

from cpmgr import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpmgr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cpmgr {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
