"""Chaos suites: the gateway killed mid-stream, peers that vanish or stall, a spool that fills up.

Each suite runs real processes (the gateway, Mosquitto, DCMTK's echoscu) against the simulators over
real sockets and ends with a summary of what it tried and what held (see tests/chaos_support.py).
`make test` runs the short versions; `make chaos` (CHAOS_LONG=1) the long ones; docs/reliability.md
holds the figures of the last long run.
"""

# ruff: noqa: F811 - the broker fixtures are imported from test_telemetry and requested by parameter name

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pytest

from simulators.datasets import StudySpec
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator
from simulators.scanner import ScanOptions, run_scanner
from simulators.serialdev import UpsSimulator
from tests.chaos_support import (
    SEED,
    ScanPlan,
    Sender,
    assert_unique_uids,
    audit_spool,
    integrity_check,
    memory_kib,
    pick,
    poll_until,
    recovery_report,
    report,
    tcp_states,
)
from tests.conftest import (
    DCMTK_ENV,
    GATEWAY_AE,
    REPO,
    SCANNER_AE,
    dataset_bytes,
    delivery_states,
    destination_section,
    require_tools,
    wait_until,
    write_config,
)
from tests.test_telemetry import broker, brokers  # noqa: F401 - fixtures used by name

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from simulators.harness import ManagedProcess
    from tests.conftest import GatewaySetup
    from tests.test_telemetry import Broker

PACS_AE = "CENTRAL_PACS"
KIB_PER_MIB = 1024


def scan(setup: GatewaySetup, **options: object) -> ScanOptions:
    base = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, timeout=30.0)
    return replace(base, **options)  # type: ignore[arg-type]


def pacs_gateway(
    directory: Path, pacs: PacsSimulator, *, extra: str = "", sections: str = "", **config: object
) -> GatewaySetup:
    """A gateway forwarding to `pacs` over plain TCP, delivered files removed at once."""
    section = destination_section("pacs", pacs.port, called_ae=PACS_AE, extra=extra)
    return write_config(
        directory,
        sections=f'{section}\n[retention]\nkeep_forwarded = "0s"\n{sections}',
        **config,  # type: ignore[arg-type]
    )


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[PacsSimulator]:
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE) as simulator:
        yield simulator


def count(setup: GatewaySetup, sql: str) -> int:
    return int(setup.rows(sql)[0][0])


def assert_at_pacs_byte_exact(pacs: PacsSimulator, plan: ScanPlan, uids: set[str]) -> None:
    """Every UID in `uids` is stored at the archive with exactly the bytes the scanner sent."""
    stored = {item.sop_instance_uid: item.path for item in pacs.received()}
    lost = sorted(uids - stored.keys())
    assert not lost, f"{len(lost)} acknowledged instances never reached the archive: {lost[:5]}"
    differ = [uid for uid in sorted(uids) if dataset_bytes(stored[uid]) != plan.expected[uid]]
    assert not differ, f"{len(differ)} instances differ at the archive from what was sent: {differ[:5]}"


# ================================================================ crash and restart

TARGETS = ("ingest", "index write", "forwarding", "retention", "anytime")


