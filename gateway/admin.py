"""The operator's queries and changes on the index: what `status` and `queue list/show/retry/purge` do.

The command line is synchronous and runs beside the daemon, so this module uses the standard library's
``sqlite3``, not aiosqlite. DESIGN's rule that each third-party I/O library has one home is about
aiosqlite (the daemon's one writer, in index.py); a second, short-lived connection from another process
is what SQLite's WAL mode is built for. To stay out of the daemon's way:

- reading commands open the file with ``mode=ro`` and read in one short transaction (a WAL reader never
  blocks the writer, and sees one consistent moment);
- changing commands set ``synchronous=FULL`` (as the daemon does: a committed change survives power
  loss), ``foreign_keys`` (deliveries go with their instance) and ``busy_timeout`` (wait for the daemon's
  group commit instead of failing), and change at most `CHUNK` instances per ``BEGIN IMMEDIATE``
  transaction, so the daemon's commits, and the scanners' acknowledgements behind them, never wait long;
- a delivery that is ``in_flight`` belongs to a forwarder sending it right now: nothing here touches it.

Imports: index (schema version), forwarder (its idle re-check period), spool (file names), model, errors.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gateway.errors import GatewayError
from gateway.forwarder import IDLE_RECHECK
from gateway.index import SCHEMA_VERSION
from gateway.model import DeliveryState, FileState
from gateway.spool import TEMP_PREFIX

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

    from gateway.spool import Spool

BUSY_TIMEOUT: Final = 5.0  # seconds to wait for the daemon's write lock before reporting "locked"
CHUNK: Final = 500  # instances changed per write transaction (each one takes milliseconds)
# No forwarder has answered for this long although work is due: the destination, or the daemon, is stuck.
# Idle forwarders look for due work at least every IDLE_RECHECK seconds; twice that is a missed look.
STALL_AFTER: Final = 2 * IDLE_RECHECK
STATES: Final = tuple(state.value for state in DeliveryState)
FILE_STATES: Final = tuple(state.value for state in FileState)
TOMBSTONE_SUFFIX: Final = ".purged"  # `.tmp.<file>.purged`: startup recovery removes any left behind


class AdminError(GatewayError):
    """An operator command cannot be done; the message is one line for stderr."""


def index_path(state_dir: Path) -> Path:
    """Where the daemon keeps its index."""
    return state_dir / "index.sqlite"


def format_age(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3.5 h``, ``2.0 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# ---------------------------------------------------------------- connections


@contextlib.contextmanager
def open_index(path: Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """Open the daemon's index beside it: read-only unless `write`; every SQLite error becomes AdminError."""
    try:
        found = path.exists()
    except PermissionError as exc:  # the state directory is 0700, the daemon user's
        raise AdminError(f"cannot read {path}: permission denied: run this as the gateway's user") from exc
    if not found:
        raise AdminError(f"no index at {path}: has the gateway run yet?")
    uri = path.absolute().as_uri() + ("" if write else "?mode=ro")
    try:
        db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise _admin_error(exc, path) from exc
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        if write:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        _check_schema(db, path)
        yield db
    except sqlite3.Error as exc:
        raise _admin_error(exc, path) from exc
    finally:
        db.close()


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        raise AdminError(f"{path} is not a gateway index (no schema)")
    if version > SCHEMA_VERSION:
        raise AdminError(
            f"index schema {version} is newer than this dicom-gateway ({SCHEMA_VERSION}): "
            "use the same version as the running gateway"
        )
    raise AdminError(
        f"index schema {version} is older than {SCHEMA_VERSION}: start the gateway once to migrate"
    )


