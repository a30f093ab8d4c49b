"""The command line: ``dicom-gateway [-c FILE] run | check-config | status | queue | echo NAME | version``.

Errors are one clear line on stderr and a non-zero exit status, never a traceback. Exit codes: 0 done,
1 the command failed (echo failed, index missing or locked, purge refused), 2 bad usage or an unusable
config (argparse's own code), 130 interrupted. The operator commands read the daemon's index beside it
(gateway.admin); `echo` opens an association the way the forwarder does. docs/operations.md is the
operator's guide to all of them.

Imports: config, app, admin, requestor, tls, spool, logs.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import socket
import ssl
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from gateway import __version__
from gateway.admin import (
    STATES,
    AdminError,
    ListQuery,
    Selector,
    format_age,
    index_path,
    list_deliveries,
    open_index,
    plan_purge,
    purge,
    read_status,
    retry,
    show_instance,
)
from gateway.app import Gateway
from gateway.config import load_config, parse_duration, resolve_config_path, summarize, warnings
from gateway.dul import LocalIdentity
from gateway.errors import ConfigError, GatewayError, ProtocolError
from gateway.forwarder import IDLE_RECHECK, VERIFICATION, peer_for
from gateway.logs import setup_logging
from gateway.requestor import AssociationError, AssociationRejectedError, Peer, RequestorAssociation
from gateway.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Spool, is_valid_uid
from gateway.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from gateway.admin import DeliveryRow, IndexStatus, InstanceView
    from gateway.config import Config, DestinationConfig

EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
ERROR_WIDTH: Final = 48  # characters of last_error in `queue list` tables (JSON has it whole)


class UsageError(Exception):
    """Arguments that argparse accepts but that do not make a command (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-gateway", description="DICOM edge gateway")
    parser.add_argument("-c", "--config", help="config file (default: $DICOM_GATEWAY_CONFIG, then /etc/...)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the gateway in the foreground")
    check = commands.add_parser("check-config", help="validate a config file and summarize it")
    check.add_argument("file", nargs="?", help="the file to check (default: the -c/--config path)")
    commands.add_parser("version", help="print the version")
    status = commands.add_parser("status", help="queue counts per destination, spool space, instances")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    echo = commands.add_parser("echo", help="C-ECHO a configured destination with its TLS settings")
    echo.add_argument("name", help="the destination's name")
    queue = commands.add_parser("queue", help="inspect and repair the delivery queue")
    actions = queue.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="deliveries, one per line, in the order received")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--destination", metavar="NAME")
    listing.add_argument("--study", metavar="UID", help="Study Instance UID")
    listing.add_argument("--since", metavar="WHEN", help="received since: a duration (2h, 30m) or ISO 8601")
    listing.add_argument("--limit", type=_count, default=50, metavar="N", help="rows per page (default 50)")
    listing.add_argument("--offset", type=_count, default=0, metavar="N", help="rows to skip")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="one instance: its row, file and every delivery")
    show.add_argument("uid", help="SOP Instance UID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--show-patient-id", action="store_true", help="include the patient ID (PHI)")
    again = actions.add_parser("retry", help="send deliveries again: due now, attempts back to 0")
    _selector_arguments(again, narrows=True)
    again.add_argument(
        "--include-done", action="store_true", help="with UID or --study: re-send delivered ones"
    )
    remove = actions.add_parser("purge", help="remove instances from the index and their spool files")
    _selector_arguments(remove, narrows=False)
    remove.add_argument("--delivered", action="store_true", help="every instance delivered everywhere")
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    remove.add_argument(
        "--force", action="store_true", help="also purge undelivered (pending, failed) instances"
    )
    return parser


