"""DIMSE command sets (PS3.7): encoded and decoded by pydicom, implicit VR little endian, group 0000.

Only what the gateway speaks: C-ECHO and C-STORE, as requestor and as acceptor.

Imports: pydicom (element framing), dul (abort reasons), spool (element writing), errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Final

from pydicom.filereader import data_element_generator

from gateway.dul import AbortReason
from gateway.errors import ProtocolError
from gateway.spool import encode_group, trusted_element

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement

C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
C_STORE_RSP: Final = 0x8001
C_ECHO_RSP: Final = 0x8030
NO_DATASET: Final = 0x0101
DATASET_PRESENT: Final = 0x0000
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
_UID: Final = re.compile(r"[0-9]+(\.[0-9]+)*")


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
    """Decode a command set; anything malformed is a protocol error (the association is aborted).

    pydicom's element generator frames the elements (tag, length, value) without building a Dataset:
    a command set has a fixed, small vocabulary of US and UI values, read directly from the raw bytes.
    """
    try:
        values = {
            int(element.tag): element.value
            for element in data_element_generator(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
        }
        field = _us(values[0x00000100])
        is_response = bool(field & 0x8000)
        return Command(
            field=field,
            message_id=_us(values[0x00000120 if is_response else 0x00000110]),
            sop_class_uid=_text(values.get(0x00000002)),
            sop_instance_uid=_text(values.get(0x00001000)),
            has_dataset=_us(values[0x00000800]) != NO_DATASET,
            status=_us(values[0x00000900]) if is_response else None,
            error_comment=_text(values.get(0x00000902)) if is_response else "",
        )
    except Exception as exc:  # a malformed command set is a protocol error, whatever pydicom raised
        raise ProtocolError(
            f"malformed command set ({exc.__class__.__name__})", AbortReason.INVALID_PARAMETER
        ) from exc


def _us(value: object) -> int:
    if not isinstance(value, bytes) or len(value) != 2:
        raise ValueError("a US element must be 2 bytes")
    return int.from_bytes(value, "little")


def _text(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, bytes):
        raise TypeError("unexpected element value")
    return value.decode("ascii", "replace").strip("\x00 ")


def _encode(elements: list[DataElement]) -> bytes:
    """A command set: implicit VR little endian, behind its (0000,0000) group length."""
    return encode_group(0x0000, elements, implicit_vr=True)


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def encode_response(request: Command, status: int, comment: str = "") -> bytes:
    """The response to `request` with `status` (and an error comment for failures).

    UIDs are echoed only when they are UIDs: a hostile request's garbage is not sent back.
    """
    elements = []
    if _is_uid(request.sop_class_uid):
        elements.append(trusted_element(0x00000002, "UI", request.sop_class_uid))
    elements += [
        trusted_element(0x00000100, "US", request.field | 0x8000),
        trusted_element(0x00000120, "US", request.message_id),
        trusted_element(0x00000800, "US", NO_DATASET),
        trusted_element(0x00000900, "US", status),
    ]
    if comment:
        elements.append(trusted_element(0x00000902, "LO", comment[:64]))
    if request.field == C_STORE_RQ and _is_uid(request.sop_instance_uid):
        elements.append(trusted_element(0x00001000, "UI", request.sop_instance_uid))
    return _encode(elements)


def encode_echo_request(message_id: int) -> bytes:
    """A C-ECHO-RQ."""
    return _encode(
        [
            trusted_element(0x00000002, "UI", VERIFICATION_SOP_CLASS),
            trusted_element(0x00000100, "US", C_ECHO_RQ),
            trusted_element(0x00000110, "US", message_id),
            trusted_element(0x00000800, "US", NO_DATASET),
        ]
    )


def encode_store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ (medium priority) announcing a data set."""
    return _encode(
        [
            trusted_element(0x00000002, "UI", sop_class_uid),
            trusted_element(0x00000100, "US", C_STORE_RQ),
            trusted_element(0x00000110, "US", message_id),
            trusted_element(0x00000700, "US", 0),
            trusted_element(0x00000800, "US", DATASET_PRESENT),
            trusted_element(0x00001000, "UI", sop_instance_uid),
        ]
    )
