"""The PACS simulator's state, free of sockets: the fault knobs in, the ledger of what happened out.

`PacsFaults` and `FaultPlan` decide which status a C-STORE gets (precedence, the transient tally, the
seeded fraction); `Ledger` keeps the sessions, counts and stored instances that the simulator reports.
Both are shared by every association thread and lock their own state; the pynetdicom glue stays in
`simulators.pacs`.

May import: stdlib only.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700
INVALID_UID: Final = 0xC000  # "cannot understand": the SOP Instance UID cannot name a file
_UID_GRAMMAR: Final = re.compile(r"[0-9]+(\.[0-9]+)*")  # the gateway's spool accepts the same
_MAX_UID_LENGTH: Final = 64
_FRACTION_SCALE: Final = 2**64


@dataclass(frozen=True)
class PacsFaults:
    """How the simulated PACS misbehaves; the default is a well-behaved archive.

    C-STORE statuses are decided in this order: an invalid UID (0xC000), `status_for_uids`,
    `transient_for_uids`, `status_fraction`, else success. Success and warning statuses store the object;
    any other status stores nothing. `abort_after` and `stall_after` count instances stored on one
    association, and apply to every association.

    Attributes:
        reject_associations: answer every A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (rejected-permanent,
            calling AE title not recognized).
        transfer_syntaxes: accept only these transfer syntax UIDs for storage (None: all pynetdicom
            knows). Verification always accepts the uncompressed ones.
        status_for_uids: always answer this status for these SOP Instance UIDs.
        transient_for_uids: answer 0xA700 to the first N C-STOREs of these UIDs, then store normally.
            The tally starts afresh with every `set_faults()`.
        status_fraction: answer `fraction_status` for this fraction of SOP Instance UIDs, chosen by
            hashing the UID with `seed`: the same UIDs every time for the same seed.
        fraction_status: the status for the chosen fraction.
        seed: see `status_fraction`.
        delay: seconds to wait before answering each C-STORE.
        abort_after: send A-ABORT right after the response that completes this many stored instances.
        stall_after: after this many stored instances, stop reading from the connection (the next
            request is never answered) until the simulator stops.
    """

    reject_associations: bool = False
    transfer_syntaxes: tuple[str, ...] | None = None
    status_for_uids: Mapping[str, int] = field(default_factory=dict)
    transient_for_uids: Mapping[str, int] = field(default_factory=dict)
    status_fraction: float = 0.0
    fraction_status: int = OUT_OF_RESOURCES
    seed: int = 0
    delay: float = 0.0
    abort_after: int | None = None
    stall_after: int | None = None

    def __post_init__(self) -> None:
        statuses = [*self.status_for_uids.values(), self.fraction_status]
        if not all(0 <= status <= 0xFFFF for status in statuses):
            raise ValueError("statuses are 16-bit values (0x0000-0xFFFF)")
        if any(count < 0 for count in self.transient_for_uids.values()):
            raise ValueError("transient_for_uids counts must not be negative")
        if not 0.0 <= self.status_fraction <= 1.0:
            raise ValueError("status_fraction must be between 0 and 1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if self.abort_after is not None and self.abort_after < 1:
            raise ValueError("abort_after must be at least 1")
        if self.stall_after is not None and self.stall_after < 0:
            raise ValueError("stall_after must not be negative")
        if self.transfer_syntaxes is not None:
            if not self.transfer_syntaxes:
                raise ValueError("transfer_syntaxes must name at least one UID (None: all)")
            bad = [uid for uid in self.transfer_syntaxes if not is_valid_uid(uid)]
            if bad:
                raise ValueError(f"not a transfer syntax UID: {', '.join(bad)}")


def is_valid_uid(uid: str) -> bool:
    """True when `uid` is digits and dots in the UID grammar, at most 64 characters: safe as a file name."""
    return 0 < len(uid) <= _MAX_UID_LENGTH and _UID_GRAMMAR.fullmatch(uid) is not None


def is_kept(status: int) -> bool:
    """True for statuses that tell the sender its object was stored: success and the warnings."""
    return status in (SUCCESS, 0x0001) or 0xB000 <= status <= 0xBFFF


def in_fraction(uid: str, fraction: float, seed: int) -> bool:
    """True when `uid` falls in the `fraction` of UIDs that `seed` selects; repeatable across runs."""
    digest = hashlib.sha256(f"{seed}/{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _FRACTION_SCALE


class FaultPlan:
    """The faults in force plus the transient tally, shared by every association thread."""

    def __init__(self, faults: PacsFaults) -> None:
        self._lock = threading.Lock()
        self._faults = faults
        self._transient_answers: collections.Counter[str] = collections.Counter()

    @property
    def faults(self) -> PacsFaults:
        """The faults in force now."""
        return self._faults

    def replace(self, faults: PacsFaults) -> None:
        """Put `faults` in force for requests from now on; the transient tally starts afresh."""
        with self._lock:
            self._faults = faults
            self._transient_answers.clear()

    def status_for(self, uid: str) -> int:
        """Return the status the C-STORE of a (valid) `uid` gets; a transient answer is tallied."""
        with self._lock:
            faults = self._faults
            if uid in faults.status_for_uids:
                return faults.status_for_uids[uid]
            if self._transient_answers[uid] < faults.transient_for_uids.get(uid, 0):
                self._transient_answers[uid] += 1
                return OUT_OF_RESOURCES
        if faults.status_fraction > 0 and in_fraction(uid, faults.status_fraction, faults.seed):
            return faults.fraction_status
        return SUCCESS


@dataclass(frozen=True)
class ReceivedInstance:
    """One object the simulator stored (answered with success or a warning)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    calling_ae: str
    association: int  # the association's number, counting every A-ASSOCIATE-RQ from 1
    received_at: float  # time.time() when stored
    status: int


