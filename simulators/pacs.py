"""The PACS simulator: a C-STORE/C-ECHO SCP that keeps every object byte-exact, with fault knobs.

It stands in for the central archive in the forwarder's tests and in demos. pynetdicom's threaded
association server accepts over plain TCP or TLS; each C-STORE's data set is written exactly as it came
off the wire, behind a file meta header, as `<SOP Instance UID>.dcm`; `PacsFaults` makes it reject,
fail, delay, abort, stall or go away on demand. Every observation (`received()`, `stats()`,
`wait_for()`) is a thread-safe snapshot.

The data set comes from `event.encoded_dataset()`, not from pynetdicom's chunked receive: chunked
receive writes a file meta header naming the peer's UID (through pydicom, which warns or fails on a
malformed one) before any handler could validate it, and leaves its temporary file open when an
association dies mid-object. Holding one object in memory is fine for a test peer.

May import: pynetdicom, `simulators.pacs_state`, `simulators.pynetdicom_setup`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import TYPE_CHECKING, Self, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.pdu import P_DATA_TF

from simulators.pacs_state import (
    INVALID_UID,
    OUT_OF_RESOURCES,
    SUCCESS,
    FaultPlan,
    Ledger,
    PacsFaults,
    PacsStats,
    ReceivedInstance,
    is_kept,
    is_valid_uid,
)
from simulators.pynetdicom_setup import (
    abort_after_this_pdu,
    configure_pynetdicom,
    connection_handlers,
    end_association,
    ends_a_command,
    reject_association,
    start_association_server,
    wake_association,
)

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import EventHandlerType
    from pynetdicom.presentation import PresentationContext

    from simulators.pynetdicom_setup import HandshakeInThreadServer

__all__ = ["PacsFaults", "PacsSimulator", "PacsStats", "ReceivedInstance", "server_tls_context"]

log = logging.getLogger(__name__)

_MAX_ASSOCIATIONS = 64  # stalled associations count too; pynetdicom's default is 10
_ACSE_TIMEOUT = 10.0  # also ARTIM: how long stop() may wait for a peer that ignores our A-ABORT
_JOIN_TIMEOUT = 15.0
_VERIFICATION = "1.2.840.10008.1.1"
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_LEGACY_TLS = (ssl.TLSVersion.SSLv3, ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)


def server_tls_context(
    cert_file: Path,
    key_file: Path | None = None,
    ca_file: Path | None = None,
    *,
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    """Return a server-side context; with `ca_file`, clients must present a certificate it signed.

    `minimum_version` defaults to TLS 1.2, or to `maximum_version` when that is older. A range reaching
    below TLS 1.2 also lowers OpenSSL's security level to 0, without which OpenSSL 3 refuses those
    versions outright: that is how a test builds an outdated peer (Python warns as it is built).
    """
    if minimum_version is None:
        minimum_version = maximum_version if maximum_version in _LEGACY_TLS else ssl.TLSVersion.TLSv1_2
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum_version
    context.maximum_version = maximum_version
    if minimum_version in _LEGACY_TLS or maximum_version in _LEGACY_TLS:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(cert_file, key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class PacsSimulator:
    """A C-STORE/C-ECHO SCP on `host:port` (0: an ephemeral port) storing into `storage_dir`.

    Start it (or enter it as a context manager), point a sender at `port`, then inspect `received()`,
    `stats()` or wait with `wait_for()`. `stop()` is idempotent and ends every association.
    """

    def __init__(
        self,
        storage_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ae_title: str = "CENTRAL_PACS",
        ssl_context: ssl.SSLContext | None = None,
        faults: PacsFaults = PacsFaults(),  # noqa: B008 - frozen, so one shared default is safe
    ) -> None:
        configure_pynetdicom()
        self.storage_dir = storage_dir
        self.host = host
        self.ae_title = ae_title
        self._port = port
        self._ssl_context = ssl_context
        self._plan = FaultPlan(faults)
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = _MAX_ASSOCIATIONS
        self._ae.acse_timeout = _ACSE_TIMEOUT
        self._ledger = Ledger()
        self._lock = threading.Lock()  # guards _helpers and the decision to stop
        self._helpers: list[threading.Thread] = []  # outage timers and association enders, joined by stop()
        self._stopping = threading.Event()  # ends delays and stalls at once
        self._listen_lock = threading.Lock()  # start/stop_listening come from callers and from timers
        self._server: HandshakeInThreadServer | None = None
        self._server_thread: threading.Thread | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The TCP port; the ephemeral one chosen once started with port 0."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """`(host, port)` to connect to."""
        return self.host, self._port

    def start(self) -> Self:
        """Bind and serve; ready when this returns. Raises OSError when the port is taken."""
        if self._started:
            raise RuntimeError("PACS simulator already started")
        self._started = True
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.start_listening()
        log.info("PACS simulator %s listening on %s:%d", self.ae_title, self.host, self._port)
        return self

    def stop(self) -> None:
        """Stop listening, abort every association, end the stalls, join every thread; idempotent."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()  # first: stalled and delayed handlers must return for the aborts to finish
            helpers = list(self._helpers)
        for helper in helpers:
            if isinstance(helper, threading.Timer):
                helper.cancel()
        self.stop_listening()
        associations = self._ae.active_associations
        for assoc in associations:
            if assoc.is_established:
                assoc.abort()  # blocking: sends A-ABORT, waits for the peer to go, closes the socket
            wake_association(assoc)  # one still negotiating, or ignoring our abort: end its waits
            assoc.kill()
        with self._lock:
            helpers = list(self._helpers)
        for thread in [*helpers, *associations, *(assoc.dul for assoc in associations)]:
            if thread.ident is not None:
                thread.join(_JOIN_TIMEOUT)

    def set_faults(self, faults: PacsFaults) -> None:
        """Put `faults` in force for requests from now on (new associations for transfer syntaxes)."""
        previous = self._plan.faults
        self._plan.replace(faults)
        if faults.transfer_syntaxes != previous.transfer_syntaxes:
            with self._listen_lock:
                if self._server is not None:
                    # Each new association copies the server's contexts: swapping the list is enough.
                    self._server.contexts = self._contexts()

    def stop_listening(self) -> None:
        """Close the listening socket (connections are refused); running associations carry on."""
        with self._listen_lock:
            server, thread = self._server, self._server_thread
            self._server = self._server_thread = None
            if server is not None and thread is not None:
                server.shutdown()
                thread.join(_JOIN_TIMEOUT)
                log.info("PACS simulator stopped listening on port %d", self._port)

    def start_listening(self) -> None:
        """Listen again on the same port (a no-op while listening). Raises OSError when it is taken."""
        with self._listen_lock:
            if self._stopping.is_set():
                raise RuntimeError("PACS simulator stopped")
            if self._server is not None:
                return
            self._server, self._server_thread = start_association_server(
                self._ae,
                (self.host, self._port),
                contexts=self._contexts(),
                ssl_context=self._ssl_context,
                evt_handlers=self._handlers(),
            )
            self._port = self._server.server_address[1]

    def schedule_outage(self, down_at: float, up_at: float) -> None:
        """Stop listening `down_at` seconds from now and listen again at `up_at`."""
        if not 0 <= down_at < up_at:
            raise ValueError("an outage needs 0 <= down_at < up_at")
        timers = [
            threading.Timer(down_at, self.stop_listening),
            threading.Timer(up_at, self._end_outage),
        ]
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("PACS simulator stopped")
            self._helpers.extend(timers)
        for timer in timers:
            timer.daemon = True
            timer.start()

    def received(self) -> list[ReceivedInstance]:
        """Every stored C-STORE, in the order stored."""
        return self._ledger.received()

    def stored_uids(self) -> set[str]:
        """The SOP Instance UIDs stored so far."""
        return self._ledger.stored_uids()

    def stats(self) -> PacsStats:
        """The counts so far."""
        return self._ledger.stats()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until `count` distinct UIDs are stored; False if `timeout` seconds pass first."""
        return self._ledger.wait_for(count, timeout)

    def __enter__(self) -> Self:
        return self if self._started else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _end_outage(self) -> None:
        try:
            self.start_listening()
        except RuntimeError:
            log.debug("outage end skipped: the simulator has stopped")
        except OSError as exc:
            log.error("cannot listen on port %d again after the outage: %s", self._port, exc)  # noqa: TRY400
        else:
            log.info("PACS simulator listening again on port %d", self._port)

    def _contexts(self) -> list[PresentationContext]:
        """Storage contexts restricted to the fault's transfer syntaxes, plus Verification."""
        syntaxes = list(self._plan.faults.transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        contexts = [
            build_context(cx.abstract_syntax, syntaxes)
            for cx in AllStoragePresentationContexts
            if cx.abstract_syntax is not None
        ]
        return [*contexts, build_context(_VERIFICATION, list(_UNCOMPRESSED))]

    def _handlers(self) -> list[EventHandlerType]:
        return [
            *connection_handlers(),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
            (evt.EVT_PDU_RECV, self._on_pdu_recv),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    # Everything below runs in pynetdicom's threads: `_on_*` handlers in an association's reactor
    # thread, except EVT_PDU_SENT/EVT_PDU_RECV/EVT_CONN_CLOSE, which run in its DUL (socket) thread.

    def _on_requested(self, event: evt.Event) -> None:
        request = event.assoc.requestor.primitive
        calling_ae = request.calling_ae_title if request is not None else "?"
        reject = self._plan.faults.reject_associations
        session = self._ledger.open_session(event.assoc, calling_ae, rejected=reject)
        if reject:
            log.info("association %d from %s: rejected (reject_associations)", session.number, calling_ae)
            # rejected-permanent, by the service user, calling AE title not recognized
            reject_association(event.assoc, 0x01, 0x01, 0x03)

    def _on_accepted(self, event: evt.Event) -> None:
        self._ledger.count_accepted()
        session = self._ledger.session(event.assoc)
        if session is not None:
            log.info("association %d from %s: accepted", session.number, session.calling_ae)

    def _on_rejected(self, _event: evt.Event) -> None:
        """Count pynetdicom's own rejections (too many associations); ours are counted when made."""
        self._ledger.count_rejected()

    def _on_c_echo(self, _event: evt.Event) -> int:
        self._ledger.count_echo()
        return SUCCESS

    def _on_c_store(self, event: evt.Event) -> int:
        request = cast("C_STORE", event.request)
        uid = str(request.AffectedSOPInstanceUID or "")
        faults = self._plan.faults
        if faults.delay > 0:
            self._stopping.wait(faults.delay)  # stop() cuts the delay short
        if not is_valid_uid(uid):
            log.warning("C-STORE refused: SOP Instance UID %r cannot name a file", uid[:80])
            status = INVALID_UID
        elif self._stopping.is_set():
            status = OUT_OF_RESOURCES  # shutting down; the association is being aborted anyway
        else:
            status = self._plan.status_for(uid)
        path = None
        if is_kept(status):
            try:
                path = self._write_blocking(event, uid)
            except OSError:
                log.exception("cannot store %s", uid)
                status = OUT_OF_RESOURCES
        session = self._ledger.record_store(
            event.assoc,
            uid,
            status,
            path=path,
            sop_class_uid=str(request.AffectedSOPClassUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            abort_after=faults.abort_after,
        )
        log.debug("C-STORE %s answered 0x%04X on association %d", uid, status, session.number)
        return status

    def _write_blocking(self, event: evt.Event, uid: str) -> Path:
        """Write preamble, file meta and the data set bytes as received; rename into place."""
        path = self.storage_dir / f"{uid}.dcm"
        # A name of its own per thread: the same UID may arrive on two associations at once.
        partial = self.storage_dir / f".{uid}.{threading.get_ident()}.partial"
        partial.write_bytes(event.encoded_dataset(include_meta=True))
        partial.replace(path)
        return path

    def _on_pdu_sent(self, event: evt.Event) -> None:
        """abort_after: abort right behind the C-STORE-RSP that completes the count, so it is acked."""
        if not ends_a_command(event.pdu):
            return
        session = self._ledger.take_pending_abort(event.assoc)
        if session is None:
            return
        log.info("association %d: aborting after %d stored instances", session.number, session.stored)
        abort_after_this_pdu(event.assoc)

    def _on_pdu_recv(self, event: evt.Event) -> None:
        """stall_after: hold the DUL thread on the next P-DATA, so nothing more is read or answered.

        Blocking the socket's reader (rather than the C-STORE handler) also stops TCP from draining: a
        sender streaming a large object sees its writes block, as with a hung archive.
        """
        if not isinstance(event.pdu, P_DATA_TF):
            return
        stall_after = self._plan.faults.stall_after
        if stall_after is None or self._stopping.is_set():
            return
        session = self._ledger.session(event.assoc)
        if session is None or session.stored < stall_after:
            return
        log.info("association %d: stalling after %d stored instances", session.number, session.stored)
        self._stopping.wait()

    def _on_conn_close(self, event: evt.Event) -> None:
        session = self._ledger.session(event.assoc)
        if session is None or not session.aborted_by_us:
            return
        with self._lock:
            if not self._stopping.is_set():  # else stop() ends what is left itself
                self._helpers.append(end_association(event.assoc, f"pacs-end-association-{session.number}"))
