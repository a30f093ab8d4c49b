"""Backlog scaling: what a claim, a settle and a row commit cost with 1k, 100k and 1M index rows.

The index is the gateway's own (`gateway.index.Index`, so its migrations make the real schema, indexes
and triggers), run in this process. Rows are bulk-inserted with one INSERT ... SELECT per 100k rows
(a recursive CTE counts), with `synchronous = OFF` while building only; the insert trigger gives every
row a pending delivery, as in the daemon. Measurements then run with the daemon's settings (WAL,
`synchronous = FULL`: every COMMIT fsyncs), through the gateway's own code:

- claim: `DeliveryQueue.claim(destination, 50)` (the default batch size);
- settle: `DeliveryQueue.settle` of that batch as done;
- record: `Index.record` of one new instance through the group-commit loop (the receive path's row).

Two shapes of the same size: `backlog` (every row pending: an archive down for long) and `history`
(every row delivered except the newest 1000: the index of a gateway that has run for a long time).
Series hold 400 instances, like the CT data set. Medians of `_ROUNDS x _SAMPLES` operations each.

`daemon_rss` checks that the daemon's memory does not grow with the backlog: it builds a state directory
with N pending rows and N (empty) spool files of the same names, starts the gateway on it with its
archive down, and reads its peak RSS (VmHWM) once it is ready and its forwarder has tried the archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import time
from typing import TYPE_CHECKING

from bench import peers
from bench.measure import peak_rss_bytes
from gateway.delivery_queue import DeliveryQueue
from gateway.index import Index
from gateway.model import DeliveryResult, DeliveryState, InstanceHeader, StoredInstance
from simulators.harness import free_port

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

DESTINATION = "archive"
BATCH = 50
SERIES_SIZE = 400
HISTORY_PENDING = 1000
_DAEMON_MAX_ROWS = 100_000  # as many empty spool files: 1M would take minutes to create
_SETTLE_SECONDS = 3.0  # after ready: the forwarder has claimed, failed to connect, and marked it down
_SAMPLES = 19  # x BATCH = 950: within the 1000 pending rows of the smallest case
_ROUNDS = 5
_CHUNK = 100_000
_UID = "1.2.826.0.1.3680043.10.1234.99."
_INSERT = """
WITH RECURSIVE n(x) AS (SELECT :first UNION ALL SELECT x + 1 FROM n WHERE x < :last)
INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, patient_id,
    modality, transfer_syntax_uid, size_bytes, sha256, file_name, calling_ae, peer_address, received_at)
SELECT :uid || '1.' || x, '1.2.840.10008.5.1.4.1.1.2', :uid || '2.' || (x / (4 * :series)),
    :uid || '3.' || (x / :series), 'PID' || (x / (4 * :series)), 'CT', '1.2.840.10008.1.2.1',
    526000, printf('%064x', x), :uid || '1.' || x || '.dcm', 'CT_SCANNER_1', '127.0.0.1', 1.7e9 + x / 10.0