def _admin_error(exc: sqlite3.Error, path: Path) -> AdminError:
    message = str(exc)
    if "locked" in message or "busy" in message:
        return AdminError(
            f"index {path} is locked: another writer held it for more than {BUSY_TIMEOUT:g} s "
            "(the gateway under heavy load, or another dicom-gateway command); try again"
        )
    if "readonly" in message or "unable to open" in message:
        return AdminError(f"cannot open index {path} ({message}): run this as the gateway's user")
    return AdminError(f"index {path}: {message}")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """One short transaction: BEGIN IMMEDIATE for writes (take the lock first), BEGIN for a snapshot."""
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _placeholders(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


# ---------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class DestinationView:
    """One destination's deliveries, and whether it looks up (inferred from the index: see `_judge`)."""

    name: str
    configured: bool
    counts: Mapping[str, int]  # every delivery state
    oldest_pending_age: float  # seconds since the oldest pending/in-flight instance arrived (0: none)
    last_delivered_at: float | None
    up: bool | None  # None: cannot tell
    up_reason: str


@dataclass(frozen=True, slots=True)
class IndexStatus:
    """What the index says at one moment."""

    destinations: tuple[DestinationView, ...]
    instances: Mapping[str, int]  # every file state
    stored_bytes: int  # size of the files the index says are in the spool


def read_status(db: sqlite3.Connection, configured: Sequence[str], now: float) -> IndexStatus:
    """Counts by state per destination (configured ones first, then any others the index still holds)."""
    with _transaction(db, write=False):
        counts: dict[str, dict[str, int]] = {}
        for name, state, count in db.execute(
            "SELECT destination, state, count(*) FROM deliveries GROUP BY 1, 2"
        ):
            counts.setdefault(name, dict.fromkeys(STATES, 0))[state] = count
        names = [*configured, *sorted(set(counts) - set(configured))]
        views = tuple(
            _destination(db, name, name in configured, counts.get(name, dict.fromkeys(STATES, 0)), now)
            for name in names
        )
        instances = dict.fromkeys(FILE_STATES, 0)
        for file_state, count in db.execute("SELECT file_state, count(*) FROM instances GROUP BY 1"):
            instances[file_state] = count
        (stored,) = db.execute(
            "SELECT coalesce(sum(size_bytes), 0) FROM instances WHERE file_state = 'stored'"
        ).fetchone()
    return IndexStatus(views, instances, int(stored))


def _destination(
    db: sqlite3.Connection, name: str, configured: bool, counts: Mapping[str, int], now: float
) -> DestinationView:
    def one(sql: str, *params: object) -> sqlite3.Row:
        row: sqlite3.Row = db.execute(sql, (name, *params)).fetchone()
        return row

    (oldest,) = one(
        "SELECT min(i.received_at) FROM deliveries d JOIN instances i ON i.id = d.instance_id "
        "WHERE d.destination = ? AND d.state IN ('pending', 'in_flight')"
    )
    (delivered,) = one("SELECT max(updated_at) FROM deliveries WHERE destination = ? AND state = 'done'")
    # The destination answered a C-STORE (success or any status): an attempt recorded with a status.
    (answered,) = one(
        "SELECT max(updated_at) FROM deliveries WHERE destination = ? "
        "AND (state = 'done' OR (attempts > 0 AND last_status IS NOT NULL))"
    )
    lost_at, lost_error = one(
        "SELECT max(updated_at), last_error FROM deliveries WHERE destination = ? AND state = 'pending' "
        "AND attempts > 0 AND last_status IS NULL AND last_error LIKE 'association lost%'"
    )
    (overdue,) = one(
        "SELECT count(*) FROM deliveries WHERE destination = ? AND state = 'pending' "
        "AND next_attempt_at <= ?",
        now - STALL_AFTER,
    )
    up, reason = _judge(
        configured=configured,
        overdue=overdue,
        in_flight=counts["in_flight"],
        answered=answered,
        lost=(lost_at, lost_error or ""),
        now=now,
    )
    age = 0.0 if oldest is None else max(now - oldest, 0.0)
    return DestinationView(name, configured, counts, age, delivered, up, reason)


def _judge(
    *,
    configured: bool,
    overdue: int,
    in_flight: int,
    answered: float | None,
    lost: tuple[float | None, str],
    now: float,
) -> tuple[bool | None, str]:
    """Up, down or unknown, from what the index recorded; the daemon's probes are not in the index.

    Down: work has been due for longer than STALL_AFTER with nothing being sent and no answer in that
    time (an unreachable destination leaves no trace but that), or the newest association-level outcome
    is a lost association. Up: the destination's newest recorded outcome is an answer. Unknown otherwise.
    """
    if not configured:
        return None, "not in the config: nothing sends its deliveries"
    if overdue and not in_flight and (answered is None or now - answered > STALL_AFTER):
        silent = "never answered" if answered is None else f"no answer for {format_age(now - answered)}"
        return False, (
            f"{overdue} deliveries overdue, {silent}: destination unreachable, or the gateway is not running"
        )
    lost_at, lost_error = lost
    if lost_at is not None and (answered is None or lost_at > answered):
        return False, f"{lost_error} ({format_age(now - lost_at)} ago)"
    if answered is not None:
        return True, f"last answered {format_age(now - answered)} ago"
    return None, "nothing sent yet"


# ---------------------------------------------------------------- list and show


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One delivery of one instance, as `queue list` and `queue show` present it (no patient data)."""

    sop_instance_uid: str
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    refusals: int
    last_status: int | None
    last_error: str | None
    received_at: float
    next_attempt_at: float
    updated_at: float


_DELIVERY_COLUMNS: Final = (
    "i.sop_instance_uid, i.study_instance_uid, d.destination, d.state, d.attempts, d.refusals, "
    "d.last_status, d.last_error, i.received_at, d.next_attempt_at, d.updated_at"
)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """Filters and the page of `queue list`; `since` is a UNIX time (received at or after)."""

    state: str | None = None
    destination: str | None = None
    study: str | None = None
    since: float | None = None
    limit: int = 50
    offset: int = 0


def list_deliveries(db: sqlite3.Connection, query: ListQuery) -> tuple[list[DeliveryRow], bool]:
    """One page of deliveries in the order received; True when more follow."""
    where, params = [], []
    for clause, value in (
        ("d.state = ?", query.state),
        ("d.destination = ?", query.destination),
        ("i.study_instance_uid = ?", query.study),
        ("i.received_at >= ?", query.since),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = f"SELECT {_DELIVERY_COLUMNS} FROM instances i JOIN deliveries d ON d.instance_id = i.id"  # noqa: S608 - fixed fragments
    if where:
        sql += " WHERE " + " AND ".join(where)
    # Instance IDs grow as instances arrive: a stable order that needs no sort over the whole table.
    sql += " ORDER BY i.id, d.destination LIMIT ? OFFSET ?"
    rows = db.execute(sql, (*params, query.limit + 1, query.offset)).fetchall()
    return [DeliveryRow(*row) for row in rows[: query.limit]], len(rows) > query.limit


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance's row and its deliveries (`queue show`)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    file_name: str
    file_state: str
    calling_ae: str
    peer_address: str
    received_at: float
    delivered_at: float | None
    deliveries: tuple[DeliveryRow, ...]


def show_instance(db: sqlite3.Connection, uid: str) -> InstanceView | None:
    """The instance with this SOP Instance UID, or None."""
    with _transaction(db, write=False):
        row = db.execute(
            "SELECT id, sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
            "patient_id, modality, transfer_syntax_uid, size_bytes, sha256, file_name, file_state, "
            "calling_ae, peer_address, received_at, delivered_at FROM instances WHERE sop_instance_uid = ?",
            (uid,),
        ).fetchone()
        if row is None:
            return None
        deliveries = db.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM instances i JOIN deliveries d ON d.instance_id = i.id "  # noqa: S608 - fixed fragments
            "WHERE i.id = ? ORDER BY d.destination",
            (row[0],),
        ).fetchall()
    fields = {key: row[key] for key in row.keys() if key != "id"}  # noqa: SIM118 - sqlite3.Row is no dict
    return InstanceView(**fields, deliveries=tuple(DeliveryRow(*d) for d in deliveries))


# ---------------------------------------------------------------- selecting instances


@dataclass(frozen=True, slots=True)
class Selector:
    """Which instances a retry or purge means: exactly one of `uid`, `study`, `failed`, `delivered`.

    `failed`: instances with a failed delivery (to `destination` when given). `delivered`: instances whose
    every delivery is done. With `uid` or `study`, `destination` narrows a retry to that destination.
    """

    uid: str | None = None
    study: str | None = None
    failed: bool = False
    delivered: bool = False
    destination: str | None = None

    def __post_init__(self) -> None:
        chosen = [self.uid is not None, self.study is not None, self.failed, self.delivered]
        if sum(chosen) != 1:
            raise ValueError("exactly one selector: a UID, a study, failed deliveries or delivered instances")

    def describe(self) -> str:
        """For messages: what was selected."""
        if self.uid is not None:
            what = f"instance {self.uid}"
        elif self.study is not None:
            what = f"study {self.study}"
        elif self.failed:
            what = "instances with a failed delivery"
        else:
            what = "instances delivered everywhere"
        return f"{what} (destination {self.destination})" if self.destination else what

    def where(self) -> tuple[str, tuple[object, ...]]:
        """The condition on ``instances i`` and its parameters."""
        if self.uid is not None:
            return "i.sop_instance_uid = ?", (self.uid,)
        if self.study is not None:
            return "i.study_instance_uid = ?", (self.study,)
        if self.failed:
            if self.destination is None:
                return (
                    "EXISTS (SELECT 1 FROM deliveries f WHERE f.instance_id = i.id AND f.state = 'failed')",
                    (),
                )
            clause = (
                "EXISTS (SELECT 1 FROM deliveries f WHERE f.instance_id = i.id AND f.state = 'failed' "
                "AND f.destination = ?)"
            )
            return clause, (self.destination,)
        # The same test retention uses (delivered_at), and no delivery open since then.
        clause = (
            "i.delivered_at IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.instance_id = i.id AND o.state != 'done')"
        )
        return clause, ()


# ---------------------------------------------------------------- retry


@dataclass(frozen=True, slots=True)
class RetryReport:
    """What a retry changed, and what it left alone and why."""

    requeued: Mapping[str, int]  # deliveries made pending and due now, per destination
    instances: int  # instances with at least one re-queued delivery
    in_flight: int  # skipped: being sent right now
    done: int  # skipped: already delivered (no include_done)
    not_stored: int  # skipped: the spool file is gone (missing, or removed by retention)

    @property
    def total(self) -> int:
        """Deliveries re-queued."""
        return sum(self.requeued.values())


@dataclass(frozen=True, slots=True)
class _RetryScope:
    """Which deliveries of the selected instances a retry re-queues."""

    states: tuple[str, ...]  # states it moves to pending
    clause: str  # further conditions on ``deliveries d``
    params: tuple[object, ...]


def retry(
    db: sqlite3.Connection, selector: Selector, *, include_done: bool = False, now: float | None = None
) -> RetryReport:
    """Make the selected deliveries pending and due now, with attempts and refusals back at 0.

    ``last_status`` and ``last_error`` stay, as history, until the next attempt replaces them. A
    delivery in flight is never touched; a done one only with `include_done` (the instance is sent
    again, and its ``delivered_at`` cleared so retention keeps the file until then).
    """
    if selector.delivered:
        raise ValueError("retry does not take the delivered selector")
    now = time.time() if now is None else now
    if selector.failed:
        scope = _RetryScope(("failed",), " AND d.state = 'failed'", ())
    else:
        scope = _RetryScope(("pending", "failed", "done") if include_done else ("pending", "failed"), "", ())
    if selector.destination:
        scope = _RetryScope(scope.states, scope.clause + " AND d.destination = ?", (selector.destination,))
    requeued: dict[str, int] = {}
    skipped = {"in_flight": 0, "done": 0, "not_stored": 0}
    instances = 0
    where, params = selector.where()
    last_id = 0
    while True:  # CHUNK instances per transaction, in ID order (memory stays flat on any index)
        with _transaction(db, write=True):
            chunk = [
                row[0]
                for row in db.execute(
                    f"SELECT i.id FROM instances i WHERE ({where}) AND i.id > ? ORDER BY i.id LIMIT ?",  # noqa: S608 - fixed fragments
                    (*params, last_id, CHUNK),
                )
            ]
            if not chunk:
                break
            _count_skipped(db, chunk, scope, skipped)
            changed = _requeue(db, chunk, scope, now)
        instances += len({instance_id for instance_id, _ in changed})
        for _, destination in changed:
            requeued[destination] = requeued.get(destination, 0) + 1
        last_id = chunk[-1]
    return RetryReport(requeued, instances, skipped["in_flight"], skipped["done"], skipped["not_stored"])


def _count_skipped(
    db: sqlite3.Connection, chunk: list[int], scope: _RetryScope, skipped: dict[str, int]
) -> None:
    """Tally the deliveries in scope that a retry leaves alone, by reason."""
    rows = db.execute(
        "SELECT d.state, i.file_state = 'stored', count(*) FROM deliveries d "  # noqa: S608 - fixed fragments
        "JOIN instances i ON i.id = d.instance_id "
        f"WHERE d.instance_id IN ({_placeholders(chunk)}){scope.clause} GROUP BY 1, 2",
        (*chunk, *scope.params),
    )
    for state, stored, count in rows:
        if state == "in_flight":
            skipped["in_flight"] += count
        elif state not in scope.states:
            skipped["done"] += count
        elif not stored:
            skipped["not_stored"] += count


def _requeue(db: sqlite3.Connection, chunk: list[int], scope: _RetryScope, now: float) -> list[sqlite3.Row]:
    """Re-queue the chunk's deliveries in scope whose file is there; (instance ID, destination) of each."""
    marks = _placeholders(chunk)
    changed: list[sqlite3.Row] = db.execute(
        "UPDATE deliveries AS d SET state = 'pending', attempts = 0, refusals = 0, "  # noqa: S608 - fixed fragments
        f"next_attempt_at = ?, claim_id = NULL, updated_at = ? WHERE d.instance_id IN ({marks}) "
        f"AND d.state IN ({_placeholders(scope.states)}){scope.clause} AND d.instance_id IN "
        "(SELECT id FROM instances WHERE file_state = 'stored') "
        "RETURNING instance_id, destination",
        (now, now, *chunk, *scope.states, *scope.params),
    ).fetchall()
    # Undelivered again: retention must keep the file (it removes only delivered_at IS NOT NULL).
    db.execute(
        f"UPDATE instances SET delivered_at = NULL WHERE id IN ({marks}) "  # noqa: S608 - fixed fragments
        "AND delivered_at IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM deliveries WHERE instance_id = instances.id AND state != 'done')",
        chunk,
    )
    return changed


# ---------------------------------------------------------------- purge


@dataclass(frozen=True, slots=True)
class PurgePlan:
    """What a purge would remove, read before asking the operator (totals only: any size fits)."""

    selector: Selector
    instances: int
    size_bytes: int
    in_flight: int  # instances with a delivery being sent right now (never purged)
    undelivered: int  # instances with a pending or failed delivery (purged only with force)
    in_flight_example: str | None
    undelivered_example: str | None
    last_id: int  # the highest instance ID selected: instances arriving later are left alone


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """One committed transaction of a purge; `skipped` changed since the plan (claimed, say)."""

    purged: tuple[str, ...]
    files_removed: int
    bytes_removed: int
    skipped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Candidate:
    id: int
    sop_instance_uid: str
    file_name: str
    size_bytes: int
    in_flight: bool
    undelivered: bool


_IN_FLIGHT: Final = "EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id = i.id AND d.state = 'in_flight')"
_UNDELIVERED: Final = (
    "EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id = i.id AND d.state IN ('pending', 'failed'))"
)


def plan_purge(db: sqlite3.Connection, selector: Selector) -> PurgePlan:
    """Count what `selector` picks, and what would stop its removal."""
    where, params = selector.where()
    with _transaction(db, write=False):
        row = db.execute(
            f"SELECT count(*), coalesce(sum(i.size_bytes), 0), coalesce(sum({_IN_FLIGHT}), 0), "  # noqa: S608 - fixed fragments
            f"coalesce(sum({_UNDELIVERED}), 0), min(CASE WHEN {_IN_FLIGHT} THEN i.sop_instance_uid END), "
            f"min(CASE WHEN {_UNDELIVERED} THEN i.sop_instance_uid END), coalesce(max(i.id), 0) "
            f"FROM instances i WHERE {where}",
            params,
        ).fetchone()
    return PurgePlan(selector, *row)


def purge(
    db: sqlite3.Connection, plan: PurgePlan, spool: Spool, *, force: bool = False
) -> Iterator[PurgeBatch]:
    """Remove the planned instances' rows (their deliveries cascade) and spool files, batch by batch.

    Refuses at once when any instance is in flight (a forwarder is reading its file), and, without
    `force`, when any is undelivered. Each batch is selected and checked again inside its own
    transaction, so an instance that a forwarder claimed since the plan is skipped, never removed under
    it. Batches are yielded as they commit.

    Order, for crash safety: inside the transaction each file is renamed to a tombstone
    (``.tmp.<name>.purged``) and the directory fsynced, then the rows are deleted and committed, then
    the tombstones unlinked. A crash before the commit leaves rows whose files are gone (startup
    recovery marks them missing: visible, and purged again), never a file without a row (which recovery
    would index again and re-send); a crash after it leaves tombstones, which recovery deletes.

    Raises:
        AdminError: refused (in flight, or undelivered without force), or a file could not be moved.
    """
    if plan.in_flight:
        raise AdminError(
            f"refusing: {plan.in_flight} of the {plan.instances} selected instances are being sent right "
            f"now (in_flight), e.g. {plan.in_flight_example}; try again in a moment"
        )
    if plan.undelivered and not force:
        raise AdminError(
            f"refusing: {plan.undelivered} of the {plan.instances} selected instances are not delivered "
            f"everywhere (pending or failed), e.g. {plan.undelivered_example}; add --force to purge them "
            "anyway"
        )
    return _purge_batches(db, plan, spool, force=force)


def _purge_batches(
    db: sqlite3.Connection, plan: PurgePlan, spool: Spool, *, force: bool
) -> Iterator[PurgeBatch]:
    where, params = plan.selector.where()
    select = (
        f"SELECT i.id, i.sop_instance_uid, i.file_name, i.size_bytes, {_IN_FLIGHT}, {_UNDELIVERED} "  # noqa: S608 - fixed fragments
        f"FROM instances i WHERE ({where}) AND i.id > ? AND i.id <= ? ORDER BY i.id LIMIT ?"
    )
    last_id = 0
    while True:
        buried: list[tuple[Path, Path]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = [_Candidate(*row) for row in db.execute(select, (*params, last_id, plan.last_id, CHUNK))]
            eligible = [c for c in rows if not c.in_flight and (force or not c.undelivered)]
            buried = _bury(spool, eligible)
            if eligible:  # deliveries go with them (ON DELETE CASCADE, foreign_keys on)
                ids = [c.id for c in eligible]
                db.execute(f"DELETE FROM instances WHERE id IN ({_placeholders(ids)})", ids)  # noqa: S608 - placeholders only
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            _unbury(buried)
            raise
        if not rows:
            return
        for _, tombstone in buried:
            tombstone.unlink(missing_ok=True)
        last_id = rows[-1].id
        removed = {c.id for c in eligible}
        yield PurgeBatch(
            purged=tuple(c.sop_instance_uid for c in eligible),
            files_removed=len(buried),
            bytes_removed=sum(c.size_bytes for c in eligible),
            skipped=tuple(c.sop_instance_uid for c in rows if c.id not in removed),
        )


def _bury(spool: Spool, candidates: Sequence[_Candidate]) -> list[tuple[Path, Path]]:
    """Rename each existing file to its tombstone and make the renames durable; undo all on failure."""
    buried: list[tuple[Path, Path]] = []
    try:
        for candidate in candidates:
            name = candidate.file_name
            if not name or "/" in name or name in {".", ".."}:  # the index names files; never a path
                continue
            source = spool.path_for(name)
            tombstone = spool.path_for(f"{TEMP_PREFIX}{name}{TOMBSTONE_SUFFIX}")
            try:
                source.rename(tombstone)
            except FileNotFoundError:  # removed by retention, or missing: only the row goes
                continue
            buried.append((source, tombstone))
        if buried:
            spool.sync_directory()
    except OSError as exc:
        _unbury(buried)
        raise AdminError(f"cannot remove spool files in {spool.directory}: {exc.strerror or exc}") from exc
    return buried


def _unbury(buried: Sequence[tuple[Path, Path]]) -> None:
    for source, tombstone in buried:
        with contextlib.suppress(OSError):
            tombstone.rename(source)