def _selector_arguments(parser: argparse.ArgumentParser, *, narrows: bool) -> None:
    parser.add_argument("uid", nargs="?", help="one instance's SOP Instance UID")
    parser.add_argument("--study", metavar="UID", help="every instance of this Study Instance UID")
    where = "with --failed: this destination's" + ("; with UID or --study: only this one" if narrows else "")
    parser.add_argument("--destination", metavar="NAME", help=where)
    parser.add_argument("--failed", action="store_true", help="with --destination: its failed deliveries")
    parser.add_argument("--all-failed", action="store_true", help="every instance with a failed delivery")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _selector(args: argparse.Namespace, *, purging: bool) -> Selector:
    """Exactly one selector; --destination only with --failed (purge) or to narrow UID/--study (retry)."""
    delivered = purging and args.delivered
    chosen = [args.uid is not None, args.study is not None, args.failed, args.all_failed, delivered]
    options = "UID, --study UID, --destination NAME --failed, --all-failed" + (
        ", --delivered" if purging else ""
    )
    if sum(chosen) != 1:
        raise UsageError(f"give exactly one of {options}")
    if args.failed and not args.destination:
        raise UsageError("--failed needs --destination NAME (or use --all-failed)")
    if args.destination and (args.all_failed or delivered or (purging and not args.failed)):
        raise UsageError("--destination goes with --failed" + ("" if purging else ", UID or --study"))
    for uid in (args.uid, args.study):
        if uid is not None and not is_valid_uid(uid):
            raise UsageError(f"{uid!r} is not a DICOM UID")
    if not purging and args.include_done and args.uid is None and args.study is None:
        raise UsageError("--include-done goes with UID or --study")
    return Selector(
        uid=args.uid,
        study=args.study,
        failed=args.failed or args.all_failed,
        delivered=delivered,
        destination=args.destination,
    )


# ---------------------------------------------------------------- formatting