@dataclass
class ChaosRun:
    """The chaos loop's state across gateway lifetimes: what was sent, acknowledged, seen at each kill."""

    setup: GatewaySetup
    pacs: PacsSimulator
    plan: ScanPlan
    directory: Path
    rng: random.Random
    acked: set[str] = field(default_factory=set)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    no_response: int = 0
    phases: collections.Counter[str] = field(default_factory=collections.Counter)
    recovered: collections.Counter[str] = field(default_factory=collections.Counter)
    kill_log: list[str] = field(default_factory=list)
    max_rss: int = 0

    def round(self, number: int, sendable: int, target: str | None) -> None:
        """One gateway lifetime: start (recovery runs), stream, then SIGKILL at `target` (None: stop)."""
        to_send = [uid for uid in list(self.plan.files)[:sendable] if uid not in self.acked]
        self.pacs.set_faults(PacsFaults(delay=self.rng.choice([0.0, 0.0, 0.002, 0.01])))
        ack_file = self.directory / f"acks-{number:02d}.txt"
        options = scan(
            self.setup,
            files=self.plan.paths(to_send),
            associations=3,
            rate=self.rng.uniform(40.0, 90.0),
            ack_file=ack_file,
        )
        gateway = self.setup.process().start()
        sender = Sender(options)
        try:
            recovery = recovery_report(gateway.output())
            assert recovery, f"no recovery line at startup:\n{gateway.output()}"
            assert recovery["rows_missing_file"] == 0, f"round {number}: indexed files lost: {recovery}"
            assert recovery["unreadable"] == 0, f"round {number}: unreadable spool files: {recovery}"
            self.recovered.update(recovery)
            sender.start()
            if target is None:
                self._finish(gateway, sender)
            else:
                self._kill(number, target, gateway, sender, ack_file)
        finally:
            sender.stop.set()
            gateway.kill()
        result = sender.join()
        self.acked |= set(_lines(ack_file))
        self.statuses.update(result.statuses)
        self.no_response += result.no_response

    def _finish(self, gateway: ManagedProcess, sender: Sender) -> None:
        sender.join()
        total = len(self.plan.files)
        # Polled, not failed on: the checks after the summary say what is wrong (a loss first).
        poll_until(lambda: len(self.pacs.stored_uids()) >= total, 120, interval=0.05)
        poll_until(lambda: delivery_states(self.setup) == {"done": total}, 60, interval=0.05)
        poll_until(lambda: not list(self.setup.spool.glob("*.dcm")), 30, interval=0.05)
        self.max_rss = max(self.max_rss, memory_kib(gateway.pid or 0)["VmHWM"])
        assert gateway.stop(grace=30) == 0, gateway.output()

    def _kill(
        self, number: int, target: str, gateway: ManagedProcess, sender: Sender, ack_file: Path
    ) -> None:
        # Every scanner association connected and the first image acknowledged before aiming: receive is
        # under way, and no scanner thread connects to a dead port (pynetdicom then leaks its socket).
        poll_until(
            lambda: (
                tcp_states(self.setup.port).get("ESTABLISHED", 0) >= sender.options.associations
                and len(_lines(ack_file)) >= 1
            ),
            20,
        )
        reached = self._aim(target, sender, ack_file)
        if target != "index write":
            time.sleep(self.rng.uniform(0.0, 0.05))  # the random moment itself is the input, not a wait
        scanner_busy = sender.running
        self.max_rss = max(self.max_rss, memory_kib(gateway.pid or 0)["VmHWM"])
        os.kill(gateway.pid or 0, signal.SIGKILL)
        gateway.wait(10)
        sender.stop.set()
        under_way, counts = _phases_at_kill(self.setup, self.pacs, scanner_busy=scanner_busy)
        self.phases.update(under_way)
        self.kill_log.append(
            f"kill {number + 1}: aimed at {target} ({'reached' if reached else 'timed out'}), "
            f"{len(_lines(ack_file))} acked this round; under way: {', '.join(under_way) or 'idle'}; "
            f"{counts}"
        )

    def _aim(self, target: str, sender: Sender, ack_file: Path) -> bool:
        """Wait for the moment a kill aimed at `target` should land; False if it did not come in time."""
        k = self.rng.randint(5, 60)
        if target == "ingest":
            return poll_until(lambda: len(_lines(ack_file)) >= k or not sender.running, 20)
        if target == "index write":  # the moment the WAL is written: a group commit, claim or settle
            poll_until(lambda: len(_lines(ack_file)) >= k // 3 or not sender.running, 20)
            wal = self.setup.index.with_name(self.setup.index.name + "-wal")
            before = _mtime_ns(wal)
            return poll_until(lambda: _mtime_ns(wal) != before, 10, interval=0.001)
        if target == "forwarding":
            base = len(self.pacs.received())
            return poll_until(lambda: len(self.pacs.received()) >= base + k, 20)
        if target == "retention":
            sql = "SELECT count(*) FROM instances WHERE file_state = 'deleted'"
            base = count(self.setup, sql)
            return poll_until(lambda: count(self.setup, sql) >= base + k, 20)
        time.sleep(self.rng.uniform(0.2, 3.0))  # "anytime": a random moment is the point
        return True


def test_chaos_sigkill_loop_loses_no_acknowledged_image(tmp_path: Path, pacs: PacsSimulator) -> None:
    """SIGKILL the gateway at random moments while a scanner streams, forwarding and retention run.

    Each gateway lifetime is one round: the scanner sends a fresh chunk plus everything not yet
    acknowledged, at a random rate over 3 associations; the kill is aimed at a phase (after k
    acknowledgements, the instant the index's WAL is written, after k more stores at the archive,
    after k more retention deletions, or at a random time) plus a random delay. What was under way is
    read from the spool and the index right after the kill. A last round sends the rest and stops the
    gateway cleanly.
    """
    kills, chunk = pick(5, 30), pick(90, 120)
    batch_size, max_parallel = 25, 2
    spec = StudySpec(
        modality="CT", series=3, images_per_series=chunk * (kills + 1) // 3, rows=32, columns=32, seed=SEED
    )
    setup = pacs_gateway(tmp_path, pacs, extra=f"batch_size = {batch_size}\nmax_parallel = {max_parallel}")
    rng = random.Random(SEED)  # noqa: S311 - seeded chaos (CHAOS_SEED replays it), not cryptography
    run = ChaosRun(setup, pacs, ScanPlan.build(spec, tmp_path / "scanner"), tmp_path, rng)
    total = len(run.plan.files)
    for number in range(kills):
        run.round(number, (number + 1) * chunk, TARGETS[number % len(TARGETS)])
    run.round(kills, total, None)

    states = delivery_states(setup)
    audit = audit_spool(setup.spool, setup.index)
    duplicates = pacs.stats().duplicates
    report(
        "crash-restart",
        {
            "kills": kills,
            "images_planned": total,
            "images_acknowledged": len(run.acked),
            "images_lost": len(run.acked - pacs.stored_uids()),
            "duplicates_at_pacs": duplicates,
            "phases_under_way_at_kills": dict(run.phases),
            "recovery_totals": {k: v for k, v in run.recovered.items() if v},
            "requests_cut_by_kills": run.no_response,
            "max_rss_kib": run.max_rss,
            "final_delivery_states": states,
        },
        run.kill_log,
    )
    assert_at_pacs_byte_exact(pacs, run.plan, run.acked)
    assert set(run.statuses) == {0x0000}, f"failure statuses during the chaos loop: {run.statuses}"
    assert run.acked == set(run.plan.files), f"{total - len(run.acked)} instances never acknowledged"
    assert states == {"done": total}, states
    assert audit.clean, audit
    assert audit.dcm_files == 0, f"retention left delivered files behind: {audit}"
    assert count(setup, "SELECT count(*) FROM instances") == total
    # At-least-once: a kill can re-send at most the batches then in flight.
    assert duplicates <= kills * batch_size * max_parallel, duplicates
    assert integrity_check(setup.index) == "ok"


def test_crash_between_retention_mark_and_unlink_is_recovered(tmp_path: Path, pacs: PacsSimulator) -> None:
    """The window the random kills rarely hit: retention marked rows deleted, then died before unlinking.

    The state is made exactly (a clean gateway keeps its delivered files; their rows are then marked
    deleted as `mark_deleted` does); the restart must re-index the files, send nothing again, and let
    retention remove them.
    """
    spec = StudySpec(modality="CT", images_per_series=5, rows=32, columns=32, seed=SEED + 20)
    section = destination_section("pacs", pacs.port, called_ae=PACS_AE)
    keeping = write_config(tmp_path, sections=f'{section}\n[retention]\nkeep_forwarded = "1h"\n')
    with keeping.process():
        assert run_scanner(scan(keeping, study=spec)).statuses == {0x0000: 5}
        wait_until(lambda: delivery_states(keeping) == {"done": 5}, 30, "all delivered")
    db = sqlite3.connect(keeping.index)
    try:
        with db:
            db.execute("UPDATE instances SET file_state = 'deleted' WHERE delivered_at IS NOT NULL")
    finally:
        db.close()
    assert audit_spool(keeping.spool, keeping.index).deleted_but_present
    stores = len(pacs.received())
    setup = write_config(
        tmp_path, port=keeping.port, sections=f'{section}\n[retention]\nkeep_forwarded = "0s"\n'
    )
    with setup.process() as gateway:
        recovery = recovery_report(gateway.output())
        wait_until(lambda: not list(setup.spool.glob("*.dcm")), 30, "retention to remove the files")
    report(
        "retention-mark-unlink-window",
        {"files_reindexed": recovery.get("files_reindexed"), "sent_again": len(pacs.received()) - stores},
    )
    assert recovery["files_reindexed"] == 5, recovery
    assert len(pacs.received()) == stores, "delivered instances were sent again"
    assert delivery_states(setup) == {"done": 5}
    assert {row[0] for row in setup.rows("SELECT file_state FROM instances")} == {"deleted"}


def _phases_at_kill(setup: GatewaySetup, pacs: PacsSimulator, *, scanner_busy: bool) -> tuple[list[str], str]:
    """What the dead gateway was doing, read from its spool and index (consistent as of the kill)."""
    states = delivery_states(setup)
    audit = audit_spool(setup.spool, setup.index)
    due = count(
        setup, "SELECT count(*) FROM instances WHERE file_state = 'stored' AND delivered_at IS NOT NULL"
    )
    deleted = count(setup, "SELECT count(*) FROM instances WHERE file_state = 'deleted'")
    assert not audit.hash_mismatches, f"spool files differ from their index rows: {audit.hash_mismatches}"
    under_way = []
    if scanner_busy:
        under_way.append("receive")
    if audit.temp_files or audit.orphans:
        under_way.append("write/commit window open")  # a temp file, or a renamed file not yet indexed
    if states.get("in_flight"):
        under_way.append("forwarding")
    if due:
        under_way.append("retention due")
    if audit.deleted_but_present:
        under_way.append("retention mid-delete")  # row marked deleted, file not yet unlinked
    counts = (
        f"index {sum(states.values())} rows ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}; "
        f"{deleted} files deleted, {due} due), spool {len(audit.temp_files)} temp + "
        f"{len(audit.orphans)} not yet indexed, archive {len(pacs.received())} stores"
    )
    return under_way, counts


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").split() if path.exists() else []


def test_committed_index_rows_survive_sigkill_at_the_worst_moment(tmp_path: Path) -> None:
    """The power-loss model: a row is acknowledged once `Index.record()` returns, never lost after that.

    A child process records rows from 8 tasks (group commits always under way) and prints each UID
    only after its `record()` returned; it is SIGKILLed after a random number of rows. Every printed
    UID must be in the database, with its delivery row, and the database must pass integrity_check.
    The child also reports its PRAGMAs: WAL with synchronous=FULL (a process kill cannot tell FULL
    from NORMAL; only a power cut could, and the settings are what cover that).
    """
    rng = random.Random(SEED + 1)  # noqa: S311 - seeded chaos, not cryptography
    database = tmp_path / "index.sqlite"
    kills = pick(5, 40)
    acknowledged: set[str] = set()
    settings: set[str] = set()
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos_support", "index-writer", str(database)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        assert child.stdout is not None
        target = rng.randint(1, 2500)
        printed: list[str] = []
        try:
            with child.stdout:
                for line in child.stdout:
                    printed.append(line.strip())
                    if len(printed) > target:
                        child.send_signal(signal.SIGKILL)
                        break
                printed += child.stdout.read().split()  # what it printed before it died
        finally:
            if child.poll() is None:
                child.kill()
        assert child.wait(30) == -signal.SIGKILL, f"the writer ended by itself: {printed[-3:]}"
        settings.add(printed[0])
        acknowledged.update(printed[1:])
        assert integrity_check(database) == "ok"
        db = sqlite3.connect(database)
        try:
            rows = {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
            with_delivery = db.execute("SELECT count(DISTINCT instance_id) FROM deliveries").fetchone()[0]
        finally:
            db.close()
        lost = acknowledged - rows
        assert not lost, f"{len(lost)} rows acknowledged by record() are gone after SIGKILL"
        assert with_delivery == len(rows), "an instance row without its delivery row"
    report(
        "power-loss-model",
        {
            "kills": kills,
            "rows_acknowledged": len(acknowledged),
            "rows_in_database": len(rows),
            "rows_lost": 0,
            "integrity_check": "ok",
            "settings": sorted(settings),
        },
        ["rows in the database beyond those acknowledged were committed just before a kill, unprinted"],
    )
    assert settings == {"settings synchronous=2 journal_mode=wal"}, settings


# ================================================================ outages and slow peers


def test_pacs_outage_backlog_drains_and_memory_stays_flat(tmp_path: Path, pacs: PacsSimulator) -> None:
    """The archive is down while thousands of instances queue up; RSS at 1x and 10x; then it returns.

    Bound: RSS at 10x the backlog must stay under 1.25 x RSS at 1x + 5 MiB (~17 MiB of headroom at a
    ~50 MiB gateway). The 64x64 objects carry ~8.4 KB each, so a gateway holding the queued objects in
    memory breaks it (+23 MB at 3000, +75 MB at 10000), as does ~2 KB of state per queued row in the
    long run; SQLite's page cache and the allocator's arenas fit.
    """
    first, total = pick(300, 1000), pick(3000, 10000)
    pacs.stop_listening()
    setup = pacs_gateway(tmp_path, pacs)
    specs = [
        StudySpec(modality="CT", series=1, images_per_series=first, rows=64, columns=64, seed=SEED + 2),
        StudySpec(
            modality="CT",
            series=9,
            images_per_series=(total - first) // 9,
            rows=64,
            columns=64,
            seed=SEED + 3,
        ),
    ]
    rss: list[int] = []
    with setup.process() as gateway:
        pid = gateway.pid or 0
        rss_at_start = memory_kib(pid)["VmRSS"]
        started = time.monotonic()
        for spec in specs:
            assert_unique_uids(spec)
            result = run_scanner(scan(setup, study=spec, associations=4))
            assert result.statuses == {0x0000: spec.total_instances}, result.summary()
            queued = count(setup, "SELECT count(*) FROM instances")
            wait_until(lambda n=queued: delivery_states(setup) == {"pending": n}, 30, "the backlog at rest")
            rss.append(memory_kib(pid)["VmRSS"])
        ingest_seconds = time.monotonic() - started
        assert "is down" in gateway.output()
        pacs.start_listening()
        started = time.monotonic()
        assert pacs.wait_for(total, pick(180, 600)), f"only {len(pacs.stored_uids())} of {total} arrived"
        drain_seconds = time.monotonic() - started
        wait_until(lambda: delivery_states(setup) == {"done": total}, 60, "every delivery done")
        wait_until(lambda: not list(setup.spool.glob("*.dcm")), 60, "retention to empty the spool")
        peak = memory_kib(pid)["VmHWM"]
    indexed = {row[0] for row in setup.rows("SELECT sop_instance_uid FROM instances")}
    bound = 1.25 * rss[0] + 5 * KIB_PER_MIB
    report(
        "pacs-outage-backlog",
        {
            "backlog": total,
            "rss_kib_at_start": rss_at_start,
            "rss_kib_at_1x": rss[0],
            "rss_kib_at_10x": rss[1],
            "rss_bound_kib": int(bound),
            "max_rss_kib": peak,
            "ingest_per_s": round(total / ingest_seconds, 1),
            "drain_seconds": round(drain_seconds, 1),
            "drain_per_s": round(total / drain_seconds, 1),
            "duplicates_at_pacs": pacs.stats().duplicates,
        },
    )
    assert indexed == pacs.stored_uids()
    assert len(indexed) == total
    assert rss[1] <= bound, f"RSS grew with the backlog: {rss[0]} KiB at 1x, {rss[1]} KiB at 10x"


def _timeout_destination(batch_size: int) -> str:
    return f'batch_size = {batch_size}\nmax_parallel = 1\ndimse_timeout = "1s"\nnetwork_timeout = "2s"'


def _lost_associations(gateway: ManagedProcess) -> int:
    return gateway.output().count("Association to pacs lost")


def test_slow_pacs_times_out_aborts_retries_and_delivers(tmp_path: Path, pacs: PacsSimulator) -> None:
    """Each C-STORE answered after 2.5 s, past a 1 s DIMSE timeout: the forwarder gives up and aborts,
    the receiver keeps answering at full speed, and once the archive is quick again everything arrives."""
    pacs.set_faults(PacsFaults(delay=2.5))
    setup = pacs_gateway(tmp_path, pacs, extra=_timeout_destination(5))
    specs = [
        StudySpec(modality="CT", images_per_series=20, rows=32, columns=32, seed=SEED + 4),
        StudySpec(modality="MR", images_per_series=pick(30, 100), rows=32, columns=32, seed=SEED + 5),
    ]
    total = sum(spec.total_instances for spec in specs)
    timeouts_wanted = pick(3, 8)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, study=specs[0])).statuses == {0x0000: 20}
        wait_until(lambda: _lost_associations(gateway) >= timeouts_wanted, 60, "DIMSE timeouts")
        during = run_scanner(scan(setup, study=specs[1]))  # the receiver, while the archive crawls
        assert during.statuses == {0x0000: specs[1].total_instances}, during.summary()
        states_during = delivery_states(setup)
        timeouts = _lost_associations(gateway)
        assert "done" not in states_during, f"a store answered after its timeout counted: {states_during}"
        pacs.set_faults(PacsFaults())
        wait_until(lambda: delivery_states(setup) == {"done": total}, 90, "all delivered after the fault")
    retries = count(setup, "SELECT sum(attempts) - count(*) FROM deliveries")
    report(
        "slow-pacs",
        {
            "store_delay_s": 2.5,
            "dimse_timeout_s": 1,
            "timeouts_seen": timeouts,
            "receiver_during_fault": f"{during.stored}/{specs[1].total_instances} acked "
            f"at {during.stored / during.elapsed:.0f}/s",
            "failed_attempts_recorded": retries,
            "delivered": total,
            "duplicates_at_pacs": pacs.stats().duplicates,
        },
    )
    assert retries >= timeouts, "a timed-out store was not recorded as a failed attempt"
    assert pacs.stored_uids() == {row[0] for row in setup.rows("SELECT sop_instance_uid FROM instances")}
    # Tied to the archive's pace the receiver would manage 0.4/s; it must stay far from that.
    assert during.stored / during.elapsed > 10, "the receiver slowed down with the archive"


