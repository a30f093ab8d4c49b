"""The SQLite index of stored instances and the delivery queue: one aiosqlite writer, group commit.

Durability settings, and why: WAL lets readers (the CLI, status) run beside the one writer; with
``synchronous=FULL`` each commit fsyncs the WAL, so a committed row survives power loss (with NORMAL a WAL
commit can be lost at power failure). The setting is per connection, so every connection sets it.

Group commit: receivers call `record`, which waits; the `run` loop takes every row that arrived while the
previous transaction was committing, makes the spool directory durable once for all of them (the renames
must be durable before a row says the file exists), and commits them in one transaction. So concurrent
associations share one directory fsync and one WAL fsync, and each C-STORE-RSP still goes out only after
its own row is committed.

Imports: aiosqlite, model, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Self

import aiosqlite

from gateway.errors import IndexDatabaseError
from gateway.model import DeliveryState, FileState, StoredInstance

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence
    from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
_MIGRATIONS: Final[dict[int, str]] = {
    1: """
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        modality TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        file_name TEXT NOT NULL,
        file_state TEXT NOT NULL DEFAULT 'stored',
        calling_ae TEXT NOT NULL,
        peer_address TEXT NOT NULL,
        received_at REAL NOT NULL,
        delivered_at REAL  -- when its last delivery became done (retention counts from here)
    );
    CREATE INDEX instances_study ON instances(study_instance_uid);
    CREATE INDEX instances_series ON instances(series_instance_uid);
    CREATE INDEX instances_retention ON instances(file_state, delivered_at);
    CREATE TABLE deliveries (
        instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
        destination TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        refusals INTEGER NOT NULL DEFAULT 0,  -- permanent refusals; max_attempts of them end `failed`
        next_attempt_at REAL NOT NULL,
        claim_id INTEGER,
        last_status INTEGER,
        last_error TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (instance_id, destination)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries(destination, state, next_attempt_at);
    CREATE TABLE destinations (name TEXT PRIMARY KEY) WITHOUT ROWID;
    -- Every new instance gets one pending delivery per configured destination.
    CREATE TRIGGER instance_added AFTER INSERT ON instances BEGIN
        INSERT INTO deliveries (instance_id, destination, state, attempts, next_attempt_at, updated_at)
        SELECT NEW.id, name, 'pending', 0, (julianday('now') - 2440587.5) * 86400.0,
            (julianday('now') - 2440587.5) * 86400.0
        FROM destinations;
    END;
    -- Different bytes under a known UID (the spool replaced the file), or a file that had gone missing
    -- and came again: deliveries start over and any claim is void, so a forwarder still sending the old
    -- bytes cannot mark the new ones done.
    -- (A trigger's INSERT OR IGNORE would take the outer upsert's conflict policy: ON CONFLICT it is.)
    CREATE TRIGGER instance_changed AFTER UPDATE OF sha256, file_state ON instances
    WHEN OLD.sha256 != NEW.sha256 OR (OLD.file_state = 'missing' AND NEW.file_state = 'stored') BEGIN
        UPDATE instances SET delivered_at = NULL WHERE id = NEW.id;
        UPDATE deliveries SET state = 'pending', attempts = 0, refusals = 0,
            next_attempt_at = (julianday('now') - 2440587.5) * 86400.0, claim_id = NULL,
            last_status = NULL, last_error = NULL, updated_at = (julianday('now') - 2440587.5) * 86400.0
        WHERE instance_id = NEW.id;
        INSERT INTO deliveries (instance_id, destination, state, attempts, next_attempt_at, updated_at)
        SELECT NEW.id, name, 'pending', 0, (julianday('now') - 2440587.5) * 86400.0,
            (julianday('now') - 2440587.5) * 86400.0
        FROM destinations WHERE true
        ON CONFLICT DO NOTHING;
    END;
    """,
}

_UPSERT_INSTANCE: Final = """
INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, patient_id,
    modality, transfer_syntax_uid, size_bytes, sha256, file_name, file_state, calling_ae, peer_address,
    received_at)
VALUES (:uid, :sop_class, :study, :series, :patient_id, :modality, :ts, :size, :sha256, :file_name, 'stored',
    :calling_ae, :peer, :received_at)
