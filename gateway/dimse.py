"""DIMSE command sets (PS3.7): encoded and decoded by pydicom, implicit VR little endian, group 0000.

Only what the gateway speaks: C-ECHO and C-STORE, as requestor and as acceptor.

Imports: pydicom, pynetdicom (dsutils), dul (abort reasons), errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Final

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from gateway.dul import AbortReason
from gateway.errors import ProtocolError

C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
C_STORE_RSP: Final = 0x8001
C_ECHO_RSP: Final = 0x8030
NO_DATASET: Final = 0x0101
DATASET_PRESENT: Final = 0x0000
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a command set that the gateway uses (requests and responses alike)."""

    field: int
    message_id: int  # MessageID in a request, MessageIDBeingRespondedTo in a response
    sop_class_uid: str
    sop_instance_uid: str
    has_dataset: bool
    status: int | None = None
    error_comment: str = ""

    @property
    def is_response(self) -> bool:
        """True for a -RSP command (the high bit of the command field)."""
        return bool(self.field & 0x8000)


def decode_command(raw: bytes) -> Command:
    """Decode a command set; anything malformed is a protocol error (the association is aborted)."""
    try:
        ds = decode(BytesIO(raw), is_implicit_vr=True, is_little_endian=True)
        field = int(ds.CommandField)
        is_response = bool(field & 0x8000)
        return Command(
            field=field,
            message_id=int(ds.MessageIDBeingRespondedTo if is_response else ds.MessageID),
            sop_class_uid=str(ds.get("AffectedSOPClassUID", "")).strip(),
            sop_instance_uid=str(ds.get("AffectedSOPInstanceUID", "")).strip(),
            has_dataset=int(ds.CommandDataSetType) != NO_DATASET,
            status=int(ds.Status) if is_response else None,
            error_comment=str(ds.get("ErrorComment", "")).strip() if is_response else "",
        )
    except Exception as exc:  # a malformed command set is a protocol error, whatever pydicom raised
        raise ProtocolError(
            f"malformed command set ({exc.__class__.__name__})", AbortReason.INVALID_PARAMETER
        ) from exc


def _encode(ds: Dataset) -> bytes:
    body = encode(ds, is_implicit_vr=True, is_little_endian=True) or b""
    group = Dataset()
    group.CommandGroupLength = len(body)
    return (encode(group, is_implicit_vr=True, is_little_endian=True) or b"") + body


def encode_response(request: Command, status: int, comment: str = "") -> bytes:
    """The response to `request` with `status` (and an error comment for failures)."""
    ds = Dataset()
    if request.sop_class_uid:
        ds.AffectedSOPClassUID = request.sop_class_uid
    ds.CommandField = request.field | 0x8000
    ds.MessageIDBeingRespondedTo = request.message_id
    ds.CommandDataSetType = NO_DATASET
    ds.Status = status
    if request.field == C_STORE_RQ and request.sop_instance_uid:
        ds.AffectedSOPInstanceUID = request.sop_instance_uid
    if comment:
        ds.ErrorComment = comment[:64]
    return _encode(ds)


def encode_echo_request(message_id: int) -> bytes:
    """A C-ECHO-RQ."""
    ds = Dataset()
    ds.AffectedSOPClassUID = VERIFICATION_SOP_CLASS
    ds.CommandField = C_ECHO_RQ
    ds.MessageID = message_id
    ds.CommandDataSetType = NO_DATASET
    return _encode(ds)


def encode_store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ (medium priority) announcing a data set."""
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class_uid
    ds.CommandField = C_STORE_RQ
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = DATASET_PRESENT
    ds.AffectedSOPInstanceUID = sop_instance_uid
    return _encode(ds)
