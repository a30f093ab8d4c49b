"""The scanner simulator: a C-STORE SCU that sends synthetic studies or DICOM files, as a modality would.

Each of `associations` worker threads opens its own association and takes the next object from one shared
queue, so a slow or failed association leaves its share to the others. Every instance answered 0x0000 is
written (and flushed) to the ack file the moment its response arrives, so a test that kills the receiver
mid-run still knows exactly what was acknowledged.

May import: pydicom, pynetdicom, `simulators.datasets`, `simulators.pynetdicom_setup`.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self, TextIO

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from simulators.datasets import InstanceRef, StudySpec, build_dataset, iter_refs
from simulators.pynetdicom_setup import (
    close_transport,
    configure_pynetdicom,
    connection_handlers,
    keep_responses_for_caller,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from pydicom.dataset import Dataset
    from pydicom.uid import UID
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

DEFAULT_MAX_PDU = 16382  # pynetdicom's own default (DEFAULT_MAX_LENGTH)
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
_ERRORS_SHOWN = 20
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class TlsOptions:
    """TLS toward the receiver: verify it against `ca_file`; present `cert_file` for mutual TLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: str | None = None  # default: the host connected to


@dataclass(frozen=True)
class ScanOptions:
    """Where and what the scanner sends. With `files`, those are streamed as stored instead of `study`."""

    host: str = "127.0.0.1"
    port: int = 11112
    calling_ae: str = "CT_SCANNER_1"
    called_ae: str = "EDGE_GW"
    study: StudySpec = field(default_factory=StudySpec)
    files: tuple[Path, ...] = ()
    associations: int = 1
    rate: float | None = None  # instances per second over all associations; None: as fast as possible
    tls: TlsOptions | None = None
    max_pdu: int = DEFAULT_MAX_PDU
    timeout: float = 30.0  # connect, ACSE and DIMSE timeouts, seconds
    ack_file: Path | None = None
    progress_interval: float = 5.0


@dataclass
class ScanResult:
    """What happened: one count or list per outcome, for the summary and for tests."""

    planned: int
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    acked: list[str] = field(default_factory=list)  # SOP Instance UIDs answered 0x0000, in arrival order
    no_response: int = 0  # requests the association died under
    associations_established: int = 0
    associations_rejected: int = 0
    associations_aborted: int = 0
    connection_failures: int = 0
    errors: list[str] = field(default_factory=list)
    bytes_sent: int = 0  # PDU bytes written to the network, headers and commands included
    elapsed: float = 0.0

    @property
    def sent(self) -> int:
        """Requests that got any response."""
        return self.statuses.total()

    @property
    def stored(self) -> int:
        """Requests answered with success or a warning: the peer kept the object."""
        return sum(n for status, n in self.statuses.items() if status == 0 or status in WARNING_STATUSES)

    @property
    def failed(self) -> int:
        """Requests answered with a failure status or not answered at all."""
        return self.sent - self.stored + self.no_response

    @property
    def ok(self) -> bool:
        """True when every planned instance was stored and nothing else went wrong."""
        return self.stored == self.planned and not self.errors

    def summary(self) -> str:
        """Return the multi-line report the CLI prints."""
        seconds = max(self.elapsed, 1e-9)
        statuses = ", ".join(f"0x{s:04X}={n}" for s, n in sorted(self.statuses.items())) or "none"
        lines = [
            (
                f"sent {self.sent} of {self.planned} instances in {self.elapsed:.2f} s: "
                f"{self.sent / seconds:.1f} instances/s, {self.bytes_sent / seconds / 1e6:.2f} MB/s"
            ),
            f"statuses: {statuses}; acked 0x0000: {len(self.acked)}; no response: {self.no_response}",
            (
                f"associations: {self.associations_established} established, {self.associations_rejected} "
                f"rejected, {self.associations_aborted} aborted, {self.connection_failures} unreachable"
            ),
        ]
        lines += [f"error: {error}" for error in self.errors[:_ERRORS_SHOWN]]
        if len(self.errors) > _ERRORS_SHOWN:
            lines.append(f"... and {len(self.errors) - _ERRORS_SHOWN} more errors")
        lines.append("result: OK" if self.ok else "result: FAILED")
        return "\n".join(lines)


@dataclass(frozen=True)
class _FileItem:
    path: Path
    sop_instance_uid: str


