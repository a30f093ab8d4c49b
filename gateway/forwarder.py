"""Forwarding to one destination: workers that claim batches, send them over one association, and record.

Each destination runs `max_parallel` workers. A worker claims a batch of due deliveries, opens one
association with a presentation context per (SOP class, transfer syntax) the batch needs, verifies each
file's SHA-256 against the index, streams it, classifies the answer, and records every outcome in one
transaction. While the destination is down, the workers stop opening batches; one of them probes with
C-ECHO on the backoff schedule, and when a probe answers, all drain the backlog at full speed.

At-least-once: a worker that dies leaves its claim `in_flight`; startup returns it to `pending`, so the
instances of that batch may be sent again, never lost.

Imports: requestor, delivery_queue, spool, retry, tls, model, config (types).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gateway.errors import GatewayError, ProtocolError
from gateway.model import Delivery, DeliveryResult, DeliveryState, Event, EventKind, ignore_event
from gateway.requestor import AssociationError, Peer, RequestorAssociation
from gateway.retry import Outcome, backoff_delay, classify_status
from gateway.spool import dataset_offset, file_sha256

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from pathlib import Path

    from gateway.config import DestinationConfig
    from gateway.delivery_queue import DeliveryQueue
    from gateway.dul import LocalIdentity
    from gateway.metrics import Metrics
    from gateway.spool import Spool

log = logging.getLogger(__name__)

MAX_CONTEXTS: Final = 128  # PS3.8: presentation context IDs are odd numbers 1..255
IDLE_RECHECK: Final = 5.0  # seconds an idle worker waits at most before looking again (e.g. CLI retries)
VERIFICATION: Final = ("1.2.840.10008.1.1", "1.2.840.10008.1.2")


def peer_for(config: DestinationConfig, ssl_context: ssl.SSLContext | None) -> Peer:
    """How to reach a destination: its address, AE titles, TLS and timeouts (forwarder and CLI echo)."""
    return Peer(
        host=config.host,
        port=config.port,
        called_ae=config.called_ae,
        calling_ae=config.calling_ae,
        ssl_context=ssl_context,
        server_hostname=(config.tls.server_hostname if config.tls else None) or config.host,
        connect_timeout=config.connect_timeout,
        acse_timeout=config.acse_timeout,
        dimse_timeout=config.dimse_timeout,
        network_timeout=config.network_timeout,
    )


@dataclass
class DestinationHealth:
    """Whether a destination answers; every change is logged and reported to `on_change`."""

    name: str
    up: bool = True
    failures: int = 0  # consecutive association failures (the probe backoff counts them)
    last_error: str = ""
    on_change: Callable[[str, bool, str], None] | None = None
    _came_up: asyncio.Event = field(default_factory=asyncio.Event)

    def mark_up(self) -> None:
        """An association worked."""
        self.failures = 0
        if not self.up:
            self.up = True
            log.warning("Destination %s is up again", self.name)
            self._notify()
        self._came_up.set()

    def mark_down(self, error: str) -> None:
        """An association could not be opened (or the probe failed)."""
        self.failures += 1
        self.last_error = error
        if self.up:
            self.up = False
            self._came_up.clear()
            log.warning("Destination %s is down: %s", self.name, error)
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self.name, self.up, self.last_error)


class Forwarder:
    """The workers of one destination; `run()` until cancelled."""

    def __init__(
        self,
        config: DestinationConfig,
        queue: DeliveryQueue,
        spool: Spool,
        identity: LocalIdentity,
        *,
        ssl_context: ssl.SSLContext | None,
        metrics: Metrics,
        emit: Callable[[Event], None] = ignore_event,
    ) -> None:
        self.config = config
        self._queue = queue
        self._spool = spool
        self._identity = identity
        self._peer = peer_for(config, ssl_context)
        self._metrics = metrics
        self._emit = emit
        self.health = DestinationHealth(config.name, on_change=self._health_changed)
        metrics.destination_up.labels(destination=config.name).set(1)
        self._probe_lock = asyncio.Lock()
        self.associations_opened = 0  # every association attempt, probes included (tests, metrics)
        self.sent = 0

    def _health_changed(self, name: str, up: bool, error: str) -> None:
        self._metrics.destination_up.labels(destination=name).set(1 if up else 0)
        self._emit(Event(EventKind.DESTINATION, {"up": up, "error": "" if up else error}, source=name))

    async def run(self) -> None:
        """Run `max_parallel` workers in one task group until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for number in range(self.config.max_parallel):
                tg.create_task(self._work(), name=f"forwarder[{self.config.name}]#{number}")

    async def _work(self) -> None:
        index = self._queue.index
        while True:
            await self._wait_until_up()
            signal = index.commit_signal()
            claim_id, batch = await self._queue.claim(self.config.name, self.config.batch_size)
            if batch:
                await self._deliver(claim_id, batch)
                continue
            due = await self._queue.next_due(self.config.name)
            wait = IDLE_RECHECK if due is None else min(max(due - time.time(), 0.0), IDLE_RECHECK)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await signal.wait()

    async def _wait_until_up(self) -> None:
        """While the destination is down, one worker probes on the backoff schedule; the others wait."""
        while not self.health.up:
            async with self._probe_lock:
                if self.health.up:
                    return
                await asyncio.sleep(backoff_delay(self.config.retry, self.health.failures))
                try:
                    await self.probe()
                except (GatewayError, OSError) as exc:
                    self.health.mark_down(str(exc))
                else:
                    self.health.mark_up()

    async def probe(self) -> int:
        """C-ECHO the destination with its TLS settings; returns the status (raises on failure)."""
        self.associations_opened += 1
        async with await RequestorAssociation.open(self._peer, self._identity, [VERIFICATION]) as association:
            status = await association.echo()
        if status != 0:
            raise AssociationError("echo", f"C-ECHO answered 0x{status:04X}")
        return status

    async def _deliver(self, claim_id: int, batch: list[Delivery]) -> None:
        """Send one claimed batch over one association and record every outcome, whatever happens."""
        results: dict[int, DeliveryResult] = {}
        try:
            await self._send_batch(_within_context_limit(batch), results)
        finally:
            now = time.time()
            for delivery in batch:  # not sent (or cut off): back to pending, due at once, no attempt counted
                results.setdefault(delivery.instance_id, _released(delivery, now))
            await asyncio.shield(self._queue.settle(self.config.name, claim_id, list(results.values())))
            self._account(batch, results)

    def _account(self, batch: list[Delivery], results: dict[int, DeliveryResult]) -> None:
        """Metrics and events for a settled batch."""
        name = self.config.name
        now = time.time()
        for delivery in batch:
            result = results[delivery.instance_id]
            if result.state is DeliveryState.DONE:
                self._metrics.instances_forwarded.labels(destination=name).inc()
                self._metrics.bytes_forwarded.labels(destination=name).inc(delivery.size_bytes)
                self._metrics.forward_latency.labels(destination=name).observe(
                    max(now - delivery.received_at, 0)
                )
            elif not result.attempted:
                continue
            elif result.state is DeliveryState.FAILED:
                self._metrics.forward_failures.labels(destination=name, kind="failed").inc()
                payload = {  # no error text: an archive's comment may quote the patient
                    "sop_instance_uid": delivery.sop_instance_uid,
                    "status": result.status,
                    "attempts": delivery.attempts + 1,
                    "error": result.error if result.status is None else None,  # our own words only
                }
                self._emit(Event(EventKind.DELIVERY_FAILED, payload, source=name))
            else:
                kind = "refused" if result.refused else "transient"
                self._metrics.forward_failures.labels(destination=name, kind=kind).inc()

    async def _send_batch(self, batch: list[Delivery], results: dict[int, DeliveryResult]) -> None:
        contexts = list(dict.fromkeys((d.sop_class_uid, d.transfer_syntax_uid) for d in batch))
        self.associations_opened += 1
        try:
            association = await RequestorAssociation.open(self._peer, self._identity, contexts)
        except (AssociationError, ProtocolError, OSError) as exc:
            self._metrics.forward_failures.labels(destination=self.config.name, kind="association").inc()
            self.health.mark_down(str(exc))
            return
        self.health.mark_up()
        current: Delivery | None = None
        try:
            async with association:
                for delivery in batch:
                    current = delivery
                    result = await self._send_one(association, delivery)
                    results[delivery.instance_id] = result
                    current = None
                    if result.status is not None and classify_status(result.status) is Outcome.TRANSIENT:
                        break  # the archive is out of resources: leave the rest for later
        except (AssociationError, ProtocolError, OSError, TimeoutError) as exc:
            log.warning("Association to %s lost: %s", self.config.name, exc)
            if current is not None:
                results[current.instance_id] = self._retry_later(current, None, f"association lost: {exc}")

    async def _send_one(self, association: RequestorAssociation, delivery: Delivery) -> DeliveryResult:
        pair = (delivery.sop_class_uid, delivery.transfer_syntax_uid)
        if pair not in association.accepted:
            error = f"no presentation context accepted for {pair[0]} in {pair[1]}"
            return self._refused(delivery, None, error)
        path = self._spool.path_for(delivery.file_name)
        try:
            offset = await asyncio.to_thread(_verified_offset, path, delivery.sha256)
        except (OSError, ValueError) as exc:
            log.error(  # noqa: TRY400 - the reason is the message; a traceback would add nothing
                "Not sending %s to %s: %s", delivery.sop_instance_uid, self.config.name, exc
            )
            return DeliveryResult(delivery.instance_id, DeliveryState.FAILED, time.time(), error=str(exc))
        outcome = await association.store_file(
            path, offset, delivery.sop_class_uid, delivery.sop_instance_uid, delivery.transfer_syntax_uid
        )
        status = outcome.status
        kind = classify_status(status)
        if kind is Outcome.DONE:
            self.sent += 1
            warning = f"warning 0x{status:04X} {outcome.comment}".strip() if status else None
            return DeliveryResult(
                delivery.instance_id, DeliveryState.DONE, time.time(), status=status, error=warning
            )
        error = f"0x{status:04X} {outcome.comment}".strip()
        if kind is Outcome.TRANSIENT:
            return self._retry_later(delivery, status, error)
        return self._refused(delivery, status, error)

    def _retry_later(self, delivery: Delivery, status: int | None, error: str) -> DeliveryResult:
        delay = backoff_delay(self.config.retry, delivery.attempts + 1)
        return DeliveryResult(
            delivery.instance_id, DeliveryState.PENDING, time.time() + delay, status=status, error=error
        )

    def _refused(self, delivery: Delivery, status: int | None, error: str) -> DeliveryResult:
        final = delivery.refusals + 1 >= self.config.retry.max_attempts
        if final:  # the archive's own comment may quote the patient: it goes to the index, not the log
            log.warning(
                "Delivery of %s to %s failed after %d refusals: %s",
                delivery.sop_instance_uid,
                self.config.name,
                delivery.refusals + 1,
                f"status 0x{status:04X}" if status is not None else error,
            )
        delay = backoff_delay(self.config.retry, delivery.refusals + 1)
        state = DeliveryState.FAILED if final else DeliveryState.PENDING
        return DeliveryResult(
            delivery.instance_id, state, time.time() + delay, refused=True, status=status, error=error
        )


def _released(delivery: Delivery, now: float) -> DeliveryResult:
    return DeliveryResult(delivery.instance_id, DeliveryState.PENDING, now, attempted=False)


def _within_context_limit(batch: list[Delivery]) -> list[Delivery]:
    """The part of a batch that fits in 128 presentation contexts (the caller releases the rest)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for delivery in batch:
        pair = (delivery.sop_class_uid, delivery.transfer_syntax_uid)
        if pair not in seen and len(seen) == MAX_CONTEXTS:
            continue
        seen.add(pair)
        kept.append(delivery)
    return kept


def _verified_offset(path: Path, sha256: str) -> int:
    """Check the spool file against the index (blocking); return where its data set starts."""
    if file_sha256(path) != sha256:
        raise ValueError("spool file corrupt: SHA-256 differs from the index")
    with path.open("rb") as fp:
        return dataset_offset(fp)
