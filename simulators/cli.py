"""`dicom-gateway-sim`: command-line entry to the simulators, one subcommand each.

Exit codes: 0 when everything went as asked, 1 when anything failed (a failure status, a rejected or
aborted association, an unreachable peer), 2 for usage errors.

May import: the simulators' modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simulators.datasets import TRANSFER_SYNTAXES, StudySpec
from simulators.scanner import DEFAULT_MAX_PDU, ScanOptions, TlsOptions, run_scanner

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run one simulator from the command line and return its exit code."""
    parser = argparse.ArgumentParser(prog="dicom-gateway-sim", description="Simulated peers of the gateway.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, pynetdicom's included")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_scanner_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every association step at INFO; keep its warnings and errors unless asked.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        code: int = args.run(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    return code


def _add_scanner_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "scanner",
        help="send synthetic studies (or DICOM files) as a modality's C-STORE SCU",
        description="Send synthetic studies, or the given DICOM files, over parallel associations.",
    )
    peer = parser.add_argument_group("peer")
    peer.add_argument("--host", default="127.0.0.1")
    peer.add_argument("--port", type=int, default=11112)
    peer.add_argument("--calling-ae", default="CT_SCANNER_1")
    peer.add_argument("--called-ae", default="EDGE_GW")
    peer.add_argument("--max-pdu", type=int, default=DEFAULT_MAX_PDU, help="largest PDU we accept")
    peer.add_argument("--timeout", type=float, default=30.0, help="connect/ACSE/DIMSE timeout, seconds")
    peer.add_argument("--tls-ca", type=Path, help="enables TLS: CA bundle the receiver must chain to")
    peer.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    peer.add_argument("--tls-key", type=Path, help="client private key (default: in --tls-cert)")
    peer.add_argument("--tls-server-hostname", help="name to verify (default: --host)")

    data = parser.add_argument_group("data")
    data.add_argument("--studies", type=int, default=1)
    data.add_argument("--series", type=int, default=1, help="series per study")
    data.add_argument("--images", type=int, default=10, help="images per series")
    data.add_argument("--modality", choices=["CT", "MR", "US", "DX"], default="CT")
    data.add_argument("--rows", type=int, help="default: the modality's usual size")
    data.add_argument("--columns", type=int, help="default: the modality's usual size")
    data.add_argument("--frames", type=int, help="frames per US object (default 10)")
    data.add_argument("--photometric", choices=["MONOCHROME2", "RGB"], help="US only; default RGB")
    data.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    data.add_argument("--seed", type=int, help="makes the run reproducible (default: random)")
    data.add_argument("--patient-name")
    data.add_argument("--patient-id")
    data.add_argument(
        "--files", type=Path, nargs="+", help="send these DICOM files (directories: recursively) instead"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--associations", type=int, default=1, help="parallel associations")
    run.add_argument("--rate", type=float, help="instances per second over all associations")
    run.add_argument(
        "--ack-file",
        type=Path,
        help="write each SOP Instance UID acked 0x0000 here, one a line, as it arrives",
    )
    run.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    parser.set_defaults(run=_run_scanner_command)


def _run_scanner_command(args: argparse.Namespace) -> int:
    if args.associations < 1:
        raise ValueError("--associations must be at least 1")
    if (args.tls_cert or args.tls_key or args.tls_server_hostname) and not args.tls_ca:
        raise ValueError("--tls-cert, --tls-key and --tls-server-hostname need --tls-ca")
    study = StudySpec(
        modality=args.modality,
        studies=args.studies,
        series=args.series,
        images_per_series=args.images,
        rows=args.rows,
        columns=args.columns,
        frames=args.frames,
        transfer_syntax=args.transfer_syntax,
        photometric=args.photometric,
        patient_name=args.patient_name,
        patient_id=args.patient_id,
    )
    if args.seed is not None:
        study = dataclasses.replace(study, seed=args.seed)
    tls = None
    if args.tls_ca:
        tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_hostname)
    options = ScanOptions(
        host=args.host,
        port=args.port,
        calling_ae=args.calling_ae,
        called_ae=args.called_ae,
        study=study,
        files=tuple(_expand_files(args.files or [])),
        associations=args.associations,
        rate=args.rate,
        tls=tls,
        max_pdu=args.max_pdu,
        timeout=args.timeout,
        ack_file=args.ack_file,
        progress_interval=args.progress_interval,
    )
    result = run_scanner(options)
    sys.stdout.write(result.summary() + "\n")
    return 0 if result.ok else 1


def _expand_files(paths: list[Path]) -> list[Path]:
    """Return the files named, with directories replaced by the files under them, in sorted order."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return files