FROM n
"""


async def _build(index: Index, rows: int) -> None:
    db = index.db
    await db.execute("PRAGMA synchronous = OFF")  # building only; measured with FULL below
    for first in range(1, rows + 1, _CHUNK):
        async with index.transaction() as tx:
            last = min(first + _CHUNK - 1, rows)
            await tx.execute(_INSERT, {"first": first, "last": last, "uid": _UID, "series": SERIES_SIZE})
    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    await db.execute("PRAGMA synchronous = FULL")


async def _make_history(index: Index, rows: int) -> None:
    """Mark every delivery done except those of the newest HISTORY_PENDING rows (pending again)."""
    db = index.db
    await db.execute("PRAGMA synchronous = OFF")
    cutoff = rows - HISTORY_PENDING
    async with index.transaction() as tx:
        await tx.execute(
            "UPDATE deliveries SET state = CASE WHEN instance_id <= :cutoff THEN 'done' ELSE 'pending' END, "
            "attempts = instance_id <= :cutoff, claim_id = NULL",
            {"cutoff": cutoff},
        )
        await tx.execute("UPDATE instances SET delivered_at = received_at WHERE id <= ?", (cutoff,))
    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    await db.execute("PRAGMA synchronous = FULL")


def _new_instance(number: int) -> StoredInstance:
    uid = f"{_UID}5.{number}"
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", uid, f"{_UID}6", f"{_UID}7", "PIDNEW", "CT")
    return StoredInstance(
        header, "1.2.840.10008.1.2.1", 526000, f"{number:064x}", f"{uid}.dcm", "CT", "127.0.0.1", time.time()
    )


async def _measure(index: Index, label: str) -> dict[str, float]:
    """`_ROUNDS` rounds of `_SAMPLES` claim/settle/record; between rounds the claimed rows are pending again.

    The reset keeps the shape (pending counts) the same for every sample, so 1k rows yield as many
    samples as 1M; it is not timed.
    """
    queue = DeliveryQueue(index)
    claims, settles, records = [], [], []
    offset = 0 if label == "backlog" else _ROUNDS * _SAMPLES  # UIDs of recorded rows stay unique
    for round_number in range(_ROUNDS):
        claimed_ids: list[int] = []
        for number in range(_SAMPLES):
            started = time.perf_counter()
            claim_id, batch = await queue.claim(DESTINATION, BATCH)
            claimed = time.perf_counter()
            if len(batch) != BATCH:
                raise RuntimeError(f"{label}: claimed {len(batch)} deliveries, expected {BATCH}")
            now = time.time()
            results = [DeliveryResult(d.instance_id, DeliveryState.DONE, now, status=0) for d in batch]
            await queue.settle(DESTINATION, claim_id, results)
            settled = time.perf_counter()
            await index.record(_new_instance(offset + round_number * _SAMPLES + number))
            recorded = time.perf_counter()
            claims.append(claimed - started)
            settles.append(settled - claimed)
            records.append(recorded - settled)
            claimed_ids += [d.instance_id for d in batch]
        async with index.transaction() as tx:
            await tx.executemany(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = 0 WHERE instance_id = ?",
                [(instance_id,) for instance_id in claimed_ids],
            )
    return {
        "claim_ms": statistics.median(claims) * 1e3,
        "settle_ms": statistics.median(settles) * 1e3,
        "record_ms": statistics.median(records) * 1e3,
        "claim_p90_ms": sorted(claims)[int(len(claims) * 0.9)] * 1e3,
    }


async def _scale(path: Path, rows: int) -> dict[str, dict[str, float]]:
    index = Index(path, [DESTINATION], lambda: None)
    async with index:
        commit_loop = asyncio.create_task(index.run(), name="bench-index-commit")
        try:
            started = time.perf_counter()
            await _build(index, rows)
            built = time.perf_counter() - started
            backlog = await _measure(index, "backlog")
            await _make_history(index, rows)
            history = await _measure(index, "history")
        finally:
            commit_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commit_loop
    return {"backlog": backlog, "history": history, "build": {"seconds": built}}


async def _build_index(path: Path, rows: int) -> None:
    async with Index(path, [DESTINATION], lambda: None) as index:
        await _build(index, rows)


def daemon_rss(rows: int, workdir: Path) -> dict[str, object]:
    """Peak RSS of a gateway started on a backlog of `rows` pending instances (its archive down)."""
    directory = workdir / f"daemon-{rows}"
    shutil.rmtree(directory, ignore_errors=True)
    state_dir = directory / "state"
    spool = state_dir / "spool"
    try:
        spool.mkdir(parents=True)
        asyncio.run(_build_index(state_dir / "index.sqlite", rows))
        for number in range(1, rows + 1):  # recovery must find every row's file, or it flags it missing
            (spool / f"{_UID}1.{number}.dcm").touch(mode=0o600)
        destination = peers.destination_table(free_port(), None, name=DESTINATION)
        with peers.gateway(directory / "gw", destination=destination, state_dir=state_dir) as gateway:
            time.sleep(_SETTLE_SECONDS)
            peak = peak_rss_bytes(gateway.pid)
            pending = gateway.query("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]
        if pending != rows:
            raise RuntimeError(f"{pending} of {rows} deliveries pending after start: recovery changed them")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"section": "backlog-rss", "rows": rows, "subject": "gateway", "peak_rss_mb": peak / 1e6}


def run_backlog(sizes: list[int], workdir: Path, *, log: Callable[[str], None]) -> list[dict[str, object]]:
    """One record per (size, shape)."""
    records: list[dict[str, object]] = []
    for rows in sizes:
        directory = workdir / f"backlog-{rows}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            result = asyncio.run(_scale(directory / "index.sqlite", rows))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        for shape in ("backlog", "history"):
            timings = result[shape]
            log(
                f"backlog {rows} rows ({shape}): claim {timings['claim_ms']:.2f} ms, "
                f"settle {timings['settle_ms']:.2f} ms, record {timings['record_ms']:.2f} ms "
                f"(built in {result['build']['seconds']:.0f} s)"
            )
            records.append(
                {"section": "backlog", "rows": rows, "shape": shape, "subject": "gateway", **timings}
            )
    for rows in sizes:
        if rows <= _DAEMON_MAX_ROWS:
            record = daemon_rss(rows, workdir)
            log(f"gateway started on a backlog of {rows} instances: peak RSS {record['peak_rss_mb']:.0f} MB")
            records.append(record)
    return records
