"""The DICOM upper layer (PS3.8) on asyncio, in the acceptor role.

One `Association` drives one TCP (or TLS) connection through the acceptor's states: awaiting the
A-ASSOCIATE-RQ under the ARTIM timer (Sta2), established (Sta6), release requested by us (Sta7), release
collision (Sta10/Sta12), awaiting close (Sta13). Every read has a deadline, so idle and trickling peers are
dropped; every PDU's declared length is checked before its body is read (pynetdicom would read whatever a
header claims). P-DATA is split into PDVs with zero-copy views and handed to a `DimseSink`: command
fragments reassembled (bounded), data set fragments passed on as they arrive so they can go straight to
disk. Anything unexpected ends in an A-ABORT, never an exception that escapes.

PDU encoding and decoding for association PDUs, and presentation context negotiation, are pynetdicom's.

Imports: pynetdicom (pdu, pdu_primitives, presentation), errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from gateway.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterator

log = logging.getLogger(__name__)

APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
MAX_CONTROL_PDU: Final = 64 * 1024  # association PDUs: 128 contexts and user information fit easily
MAX_COMMAND_SET: Final = 64 * 1024  # a DIMSE command set is a few hundred bytes
_HEADER: Final = struct.Struct(">BxL")
_PDV_HEADER: Final = struct.Struct(">LBB")


class PduType(enum.IntEnum):
    """PDU type codes (PS3.8 9.3)."""

    ASSOCIATE_RQ = 1
    ASSOCIATE_AC = 2
    ASSOCIATE_RJ = 3
    P_DATA_TF = 4
    RELEASE_RQ = 5
    RELEASE_RP = 6
    ABORT = 7


class AbortReason(enum.IntEnum):
    """A-ABORT reasons when the service provider (we) aborts (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PARAMETER = 4
    UNEXPECTED_PARAMETER = 5
    INVALID_PARAMETER = 6


class State(enum.Enum):
    """The acceptor's states of PS3.8 9.2 that this side can be in."""

    AWAITING_REQUEST = "Sta2"
    ESTABLISHED = "Sta6"
    AWAITING_RELEASE_RP = "Sta7"
    RELEASE_COLLISION = "Sta12"
    AWAITING_CLOSE = "Sta13"
    CLOSED = "Sta1"


@dataclass(frozen=True, slots=True)
class Accept:
    """The policy accepts: these negotiated contexts and role replies go into the A-ASSOCIATE-AC."""

    contexts: list[PresentationContext]
    roles: list[SCP_SCU_RoleSelectionNegotiation]


@dataclass(frozen=True, slots=True)
class Reject:
    """The policy rejects with this result/source/reason (PS3.8 9.3.4); `why` is for the log."""

    result: int
    source: int
    reason: int
    why: str
    label: str = "rejected"  # a fixed word for metrics (calling_ae, called_ae, network, limit, ...)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds: ARTIM (request and close), and each PDU read once established."""

    acse: float
    network: float


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """What we announce in every A-ASSOCIATE-RQ and -AC."""

    implementation_class_uid: str
    implementation_version_name: str
    max_pdu_length: int

    def user_information(
        self,
    ) -> list[
        MaximumLengthNotification | ImplementationClassUIDNotification | ImplementationVersionNameNotification
    ]:
        """The user information items: our maximum PDU length and implementation class and version."""
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.max_pdu_length
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = self.implementation_class_uid
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = self.implementation_version_name
        return [max_length, class_uid, version]


class AssociationPolicy(Protocol):
    """Decides on an A-ASSOCIATE-RQ (access control and presentation negotiation)."""

    def negotiate(self, request: A_ASSOCIATE, protocol_version: int, peer: str) -> Accept | Reject:
        """Accept or reject one request from `peer` (host:port)."""


class DimseSink(Protocol):
    """Receives the DIMSE traffic of one established association, in order."""

    async def on_command(self, context_id: int, command: bytes) -> None:
        """A complete command set arrived."""

    async def on_dataset(self, context_id: int, fragment: memoryview, last: bool) -> None:
        """A data set fragment arrived; awaiting here is the association's backpressure."""

    async def on_close(self, clean: bool) -> None:
        """The association ended; unclean when aborted, dropped or timed out mid-way."""


def negotiate_contexts(
    request: A_ASSOCIATE, supported: list[PresentationContext]
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """Negotiate the requested presentation contexts, with SCP/SCU role selection replies."""
    roles: dict[str, tuple[bool | None, bool | None]] = {}
    for item in request.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    results, role_replies = negotiate_as_acceptor(
        request.presentation_context_definition_list,
        supported,
        roles or None,  # type: ignore[arg-type]  # pynetdicom's alias is stricter than its use
    )
    return results, [r for r in role_replies if isinstance(r, SCP_SCU_RoleSelectionNegotiation)]


def encode_abort(reason: AbortReason) -> bytes:
    """An A-ABORT from the service provider."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = int(reason)
    return pdu.encode()


def encode_reject(reject: Reject) -> bytes:
    """An A-ASSOCIATE-RJ."""
    primitive = A_ASSOCIATE()
    primitive.result = reject.result
    primitive.result_source = reject.source
    primitive.diagnostic = reject.reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def encode_accept(request: A_ASSOCIATE, accept: Accept, identity: LocalIdentity) -> bytes:
    """An A-ASSOCIATE-AC answering `request`."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = accept.contexts
    primitive.user_information = [*identity.user_information(), *accept.roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def encode_pdata(
    context_id: int, payload: bytes, *, command: bool, max_pdu_length: int, final: bool = True
) -> list[bytes]:
    """P-DATA-TF PDUs carrying `payload` as PDVs of one context, split to the peer's maximum.

    `final` marks the last fragment of the message; a message streamed in several payloads passes False
    for all but the last.
    """
    # The peer's maximum counts the PDU's variable field: PDV item header (4 + 2 bytes) plus the fragment.
    room = max(max_pdu_length - 6, 1) if max_pdu_length else max(len(payload), 1)
    pdus = []
    for start in range(0, max(len(payload), 1), room):
        fragment = payload[start : start + room]
        last = final and start + room >= len(payload)
        control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_HEADER.pack(PduType.P_DATA_TF, len(pdv)) + pdv)
    return pdus


async def read_pdu(reader: asyncio.StreamReader, seconds: float, max_pdata: int) -> tuple[int, bytes]:
    """Read one PDU under a deadline, refusing declared lengths beyond what the type may carry."""
    async with asyncio.timeout(seconds):
        pdu_type, length = _HEADER.unpack(await reader.readexactly(6))
        limit = max_pdata if pdu_type == PduType.P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            raise ProtocolError(
                f"PDU type 0x{pdu_type:02x} declares {length} bytes (limit {limit})",
                AbortReason.INVALID_PARAMETER,
            )
        return pdu_type, await reader.readexactly(length)


def iter_pdvs(body: bytes, contexts: Container[int]) -> Iterator[tuple[int, int, memoryview]]:
    """Split a P-DATA-TF body into (context ID, message control header, fragment view) items."""
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated PDV item", AbortReason.INVALID_PARAMETER)
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError("PDV item length out of bounds", AbortReason.INVALID_PARAMETER)
        if context_id not in contexts:
            raise ProtocolError(
                f"PDV on presentation context {context_id} not accepted", AbortReason.INVALID_PARAMETER
            )
        yield context_id, control, view[offset + 6 : end]
        offset = end


class Association:
    """One accepted connection: reads PDUs under deadlines and runs the acceptor's state machine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        timeouts: Timeouts,
        identity: LocalIdentity,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.timeouts = timeouts
        self.identity = identity
        self.state = State.AWAITING_REQUEST
        self.request: A_ASSOCIATE | None = None
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0  # 0: the peer set no limit
        self._command = bytearray()
        self._sink: DimseSink | None = None
        self.abort_sent = False

    @property
    def sink(self) -> DimseSink | None:
        """Who receives this association's DIMSE traffic (None before it is accepted)."""
        return self._sink

    @property
    def calling_ae(self) -> str:
        """The peer's AE title (empty before the request)."""
        return "" if self.request is None else self.request.calling_ae_title.strip()

    async def serve(self, policy: AssociationPolicy, make_sink: Callable[[Association], DimseSink]) -> None:
        """Run the association to its end; never raises except cancellation."""
        clean = False
        try:
            clean = await self._run(policy, make_sink)
        except ProtocolError as exc:
            log.warning("Aborting association with %s (%s): %s", self.peer, self.calling_ae or "?", exc)
            await self._send_abort(AbortReason(exc.reason))
        except TimeoutError:
            log.warning(
                "Aborting association with %s (%s): %s timed out",
                self.peer,
                self.calling_ae or "?",
                self.state.value,
            )
            await self._send_abort(AbortReason.NOT_SPECIFIED)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.info(
                "Connection from %s (%s) lost: %s", self.peer, self.calling_ae or "?", exc.__class__.__name__
            )
        except asyncio.CancelledError:
            await self._send_abort(AbortReason.NOT_SPECIFIED)
            raise
        except Exception:  # the last line of defence: one bad peer never takes the server down
            log.exception("Aborting association with %s after an internal error", self.peer)
            await self._send_abort(AbortReason.NOT_SPECIFIED)
        finally:
            self.state = State.CLOSED
            if self._sink is not None:
                await self._sink.on_close(clean)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), self.timeouts.acse)

    async def _run(self, policy: AssociationPolicy, make_sink: Callable[[Association], DimseSink]) -> bool:
        pdu_type, body = await self._read_pdu(self.timeouts.acse)
        if pdu_type != PduType.ASSOCIATE_RQ:
            return self._unexpected_before_request(pdu_type)
        if not await self._associate(policy, body):
            return True
        self._sink = make_sink(self)
        while True:
            pdu_type, body = await self._read_pdu(self.timeouts.network)
            if pdu_type == PduType.P_DATA_TF and self.state in {State.ESTABLISHED, State.AWAITING_RELEASE_RP}:
                await self._on_pdata(body)
            elif pdu_type == PduType.RELEASE_RQ and self.state is State.ESTABLISHED:
                await self._send(A_RELEASE_RP().encode())
                await self._await_close()
                return self._command == b""
            elif pdu_type == PduType.RELEASE_RQ and self.state is State.AWAITING_RELEASE_RP:
                # Release collision, acceptor side (AR-8, AR-10): answer, then wait for the peer's RP.
                await self._send(A_RELEASE_RP().encode())
                self.state = State.RELEASE_COLLISION
            elif pdu_type == PduType.RELEASE_RP and self.state in {
                State.AWAITING_RELEASE_RP,
                State.RELEASE_COLLISION,
            }:
                return True
            elif pdu_type == PduType.ABORT:
                log.info("Association with %s (%s) aborted by the peer", self.peer, self.calling_ae)
                return False
            elif pdu_type in PduType.__members__.values():
                raise ProtocolError(
                    f"unexpected {PduType(pdu_type).name} in {self.state.value}", AbortReason.UNEXPECTED_PDU
                )
            else:
                raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}", AbortReason.UNRECOGNIZED_PDU)

    def _unexpected_before_request(self, pdu_type: int) -> bool:
        if pdu_type == PduType.ABORT:
            return False
        if pdu_type not in PduType.__members__.values():
            raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}", AbortReason.UNRECOGNIZED_PDU)
        raise ProtocolError(f"{PduType(pdu_type).name} before A-ASSOCIATE-RQ", AbortReason.UNEXPECTED_PDU)

    async def _associate(self, policy: AssociationPolicy, body: bytes) -> bool:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(_HEADER.pack(PduType.ASSOCIATE_RQ, len(body)) + body)
            request = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted types on malformed items
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({exc})", AbortReason.INVALID_PARAMETER) from exc
        self.request = request
        decision = policy.negotiate(request, pdu.protocol_version, self.peer)
        if isinstance(decision, Reject):
            log.warning(
                "Rejected association from %s calling %r as %r: %s",
                self.peer,
                request.called_ae_title.strip(),
                request.calling_ae_title.strip(),
                decision.why,
            )
            await self._send(encode_reject(decision))
            await self._await_close()
            return False
        await self._send(encode_accept(request, decision, self.identity))
        self.contexts = {cx.context_id: cx for cx in decision.contexts if cx.result == 0 and cx.context_id}
        self.peer_max_pdu = request.maximum_length_received or 0
        self.state = State.ESTABLISHED
        log.info(
            "Association from %s as %r accepted with %d contexts",
            self.peer,
            self.calling_ae,
            len(self.contexts),
        )
        return True

    async def _read_pdu(self, seconds: float) -> tuple[int, bytes]:
        return await read_pdu(self.reader, seconds, self.identity.max_pdu_length)

    async def _on_pdata(self, body: bytes) -> None:
        assert self._sink is not None  # noqa: S101 - set when the association was accepted
        for context_id, control, fragment in iter_pdvs(body, self.contexts):
            if control & 0x01:
                self._command += fragment
                if len(self._command) > MAX_COMMAND_SET:
                    raise ProtocolError("command set too large", AbortReason.INVALID_PARAMETER)
                if control & 0x02:
                    command, self._command = bytes(self._command), bytearray()
                    await self._sink.on_command(context_id, command)
            else:
                if self._command:
                    raise ProtocolError(
                        "data set fragment inside a command", AbortReason.UNEXPECTED_PARAMETER
                    )
                await self._sink.on_dataset(context_id, fragment, bool(control & 0x02))

    async def send_message(self, context_id: int, payload: bytes, *, command: bool) -> None:
        """Send a command set or data set as P-DATA, within the peer's maximum PDU length."""
        for pdu in encode_pdata(context_id, payload, command=command, max_pdu_length=self.peer_max_pdu):
            self.writer.write(pdu)
        await self._drain()

    async def request_release(self) -> None:
        """Ask the peer to release (graceful shutdown); only once established, between messages."""
        if self.state is State.ESTABLISHED:
            self.state = State.AWAITING_RELEASE_RP
            await self._send(A_RELEASE_RQ().encode())

    async def _send(self, pdu: bytes) -> None:
        self.writer.write(pdu)
        await self._drain()

    async def _drain(self) -> None:
        async with asyncio.timeout(self.timeouts.network):
            await self.writer.drain()

    async def _await_close(self) -> None:
        """Sta13: the requestor closes the connection; ARTIM bounds the wait."""
        self.state = State.AWAITING_CLOSE
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(self.timeouts.acse):
                while await self.reader.read(4096):
                    pass

    async def _send_abort(self, reason: AbortReason) -> None:
        if self.abort_sent or self.writer.is_closing():
            return
        self.abort_sent = True
        with contextlib.suppress(Exception):
            self.writer.write(encode_abort(reason))
            async with asyncio.timeout(1.0):
                await self.writer.drain()