def _iso(moment: float | None) -> str | None:
    """UTC ISO 8601 for JSON."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


def _local(moment: float | None) -> str:
    """Local time for people."""
    return "-" if moment is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _size(count: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _n(count: int, singular: str, plural: str = "") -> str:
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def _hex(status: int | None) -> str | None:
    return None if status is None else f"0x{status:04X}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    return "\n".join(line.rstrip() for line in lines)


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, sort_keys=False))


def _delivery_json(row: DeliveryRow) -> dict[str, Any]:
    return {
        "sop_instance_uid": row.sop_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "destination": row.destination,
        "state": row.state,
        "attempts": row.attempts,
        "refusals": row.refusals,
        "last_status": row.last_status,
        "last_status_hex": _hex(row.last_status),
        "last_error": row.last_error,
        "received_at": _iso(row.received_at),
        "next_attempt_at": _iso(row.next_attempt_at),
        "updated_at": _iso(row.updated_at),
    }


def _clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- status


def _status(config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    path = index_path(config.gateway.state_dir)
    with open_index(path) as db:
        report = read_status(db, [d.name for d in config.destinations], now)
    spool = Spool(config.gateway.state_dir / "spool", config.gateway.min_free_bytes)
    free = spool.free_bytes()
    if args.json:
        _print_json(_status_json(config, report, path, free, now))
        return 0
    print(f"node {config.gateway.node_id}, index {path}, at {_local(now)}")
    if report.destinations:
        print()
        rows = [
            [
                d.name if d.configured else f"{d.name} (not configured)",
                {True: "up", False: "DOWN", None: "unknown"}[d.up],
                *(str(d.counts[state]) for state in STATES),
                format_age(d.oldest_pending_age) if d.counts["pending"] + d.counts["in_flight"] else "-",
                _local(d.last_delivered_at),
            ]
            for d in report.destinations
        ]
        header = [
            "DESTINATION",
            "UP",
            "PENDING",
            "IN FLIGHT",
            "DONE",
            "FAILED",
            "OLDEST PENDING",
            "LAST DELIVERED",
        ]
        print(_table(header, rows))
        for d in report.destinations:
            print(f"  {d.name}: {d.up_reason}")
    else:
        print("no destinations: receive-only")
    print()
    reserve = config.gateway.min_free_bytes
    warning = "  BELOW THE RESERVE: C-STOREs are refused" if free < reserve else ""
    stored = report.instances["stored"]
    used = f"{_size(report.stored_bytes)} in {stored} files"
    print(f"spool      {used}, {_size(free)} free, reserve {_size(reserve)}{warning}")
    print("instances  " + ", ".join(f"{count} {state}" for state, count in report.instances.items()))
    return 0


def _status_json(config: Config, report: IndexStatus, path: Path, free: int, now: float) -> dict[str, Any]:
    return {
        "node_id": config.gateway.node_id,
        "at": _iso(now),
        "index": str(path),
        "destinations": {
            d.name: {
                "configured": d.configured,
                **d.counts,
                "oldest_pending_age_seconds": round(d.oldest_pending_age, 1),
                "last_delivered_at": _iso(d.last_delivered_at),
                "up": d.up,
                "up_reason": d.up_reason,
            }
            for d in report.destinations
        },
        "spool": {
            "path": str(config.gateway.state_dir / "spool"),
            "free_bytes": free,
            "used_bytes": report.stored_bytes,
            "reserve_bytes": config.gateway.min_free_bytes,
            "below_reserve": free < config.gateway.min_free_bytes,
        },
        "instances": {**report.instances, "total": sum(report.instances.values())},
    }


# ---------------------------------------------------------------- queue list / show


def _since(text: str, now: float) -> float:
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 2h or 30m, or a time such as 2024-05-01T08:00"
        ) from None
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()  # no zone given: local time


def _queue_list(config: Config, args: argparse.Namespace) -> int:
    since = None if args.since is None else _since(args.since, time.time())
    if args.study is not None and not is_valid_uid(args.study):
        raise UsageError(f"{args.study!r} is not a DICOM UID")
    query = ListQuery(args.state, args.destination, args.study, since, max(args.limit, 1), args.offset)
    with open_index(index_path(config.gateway.state_dir)) as db:
        rows, more = list_deliveries(db, query)
    if args.json:
        deliveries = [_delivery_json(row) for row in rows]
        _print_json({"deliveries": deliveries, "offset": query.offset, "limit": query.limit, "more": more})
        return 0
    if not rows:
        print("no deliveries match" + (" (past the last page)" if query.offset else ""))
        return 0
    header = ["SOP INSTANCE UID", "DESTINATION", "STATE", "ATT", "REF", "STATUS", "RECEIVED", "LAST ERROR"]
    table = [
        [
            r.sop_instance_uid,
            r.destination,
            r.state,
            str(r.attempts),
            str(r.refusals),
            _hex(r.last_status) or "-",
            _local(r.received_at),
            _clip(r.last_error, ERROR_WIDTH),
        ]
        for r in rows
    ]
    print(_table(header, table))
    first = query.offset + 1
    if more:
        print(f"(rows {first}-{query.offset + len(rows)}; next page: --offset {query.offset + len(rows)})")
    elif query.offset:
        print(f"(rows {first}-{query.offset + len(rows)}, the last page)")
    return 0


def _queue_show(config: Config, args: argparse.Namespace) -> int:
    if not is_valid_uid(args.uid):
        raise UsageError(f"{args.uid!r} is not a DICOM UID")
    with open_index(index_path(config.gateway.state_dir)) as db:
        instance = show_instance(db, args.uid)
    if instance is None:
        raise AdminError(f"no instance {args.uid} in the index")
    path = config.gateway.state_dir / "spool" / instance.file_name
    if args.json:
        _print_json(_instance_json(instance, path, show_patient_id=args.show_patient_id))
        return 0
    on_disk = "present" if path.exists() else "absent"
    lines = [
        ("SOP Instance UID", instance.sop_instance_uid),
        ("SOP Class UID", instance.sop_class_uid),
        ("Study UID", instance.study_instance_uid),
        ("Series UID", instance.series_instance_uid),
        ("Modality", instance.modality),
        ("Patient ID", instance.patient_id if args.show_patient_id else "(hidden: --show-patient-id)"),
        ("Transfer syntax", instance.transfer_syntax_uid),
        ("Size", f"{instance.size_bytes} bytes ({_size(instance.size_bytes)})"),
        ("SHA-256", instance.sha256),
        ("File", f"{path} ({instance.file_state}; {on_disk} on disk)"),
        (
            "Received",
            f"{_local(instance.received_at)} from {instance.calling_ae} at {instance.peer_address or '?'}",
        ),
        ("Delivered", _local(instance.delivered_at) if instance.delivered_at else "not everywhere yet"),
    ]
    for label, value in lines:
        print(f"{label + ':':<18}{value}")
    for d in instance.deliveries:
        print(f"\n{d.destination}: {d.state}, {d.attempts} attempts, {d.refusals} refusals")
        if d.state == "pending":
            print(f"  next attempt  {_local(d.next_attempt_at)}")
        print(f"  last status   {_hex(d.last_status) or '-'}")
        print(f"  last error    {d.last_error or '-'}")
        print(f"  updated       {_local(d.updated_at)}")
    if not instance.deliveries:
        print("\nno deliveries (no destination was configured when it arrived)")
    return 0


def _instance_json(instance: InstanceView, path: Path, *, show_patient_id: bool) -> dict[str, Any]:
    document: dict[str, Any] = {
        "sop_instance_uid": instance.sop_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "study_instance_uid": instance.study_instance_uid,
        "series_instance_uid": instance.series_instance_uid,
        "modality": instance.modality,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "size_bytes": instance.size_bytes,
        "sha256": instance.sha256,
        "path": str(path),
        "file_state": instance.file_state,
        "file_present": path.exists(),
        "calling_ae": instance.calling_ae,
        "peer_address": instance.peer_address,
        "received_at": _iso(instance.received_at),
        "delivered_at": _iso(instance.delivered_at),
        "deliveries": [_delivery_json(d) for d in instance.deliveries],
    }
    if show_patient_id:
        document["patient_id"] = instance.patient_id
    return document


# ---------------------------------------------------------------- queue retry / purge


def _queue_retry(config: Config, args: argparse.Namespace) -> int:
    selector = _selector(args, purging=False)
    with open_index(index_path(config.gateway.state_dir), write=True) as db:
        report = retry(db, selector, include_done=args.include_done)
    if selector.uid is not None and not (
        report.total or report.in_flight or report.done or report.not_stored
    ):
        raise AdminError(f"nothing to retry for {selector.describe()}: not in the index, or no such delivery")
    per_destination = ", ".join(f"{count} to {name}" for name, count in sorted(report.requeued.items()))
    print(
        f"re-queued {_n(report.total, 'delivery', 'deliveries')} of {_n(report.instances, 'instance')}"
        + (f" ({per_destination})" if per_destination else "")
    )
    if report.total:
        print(
            f"the running gateway sends them within {IDLE_RECHECK:.0f} s "
            "(to a destination it has marked down: after its next successful probe)"
        )
    unconfigured = sorted(set(report.requeued) - {d.name for d in config.destinations})
    if unconfigured:
        print(f"warning: not in the config, so nothing sends them: {', '.join(unconfigured)}")
    if report.in_flight:
        print(f"skipped {report.in_flight} being sent right now (in_flight)")
    if report.done:
        print(f"skipped {report.done} already delivered (add --include-done to send them again)")
    if report.not_stored:
        print(f"skipped {report.not_stored} whose spool file is gone (missing, or removed by retention)")
    return 0


def _queue_purge(config: Config, args: argparse.Namespace) -> int:
    selector = _selector(args, purging=True)
    spool = Spool(config.gateway.state_dir / "spool", config.gateway.min_free_bytes)
    with open_index(index_path(config.gateway.state_dir), write=True) as db:
        plan = plan_purge(db, selector)
        if not plan.instances:
            if selector.uid is not None:
                raise AdminError(f"no instance {selector.uid} in the index")
            print(f"nothing to purge: no {selector.describe()}")
            return 0
        batches = purge(db, plan, spool, force=args.force)  # refuses here, before asking
        if not args.yes:
            undelivered = f", {plan.undelivered} of them NOT delivered everywhere" if plan.undelivered else ""
            selected = f"{_n(plan.instances, 'instance')} ({_size(plan.size_bytes)}){undelivered}"
            _confirm(f"purge {selected}: {selector.describe()}? Their index rows and spool files go. [y/N] ")
        purged = files = size = 0
        skipped: list[str] = []
        for batch in batches:
            for uid in batch.purged:
                print(f"purged {uid}")
            purged += len(batch.purged)
            files += batch.files_removed
            size += batch.bytes_removed
            skipped += batch.skipped
    removed = f"{_n(files, 'spool file')} ({_size(size)})"
    print(f"purged {_n(purged, 'instance')}: their rows and deliveries, and {removed}")
    if skipped:
        changed = " ".join(skipped)
        print(f"skipped {len(skipped)} that changed meanwhile (now in flight or undelivered): {changed}")
    return 0


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError("purge asks for confirmation: add --yes (stdin is not a terminal)")
    try:
        answer = input(question)
    except EOFError:
        answer = ""
    if answer.strip().lower() not in {"y", "yes"}:
        raise AdminError("not purged")


# ---------------------------------------------------------------- echo

_REJECT_SOURCES: Final = {
    1: "the service user",
    2: "the service provider (ACSE)",
    3: "the service provider (presentation)",
}
_REJECT_REASONS: Final = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_VERIFY_HINTS: Final = {
    2: "its certificate is not signed by a CA in {ca}: set destination.tls.ca to the CA that issued it",
    9: "its certificate is not valid yet: check both clocks",
    10: "its certificate has expired",
    18: "it presents a self-signed certificate that {ca} does not hold",
    19: "its chain ends in a CA that {ca} does not hold: set destination.tls.ca to the CA that issued it",
    20: "its certificate is not signed by a CA in {ca}: set destination.tls.ca to the CA that issued it",
    21: "its certificate is not signed by a CA in {ca}: set destination.tls.ca to the CA that issued it",
    62: "its certificate does not name {hostname!r}: set destination.tls.server_hostname to a name it holds",
}
_TLS_HINTS: Final = {
    "WRONG_VERSION_NUMBER": "the destination does not speak TLS on this port (plain DICOM? then tls = false)",
    "UNSUPPORTED_PROTOCOL": "protocol version: the destination offers only TLS older than 1.2 (refused)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol version: the destination and the gateway share no TLS version",
    "NO_PROTOCOLS_AVAILABLE": "protocol version: the destination and the gateway share no TLS version",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "a client certificate is required: set tls.cert and tls.key",
    "TLSV1_ALERT_UNKNOWN_CA": "the destination does not trust our client certificate's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the destination refused our client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the destination refused our client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no common cipher suite, or a client certificate is required",
}


def _echo(config: Config, args: argparse.Namespace) -> int:
    destination = next((d for d in config.destinations if d.name == args.name), None)
    if destination is None:
        names = ", ".join(d.name for d in config.destinations) or "none (receive-only)"
        raise UsageError(f"no destination {args.name!r} in {config.source}; configured: {names}")
    where = f"{destination.called_ae} at {destination.host}:{destination.port}"
    transport = "plain TCP" if destination.tls is None else "TLS"
    try:
        context = client_context(destination.tls) if destination.tls is not None else None
    except (ssl.SSLError, OSError) as exc:
        raise AdminError(f"echo {destination.name}: TLS settings unusable: {exc}") from exc
    peer = peer_for(destination, context)
    identity = LocalIdentity(
        IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, config.receiver.max_pdu_length
    )
    try:
        setup, round_trip = asyncio.run(_echo_once(peer, identity))
    except (GatewayError, OSError) as exc:
        reason = _explain(exc, destination, peer)
        raise AdminError(f"echo {destination.name} ({where}, {transport}) failed: {reason}") from exc
    print(
        f"echo {destination.name} ({where}, {transport}): success, round trip {round_trip * 1000:.1f} ms "
        f"(association set up in {setup * 1000:.1f} ms)"
    )
    return 0


async def _echo_once(peer: Peer, identity: LocalIdentity) -> tuple[float, float]:
    """Seconds to open the association, and for the C-ECHO's round trip."""
    started = time.perf_counter()
    async with await RequestorAssociation.open(peer, identity, [VERIFICATION]) as association:
        opened = time.perf_counter()
        status = await association.echo()
        answered = time.perf_counter()
    if status != 0:
        raise AssociationError("echo", f"C-ECHO answered status 0x{status:04X}")
    return opened - started, answered - opened