@dataclass
class _Wire:
    """What one association's socket saw, filled in by pynetdicom event handlers."""

    connected: bool = False
    bytes_sent: int = 0
    rejection: str | None = None  # the A-ASSOCIATE-RJ's result, source and reason, when one came


class _Tally:
    """The run's shared state: work queue, pacing, result and ack file. Mutate `result` under `lock`."""

    def __init__(self, options: ScanOptions, items: Iterator[InstanceRef | _FileItem], planned: int) -> None:
        self.result = ScanResult(planned=planned)
        self.lock = threading.Lock()
        self._ack_file = options.ack_file
        self._items = items
        self._interval = 1.0 / options.rate if options.rate else 0.0
        self._next_slot = time.monotonic()
        self._ack_stream: TextIO | None = None

    def __enter__(self) -> Self:
        if self._ack_file is not None:
            self._ack_stream = self._ack_file.open("w", encoding="ascii")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._ack_stream is not None:
            self._ack_stream.close()

    def next_item(self) -> InstanceRef | _FileItem | None:
        """Take the next object to send, waiting for its slot when a rate is set."""
        with self.lock:
            item = next(self._items, None)
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if item is not None and slot > now:
            time.sleep(slot - now)  # the rate limit itself, not a wait for an event
        return item

    def record_response(self, uid: str, status: int | None) -> None:
        """Count one C-STORE response (None: none came); a 0x0000 goes to the ack file at once."""
        with self.lock:
            if status is None:
                self.result.no_response += 1
                return
            self.result.statuses[status] += 1
            if status == 0:
                self.result.acked.append(uid)
                if self._ack_stream is not None:
                    self._ack_stream.write(uid + "\n")
                    self._ack_stream.flush()

    def add_error(self, error: str) -> None:
        with self.lock:
            self.result.errors.append(error)


def run_scanner(options: ScanOptions, stop: threading.Event | None = None) -> ScanResult:
    """Send everything `options` describes over parallel associations; return what happened.

    Setting `stop` (or Ctrl-C) ends the run after the requests in flight.
    """
    configure_pynetdicom()
    stop = stop if stop is not None else threading.Event()
    items: Iterator[InstanceRef | _FileItem]
    if options.files:
        metas = [(path, *_read_uids(path)) for path in options.files]
        contexts = sorted({(sop_class, syntax) for _, sop_class, _, syntax in metas})
        items, planned = (_FileItem(path, uid) for path, _, uid, _ in metas), len(metas)
    else:
        contexts = [(options.study.sop_class_uid, options.study.transfer_syntax_uid)]
        items, planned = iter_refs(options.study), options.study.total_instances
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP class/transfer syntax pairs; one association takes 128")

    started = time.monotonic()
    done = threading.Event()
    with _Tally(options, items, planned) as tally:
        workers = [
            threading.Thread(
                target=_run_association_blocking,
                args=(options, contexts, tally, stop),
                name=f"scanner-association-{number}",
            )
            for number in range(1, options.associations + 1)
        ]
        progress = threading.Thread(
            target=_report_progress_blocking,
            args=(options.progress_interval, tally, started, done),
            name="scanner-progress",
        )
        for thread in [*workers, progress]:
            thread.start()
        try:
            for worker in workers:
                worker.join()
        except KeyboardInterrupt:
            tally.add_error("interrupted")
            stop.set()
            for worker in workers:
                worker.join()
        done.set()
        progress.join()
    result = tally.result
    result.elapsed = time.monotonic() - started
    unsent = planned - result.sent - result.no_response
    if unsent:
        result.errors.append(f"{unsent} of {planned} instances were not sent")
    return result


