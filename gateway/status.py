"""The status poller: state that lives in the index and on disk, turned into gauges, readiness and health.

Every few seconds it reads queue depths and the oldest undelivered instance per destination (index
range scans over the backlog only, never over delivered rows), free and used spool space, and decides
readiness: the receiver listens, the index answers, the spool is above its reserve, no power hold. The
same snapshot is the MQTT health payload and the CLI's status.

Imports: index, spool, metrics, model.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gateway.model import Event, EventKind, ignore_event

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from gateway.index import Index
    from gateway.metrics import Metrics
    from gateway.spool import Spool

log = logging.getLogger(__name__)

OPEN_STATES: Final = ("pending", "in_flight", "failed")


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """One destination's queue as the index sees it."""

    name: str
    up: bool
    counts: Mapping[str, int]
    oldest_pending_age: float  # seconds since the oldest undelivered instance arrived (0: none)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The gateway's state at one moment."""

    ready: bool
    not_ready: tuple[str, ...]
    destinations: tuple[DestinationStatus, ...]
    spool_free_bytes: int
    spool_used_bytes: int
    spool_reserve_bytes: int
    associations_active: int
    at: float = field(default_factory=time.time)

    def as_payload(self, extra: Mapping[str, object] | None = None) -> dict[str, object]:
        """JSON-ready form (the MQTT health payload, `status --json`)."""
        payload: dict[str, object] = {
            "ready": self.ready,
            "not_ready": list(self.not_ready),
            "associations_active": self.associations_active,
            "spool": {
                "free_bytes": self.spool_free_bytes,
                "used_bytes": self.spool_used_bytes,
                "reserve_bytes": self.spool_reserve_bytes,
            },
            "destinations": {
                d.name: {**d.counts, "up": d.up, "oldest_pending_age_seconds": round(d.oldest_pending_age, 1)}
                for d in self.destinations
            },
        }
        payload.update(extra or {})
        return payload


async def queue_status(
    index: Index, destinations: Sequence[str], now: float
) -> dict[str, tuple[dict[str, int], float]]:
    """Counts of open deliveries by state, and the oldest undelivered age, per destination."""
    result = {}
    for name in destinations:
        counts = {}
        for state in OPEN_STATES:
            counts[state] = int(
                await index.scalar(
                    "SELECT count(*) FROM deliveries WHERE destination = ? AND state = ?", (name, state)
                )
            )
        oldest = await index.scalar(
            "SELECT min(i.received_at) FROM deliveries d JOIN instances i ON i.id = d.instance_id "
            "WHERE d.destination = ? AND d.state IN ('pending', 'in_flight')",
            (name,),
        )
        result[name] = (counts, 0.0 if oldest is None else max(now - float(oldest), 0.0))
    return result


class StatusPoller:
    """Refreshes gauges and readiness every `interval` seconds; `latest` holds the last snapshot."""

    def __init__(
        self,
        index: Index,
        spool: Spool,
        metrics: Metrics,
        *,
        destinations: Callable[[], Mapping[str, bool]],
        not_ready: Callable[[], list[str]],
        associations: Callable[[], int],
        on_space: Callable[[bool], None] | None = None,
        emit: Callable[[Event], None] = ignore_event,
        interval: float = 5.0,
    ) -> None:
        self._index = index
        self._spool = spool
        self._metrics = metrics
        self._destinations = destinations
        self._not_ready = not_ready
        self._associations = associations
        self._on_space = on_space
        self._emit = emit
        self.interval = interval
        self.latest: Snapshot | None = None
        self._had_room = True

    async def run(self) -> None:
        """Poll until cancelled; a failing poll is logged and reflected in readiness, never fatal."""
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)

    async def poll(self) -> Snapshot:
        """Take one snapshot and publish it to the gauges and the readiness state."""
        now = time.time()
        reasons = list(self._not_ready())
        destinations = self._destinations()
        statuses: list[DestinationStatus] = []
        used = 0
        try:
            queues = await queue_status(self._index, list(destinations), now)
            used = int(
                await self._index.scalar(
                    "SELECT coalesce(sum(size_bytes), 0) FROM instances WHERE file_state = 'stored'"
                )
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("Status poll failed: %s", exc)  # noqa: TRY400 - the database error says it all
            reasons.append(f"index not readable: {exc}")
            queues = {}
        for name, up in destinations.items():
            counts, oldest = queues.get(name, ({}, 0.0))
            statuses.append(DestinationStatus(name, up, counts, oldest))
            for state, count in counts.items():
                self._metrics.queue_depth.labels(destination=name, state=state).set(count)
            self._metrics.oldest_pending_age.labels(destination=name).set(oldest)
        free = await asyncio.to_thread(self._spool.free_bytes)
        has_room = free >= self._spool.min_free_bytes
        if not has_room:
            reasons.append("spool below its free-space reserve")
        if has_room != self._had_room:
            self._had_room = has_room
            self._emit(Event(EventKind.RESERVE, {"reached": not has_room, "free_bytes": free}))
            if self._on_space is not None:
                self._on_space(has_room)
        self._metrics.spool_free_bytes.set(free)
        self._metrics.spool_used_bytes.set(used)
        self._metrics.spool_reserve_bytes.set(self._spool.min_free_bytes)
        self._metrics.set_readiness(reasons)
        self.latest = Snapshot(
            ready=not reasons,
            not_ready=tuple(reasons),
            destinations=tuple(statuses),
            spool_free_bytes=free,
            spool_used_bytes=used,
            spool_reserve_bytes=self._spool.min_free_bytes,
            associations_active=self._associations(),
        )
        return self.latest
