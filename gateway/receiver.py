"""The DICOM acceptor: access control, negotiation policy, C-ECHO and C-STORE into the spool.

The durability contract lives here: a C-STORE-RSP with a success status goes out only after the object's
file is fsynced and renamed (spool) and its row committed (index). Data set fragments are buffered per
object and written by a worker thread in order; at most one write job per association is outstanding
while the next chunk is read (double buffering), so memory per association is bounded by two chunks plus
one PDU, and in total by `max_associations` times that.

Imports: dul, spool, index, model, errors, config.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final, TypeVar

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context

from gateway.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    VERIFICATION_SOP_CLASS,
    Command,
    decode_command,
    encode_response,
)
from gateway.dul import (
    AbortReason,
    Accept,
    Association,
    LocalIdentity,
    Reject,
    State,
    Timeouts,
    negotiate_contexts,
)
from gateway.errors import IndexDatabaseError, ProtocolError, StoreError
from gateway.model import Event, EventKind, StoredInstance, ignore_event
from gateway.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    FileMetaSpec,
    ObjectWriter,
    Placement,
    Spool,
    is_valid_uid,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import PresentationContext

    from gateway.config import ReceiverConfig
    from gateway.index import Index
    from gateway.metrics import Metrics
    from gateway.model import DuplicatePolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_SUCCESS: Final = 0x0000
STATUS_UNRECOGNIZED_OPERATION: Final = 0x0211
STATUS_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
WRITE_CHUNK: Final = 1 << 20  # bytes gathered before a write job; small objects take a single job
_UNCOMPRESSED: Final = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
# Deflated Explicit VR LE is not accepted: checking a deflated data set means inflating it, and a small
# hostile object can inflate to gigabytes (a deflate bomb); scanners send the other syntaxes anyway.
_NOT_ACCEPTED: Final = {"1.2.840.10008.1.2.1.99"}
_TRANSFER_SYNTAXES: Final = _UNCOMPRESSED + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED and ts not in _NOT_ACCEPTED
]


def supported_contexts() -> list[PresentationContext]:
    """Verification, and every storage SOP class pynetdicom knows with every transfer syntax it knows.

    The requestor may act as SCU only (role selection replies say so); compressed syntaxes are stored as
    received, never transcoded.
    """
    contexts = [
        build_context(str(cx.abstract_syntax), _TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
    ]
    contexts.append(build_context(VERIFICATION_SOP_CLASS))
    for cx in contexts:
        cx.scu_role, cx.scp_role = True, False
    return contexts


class AccessPolicy:
    """Deny-by-default access control and presentation negotiation for incoming associations."""

    def __init__(
        self, config: ReceiverConfig, ae_title: str, active: Callable[[], int], metrics: Metrics
    ) -> None:
        self._ae_title = ae_title
        self._active = active
        self._metrics = metrics
        self._supported = supported_contexts()
        self.hold_reason: str | None = None  # set while new associations are refused (power failure)
        self.configure(config)

    def configure(self, config: ReceiverConfig) -> None:
        """Take new allow lists and limits (a reload); associations already accepted are unaffected."""
        self._config = config
        self._any_caller = config.allowed_calling_ae == ("*",)
        self._callers = frozenset(config.allowed_calling_ae)

    def negotiate(self, request: A_ASSOCIATE, protocol_version: int, peer: str) -> Accept | Reject:
        """Reject with the PS3.8 result/source/reason that fits, or accept the negotiated contexts."""
        decision = self._decide(request, protocol_version, peer)
        if isinstance(decision, Reject):
            self._metrics.associations_rejected.labels(reason=decision.label).inc()
        else:
            calling = self._metrics.calling_ae(request.calling_ae_title.strip())
            self._metrics.associations_accepted.labels(calling_ae=calling).inc()
        return decision

    def _decide(self, request: A_ASSOCIATE, protocol_version: int, peer: str) -> Accept | Reject:  # noqa: PLR0911 - one return per PS3.8 reason
        called = request.called_ae_title.strip()
        calling = request.calling_ae_title.strip()
        if not protocol_version & 0x0001:
            return Reject(1, 2, 2, f"protocol version {protocol_version} not supported", "protocol")
        if request.application_context_name != "1.2.840.10008.3.1.1.1":
            why = f"application context {request.application_context_name} not supported"
            return Reject(1, 1, 2, why, "protocol")
        if not self._address_allowed(peer):
            return Reject(1, 1, 1, "peer address not in allowed_networks", "network")
        if self._config.require_called_ae and called != self._ae_title:
            return Reject(1, 1, 7, f"called AE title {called!r} is not ours", "called_ae")
        if not self._any_caller and calling not in self._callers:
            return Reject(1, 1, 3, f"calling AE title {calling!r} not in allowed_calling_ae", "calling_ae")
        if self.hold_reason is not None:  # transient, temporary congestion: the scanner retries later
            return Reject(2, 3, 1, f"not accepting: {self.hold_reason}", "hold")
        if self._active() >= self._config.max_associations:  # established ones; this one is not yet
            return Reject(2, 3, 2, f"max_associations ({self._config.max_associations}) reached", "limit")
        contexts, roles = negotiate_contexts(request, self._supported)
        _prefer_requested_syntax(request, contexts, self._supported)
        if not any(cx.result == 0 for cx in contexts):
            return Reject(1, 1, 1, "no acceptable presentation context", "no_contexts")
        return Accept(contexts, roles)

    def _address_allowed(self, peer: str) -> bool:
        networks = self._config.allowed_networks
        if not networks:
            return True
        host = peer.rsplit(":", 1)[0].strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)


def _prefer_requested_syntax(
    request: A_ASSOCIATE, results: list[PresentationContext], supported: list[PresentationContext]
) -> None:
    """Take the requestor's first supported transfer syntax: it sends what it has, and we store that."""
    proposed = {cx.context_id: cx for cx in request.presentation_context_definition_list}
    ours = {str(cx.abstract_syntax): set(cx.transfer_syntax) for cx in supported}
    for cx in results:
        rq = proposed.get(cx.context_id)
        if cx.result != 0 or rq is None:
            continue
        for syntax in rq.transfer_syntax:
            if syntax in ours.get(str(cx.abstract_syntax), set()):
                cx.transfer_syntax = [syntax]
                break