def test_stalled_pacs_times_out_aborts_retries_and_delivers(tmp_path: Path, pacs: PacsSimulator) -> None:
    """The archive stops reading after 3 stores per association: the forwarder's timeout aborts it (our
    side closes while the archive's socket still waits: CLOSE_WAIT), retries on a new association, and
    the receiver is unaffected; once the archive is healthy again everything arrives."""
    stall_after = 3
    pacs.set_faults(PacsFaults(stall_after=stall_after))
    setup = pacs_gateway(tmp_path, pacs, extra=_timeout_destination(10))
    specs = [
        StudySpec(modality="CT", images_per_series=pick(40, 100), rows=32, columns=32, seed=SEED + 6),
        StudySpec(modality="MR", images_per_series=pick(30, 100), rows=32, columns=32, seed=SEED + 7),
    ]
    total = sum(spec.total_instances for spec in specs)
    stalls_wanted = pick(2, 6)
    with setup.process() as gateway:
        first = run_scanner(scan(setup, study=specs[0]))
        assert first.stored == specs[0].total_instances, first.summary()
        wait_until(
            lambda: _lost_associations(gateway) >= stalls_wanted, 60, "timeouts on stalled associations"
        )
        closed_by_us = tcp_states(pacs.port).get("CLOSE_WAIT", 0)
        during = run_scanner(scan(setup, study=specs[1]))
        assert during.statuses == {0x0000: specs[1].total_instances}, during.summary()
        stalls = _lost_associations(gateway)
        delivered_during = len(pacs.stored_uids())
        pacs.set_faults(PacsFaults())
        wait_until(lambda: delivery_states(setup) == {"done": total}, 90, "all delivered after the stall")
    retries = count(setup, "SELECT sum(attempts) - count(*) FROM deliveries")
    report(
        "stalled-pacs",
        {
            "stall_after": stall_after,
            "dimse_timeout_s": 1,
            "stalled_associations_aborted": stalls,
            "archive_sockets_left_in_close_wait": closed_by_us,
            "delivered_during_fault": delivered_during,
            "failed_attempts_recorded": retries,
            "receiver_during_fault": f"{during.stored}/{specs[1].total_instances} acked "
            f"at {during.stored / during.elapsed:.0f}/s",
            "delivered": total,
            "duplicates_at_pacs": pacs.stats().duplicates,
        },
    )
    assert closed_by_us >= 1, "the forwarder left a stalled association open"
    assert delivered_during < total, "the stall held nothing back"
    assert retries >= stalls, "a timed-out store was not recorded as a failed attempt"
    assert during.stored / during.elapsed > 10, "the receiver slowed down with the stalled archive"
    assert len(pacs.stored_uids()) == total


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_broker_and_ups_outages_while_images_flow(
    broker: Broker, tmp_path: Path, pacs: PacsSimulator
) -> None:
    """Mosquitto stopped and the UPS silent (then both back) while a scanner streams and the forwarder
    drains: no failed store, no delay beyond the scanner's own pace, everything delivered."""
    metrics_port = free_port()
    outages = pick(1, 3)
    rate = 20.0
    spec = StudySpec(
        modality="CT", series=2, images_per_series=pick(120, 450), rows=32, columns=32, seed=SEED + 8
    )
    assert_unique_uids(spec)
    with UpsSimulator() as ups:
        sections = (
            f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
            'health_interval = "0.5s"\nkeepalive = "2s"\n'
            f'\n[[serial]]\nname = "ups"\nport = "{ups.path}"\nprotocol = "megatec-q1"\n'
            'poll_interval = "0.2s"\nread_timeout = "0.5s"\n'
        )
        setup = pacs_gateway(tmp_path, pacs, sections=sections, metrics_port=metrics_port)
        mqtt = "dicom_gateway_mqtt_connected"
        device = 'dicom_gateway_device_up{device="ups"}'

        def both(value: float) -> bool:
            return _metric(metrics_port, mqtt) == value and _metric(metrics_port, device) == value

        with setup.process():
            wait_until(lambda: both(1.0), 30, "MQTT connected and the UPS up")
            sender = Sender(scan(setup, study=spec, rate=rate, associations=2)).start()
            progress: list[str] = []
            slowest = float("inf")
            for number in range(outages):
                wait_until(lambda n=number: len(setup.rows()) >= 20 * (n + 1), 30, "ingest under way")
                broker.stop()
                ups.silence()
                wait_until(lambda: both(0.0), 30, "the gateway to see both gone")
                rows, stored, gone_at = len(setup.rows()), len(pacs.stored_uids()), time.monotonic()
                wait_until(lambda r=rows: len(setup.rows()) >= r + 20, 30, "ingest while both are gone")
                ingest_rate = (len(setup.rows()) - rows) / (time.monotonic() - gone_at)
                wait_until(lambda s=stored: len(pacs.stored_uids()) >= s + 20, 30, "forwarding while gone")
                progress.append(
                    f"outage {number + 1}: +{len(setup.rows()) - rows} ingested "
                    f"(at {ingest_rate:.0f}/s, the scanner's pace is {rate:.0f}/s), "
                    f"+{len(pacs.stored_uids()) - stored} forwarded while broker and UPS were gone"
                )
                slowest = min(slowest, ingest_rate)
                broker.start()
                ups.resume()
                wait_until(lambda: both(1.0), 60, "MQTT reconnected and the UPS back")
            result = sender.join()
            assert pacs.wait_for(spec.total_instances, 60)
            wait_until(lambda: delivery_states(setup) == {"done": spec.total_instances}, 30, "all delivered")
    paced = spec.total_instances / rate
    report(
        "mqtt-serial-outages",
        {
            "outages": outages,
            "images_acknowledged": len(result.acked),
            "failed_stores": result.failed,
            "scanner_seconds": round(result.elapsed, 1),
            "scanner_paced_seconds": round(paced, 1),
            "slowest_ingest_per_s_during_outage": round(slowest, 1),
            "delivered": len(pacs.stored_uids()),
        },
        progress,
    )
    assert result.statuses == {0x0000: spec.total_instances}, result.summary()
    assert result.elapsed <= paced + 5, "ingest slowed down during the outages"
    assert slowest >= rate / 2, "ingest slowed down while the broker and the UPS were gone"


