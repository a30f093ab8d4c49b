"""Frozen records shared by all parts of the gateway.

Imports: errors (and stdlib) only. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DeliveryState(enum.StrEnum):
    """Where one instance stands toward one destination."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"


class FileState(enum.StrEnum):
    """Whether an indexed instance's spool file is there."""

    STORED = "stored"
    DELETED = "deleted"  # removed on purpose by retention after every delivery was done
    MISSING = "missing"  # found absent by startup recovery: an error an operator must see


class DuplicatePolicy(enum.StrEnum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    REPLACE = "replace"
    KEEP_FIRST = "keep-first"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few attributes of a data set that the index records (read without pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One object made durable in the spool, as its index row records it."""

    header: InstanceHeader
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    file_name: str  # relative to the spool directory
    calling_ae: str
    peer_address: str
    received_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """One instance's delivery to one destination, as the index records it."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    file_name: str
    sha256: str
    size_bytes: int
    destination: str
    state: DeliveryState
    attempts: int
    refusals: int
    next_attempt_at: float
    received_at: float
    last_status: int | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What became of one claimed delivery, for the index to record.

    `state` is the state to move to; `attempted` counts a send toward `attempts`, `refused` counts a
    permanent refusal toward `refusals`.
    """

    instance_id: int
    state: DeliveryState
    next_attempt_at: float
    attempted: bool = True
    refused: bool = False
    status: int | None = None
    error: str | None = None
