"""Frozen records shared by all parts of the gateway.

Imports: errors (and stdlib) only. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


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


class EventKind(enum.StrEnum):
    """What an event reports; the MQTT topic is ``events/<kind>`` (``device/<name>`` for readings)."""

    ASSOCIATION = "association"  # one summary per association, never one per image
    DESTINATION = "destination"  # a destination went up or down
    DELIVERY_FAILED = "delivery_failed"  # a delivery ended `failed`
    RESERVE = "reserve"  # the spool reached (or left) its free-space reserve
    DEVICE = "device"  # a serial device reading (payload: the reading)
    DEVICE_STATUS = "device_status"  # a serial device went silent or came back
    POWER = "power"  # the power policy stopped or resumed accepting associations


@dataclass(frozen=True, slots=True)
class Event:
    """Something ops should hear about. Payloads carry UIDs at most, never patient names or IDs."""

    kind: EventKind
    payload: Mapping[str, object]
    source: str = ""  # e.g. the destination or device name (devices: used in the topic)
    at: float = field(default_factory=time.time)


def ignore_event(_event: Event) -> None:
    """An event sink for components running without telemetry."""


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One poll of a serial device: numeric quantities (gauges) and flags (UPS status bits)."""

    device: str
    values: Mapping[str, float]
    flags: Mapping[str, bool] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