def _explain(exc: BaseException, destination: DestinationConfig, peer: Peer) -> str:  # noqa: PLR0911 - one per stage
    """Which step failed (DNS, TCP, TLS, association, C-ECHO), why, and what to check."""
    if isinstance(exc, AssociationRejectedError):
        return _explain_rejection(exc, peer)
    cause = exc.__cause__ if isinstance(exc, AssociationError) else exc
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return f"TLS handshake failed: {_explain_tls(cause, destination, peer)}"
    stage = exc.stage if isinstance(exc, AssociationError) else ""
    if stage == "connect":
        return _explain_connect(cause or exc, peer)
    plain = _closed_hint(destination)
    if stage == "associate":
        return f"association request: {str(exc).removeprefix('associate: ')}{plain}"
    if stage:
        return str(exc).removeprefix(f"{stage}: ")
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc} (is this a DICOM port? a proxy or web server may be answering)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {peer.dimse_timeout:g} s"
    if isinstance(exc, ConnectionError):
        return f"the destination closed the connection ({exc.strerror or exc}){plain}"
    return str(exc)


def _closed_hint(destination: DestinationConfig) -> str:
    """Why a destination may close the connection instead of answering the association request."""
    if destination.tls is None:
        return " (does it expect TLS? this destination has tls = false)"
    if destination.tls.cert is None:  # a TLS 1.3 server refuses a missing client certificate only now
        return (
            " right after the TLS handshake (it may require a client certificate: set tls.cert and tls.key)"
        )
    return " right after the TLS handshake (it may not trust our client certificate)"


