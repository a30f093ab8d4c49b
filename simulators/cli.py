"""`dicom-gateway-sim`: command-line entry to the simulators, one subcommand each.

Exit codes: 0 when everything went as asked, 1 when anything failed (a failure status, a rejected or
aborted association, an unreachable peer), 2 for usage errors. `pacs` serves until SIGINT or SIGTERM and
then exits 0, whatever its peers did; so does `serial`.

May import: the simulators' modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from simulators.datasets import TRANSFER_SYNTAXES, StudySpec
from simulators.pacs import PacsFaults, PacsSimulator, server_tls_context
from simulators.scanner import DEFAULT_MAX_PDU, ScanOptions, TlsOptions, run_scanner
from simulators.serialdev import KeyValueSimulator, UpsSimulator, parse_script

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

_TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one simulator from the command line and return its exit code."""
    parser = argparse.ArgumentParser(prog="dicom-gateway-sim", description="Simulated peers of the gateway.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, pynetdicom's included")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_scanner_parser(commands)
    _add_pacs_parser(commands)
    _add_serial_parser(commands)
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


def _add_pacs_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "pacs",
        help="receive C-STORE/C-ECHO as the central archive, with fault injection",
        description=(
            "Store every object byte-exact as <SOP Instance UID>.dcm until SIGINT/SIGTERM, then print a "
            "summary. Statuses are hex or decimal (0xA700, 42752)."
        ),
    )
    peer = parser.add_argument_group("listener")
    peer.add_argument("--host", default="127.0.0.1")
    peer.add_argument("--port", type=int, default=11113)
    peer.add_argument("--ae-title", default="CENTRAL_PACS")
    peer.add_argument("--storage", type=Path, required=True, help="directory for the received objects")
    peer.add_argument("--tls-cert", type=Path, help="enables TLS: server certificate (PEM)")
    peer.add_argument("--tls-key", type=Path, help="private key (default: in --tls-cert)")
    peer.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA")
    peer.add_argument(
        "--tls-min-version", choices=sorted(_TLS_VERSIONS), help="default: 1.2, or --tls-max-version if older"
    )
    peer.add_argument("--tls-max-version", choices=sorted(_TLS_VERSIONS), help="default: newest")

    faults = parser.add_argument_group("faults")
    faults.add_argument("--reject", action="store_true", help="reject every association")
    faults.add_argument(
        "--transfer-syntax",
        action="append",
        metavar="UID",
        help="accept only these transfer syntaxes for storage (repeatable; default: all)",
    )
    faults.add_argument(
        "--status-for",
        action="append",
        default=[],
        metavar="UID=STATUS",
        help="always answer STATUS for this SOP Instance UID (repeatable)",
    )
    faults.add_argument(
        "--transient-for",
        action="append",
        default=[],
        metavar="UID=N",
        help="answer 0xA700 to the first N C-STOREs of this UID, then store it (repeatable)",
    )
    faults.add_argument("--fraction", type=float, default=0.0, help="answer --fraction-status for this share")
    faults.add_argument("--fraction-status", type=_status, default=0xA700, metavar="STATUS")
    faults.add_argument("--seed", type=int, default=0, help="picks which UIDs fall in --fraction")
    faults.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="before each response")
    faults.add_argument(
        "--abort-after", type=int, metavar="K", help="A-ABORT after K stored, per association"
    )
    faults.add_argument("--stall-after", type=int, metavar="K", help="stop answering after K stored")
    faults.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="DOWN_AT:UP_AT",
        help="stop listening DOWN_AT seconds after start, listen again at UP_AT (repeatable)",
    )
    parser.set_defaults(run=_run_pacs_command)


def _status(text: str) -> int:
    """Parse a DIMSE status given in hex (0xA700) or decimal."""
    try:
        status = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a status: {text!r} (e.g. 0xA700)") from None
    if not 0 <= status <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"status out of range: {text}")
    return status


def _uid_map(pairs: list[str], flag: str, parse_value: type[int] | None = None) -> dict[str, int]:
    """Parse repeated UID=VALUE options; VALUE is a status unless `parse_value` says otherwise."""
    result = {}
    for pair in pairs:
        uid, separator, value = pair.partition("=")
        if not separator or not uid:
            raise ValueError(f"{flag} takes UID=VALUE, not {pair!r}")
        try:
            result[uid] = parse_value(value) if parse_value else _status(value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{flag} {pair}: {exc}") from None
    return result


def _outage(text: str) -> tuple[float, float]:
    """Parse DOWN_AT:UP_AT, seconds after start."""
    down, separator, up = text.partition(":")
    try:
        times = float(down), float(up)
    except ValueError:
        times = None
    if not separator or times is None:
        raise ValueError(f"--outage takes DOWN_AT:UP_AT in seconds, not {text!r}")
    return times


def _run_pacs_command(args: argparse.Namespace) -> int:
    if (args.tls_key or args.tls_ca or args.tls_min_version or args.tls_max_version) and not args.tls_cert:
        raise ValueError("--tls-key, --tls-ca, --tls-min-version and --tls-max-version need --tls-cert")
    faults = PacsFaults(
        reject_associations=args.reject,
        transfer_syntaxes=tuple(args.transfer_syntax) if args.transfer_syntax else None,
        status_for_uids=_uid_map(args.status_for, "--status-for"),
        transient_for_uids=_uid_map(args.transient_for, "--transient-for", int),
        status_fraction=args.fraction,
        fraction_status=args.fraction_status,
        seed=args.seed,
        delay=args.delay,
        abort_after=args.abort_after,
        stall_after=args.stall_after,
    )
    outages = [_outage(text) for text in args.outage]
    context = None
    if args.tls_cert:
        context = server_tls_context(
            args.tls_cert,
            args.tls_key,
            args.tls_ca,
            minimum_version=_TLS_VERSIONS.get(args.tls_min_version),
            maximum_version=_TLS_VERSIONS.get(args.tls_max_version, ssl.TLSVersion.MAXIMUM_SUPPORTED),
        )
    stop_requested = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    pacs = PacsSimulator(
        args.storage,
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        ssl_context=context,
        faults=faults,
    )
    with pacs:
        for down_at, up_at in outages:
            pacs.schedule_outage(down_at, up_at)
        print(f"PACS simulator listening on {args.host}:{pacs.port}", flush=True)
        stop_requested.wait()
    print(pacs.stats().summary(), flush=True)
    return 0


def _add_serial_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serial",
        help="a UPS (Megatec Q1) or a key=value sensor on a pty pair",
        description=(
            "Serve a simulated serial device on a new pty until SIGINT/SIGTERM; point the gateway's "
            "[[serial]] port at the path printed on start. Script actions: power_fail, battery_low, "
            "power_restore (UPS only), silence, resume."
        ),
    )
    parser.add_argument("--protocol", choices=["megatec-q1", "keyvalue"], default="megatec-q1")
    parser.add_argument(
        "--script",
        default="",
        metavar="AT:ACTION,...",
        help='timed actions, seconds after start, e.g. "10:power_fail,20:battery_low,40:power_restore"',
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="keyvalue: seconds between lines"
    )
    parser.set_defaults(run=_run_serial_command)


def _run_serial_command(args: argparse.Namespace) -> int:
    steps = parse_script(args.script)
    stop_requested = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    device = UpsSimulator() if args.protocol == "megatec-q1" else KeyValueSimulator(interval=args.interval)
    with device:
        device.run_script(steps)  # unknown actions raise here, before the READY line
        print(f"serial simulator on {device.path}", flush=True)
        stop_requested.wait()
    print(f"serial simulator: {device.polls} polls", flush=True)
    return 0
