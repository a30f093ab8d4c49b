"""Retention: remove spool files whose every delivery is done, after `keep_forwarded`, oldest first.

When the spool's free space falls below twice the reserve, delivered files go at once regardless of
age, oldest first, so ingest keeps its room. A file with any undelivered or failed delivery, and every
file of a receive-only gateway (no destinations), is never removed.

Order per file: the row is marked `deleted` first, then the file is removed; a crash in between leaves a
file whose row says deleted, which recovery indexes again (and a later sweep removes). Each removal holds
the file's UID lock, so it never races a receiver replacing the same file.

Imports: delivery_queue, spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.delivery_queue import DeliveryQueue
    from gateway.spool import Spool

log = logging.getLogger(__name__)

SWEEP_BATCH: Final = 500


class Retention:
    """Sweeps the spool every `interval` seconds (and whenever `wake()` is called)."""

    def __init__(self, queue: DeliveryQueue, spool: Spool, keep_forwarded: float) -> None:
        self._queue = queue
        self._spool = spool
        self.keep_forwarded = keep_forwarded
        self.interval = min(max(keep_forwarded / 2, 1.0), 30.0)
        self._wakeup = asyncio.Event()
        self.deleted = 0

    def wake(self) -> None:
        """Sweep soon (the spool is short of space, or deliveries just completed)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            try:
                await self.sweep()
            except OSError as exc:
                log.error("Retention sweep failed: %s", exc)  # noqa: TRY400 - the OS error says it all
            self._wakeup.clear()
            try:
                async with asyncio.timeout(self.interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _remove(self, candidates: list[tuple[str, str]]) -> int:
        """Mark and delete one group of (UID, file name); returns how many files went."""
        async with contextlib.AsyncExitStack() as locks:  # receivers take one UID lock at a time
            for uid, _ in candidates:
                await locks.enter_async_context(self._spool.locks.hold(uid))
            marked = await self._queue.mark_deleted([uid for uid, _ in candidates])
            # Unmarked ones were replaced by new bytes while we waited for their locks: they stay.
            names = [file_name for uid, file_name in candidates if uid in marked]
            await asyncio.to_thread(self._delete_files, names)
        return len(names)

    def _delete_files(self, names: list[str]) -> None:
        for name in names:
            self._spool.delete(name)

    async def _has_room(self) -> bool:
        """True while free space is at least twice the reserve."""
        return await asyncio.to_thread(self._spool.has_room, self._spool.min_free_bytes)

    async def sweep(self) -> int:
        """Remove what is due now; returns how many files were removed."""
        removed = 0
        while True:
            under_pressure = not await self._has_room()
            cutoff = time.time() - (0.0 if under_pressure else self.keep_forwarded)
            candidates = await self._queue.delivered_files(cutoff, SWEEP_BATCH)
            if not candidates:
                break
            # One transaction per batch; under pressure one file at a time, to stop as soon as there is room.
            for group in [[c] for c in candidates] if under_pressure else [candidates]:
                removed += await self._remove(group)
                if under_pressure and await self._has_room():
                    break
            else:
                if len(candidates) == SWEEP_BATCH:
                    continue
            break
        if removed:
            self.deleted += removed
            log.info("Retention removed %d delivered files", removed)
        return removed