class _Incoming:
    """One C-STORE's data set on its way to the spool (or to the bin, when refused)."""

    def __init__(
        self, command: Command, context_id: int, writer: ObjectWriter | None, error: StoreError | None
    ) -> None:
        self.command = command
        self.context_id = context_id
        self.writer = writer
        self.error = error
        self.buffer = bytearray()
        self.job: asyncio.Future[None] | None = None


class StoreService:
    """The DIMSE side of one association: C-ECHO, C-STORE, and the answers per the durability contract."""

    def __init__(self, association: Association, receiver: Receiver) -> None:
        self._association = association
        self._receiver = receiver
        self._current: _Incoming | None = None
        self._started = time.monotonic()
        self.stored = 0
        self.failed = 0
        self.bytes = 0
        receiver.metrics.associations_active.inc()

    async def on_command(self, context_id: int, command: bytes) -> None:
        """Dispatch one request."""
        if self._current is not None:
            raise ProtocolError(
                "command received while a data set was expected", AbortReason.UNEXPECTED_PARAMETER
            )
        request = decode_command(command)
        abstract = str(self._association.contexts[context_id].abstract_syntax)
        if request.field == C_ECHO_RQ and not request.has_dataset:
            await self._respond(context_id, request, STATUS_SUCCESS)
        elif request.field == C_STORE_RQ and request.has_dataset:
            self._current = self._start_store(context_id, request, abstract)
        elif request.has_dataset:  # not ours: swallow its data set, then refuse
            message = f"operation 0x{request.field:04x} not supported"
            error = StoreError(STATUS_UNRECOGNIZED_OPERATION, message, reason="unsupported")
            self._current = _Incoming(request, context_id, None, error)
        else:
            await self._respond(context_id, request, STATUS_UNRECOGNIZED_OPERATION, "operation not supported")

    def _start_store(self, context_id: int, request: Command, abstract: str) -> _Incoming:
        receiver = self._receiver
        uid = request.sop_instance_uid
        if request.sop_class_uid != abstract:
            message = "SOP class differs from the presentation context"
            error = StoreError(STATUS_SOP_CLASS_NOT_SUPPORTED, message, reason="sop_class")
            return _Incoming(request, context_id, None, error)
        if not is_valid_uid(uid):
            log.warning("Refusing C-STORE from %s: invalid Affected SOP Instance UID", self._association.peer)
            error = StoreError(STATUS_INVALID_UID, "invalid SOP Instance UID", reason="invalid_uid")
            return _Incoming(request, context_id, None, error)
        syntax = str(self._association.contexts[context_id].transfer_syntax[0])
        meta = FileMetaSpec(abstract, uid, syntax, self._association.calling_ae)
        return _Incoming(request, context_id, receiver.spool.open_object(uid, meta), None)

    async def on_dataset(self, context_id: int, fragment: memoryview, last: bool) -> None:
        """Gather a fragment; write in chunks off the loop; on the last one, make it durable and answer."""
        incoming = self._current
        if incoming is None or incoming.context_id != context_id:
            raise ProtocolError(
                "data set fragment without a matching command", AbortReason.UNEXPECTED_PARAMETER
            )
        if incoming.error is None:
            incoming.buffer += fragment
            if len(incoming.buffer) >= WRITE_CHUNK and not last:
                await self._write_chunk(incoming)
        if last:
            status, comment = await self._finish(incoming)
            self._current = None
            await self._respond(context_id, incoming.command, status, comment)

    async def _write_chunk(self, incoming: _Incoming) -> None:
        """Start writing the gathered bytes, after the previous chunk's write is done (order, bound)."""
        await self._settle(incoming)
        if incoming.error is not None or incoming.writer is None:
            return
        chunk, incoming.buffer = incoming.buffer, bytearray()
        incoming.job = self._receiver.run_blocking(incoming.writer.write, chunk)

    async def _settle(self, incoming: _Incoming) -> None:
        if incoming.job is None:
            return
        job, incoming.job = incoming.job, None
        try:
            await job
        except StoreError as exc:
            incoming.error = exc
            incoming.buffer = bytearray()

    async def _finish(self, incoming: _Incoming) -> tuple[int, str]:
        await self._settle(incoming)
        writer = incoming.writer
        if incoming.error is not None or writer is None:
            error = incoming.error or StoreError(STATUS_OUT_OF_RESOURCES, "not stored")
            self.failed += 1
            self._receiver.note_failure(self._association, error)
            return error.status, str(error)
        receiver = self._receiver
        try:
            async with receiver.uid_lock(writer.uid):
                policy = receiver.duplicate_policy
                finished = await receiver.run_blocking(writer.finish, policy, incoming.buffer)
                if finished.placement is not Placement.KEPT_FIRST:
                    instance = StoredInstance(
                        header=finished.header,
                        transfer_syntax_uid=str(
                            self._association.contexts[incoming.context_id].transfer_syntax[0]
                        ),
                        size_bytes=finished.size_bytes,
                        sha256=finished.sha256,
                        file_name=finished.file_name,
                        calling_ae=self._association.calling_ae,
                        peer_address=self._association.peer,
                        received_at=time.time(),
                    )
                    await receiver.commit(instance, finished.placement)
        except StoreError as exc:
            self.failed += 1
            receiver.note_failure(self._association, exc)
            return exc.status, str(exc)
        self.stored += 1
        self.bytes += finished.size_bytes
        calling = receiver.metrics.calling_ae(self._association.calling_ae)
        receiver.metrics.instances_received.labels(calling_ae=calling).inc()
        receiver.metrics.bytes_received.labels(calling_ae=calling).inc(finished.size_bytes)
        return STATUS_SUCCESS, ""

    async def _respond(self, context_id: int, request: Command, status: int, comment: str = "") -> None:
        await self._association.send_message(
            context_id, encode_response(request, status, comment), command=True
        )
        if self._receiver.draining:  # shutting down: end the association between messages
            await self._association.request_release()

    @property
    def idle(self) -> bool:
        """True between messages (no data set being received or made durable)."""
        return self._current is None

    async def on_close(self, clean: bool) -> None:
        """Drop a half-received object: its temporary file must not survive the association."""
        incoming, self._current = self._current, None
        if incoming is not None:
            with contextlib.suppress(StoreError):
                await self._settle(incoming)
            if incoming.writer is not None:
                await self._receiver.run_blocking(incoming.writer.discard)
        receiver = self._receiver
        receiver.metrics.associations_active.dec()
        log.info(
            "Association from %s (%s) ended%s: %d stored, %d refused",
            self._association.peer,
            self._association.calling_ae,
            "" if clean else " abnormally",
            self.stored,
            self.failed,
        )
        receiver.emit(
            Event(
                EventKind.ASSOCIATION,
                {
                    "peer": self._association.peer,
                    "calling_ae": self._association.calling_ae,
                    "stored": self.stored,
                    "refused": self.failed,
                    "bytes": self.bytes,
                    "seconds": round(time.monotonic() - self._started, 3),
                    "clean": clean,
                },
            )
        )


