"""Helpers for the chaos suites (tests/test_chaos.py): run length, summaries, process and spool probes.

`make test` runs the short versions; `make chaos` sets CHAOS_LONG=1 for the long ones. Every suite
ends with `report()`: a summary on stdout and, when CHAOS_RESULTS names a file, one JSON line appended
to it (docs/reliability.md is filled from those lines). CHAOS_SEED replays a run's random choices.

Run as a module, this file is also the power-loss model's victim: `python -m tests.chaos_support
index-writer DB` records rows through `gateway.index.Index` from several tasks and prints each UID
only after `record()` has returned, until it is killed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from simulators.scanner import ScanOptions, ScanResult, run_scanner

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from simulators.datasets import StudySpec

T = TypeVar("T")

LONG = os.environ.get("CHAOS_LONG", "") not in {"", "0"}
MODE = "long" if LONG else "short"
SEED = int(os.environ.get("CHAOS_SEED", "20260507"))
_TCP_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "06": "TIME_WAIT", "0A": "LISTEN"}


def pick(short: T, long: T) -> T:
    """The short run's value under `make test`, the long run's under `make chaos`."""
    return long if LONG else short


def report(suite: str, figures: dict[str, object], notes: Iterable[str] = ()) -> None:
    """Print what a suite tried and what held; append it as one JSON line to $CHAOS_RESULTS if set."""
    record = {
        "suite": suite,
        "mode": MODE,
        "seed": SEED,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        **figures,
    }
    lines = [f"=== chaos suite {suite} ({MODE} run, seed {SEED}) ==="]
    lines += [f"  {key}: {value}" for key, value in figures.items()]
    lines += [f"  - {note}" for note in notes]
    print("\n".join(lines), flush=True)  # noqa: T201 - the summary is the suite's output
    target = os.environ.get("CHAOS_RESULTS")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, sort_keys=False, default=str) + "\n")


def poll_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll another process's state until `predicate` holds; False (no failure) when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            values[key] = int(rest.split()[0])
    return values


def tcp_states(port: int) -> dict[str, int]:
    """IPv4 TCP sockets whose local port is `port`, counted by state (from /proc/net/tcp)."""
    counts: dict[str, int] = {}
    lines = Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        if int(local.rsplit(":", 1)[1], 16) == port:
            name = _TCP_STATES.get(state, state)
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_unique_uids(spec: StudySpec) -> None:
    """Guard against the synthetic factory giving two objects one SOP Instance UID.

    simulators/datasets.py `_uid` joins its entropy sources without a separator, so (series 1, image 11)
    and (series 11, image 1) collide: keep `studies` and `series` single-digit.
    """
    if spec.studies > 9 or spec.series > 9:
        raise ValueError("studies and series must stay below 10: the simulator's UIDs would collide")


@dataclass
class ScanPlan:
    """The objects a suite sends, as Part 10 files (so any subset can be sent again), and their bytes."""

    files: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file, in send order
    expected: dict[str, bytes] = field(default_factory=dict)  # UID -> encoded data set as sent

    @classmethod
    def build(cls, spec: StudySpec, directory: Path) -> ScanPlan:
        """Write every object of `spec` under `directory`; check each file carries the wire bytes."""
        from simulators.datasets import build_dataset, encode_dataset, iter_refs  # noqa: PLC0415
        from tests.conftest import dataset_bytes  # noqa: PLC0415

        assert_unique_uids(spec)
        directory.mkdir(parents=True, exist_ok=True)
        plan = cls()
        for ref in iter_refs(spec):
            ds = build_dataset(spec, ref)
            uid = str(ds.SOPInstanceUID)
            path = directory / f"{uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            plan.files[uid] = path
            plan.expected[uid] = encode_dataset(ds)
            if dataset_bytes(path) != plan.expected[uid]:
                raise AssertionError(f"{path.name}: the file's data set differs from the wire encoding")
        return plan

    def paths(self, uids: Iterable[str]) -> tuple[Path, ...]:
        """The files of `uids`, in send order."""
        wanted = set(uids)
        return tuple(path for uid, path in self.files.items() if uid in wanted)


@dataclass(frozen=True)
class SpoolAudit:
    """What the spool holds against the index, read while the gateway is stopped or idle."""

    dcm_files: int
    temp_files: list[str]
    orphans: list[str]  # .dcm files without a row that says `stored`
    hash_mismatches: list[str]  # .dcm files whose SHA-256 differs from their row's
    deleted_but_present: list[str]  # rows marked deleted by retention whose file is still there

    @property
    def clean(self) -> bool:
        """No temporary file, no orphan, no corrupt file."""
        return not (self.temp_files or self.orphans or self.hash_mismatches)


def audit_spool(spool: Path, index: Path) -> SpoolAudit:
    """Compare the spool directory with the index rows (a read-only connection, as the CLI makes)."""
    names = sorted(p.name for p in spool.iterdir()) if spool.exists() else []
    rows: dict[str, tuple[str, str]] = {}
    if index.exists():
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            for uid, state, sha in db.execute("SELECT sop_instance_uid, file_state, sha256 FROM instances"):
                rows[uid] = (state, sha)
        finally:
            db.close()
    dcm = [n for n in names if n.endswith(".dcm")]
    orphans, mismatches, deleted_present = [], [], []
    for name in dcm:
        uid = name.removesuffix(".dcm")
        state, sha = rows.get(uid, ("", ""))
        if state == "deleted":
            deleted_present.append(uid)
        elif state != "stored":
            orphans.append(uid)
        elif hashlib.sha256((spool / name).read_bytes()).hexdigest() != sha:
            mismatches.append(uid)
    return SpoolAudit(
        dcm_files=len(dcm),
        temp_files=[n for n in names if n.startswith(".tmp.")],
        orphans=orphans,
        hash_mismatches=mismatches,
        deleted_but_present=deleted_present,
    )


def integrity_check(database: Path) -> str:
    """`PRAGMA integrity_check` on a database file (a writable connection: it replays a crashed WAL)."""
    db = sqlite3.connect(database)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


_RECOVERY = re.compile(
    r"Recovery: (\d+) temp files removed, (\d+) files re-indexed, (\d+) unreadable, "
    r"(\d+) rows missing their file, (\d+) claims released"
)
RECOVERY_KEYS = (
    "temp_files_removed",
    "files_reindexed",
    "unreadable",
    "rows_missing_file",
    "claims_released",
)


class Sender:
    """`run_scanner` in a thread, so the test can kill the gateway under it; `join()` gives its result."""

    def __init__(self, options: ScanOptions) -> None:
        self.options = options
        self.stop = threading.Event()
        self._result: ScanResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-scanner")

    def _run(self) -> None:
        try:
            self._result = run_scanner(self.options, self.stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by join()
            self._error = exc

    def start(self) -> Sender:
        """Start sending."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True until the scanner has sent everything (or stopped)."""
        return self._thread.is_alive()

    def join(self, timeout: float = 120.0) -> ScanResult:
        """Wait for the scanner to end and return its result (re-raising what it raised)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop.set()
            raise AssertionError(f"the scanner did not end within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def recovery_report(output: str) -> dict[str, int]:
    """The counts of the gateway's startup recovery line in its output (empty if not found)."""
    match = _RECOVERY.search(output)
    return dict(zip(RECOVERY_KEYS, map(int, match.groups()), strict=True)) if match else {}