def _explain_rejection(exc: AssociationRejectedError, peer: Peer) -> str:
    source = _REJECT_SOURCES.get(exc.source, f"source {exc.source}")
    reason = _REJECT_REASONS.get((exc.source, exc.reason), f"reason {exc.reason}")
    kind = "permanent" if exc.permanent else "transient"
    if (exc.source, exc.reason) == (1, 3):
        hint = f": it does not accept our AE title {peer.calling_ae} (ask its admin, or set calling_ae)"
    elif (exc.source, exc.reason) == (1, 7):
        hint = f": it does not answer to {peer.called_ae} (check called_ae)"
    elif exc.source == 3:
        hint = ": it is busy, try again later"
    else:
        hint = ""
    return f"association rejected ({kind}) by {source}: {reason}{hint}"


def _explain_connect(cause: BaseException, peer: Peer) -> str:
    address = f"{peer.host}:{peer.port}"
    if isinstance(cause, socket.gaierror):
        return f"DNS: cannot resolve {peer.host!r} ({cause.strerror or cause})"
    if isinstance(cause, ConnectionRefusedError):
        return f"TCP: connection refused by {address} (nothing listens there, or a firewall rejects it)"
    if isinstance(cause, TimeoutError):
        return (
            f"TCP: no answer from {address} within {peer.connect_timeout:g} s "
            "(host down, or a firewall drops the packets)"
        )
    return f"TCP: cannot connect to {address}: {getattr(cause, 'strerror', None) or cause}"