def _read_uids(path: Path) -> tuple[UID, UID, UID]:
    """Return a file's SOP class, SOP instance and transfer syntax UIDs from its file meta."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError as exc:
        raise ValueError(f"{path}: not a DICOM file ({exc})") from exc
    if not all(
        k in meta for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    ):
        raise ValueError(f"{path}: file meta lacks the SOP class, SOP instance or transfer syntax UID")
    return meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID


def _client_tls_context(tls: TlsOptions) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _on_conn_open(_event: evt.Event, wire: _Wire) -> None:
    wire.connected = True


def _on_data_sent(event: evt.Event, wire: _Wire) -> None:
    wire.bytes_sent += len(event.data)


def _on_pdu_recv(event: evt.Event, wire: _Wire) -> None:
    # pynetdicom can report a rejection as an abort: when the peer closes right after its A-ASSOCIATE-RJ,
    # the ACSE thread may find the transport already closed and abort before it reads the RJ.
    pdu = event.pdu
    if isinstance(pdu, A_ASSOCIATE_RJ):
        wire.rejection = f"{pdu.result_str}, {pdu.source_str}, {pdu.reason_str}"


def _associate_blocking(
    options: ScanOptions, contexts: list[tuple[UID, UID]], tally: _Tally, wire: _Wire
) -> Association | None:
    """Open one association; count it, or count and report why it did not come up."""
    ae = AE(ae_title=options.calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = options.timeout
    # No idle abort: gaps between requests are ours (rate limiting); the DIMSE timeout bounds a silent peer.
    ae.network_timeout = None
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    tls_args = None
    if options.tls is not None:
        tls_args = (_client_tls_context(options.tls), options.tls.server_hostname or options.host)
    assoc = ae.associate(
        options.host,
        options.port,
        ae_title=options.called_ae,
        max_pdu=options.max_pdu,
        tls_args=tls_args,
        evt_handlers=[
            *connection_handlers(),
            (evt.EVT_CONN_OPEN, _on_conn_open, [wire]),
            (evt.EVT_DATA_SENT, _on_data_sent, [wire]),
            (evt.EVT_PDU_RECV, _on_pdu_recv, [wire]),
        ],
    )
    if assoc.is_established:
        keep_responses_for_caller(assoc)
    else:
        close_transport(assoc)
    where = f"{options.host}:{options.port}"
    with tally.lock:
        result = tally.result
        if assoc.is_established:
            result.associations_established += 1
            return assoc
        if assoc.is_rejected or wire.rejection is not None:
            result.associations_rejected += 1
            result.errors.append(f"association rejected by {where}: {wire.rejection}")
        elif not wire.connected:
            result.connection_failures += 1
            result.errors.append(f"cannot connect to {where}")
        else:
            result.associations_aborted += 1
            result.errors.append(f"association with {where} aborted during negotiation")
    return None


def _run_association_blocking(
    options: ScanOptions, contexts: list[tuple[UID, UID]], tally: _Tally, stop: threading.Event
) -> None:
    """Worker thread: one association, sending queued objects until the queue or the association ends."""
    wire = _Wire()
    assoc = _associate_blocking(options, contexts, tally, wire)
    message_id = 0
    try:
        while assoc is not None and not stop.is_set():
            if not assoc.is_established:  # the peer aborted or closed the connection between requests
                _count_abort(tally, message_id)
                break
            item = tally.next_item()
            if item is None:
                break
            message_id = message_id % 0xFFFF + 1
            payload: Path | Dataset
            if isinstance(item, _FileItem):
                uid, payload = item.sop_instance_uid, item.path
            else:
                payload = build_dataset(options.study, item)
                uid = payload.SOPInstanceUID
            try:
                response = assoc.send_c_store(payload, msg_id=message_id)
            except ValueError as exc:  # the peer accepted no presentation context for this object
                tally.add_error(f"{uid} not sent: {exc}")
                continue
            except RuntimeError:  # the association ended just before the request went out
                _count_abort(tally, message_id)
                break
            tally.record_response(uid, response.get("Status"))
    except (OSError, ValueError) as exc:
        tally.add_error(f"{threading.current_thread().name}: {exc!r}")
    finally:
        if assoc is not None:
            if assoc.is_established:
                assoc.release()
            close_transport(assoc)
        with tally.lock:
            tally.result.bytes_sent += wire.bytes_sent


def _count_abort(tally: _Tally, message_id: int) -> None:
    with tally.lock:
        tally.result.associations_aborted += 1
        tally.result.errors.append(f"association aborted after {message_id} requests")


def _report_progress_blocking(interval: float, tally: _Tally, started: float, done: threading.Event) -> None:
    """Log one progress line every `interval` seconds until the run is done."""
    while not done.wait(interval):
        with tally.lock:
            result = tally.result
            sent, acked, failed = result.sent, len(result.acked), result.failed
        log.info(
            "progress sent=%d/%d acked=%d failed=%d rate=%.1f/s",
            sent,
            tally.result.planned,
            acked,
            failed,
            sent / (time.monotonic() - started),
        )