# ---------------------------------------------------------------- the power-loss model's victim

WRITERS = 8  # concurrent record() callers: group commits are always under way


async def _index_writer(database: Path) -> None:
    from gateway.index import Index  # noqa: PLC0415 - only the child process needs the gateway
    from gateway.model import InstanceHeader, StoredInstance  # noqa: PLC0415

    run_id = time.time_ns()
    numbers = itertools.count(1)
    async with Index(database, ["pacs"], before_commit=lambda: None) as index:
        synchronous = await index.scalar("PRAGMA synchronous")
        journal = await index.scalar("PRAGMA journal_mode")
        sys.stdout.write(f"settings synchronous={synchronous} journal_mode={journal}\n")
        sys.stdout.flush()
        committing = asyncio.create_task(index.run(), name="index-commit")

        async def record_forever() -> None:
            while True:
                uid = f"2.25.{run_id}.{next(numbers)}"
                header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", uid, "2.25.1", "2.25.2", "PID", "CT")
                await index.record(
                    StoredInstance(header, "1.2.840.10008.1.2.1", 1, "0" * 64, f"{uid}.dcm", "AE", "", 0.0)
                )
                sys.stdout.write(uid + "\n")  # only now is the row acknowledged
                sys.stdout.flush()

        await asyncio.gather(committing, *(record_forever() for _ in range(WRITERS)))


def main(argv: list[str]) -> int:
    """`index-writer DB`: record rows until killed."""
    if len(argv) != 2 or argv[0] != "index-writer":
        sys.stderr.write("usage: python -m tests.chaos_support index-writer DB\n")
        return 2
    asyncio.run(_index_writer(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