# ================================================================ disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs as the gateway's state_dir (root only: `make test` runs as root)."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full suite mounts a tmpfs: run it as root (as `make test` does)")
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_full_spool_answers_a700_serves_echo_and_resumes_by_itself(
    tmp_path: Path, small_disk: Path, pacs: PacsSimulator
) -> None:
    """The spool (a 24 MB tmpfs, 4 MB reserve) fills while the archive is down; then it comes back."""
    require_tools("echoscu")
    cycles = pick(1, 3)
    setup = pacs_gateway(tmp_path, pacs, min_free_bytes="4MB")
    assert setup.state_dir == small_disk
    figures: list[str] = []
    acked_total: set[str] = set()
    plans: list[ScanPlan] = []
    with setup.process() as gateway:
        for cycle in range(cycles):
            pacs.stop_listening()
            spec = StudySpec(
                modality="CT", images_per_series=220, rows=256, columns=256, seed=SEED + 10 + cycle
            )
            plan = ScanPlan.build(spec, tmp_path / f"scanner-{cycle}")
            plans.append(plan)
            fill = run_scanner(scan(setup, files=plan.paths(plan.files), associations=2))
            refused = [uid for uid in plan.files if uid not in set(fill.acked)]
            free_at_reserve = _free_bytes(small_disk)
            assert fill.statuses[0x0000] > 0, fill.summary()
            assert set(fill.statuses) == {0x0000, 0xA700}, fill.summary()
            audit = audit_spool(setup.spool, setup.index)
            assert audit.clean, f"after the fill: {audit}"
            assert audit.dcm_files == len(fill.acked), audit  # the earlier cycles' files went
            echo = subprocess.run(
                ["echoscu", "-aet", "ECHOSCU", "-aec", GATEWAY_AE, "127.0.0.1", str(setup.port)],
                env=DCMTK_ENV,
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
            assert echo.returncode == 0, f"C-ECHO failed at the reserve: {echo.stdout}{echo.stderr}"
            pacs.start_listening()
            acked_total |= set(fill.acked)
            wait_until(lambda a=acked_total: pacs.stored_uids() >= a, 90, "the acknowledged ones delivered")
            wait_until(lambda: not list(setup.spool.glob("*.dcm")), 60, "retention to free the spool")
            resend = run_scanner(scan(setup, files=plan.paths(refused), associations=2))
            assert resend.statuses == {0x0000: len(refused)}, resend.summary()
            acked_total |= set(resend.acked)
            figures.append(
                f"cycle {cycle + 1}: {fill.statuses[0x0000]} acked, {fill.statuses[0xA700]} answered 0xA700 "
                f"with {free_at_reserve / 1e6:.1f} MB free; C-ECHO 0x0000; after retention the "
                f"{len(refused)} refused were sent again: all 0x0000"
            )
            wait_until(lambda a=acked_total: pacs.stored_uids() >= a, 90, "everything delivered")
        wait_until(lambda: not list(setup.spool.glob("*.dcm")), 60, "retention to empty the spool")
        log = gateway.output()
    audit = audit_spool(setup.spool, setup.index)
    everything = ScanPlan()
    for plan in plans:
        everything.expected.update(plan.expected)
    report(
        "disk-full",
        {
            "cycles": cycles,
            "tmpfs": "24 MiB",
            "min_free_bytes": "4MB",
            "images_acknowledged": len(acked_total),
            "images_lost": len(acked_total - pacs.stored_uids()),
            "temp_or_corrupt_files": len(audit.temp_files) + len(audit.hash_mismatches) + len(audit.orphans),
        },
        figures,
    )
    assert "0xA700" in log
    assert audit.clean, audit
    assert acked_total == set(everything.expected)
    assert_at_pacs_byte_exact(pacs, everything, acked_total)
