"""Command line: argv -> config -> daemon, emulator or socket client; errors -> exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cpmgr import __version__
from cpmgr.clientcli import add_client_commands
from cpmgr.completion import add_completion_command
from cpmgr.config import load_config, render_effective
from cpmgr.daemon import run_from_file
from cpmgr.emulator import add_emulator_arguments, run_emulator_from_args
from cpmgr.errors import ConfigError
from cpmgr.sls.credentials.chain import describe_for_check

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# Where the packages, the container image and the systemd unit put the config.
DEFAULT_CONFIG = "/etc/cpmgr/cpmgr.yaml"
CONFIG_ENV = "CPMGR_CONFIG"

Command = Callable[[argparse.Namespace], int]


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(describe_for_check(cfg.sls) + render_effective(cfg))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    try:
        return run_from_file(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _add_config_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG,
        metavar="PATH",
        help=f"YAML config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpmgr", description="Consumer-group checkpoint manager for Alibaba Cloud SLS."
    )
    parser.add_argument("--version", action="version", version=f"cpmgr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = _add_config_command(subparsers, "run", "run the daemon in the foreground")
    run.set_defaults(handler=_run)
    check = _add_config_command(
        subparsers, "check-config", "validate a config file and print the effective config"
    )
    check.set_defaults(handler=_check_config)
    emulator = subparsers.add_parser(
        "emulator",
        help="run the local SLS-compatible consumer-group API",
        description="The local SLS-compatible consumer-group API, for development and tests.",
    )
    add_emulator_arguments(emulator)
    emulator.set_defaults(handler=run_emulator_from_args)
    add_client_commands(subparsers)
    add_completion_command(subparsers, parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    validate: Callable[[argparse.Namespace], None] | None = getattr(args, "validate", None)
    if validate is not None:
        validate(args)  # exits 2 with a usage message, like argparse's own checks
    return handler(args)