ON CONFLICT (sop_instance_uid) DO UPDATE SET
    sop_class_uid = excluded.sop_class_uid, study_instance_uid = excluded.study_instance_uid,
    series_instance_uid = excluded.series_instance_uid, patient_id = excluded.patient_id,
    modality = excluded.modality, transfer_syntax_uid = excluded.transfer_syntax_uid,
    size_bytes = excluded.size_bytes, sha256 = excluded.sha256, file_name = excluded.file_name,
    file_state = 'stored', calling_ae = excluded.calling_ae, peer_address = excluded.peer_address,
    received_at = excluded.received_at
WHERE excluded.sha256 != instances.sha256 OR instances.file_state != 'stored'
"""


@dataclass(frozen=True, slots=True)
class _PendingRow:
    instance: StoredInstance
    done: asyncio.Future[None]


class Index:
    """The index database; use as ``async with Index(...) as index`` and run `run()` as a task.

    Args:
        path: the SQLite file.
        destinations: names of the configured destinations (each new instance gets a delivery per name).
        before_commit: blocking callable run before each group commit (the spool's directory fsync).
    """

    def __init__(self, path: Path, destinations: Sequence[str], before_commit: Callable[[], None]) -> None:
        self.path = path
        self.destinations = tuple(destinations)
        self._before_commit = before_commit
        self._db: aiosqlite.Connection | None = None
        self._queue: list[_PendingRow] = []
        self._wakeup = asyncio.Event()
        self._tx_lock = asyncio.Lock()  # one connection: transactions of different tasks must not interleave
        self._committed = asyncio.Event()  # replaced after each group commit: a broadcast to waiters
        self.commits = 0  # group commits done (observability and tests)
        self.failing = False  # the last group commit failed (readiness)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection."""
        if self._db is None:
            raise IndexDatabaseError("index is not open")
        return self._db

    async def open(self) -> None:
        """Open (creating or migrating) the database with the durability settings above."""
        self._db = await connect(self.path)
        try:
            await self._migrate()
            await self.set_destinations(self.destinations)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection; rows still waiting for a commit get an error."""
        for row in self._queue:
            if not row.done.done():
                row.done.set_exception(IndexDatabaseError("index closed before commit"))
        self._queue.clear()
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        version = await self.scalar("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise IndexDatabaseError(f"index schema {version} is newer than this gateway ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        if version > 0:
            backup = self.path.with_name(f"{self.path.name}.v{version}.bak")
            log.warning("Migrating index schema %d -> %d; backup at %s", version, SCHEMA_VERSION, backup)
            # VACUUM INTO copies committed pages still in the WAL too, unlike a file copy.
            await asyncio.to_thread(backup.unlink, missing_ok=True)
            await self.db.execute("VACUUM INTO ?", (str(backup),))
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self.db.executescript(
                f"BEGIN; {_MIGRATIONS[target]}; PRAGMA user_version = {target}; COMMIT;"
            )

    async def set_destinations(self, names: Sequence[str]) -> None:
        """The destinations new instances get deliveries for (at start, and on a config reload)."""
        self.destinations = tuple(names)
        async with self.transaction() as db:
            await db.execute("DELETE FROM destinations")
            await db.executemany(
                "INSERT INTO destinations (name) VALUES (?)", [(n,) for n in self.destinations]
            )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (never left open)."""
        db = self.db
        async with self._tx_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    def commit_signal(self) -> asyncio.Event:
        """An event set by the next group commit (take it before looking for work, then wait on it)."""
        return self._committed

    async def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:  # noqa: ANN401
        """First column of the first row, or None."""
        async with self.db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """All rows of a query."""
        return list(await self.db.execute_fetchall(sql, params))

    # ---------------------------------------------------------------- group commit
    async def record(self, instance: StoredInstance) -> None:
        """Index one durable spool file and wait until its row is committed.

        A UID seen before keeps its row and deliveries when the hash is the same; different bytes update
        the row and start its deliveries again.
        """
        done = asyncio.get_running_loop().create_future()
        self._queue.append(_PendingRow(instance, done))
        self._wakeup.set()
        await done

    async def run(self) -> None:
        """Commit queued rows in groups until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_PendingRow]) -> None:
        """Commit one group; on cancellation, wait for its outcome, answer its rows truthfully, then stop."""
        write = asyncio.ensure_future(self._write(batch))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait({write})
            self._answer(batch, write)
            raise
        except Exception:  # noqa: BLE001, S110 - the outcome is read from the task just below
            pass
        self._answer(batch, write)

    def _answer(self, batch: list[_PendingRow], write: asyncio.Future[None]) -> None:
        exc = write.exception()
        self.failing = exc is not None
        if exc is None:
            self.commits += 1
            self._committed.set()
            self._committed = asyncio.Event()
        else:
            log.error("Index commit of %d rows failed: %s", len(batch), exc)
        for row in batch:
            if row.done.done():
                continue
            if exc is None:
                row.done.set_result(None)
            else:
                row.done.set_exception(IndexDatabaseError(f"index commit failed: {exc}"))

    async def _write(self, batch: list[_PendingRow]) -> None:
        """One transaction for the batch; the directory fsync overlaps the statements, never the COMMIT."""
        synced = asyncio.ensure_future(asyncio.to_thread(self._before_commit))
        try:
            async with self.transaction() as db:
                await db.executemany(_UPSERT_INSTANCE, [_instance_params(row.instance) for row in batch])
                await synced  # renames durable before any row says the file exists
        finally:
            if not synced.done():
                synced.cancel()
            with contextlib.suppress(BaseException):
                await synced

    # ---------------------------------------------------------------- recovery
    async def stored_uids(self) -> set[str]:
        """SOP Instance UIDs whose file the index believes is in the spool."""
        rows = await self.fetchall("SELECT sop_instance_uid FROM instances WHERE file_state = 'stored'")
        return {row[0] for row in rows}

    async def mark_missing(self, uids: Iterable[str]) -> int:
        """Flag rows whose file is gone, and fail their open deliveries so an operator sees them."""
        params = [(uid,) for uid in uids]
        if not params:
            return 0
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE instances SET file_state = 'missing' WHERE sop_instance_uid = ?", params
            )
            await db.executemany(
                "UPDATE deliveries SET state = 'failed', last_error = 'spool file missing', claim_id = NULL, "
                "updated_at = ? WHERE state != 'done' AND instance_id = "
                "(SELECT id FROM instances WHERE sop_instance_uid = ?)",
                [(now, uid) for (uid,) in params],
            )
        return len(params)

    async def release_claims(self) -> int:
        """Return deliveries claimed by a worker that died (crash) to pending; at-least-once from here."""
        async with self.db.execute(
            "UPDATE deliveries SET state = 'pending', claim_id = NULL WHERE state = 'in_flight'"
        ) as cursor:
            count = cursor.rowcount
        await self.db.commit()
        return count

    # ---------------------------------------------------------------- reading
    async def count_instances(self, file_state: FileState | None = None) -> int:
        """Instances in the index (optionally only those in one file state)."""
        if file_state is None:
            return int(await self.scalar("SELECT count(*) FROM instances"))
        return int(
            await self.scalar("SELECT count(*) FROM instances WHERE file_state = ?", (file_state.value,))
        )

    async def delivery_counts(self) -> dict[tuple[str, DeliveryState], int]:
        """Deliveries by (destination, state)."""
        rows = await self.fetchall("SELECT destination, state, count(*) FROM deliveries GROUP BY 1, 2")
        return {(row[0], DeliveryState(row[1])): row[2] for row in rows}


async def connect(path: Path) -> aiosqlite.Connection:
    """Open a connection with the index's per-connection durability and locking settings."""
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute("PRAGMA busy_timeout = 5000")
    return db


def _instance_params(instance: StoredInstance) -> dict[str, object]:
    header = instance.header
    return {
        "uid": header.sop_instance_uid,
        "sop_class": header.sop_class_uid,
        "study": header.study_instance_uid,
        "series": header.series_instance_uid,
        "patient_id": header.patient_id,
        "modality": header.modality,
        "ts": instance.transfer_syntax_uid,
        "size": instance.size_bytes,
        "sha256": instance.sha256,
        "file_name": instance.file_name,
        "calling_ae": instance.calling_ae,
        "peer": instance.peer_address,
        "received_at": instance.received_at,
    }