class Receiver:
    """The listening acceptor: owns the server socket, the connection tasks and the file-work threads."""

    def __init__(
        self,
        config: ReceiverConfig,
        ae_title: str,
        spool: Spool,
        index: Index,
        *,
        metrics: Metrics,
        emit: Callable[[Event], None] = ignore_event,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.index = index
        self.metrics = metrics
        self.emit = emit
        self.reserve_reached = False  # cleared by the status poller when space returns
        self.draining = False  # shutting down: associations are released as soon as they are idle
        self.duplicate_policy: DuplicatePolicy = config.duplicate_policy
        self._ssl = ssl_context
        self._policy = AccessPolicy(config, ae_title, self._count_active, metrics)
        self._identity = LocalIdentity(
            IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, config.max_pdu_length
        )
        self._timeouts = Timeouts(acse=config.acse_timeout, network=config.network_timeout)
        self._pool = ThreadPoolExecutor(max_workers=config.max_associations + 2, thread_name_prefix="spool")
        self._connections: set[asyncio.Task[None]] = set()
        self._associations: set[Association] = set()
        self._server: asyncio.Server | None = None
        self.listening = asyncio.Event()
        self.stored = 0
        self.failures = 0

    def reconfigure(self, config: ReceiverConfig) -> list[str]:
        """Apply a reloaded [receiver] section; returns the changed keys that need a restart."""
        fixed = ("host", "port", "tls", "max_pdu_length")
        needs_restart = [key for key in fixed if getattr(config, key) != getattr(self.config, key)]
        self.config = config
        self.duplicate_policy = config.duplicate_policy
        self._timeouts = Timeouts(acse=config.acse_timeout, network=config.network_timeout)
        self._policy.configure(config)
        return needs_restart

    def hold(self, reason: str | None) -> None:
        """Refuse new associations (transiently) while `reason` is set; those in progress go on."""
        self._policy.hold_reason = reason

    @property
    def held(self) -> str | None:
        """Why new associations are refused, or None."""
        return self._policy.hold_reason

    def active_associations(self) -> int:
        """Associations open right now."""
        return len(self._associations)

    def _count_active(self) -> int:
        """Associations that count toward max_associations (not those only waiting for the close)."""
        idle = {State.AWAITING_REQUEST, State.AWAITING_CLOSE, State.CLOSED}  # the connection cap bounds these
        return sum(1 for a in self._associations if a.state not in idle)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("receiver is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    def run_blocking(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run blocking file work in the receiver's threads."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def uid_lock(self, uid: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Serialize placement of one SOP Instance UID across associations."""
        return self.spool.locks.hold(uid)

    async def commit(self, instance: StoredInstance, placement: Placement) -> None:
        """Commit the row; if that fails, take a newly placed file back out (no unacknowledged orphans)."""
        try:
            await self.index.record(instance)
        except IndexDatabaseError as exc:
            if placement is Placement.NEW:
                await self.run_blocking(self.spool.delete, instance.file_name)
            uid = instance.header.sop_instance_uid
            raise StoreError(STATUS_OUT_OF_RESOURCES, "index unavailable", uid, reason="index") from exc
        self.stored += 1

    def note_failure(self, association: Association, error: StoreError) -> None:
        """Count and log a refused object (UIDs may be logged; patient data never is)."""
        self.failures += 1
        self.metrics.store_failures.labels(reason=error.reason).inc()
        if error.reason in {"reserve", "disk_full"} and not self.reserve_reached:
            self.reserve_reached = True
            self.emit(Event(EventKind.RESERVE, {"reached": True, "reason": str(error)}))
        log.warning(
            "C-STORE from %s (%s) refused with 0x%04X: %s",
            association.peer,
            association.calling_ae,
            error.status,
            error,
        )

    async def run(self) -> None:
        """Listen and serve until cancelled; then stop listening and abort what is still open."""
        self._server = await asyncio.start_server(
            self._on_connection,
            self.config.host,
            self.config.port,
            backlog=64,
            limit=1 << 18,
        )
        log.info(
            "Receiver listening on %s:%d (TLS %s)", self.config.host, self.port, "on" if self._ssl else "off"
        )
        self.listening.set()
        try:
            await asyncio.Event().wait()
        finally:
            await self._close()

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress go on."""
        if self._server is not None:
            self._server.close()
        self.listening.clear()

    async def drain(self, grace: float) -> bool:
        """Ask idle associations to release and wait up to `grace` seconds for all to end; True if all did."""
        self.draining = True
        self.stop_accepting()
        for association in list(self._associations):
            service = association.sink
            if isinstance(service, StoreService) and service.idle:
                with contextlib.suppress(Exception):
                    await association.request_release()
        if not self._connections:
            return True
        _, pending = await asyncio.wait(set(self._connections), timeout=grace)
        return not pending

    async def _close(self) -> None:
        self.stop_accepting()
        tasks = set(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._pool.shutdown(wait=True)

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        """TLS on an accepted connection, here rather than in the server, so that a refusal is logged.

        (asyncio's TLS server logs failed handshakes only in debug mode; an admin must see why a scanner
        with an expired or foreign certificate cannot connect.)
        """
        assert self._ssl is not None  # noqa: S101 - only called with TLS
        try:
            await writer.start_tls(self._ssl, ssl_handshake_timeout=self.config.acse_timeout)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, str(exc) or type(exc).__name__)
            writer.close()
            return False
        return True

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - always inside the server's task
        self._connections.add(task)  # a strong reference until it ends (unreferenced tasks can be collected)
        try:
            raw = writer.get_extra_info("socket")
            if raw is not None:  # Nagle + delayed ACK would cost 40-70 ms per response
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_info = writer.get_extra_info("peername")
            peer = f"{peer_info[0]}:{peer_info[1]}" if peer_info else "unknown"
            if len(self._connections) > 2 * self.config.max_associations + 8:
                log.warning("Dropping connection from %s: too many open connections", peer)
                writer.close()
                return
            if self._ssl is not None and not await self._handshake(writer, peer):
                return
            association = Association(reader, writer, peer, self._timeouts, self._identity)
            self._associations.add(association)
            try:
                await association.serve(self._policy, lambda a: StoreService(a, self))
            finally:
                self._associations.discard(association)
        finally:
            self._connections.discard(task)