@dataclass(frozen=True)
class PacsStats:
    """Counts since start(): what the forwarder's tests assert on and the CLI prints."""

    associations_requested: int = 0  # every A-ASSOCIATE-RQ, rejected ones included
    associations_accepted: int = 0
    associations_rejected: int = 0
    associations_aborted_by_us: int = 0
    echoes: int = 0
    stores_by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    instances_stored: int = 0  # distinct SOP Instance UIDs on disk
    duplicates: int = 0  # stores of a UID that was stored before

    def summary(self) -> str:
        """Return the multi-line report the CLI prints when it stops."""
        statuses = ", ".join(f"0x{s:04X}={n}" for s, n in sorted(self.stores_by_status.items())) or "none"
        return "\n".join(
            [
                (
                    f"associations: {self.associations_requested} requested, {self.associations_accepted} "
                    f"accepted, {self.associations_rejected} rejected, "
                    f"{self.associations_aborted_by_us} aborted by us"
                ),
                f"echoes: {self.echoes}",
                f"stores by status: {statuses}",
                f"instances stored: {self.instances_stored}; duplicates: {self.duplicates}",
            ]
        )


@dataclass
class Session:
    """One association as the fault knobs see it; the ledger changes it under its lock."""

    number: int
    calling_ae: str
    stored: int = 0
    abort_pending: bool = False  # the response completing `abort_after` is on its way out
    aborted_by_us: bool = False


@dataclass
class _Counts:
    """The mutable side of PacsStats."""

    associations_requested: int = 0
    associations_accepted: int = 0
    associations_rejected: int = 0
    associations_aborted_by_us: int = 0
    echoes: int = 0
    duplicates: int = 0
    stores_by_status: collections.Counter[int] = field(default_factory=collections.Counter)


class Ledger:
    """Sessions, counts and stored instances, kept per association object (held weakly)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored_changed = threading.Condition(self._lock)  # wakes wait_for()
        self._counts = _Counts()
        self._received: list[ReceivedInstance] = []
        self._stored_uids: set[str] = set()
        self._sessions: weakref.WeakKeyDictionary[object, Session] = weakref.WeakKeyDictionary()

    def open_session(self, association: object, calling_ae: str, *, rejected: bool) -> Session:
        """Count an A-ASSOCIATE-RQ (and our rejection of it) and number its association."""
        with self._lock:
            self._counts.associations_requested += 1
            if rejected:
                self._counts.associations_rejected += 1
            session = Session(self._counts.associations_requested, calling_ae)
            self._sessions[association] = session
            return session

    def session(self, association: object) -> Session | None:
        """The association's session, if its A-ASSOCIATE-RQ reached us."""
        with self._lock:
            return self._sessions.get(association)

    def count_accepted(self) -> None:
        """Count an accepted association."""
        with self._lock:
            self._counts.associations_accepted += 1

    def count_rejected(self) -> None:
        """Count a rejection not made through `open_session(rejected=True)`."""
        with self._lock:
            self._counts.associations_rejected += 1

    def count_echo(self) -> None:
        """Count a C-ECHO."""
        with self._lock:
            self._counts.echoes += 1

    def record_store(
        self,
        association: object,
        uid: str,
        status: int,
        *,
        path: Path | None = None,
        sop_class_uid: str = "",
        transfer_syntax_uid: str = "",
        abort_after: int | None = None,
    ) -> Session:
        """Count a C-STORE's answer; with `path` (stored), list it and arm the abort at `abort_after`."""
        with self._lock:
            self._counts.stores_by_status[status] += 1
            session = self._sessions.setdefault(association, Session(0, "?"))
            if path is None:
                return session
            if uid in self._stored_uids:
                self._counts.duplicates += 1
            self._stored_uids.add(uid)
            self._received.append(
                ReceivedInstance(
                    sop_instance_uid=uid,
                    sop_class_uid=sop_class_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    path=path,
                    calling_ae=session.calling_ae,
                    association=session.number,
                    received_at=time.time(),
                    status=status,
                )
            )
            session.stored += 1
            session.abort_pending = abort_after is not None and session.stored >= abort_after
            self._stored_changed.notify_all()
            return session

    def take_pending_abort(self, association: object) -> Session | None:
        """If an abort is armed for this association: disarm it, count it, return the session."""
        with self._lock:
            session = self._sessions.get(association)
            if session is None or not session.abort_pending:
                return None
            session.abort_pending = False
            session.aborted_by_us = True
            self._counts.associations_aborted_by_us += 1
            return session

    def received(self) -> list[ReceivedInstance]:
        """Every stored C-STORE, in the order stored."""
        with self._lock:
            return list(self._received)

    def stored_uids(self) -> set[str]:
        """The SOP Instance UIDs stored so far."""
        with self._lock:
            return set(self._stored_uids)

    def stats(self) -> PacsStats:
        """The counts so far."""
        with self._lock:
            counts = self._counts
            return PacsStats(
                associations_requested=counts.associations_requested,
                associations_accepted=counts.associations_accepted,
                associations_rejected=counts.associations_rejected,
                associations_aborted_by_us=counts.associations_aborted_by_us,
                echoes=counts.echoes,
                stores_by_status=collections.Counter(counts.stores_by_status),
                instances_stored=len(self._stored_uids),
                duplicates=counts.duplicates,
            )

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until `count` distinct UIDs are stored; False if `timeout` seconds pass first."""
        with self._stored_changed:
            return self._stored_changed.wait_for(lambda: len(self._stored_uids) >= count, timeout)
