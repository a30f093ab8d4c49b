"""The command line: ``dicom-gateway [-c FILE] run | check-config [FILE] | version``.

Errors are one clear line on stderr and a non-zero exit status, never a traceback.

Imports: config, app, logs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.app import Gateway
from gateway.config import load_config, resolve_config_path, summarize, warnings
from gateway.errors import ConfigError, GatewayError
from gateway.logs import setup_logging

if TYPE_CHECKING:
    from pathlib import Path

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-gateway", description="DICOM edge gateway")
    parser.add_argument("-c", "--config", help="config file (default: $DICOM_GATEWAY_CONFIG, then /etc/...)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the gateway in the foreground")
    check = commands.add_parser("check-config", help="validate a config file and summarize it")
    check.add_argument("file", nargs="?", help="the file to check (default: the -c/--config path)")
    commands.add_parser("version", help="print the version")
    return parser


def _print_problems(path: Path, error: ConfigError) -> None:
    for key, message in error.problems:
        where = f"{path}: {key}" if key else str(path)
        print(f"{where}: {message}", file=sys.stderr)


def _check_config(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return EXIT_CONFIG
    print(summarize(config))
    for warning in warnings(config):
        print(f"warning: {warning}")
    return 0


def _run(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return EXIT_CONFIG
    setup_logging(config.gateway.log_level, config.gateway.log_format)
    try:
        asyncio.run(Gateway(config).run(handle_signals=True))
    except (
        GatewayError,
        OSError,
        ExceptionGroup,
    ) as exc:  # port in use, unwritable state_dir, bad TLS key...
        for cause in _leaves(exc):
            if not isinstance(cause, GatewayError | OSError):
                raise
            print(f"dicom-gateway: {cause}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, as a flat list."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dicom-gateway`` command."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"dicom-gateway {__version__}")
        return 0
    if args.command == "check-config":
        return _check_config(resolve_config_path(args.file or args.config))
    return _run(resolve_config_path(args.config))


if __name__ == "__main__":
    sys.exit(main())