def _explain_tls(error: BaseException, destination: DestinationConfig, peer: Peer) -> str:
    ca = str(destination.tls.ca) if destination.tls and destination.tls.ca else "the system CA store"
    if isinstance(error, ssl.SSLCertVerificationError):
        hint = _VERIFY_HINTS.get(error.verify_code, "").format(ca=ca, hostname=peer.server_hostname)
        message = str(error.verify_message).rstrip(".")
        return f"certificate verify failed: {message}" + (f"; {hint}" if hint else "")
    reason = getattr(error, "reason", None)
    hint = _TLS_HINTS.get(reason or "", "")
    if isinstance(error, ssl.SSLEOFError):
        hint = "the destination closed the connection during the handshake (does it speak TLS on this port?)"
    return f"{reason or error}" + (f": {hint}" if hint else "")


# ---------------------------------------------------------------- run / check-config


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
    faulthandler.enable()  # a watchdog kill of a hung loop dumps every thread's stack to the journal
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


_OPERATOR_COMMANDS: Final[dict[str, Callable[[Config, argparse.Namespace], int]]] = {
    "status": _status,
    "echo": _echo,
    "list": _queue_list,
    "show": _queue_show,
    "retry": _queue_retry,
    "purge": _queue_purge,
}


def _operator(path: Path, args: argparse.Namespace) -> int:
    """Run an operator command; every failure becomes one line on stderr and an exit code."""
    command = _OPERATOR_COMMANDS[args.action if args.command == "queue" else args.command]
    try:
        return command(load_config(path), args)
    except ConfigError as exc:
        _print_problems(path, exc)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the reader left; stay quiet as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (GatewayError, OSError) as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("dicom-gateway: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dicom-gateway`` command."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"dicom-gateway {__version__}")
        return 0
    if args.command == "check-config":
        return _check_config(resolve_config_path(args.file or args.config))
    if args.command == "run":
        return _run(resolve_config_path(args.config))
    return _operator(resolve_config_path(args.config), args)


if __name__ == "__main__":
    sys.exit(main())
