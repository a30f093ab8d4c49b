"""The operator CLI: status, queue list/show/retry/purge and echo, on a crafted index or beside a gateway.

Most tests craft an index with gateway.index.Index (the daemon's own writer) and set delivery outcomes
as a forwarder would record them; one runs a real gateway against two PACS simulators, fails deliveries
on purpose, and checks that every retry selector gets its instances delivered by the running daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gateway import admin
from gateway.cli import main
from gateway.index import Index
from gateway.model import InstanceHeader, StoredInstance
from gateway.spool import Spool
from simulators.datasets import StudySpec, build_dataset, iter_refs
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator, server_tls_context
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    REPO,
    SCANNER_AE,
    delivery_states,
    destination_section,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import GatewaySetup, Pki

PACS_AE = "CENTRAL_PACS"
ROOT = "1.2.826.0.1.3680043.8.498.77"
STUDY_A, STUDY_B, STUDY_C, STUDY_D = (f"{ROOT}.{n}" for n in (1, 2, 3, 4))
PATIENT_ID = "PAT-SECRET-4711"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# ---------------------------------------------------------------- helpers


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli(capsys: pytest.CaptureFixture[str], setup: GatewaySetup, *args: str) -> Run:
    """Run the CLI in-process; every run must be free of tracebacks, and failures one line on stderr."""
    code = main(["-c", str(setup.config), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if code != 0:
        assert len(captured.err.strip().splitlines()) == 1, captured.err
    return Run(code, captured.out, captured.err)


def uid(study: str, n: int) -> str:
    return f"{study}.{n}"


def stored(sop_uid: str, study: str, received_at: float) -> StoredInstance:
    header = InstanceHeader(CT_IMAGE, sop_uid, study, f"{study}.0", PATIENT_ID, "CT")
    return StoredInstance(
        header, EXPLICIT_LE, 1000, "a" * 64, f"{sop_uid}.dcm", SCANNER_AE, "10.1.2.3", received_at
    )


def build_index(setup: GatewaySetup, destinations: list[str], instances: list[StoredInstance]) -> None:
    """Index `instances` with the daemon's own writer, and give each a spool file."""
    setup.spool.mkdir(parents=True, exist_ok=True)
    for instance in instances:
        (setup.spool / instance.file_name).write_bytes(b"\0" * instance.size_bytes)

    async def record() -> None:
        async with Index(setup.index, destinations, lambda: None) as index:
            commits = asyncio.create_task(index.run())
            for instance in instances:
                await index.record(instance)
            commits.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commits

    asyncio.run(record())


def execute(setup: GatewaySetup, sql: str, params: tuple[object, ...] = ()) -> None:
    with contextlib.closing(sqlite3.connect(setup.index, isolation_level=None)) as db:
        db.execute(sql, params)


def outcome(setup: GatewaySetup, sop_uid: str, destination: str, **columns: object) -> None:
    """Record a delivery's outcome as a forwarder would."""
    assignments = ", ".join(f"{name} = ?" for name in columns)
    execute(
        setup,
        f"UPDATE deliveries SET {assignments} WHERE destination = ? "  # noqa: S608 - test helper
        "AND instance_id = (SELECT id FROM instances WHERE sop_instance_uid = ?)",
        (*columns.values(), destination, sop_uid),
    )


def deliveries(setup: GatewaySetup) -> dict[tuple[str, str], dict[str, Any]]:
    rows = setup.rows(
        "SELECT i.sop_instance_uid AS uid, d.* FROM deliveries d JOIN instances i ON i.id = d.instance_id"
    )
    return {(row["uid"], row["destination"]): dict(row) for row in rows}


def states(setup: GatewaySetup) -> dict[tuple[str, str], str]:
    return {key: row["state"] for key, row in deliveries(setup).items()}


# A1, A2: delivered everywhere. B1: refused by pacs (failed). B2: pacs pending after 0xA700.
# C1: being sent to pacs right now; failed at backup. D1: its file went missing.
A1, A2, B1, B2, C1, D1 = (
    uid(STUDY_A, 1),
    uid(STUDY_A, 2),
    uid(STUDY_B, 1),
    uid(STUDY_B, 2),
    uid(STUDY_C, 1),
    uid(STUDY_D, 1),
)


@pytest.fixture
def crafted(tmp_path: Path) -> GatewaySetup:
    """A config with destinations pacs and backup, and an index in every state (no daemon running)."""
    sections = destination_section("pacs", free_port(), called_ae=PACS_AE) + destination_section(
        "backup", free_port(), called_ae="BACKUP"
    )
    setup = write_config(tmp_path, sections=sections)
    now = time.time()
    received = {A1: now - 3 * 3600, A2: now - 3 * 3600 + 1, B1: now - 3600, B2: now - 3600 + 1, C1: now - 600}
    received[D1] = now - 300
    studies = {A1: STUDY_A, A2: STUDY_A, B1: STUDY_B, B2: STUDY_B, C1: STUDY_C, D1: STUDY_D}
    build_index(setup, ["pacs", "backup"], [stored(u, studies[u], received[u]) for u in received])
    recent = now - 60
    for sop_uid in (A1, A2):
        for destination in ("pacs", "backup"):
            outcome(setup, sop_uid, destination, state="done", attempts=1, last_status=0, updated_at=recent)
        execute(setup, "UPDATE instances SET delivered_at = ? WHERE sop_instance_uid = ?", (recent, sop_uid))
    outcome(
        setup,
        B1,
        "pacs",
        state="failed",
        attempts=3,
        refusals=3,
        last_status=0xC000,
        last_error="0xC000 Cannot understand",
        updated_at=recent,
    )
    outcome(setup, B1, "backup", state="done", attempts=1, last_status=0, updated_at=recent)
    outcome(
        setup,
        B2,
        "pacs",
        state="pending",
        attempts=1,
        last_status=0xA700,
        next_attempt_at=now + 600,
        last_error="0xA700 Out of resources",
        updated_at=recent,
    )
    outcome(setup, B2, "backup", state="done", attempts=1, last_status=0, updated_at=recent)
    outcome(setup, C1, "pacs", state="in_flight", claim_id=42, updated_at=now)
    outcome(
        setup,
        C1,
        "backup",
        state="failed",
        attempts=3,
        refusals=3,
        last_status=0xA900,
        last_error="0xA900 " + "data set does not match SOP class " * 4,
        updated_at=recent,
    )
    execute(setup, "UPDATE instances SET file_state = 'missing' WHERE sop_instance_uid = ?", (D1,))
    (setup.spool / f"{D1}.dcm").unlink()
    for destination in ("pacs", "backup"):
        outcome(setup, D1, destination, state="failed", last_error="spool file missing", updated_at=recent)
    return setup


# ---------------------------------------------------------------- status


def test_status_table_shows_counts_health_spool_and_instances(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "status")
    assert run.code == 0
    lines = run.out.splitlines()
    header = next(line for line in lines if line.startswith("DESTINATION"))
    assert header.split() == [
        "DESTINATION",
        "UP",
        "PENDING",
        "IN",
        "FLIGHT",
        "DONE",
        "FAILED",
        "OLDEST",
        "PENDING",
        "LAST",
        "DELIVERED",
    ]
    pacs = next(line for line in lines if line.startswith("pacs "))
    assert pacs.split()[:6] == ["pacs", "up", "1", "1", "2", "2"]
    assert "60 min" in pacs  # the oldest undelivered (B2, pending) arrived an hour ago
    backup = next(line for line in lines if line.startswith("backup "))
    assert backup.split()[:6] == ["backup", "up", "0", "0", "4", "2"]
    assert any(line.startswith("spool") and "5 files" in line and "reserve" in line for line in lines)
    assert "5 stored, 0 deleted, 1 missing" in run.out
    assert PATIENT_ID not in run.out


def test_status_json_has_stable_keys_and_values(crafted: GatewaySetup, capsys) -> None:
    document = cli(capsys, crafted, "status", "--json").json()
    assert set(document) == {"node_id", "at", "index", "destinations", "spool", "instances"}
    assert document["node_id"] == "test-node"
    assert document["index"] == str(crafted.index)
    assert list(document["destinations"]) == ["pacs", "backup"]
    pacs = document["destinations"]["pacs"]
    assert set(pacs) == {
        "configured",
        "pending",
        "in_flight",
        "done",
        "failed",
        "oldest_pending_age_seconds",
        "last_delivered_at",
        "up",
        "up_reason",
    }
    assert (pacs["pending"], pacs["in_flight"], pacs["done"], pacs["failed"]) == (1, 1, 2, 2)
    assert 3590 <= pacs["oldest_pending_age_seconds"] <= 3700
    assert pacs["up"] is True
    assert pacs["configured"] is True
    assert pacs["last_delivered_at"].endswith("+00:00")
    assert document["destinations"]["backup"]["done"] == 4
    spool = document["spool"]
    assert set(spool) == {"path", "free_bytes", "used_bytes", "reserve_bytes", "below_reserve"}
    assert spool["used_bytes"] == 5000  # five stored files of 1000 bytes (D1's is missing)
    assert spool["reserve_bytes"] == 1_000_000
    assert spool["free_bytes"] > 0
    assert spool["below_reserve"] is False
    assert document["instances"] == {"stored": 5, "deleted": 0, "missing": 1, "total": 6}


def test_status_says_down_when_work_is_overdue_and_nothing_answers(crafted: GatewaySetup, capsys) -> None:
    """What an unreachable archive leaves in the index: due deliveries that nobody sends."""
    long_ago = time.time() - 3600
    execute(crafted, "UPDATE deliveries SET updated_at = ? WHERE destination = 'pacs'", (long_ago,))
    outcome(crafted, C1, "pacs", state="pending", claim_id=None, next_attempt_at=long_ago)
    outcome(crafted, B2, "pacs", next_attempt_at=long_ago)
    pacs = cli(capsys, crafted, "status", "--json").json()["destinations"]["pacs"]
    assert pacs["up"] is False
    assert "2 deliveries overdue" in pacs["up_reason"]
    assert "unreachable" in pacs["up_reason"]
    table = cli(capsys, crafted, "status").out
    assert any(line.startswith("pacs ") and " DOWN " in line for line in table.splitlines())


def test_status_says_down_after_a_lost_association_and_unknown_before_any_attempt(
    tmp_path: Path, capsys
) -> None:
    setup = write_config(tmp_path, sections=destination_section("pacs", free_port()))
    now = time.time()
    build_index(setup, ["pacs", "gone"], [stored(A1, STUDY_A, now), stored(A2, STUDY_A, now)])
    document = cli(capsys, setup, "status", "--json").json()
    assert document["destinations"]["pacs"]["up"] is None
    assert document["destinations"]["pacs"]["up_reason"] == "nothing sent yet"
    assert document["destinations"]["gone"]["configured"] is False  # still in the index, not in the config
    assert "not in the config" in document["destinations"]["gone"]["up_reason"]
    outcome(setup, A1, "pacs", state="done", attempts=1, last_status=0, updated_at=now - 20)
    outcome(
        setup, A2, "pacs", attempts=1, last_error="association lost: connection reset", updated_at=now - 10
    )
    pacs = cli(capsys, setup, "status", "--json").json()["destinations"]["pacs"]
    assert pacs["up"] is False
    assert pacs["up_reason"].startswith("association lost: connection reset")


def test_status_is_read_while_the_daemon_holds_the_write_lock(crafted: GatewaySetup, capsys) -> None:
    """A WAL reader never waits for the writer: status answers during a (long) group commit."""
    with contextlib.closing(sqlite3.connect(crafted.index, isolation_level=None)) as daemon:
        daemon.execute("BEGIN IMMEDIATE")
        daemon.execute("UPDATE deliveries SET attempts = attempts + 1")
        started = time.monotonic()
        assert cli(capsys, crafted, "status").code == 0
        assert cli(capsys, crafted, "queue", "list").code == 0
        assert time.monotonic() - started < 2.0
        daemon.execute("ROLLBACK")


def test_a_write_blocked_past_busy_timeout_says_locked(crafted: GatewaySetup, capsys, monkeypatch) -> None:
    monkeypatch.setattr(admin, "BUSY_TIMEOUT", 0.2)
    with contextlib.closing(sqlite3.connect(crafted.index, isolation_level=None)) as daemon:
        daemon.execute("BEGIN IMMEDIATE")
        run = cli(capsys, crafted, "queue", "retry", "--all-failed")
        daemon.execute("ROLLBACK")
    assert run.code == 1
    assert "is locked" in run.err
    assert states(crafted)[(B1, "pacs")] == "failed"


# ---------------------------------------------------------------- queue list / show


def listed(run: Run) -> list[tuple[str, str]]:
    return [(d["sop_instance_uid"], d["destination"]) for d in run.json()["deliveries"]]


def test_queue_list_filters_by_state_destination_study_and_since(crafted: GatewaySetup, capsys) -> None:
    failed = cli(capsys, crafted, "queue", "list", "--state", "failed", "--json")
    assert sorted(listed(failed)) == sorted([(B1, "pacs"), (C1, "backup"), (D1, "pacs"), (D1, "backup")])
    to_pacs = cli(capsys, crafted, "queue", "list", "--state", "failed", "--destination", "pacs", "--json")
    assert listed(to_pacs) == [(B1, "pacs"), (D1, "pacs")]
    study = cli(capsys, crafted, "queue", "list", "--study", STUDY_B, "--json")
    assert listed(study) == [(B1, "backup"), (B1, "pacs"), (B2, "backup"), (B2, "pacs")]
    recent = cli(capsys, crafted, "queue", "list", "--since", "2h", "--json")
    assert {u for u, _ in listed(recent)} == {B1, B2, C1, D1}
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 900))
    latest = cli(capsys, crafted, "queue", "list", "--since", iso, "--json")
    assert {u for u, _ in listed(latest)} == {C1, D1}


def test_queue_list_pages_in_the_order_received(crafted: GatewaySetup, capsys) -> None:
    everything = listed(cli(capsys, crafted, "queue", "list", "--limit", "100", "--json"))
    assert len(everything) == 12
    assert [u for u, _ in everything] == [u for u in (A1, A2, B1, B2, C1, D1) for _ in range(2)]
    first = cli(capsys, crafted, "queue", "list", "--limit", "5", "--json").json()
    assert (first["limit"], first["offset"], first["more"]) == (5, 0, True)
    pages = [
        listed(cli(capsys, crafted, "queue", "list", "--limit", "5", "--offset", str(n), "--json"))
        for n in (0, 5, 10)
    ]
    assert [len(page) for page in pages] == [5, 5, 2]
    assert pages[0] + pages[1] + pages[2] == everything
    table = cli(capsys, crafted, "queue", "list", "--limit", "5")
    assert "next page: --offset 5" in table.out
    assert len([line for line in table.out.splitlines() if line.startswith(ROOT)]) == 5


def test_queue_list_lines_and_json_keys_carry_no_patient_data(crafted: GatewaySetup, capsys) -> None:
    table = cli(capsys, crafted, "queue", "list", "--state", "failed", "--destination", "backup")
    assert table.out.splitlines()[0].split() == [
        "SOP",
        "INSTANCE",
        "UID",
        "DESTINATION",
        "STATE",
        "ATT",
        "REF",
        "STATUS",
        "RECEIVED",
        "LAST",
        "ERROR",
    ]
    (line,) = [line for line in table.out.splitlines() if line.startswith(C1)]
    assert line.split()[1:6] == ["backup", "failed", "3", "3", "0xA900"]
    assert line.endswith("...")  # a long error is truncated in the table
    document = cli(capsys, crafted, "queue", "list", "--json")
    (row,) = [
        d
        for d in document.json()["deliveries"]
        if d["sop_instance_uid"] == C1 and d["destination"] == "backup"
    ]
    assert set(row) == {
        "sop_instance_uid",
        "study_instance_uid",
        "destination",
        "state",
        "attempts",
        "refusals",
        "last_status",
        "last_status_hex",
        "last_error",
        "received_at",
        "next_attempt_at",
        "updated_at",
    }
    assert (row["last_status"], row["last_status_hex"]) == (0xA900, "0xA900")
    assert row["last_error"].count("data set does not match") == 4  # whole in JSON
    assert PATIENT_ID not in table.out + document.out


def test_queue_list_rejects_a_bad_since_with_one_line(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "list", "--since", "yesterday")
    assert run.code == 2
    assert "--since 'yesterday'" in run.err


def test_queue_show_prints_the_row_file_and_every_delivery(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "show", B1)
    assert run.code == 0
    assert f"SOP Instance UID: {B1}" in run.out
    assert f"SHA-256:          {'a' * 64}" in run.out
    assert f"{crafted.spool / (B1 + '.dcm')} (stored; present on disk)" in run.out
    assert "pacs: failed, 3 attempts, 3 refusals" in run.out
    assert "0xC000 Cannot understand" in run.out
    assert "backup: done" in run.out
    assert PATIENT_ID not in run.out
    assert "--show-patient-id" in run.out
    missing = cli(capsys, crafted, "queue", "show", D1, "--json").json()
    assert (missing["file_state"], missing["file_present"]) == ("missing", False)
    assert "patient_id" not in missing
    assert [d["destination"] for d in missing["deliveries"]] == ["backup", "pacs"]


def test_queue_show_reveals_the_patient_id_only_when_asked(crafted: GatewaySetup, capsys) -> None:
    assert (
        f"Patient ID:       {PATIENT_ID}"
        in cli(capsys, crafted, "queue", "show", B1, "--show-patient-id").out
    )
    document = cli(capsys, crafted, "queue", "show", B1, "--json", "--show-patient-id").json()
    assert document["patient_id"] == PATIENT_ID


def test_queue_show_of_an_unknown_or_invalid_uid_is_one_line(crafted: GatewaySetup, capsys) -> None:
    unknown = cli(capsys, crafted, "queue", "show", f"{ROOT}.999")
    assert (unknown.code, unknown.err.strip()) == (1, f"dicom-gateway: no instance {ROOT}.999 in the index")
    invalid = cli(capsys, crafted, "queue", "show", "../../etc/passwd")
    assert invalid.code == 2
    assert "not a DICOM UID" in invalid.err


# ---------------------------------------------------------------- queue retry


def test_retry_one_instance_requeues_failed_and_pending_but_never_in_flight_or_done(
    crafted: GatewaySetup, capsys
) -> None:
    before = time.time()
    run = cli(capsys, crafted, "queue", "retry", B1)
    assert run.code == 0
    assert "re-queued 1 delivery of 1 instance (1 to pacs)" in run.out
    assert "within 5 s" in run.out
    assert "skipped 1 already delivered (add --include-done" in run.out
    row = deliveries(crafted)[(B1, "pacs")]
    assert (row["state"], row["attempts"], row["refusals"], row["claim_id"]) == ("pending", 0, 0, None)
    assert before <= row["next_attempt_at"] <= time.time()
    assert row["last_error"] == "0xC000 Cannot understand"  # kept as history until the next attempt
    assert states(crafted)[(B1, "backup")] == "done"
    in_flight = cli(capsys, crafted, "queue", "retry", C1)
    assert "re-queued 1 delivery of 1 instance (1 to backup)" in in_flight.out
    assert "skipped 1 being sent right now (in_flight)" in in_flight.out
    assert deliveries(crafted)[(C1, "pacs")]["claim_id"] == 42  # the forwarder's claim is untouched


def test_retry_a_study_also_makes_backing_off_deliveries_due_now(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "retry", "--study", STUDY_B)
    assert "re-queued 2 deliveries of 2 instances (2 to pacs)" in run.out
    assert "skipped 2 already delivered" in run.out
    rows = deliveries(crafted)
    assert rows[(B2, "pacs")]["next_attempt_at"] <= time.time()
    assert rows[(B2, "pacs")]["attempts"] == 0
    assert {k: v for k, v in states(crafted).items() if k[0] in {B1, B2}} == {
        (B1, "pacs"): "pending",
        (B1, "backup"): "done",
        (B2, "pacs"): "pending",
        (B2, "backup"): "done",
    }


def test_retry_a_destinations_failed_leaves_other_destinations_alone(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "retry", "--destination", "backup", "--failed")
    assert "re-queued 1 delivery of 1 instance (1 to backup)" in run.out
    assert "skipped 1 whose spool file is gone" in run.out  # D1's file is missing: nothing to send
    after = states(crafted)
    assert after[(C1, "backup")] == "pending"
    assert after[(B1, "pacs")] == "failed"
    assert after[(D1, "backup")] == "failed"


def test_retry_all_failed_takes_every_destination(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "retry", "--all-failed")
    assert "re-queued 2 deliveries of 2 instances (1 to backup, 1 to pacs)" in run.out
    assert "skipped 2 whose spool file is gone" in run.out
    assert sorted(k for k, v in states(crafted).items() if v == "failed") == [(D1, "backup"), (D1, "pacs")]


def test_retry_include_done_resends_and_keeps_the_file_from_retention(crafted: GatewaySetup, capsys) -> None:
    plain = cli(capsys, crafted, "queue", "retry", A1)
    assert "re-queued 0 deliveries" in plain.out
    assert "skipped 2 already delivered" in plain.out
    run = cli(capsys, crafted, "queue", "retry", A1, "--include-done", "--destination", "pacs")
    assert "re-queued 1 delivery of 1 instance (1 to pacs)" in run.out
    assert states(crafted)[(A1, "pacs")] == "pending"
    assert states(crafted)[(A1, "backup")] == "done"
    (row,) = crafted.rows("SELECT delivered_at FROM instances WHERE sop_instance_uid = ?", (A1,))
    assert row["delivered_at"] is None  # retention removes only delivered files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of"),
        ([B1, "--all-failed"], "give exactly one of"),
        (["--failed"], "--failed needs --destination"),
        (["--all-failed", "--destination", "pacs"], "--destination goes with"),
        (["--all-failed", "--include-done"], "--include-done goes with UID or --study"),
        (["not-a-uid"], "not a DICOM UID"),
    ],
)
def test_retry_needs_exactly_one_selector(
    crafted: GatewaySetup, capsys, args: list[str], message: str
) -> None:
    run = cli(capsys, crafted, "queue", "retry", *args)
    assert run.code == 2
    assert message in run.err
    assert states(crafted)[(B1, "pacs")] == "failed"


def test_retry_of_an_unknown_uid_fails(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "retry", f"{ROOT}.999")
    assert run.code == 1
    assert "nothing to retry" in run.err


# ---------------------------------------------------------------- queue purge


def spool_names(setup: GatewaySetup) -> set[str]:
    return {path.name for path in setup.spool_files()}


def test_purge_delivered_removes_rows_deliveries_and_files(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "purge", "--delivered", "--yes")
    assert run.code == 0
    assert f"purged {A1}" in run.out
    assert f"purged {A2}" in run.out
    assert "purged 2 instances: their rows and deliveries, and 2 spool files (2.0 KiB)" in run.out
    assert {row[0] for row in crafted.rows("SELECT sop_instance_uid FROM instances")} == {B1, B2, C1, D1}
    assert not crafted.rows("SELECT 1 FROM deliveries WHERE instance_id NOT IN (SELECT id FROM instances)"), (
        "deliveries must go with their instance"
    )
    assert spool_names(crafted) == {f"{u}.dcm" for u in (B1, B2, C1)}  # no tombstones left either


def test_purge_refuses_undelivered_instances_without_force(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "purge", "--study", STUDY_B, "--yes")
    assert run.code == 1
    assert "refusing: 2 of the 2 selected instances are not delivered everywhere" in run.err
    assert "--force" in run.err
    assert len(crafted.rows("SELECT 1 FROM instances WHERE study_instance_uid = ?", (STUDY_B,))) == 2
    forced = cli(capsys, crafted, "queue", "purge", "--study", STUDY_B, "--yes", "--force")
    assert forced.code == 0
    assert "purged 2 instances" in forced.out
    assert not crafted.rows("SELECT 1 FROM instances WHERE study_instance_uid = ?", (STUDY_B,))
    assert f"{B1}.dcm" not in spool_names(crafted)


def test_purge_refuses_in_flight_instances_even_with_force(crafted: GatewaySetup, capsys) -> None:
    run = cli(capsys, crafted, "queue", "purge", C1, "--yes", "--force")
    assert run.code == 1
    assert "being sent right now (in_flight)" in run.err
    assert crafted.rows("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (C1,))
    assert f"{C1}.dcm" in spool_names(crafted)
    everything = cli(capsys, crafted, "queue", "purge", "--all-failed", "--yes", "--force")
    assert everything.code == 1  # C1 is among them: nothing is purged
    assert len(crafted.rows("SELECT 1 FROM instances")) == 6


def test_purge_a_destinations_failed_with_force_removes_a_missing_files_row(
    crafted: GatewaySetup, capsys
) -> None:
    outcome(crafted, C1, "pacs", state="done", claim_id=None)
    run = cli(capsys, crafted, "queue", "purge", "--destination", "backup", "--failed", "--yes", "--force")
    assert run.code == 0
    assert "purged 2 instances: their rows and deliveries, and 1 spool file" in run.out  # D1 had no file
    assert {row[0] for row in crafted.rows("SELECT sop_instance_uid FROM instances")} == {A1, A2, B1, B2}


def test_purge_skips_an_instance_a_forwarder_claimed_after_the_plan(crafted: GatewaySetup) -> None:
    with admin.open_index(crafted.index, write=True) as db:
        plan = admin.plan_purge(db, admin.Selector(study=STUDY_A))
        assert (plan.instances, plan.in_flight, plan.undelivered) == (2, 0, 0)
        outcome(crafted, A2, "pacs", state="in_flight", claim_id=7)  # claimed between plan and purge
        batches = list(admin.purge(db, plan, Spool(crafted.spool, 0)))
    assert [b.purged for b in batches] == [(A1,)]
    assert [b.skipped for b in batches] == [(A2,)]
    assert f"{A2}.dcm" in spool_names(crafted)
    assert crafted.rows("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (A2,))


def test_retry_and_purge_of_many_instances_go_in_small_transactions(
    crafted: GatewaySetup, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(admin, "CHUNK", 1)  # one instance per transaction: every batch boundary is crossed
    retried = cli(capsys, crafted, "queue", "retry", "--all-failed")
    assert "re-queued 2 deliveries of 2 instances (1 to backup, 1 to pacs)" in retried.out
    assert "skipped 2 whose spool file is gone" in retried.out
    purged = cli(capsys, crafted, "queue", "purge", "--delivered", "--yes")
    assert "purged 2 instances" in purged.out
    forced = cli(capsys, crafted, "queue", "purge", "--study", STUDY_B, "--yes", "--force")
    assert "purged 2 instances: their rows and deliveries, and 2 spool files" in forced.out
    assert {row[0] for row in crafted.rows("SELECT sop_instance_uid FROM instances")} == {C1, D1}


def test_purge_asks_for_confirmation_or_yes(crafted: GatewaySetup, capsys, monkeypatch) -> None:
    run = cli(capsys, crafted, "queue", "purge", A1)  # stdin is not a terminal under pytest
    assert run.code == 2
    assert "add --yes" in run.err
    assert crafted.rows("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (A1,))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _question: "n")
    declined = cli(capsys, crafted, "queue", "purge", A1)
    assert (declined.code, declined.err.strip()) == (1, "dicom-gateway: not purged")
    assert crafted.rows("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (A1,))
    monkeypatch.setattr("builtins.input", lambda question: "y" if "1 instance " in question else "n")
    accepted = cli(capsys, crafted, "queue", "purge", A1)
    assert accepted.code == 0
    assert not crafted.rows("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (A1,))


def test_purge_that_cannot_remove_a_file_changes_nothing(crafted: GatewaySetup, capsys, monkeypatch) -> None:
    """A rename failing half-way: the files already moved come back and the rows stay (one transaction)."""
    real_rename = Path.rename
    moves: list[Path] = []

    def failing_rename(self: Path, target: Path) -> Path:
        if str(target).endswith(admin.TOMBSTONE_SUFFIX):
            moves.append(self)
            if len(moves) == 2:
                raise PermissionError(13, "Permission denied")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    run = cli(capsys, crafted, "queue", "purge", "--delivered", "--yes")
    assert run.code == 1
    assert "cannot remove spool files" in run.err
    assert "Permission denied" in run.err
    assert len(moves) == 2
    assert {f"{A1}.dcm", f"{A2}.dcm"} <= spool_names(crafted)
    assert not [name for name in spool_names(crafted) if name.endswith(admin.TOMBSTONE_SUFFIX)]
    assert len(crafted.rows("SELECT 1 FROM instances WHERE study_instance_uid = ?", (STUDY_A,))) == 2


def test_tombstones_of_an_interrupted_purge_are_removed_at_startup(tmp_path: Path) -> None:
    """Purge relies on startup recovery's temp-file sweep for tombstones a crash left behind."""
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    tombstone = spool.path_for(f".tmp.{A1}.dcm{admin.TOMBSTONE_SUFFIX}")
    tombstone.write_bytes(b"x")
    assert list(spool.stored_uids()) == []  # never mistaken for a stored instance
    assert spool.remove_temp_files() == 1
    assert not tombstone.exists()


# ---------------------------------------------------------------- errors


def test_missing_index_is_one_line_without_traceback(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "-c", str(setup.config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == f"dicom-gateway: no index at {setup.index}: has the gateway run yet?\n"
    assert not setup.index.exists(), "a read must not create the database"


def test_an_invalid_config_is_reported_by_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nnode_id = 3\n", encoding="utf-8")
    code = main(["-c", str(config), "queue", "list"])
    captured = capsys.readouterr()
    assert code == 2
    assert "gateway.node_id" in captured.err
    assert "Traceback" not in captured.err


def test_an_index_from_a_newer_gateway_is_refused(crafted: GatewaySetup, capsys) -> None:
    execute(crafted, "PRAGMA user_version = 99")
    run = cli(capsys, crafted, "status")
    assert run.code == 1
    assert "index schema 99 is newer" in run.err


# ---------------------------------------------------------------- echo


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[PacsSimulator]:
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE) as simulator:
        yield simulator


def echo_setup(
    tmp_path: Path, port: int, *, tls: str = "tls = false", host: str = "127.0.0.1"
) -> GatewaySetup:
    section = destination_section("pacs", port, called_ae=PACS_AE, tls=tls, extra='connect_timeout = "5s"')
    return write_config(tmp_path, sections=section.replace('host = "127.0.0.1"', f'host = "{host}"'))


def tls_table(ca: Path) -> str:
    return f'[destination.tls]\nca = "{ca}"\nserver_hostname = "localhost"\n'


def test_echo_success_reports_the_round_trip(tmp_path: Path, pacs: PacsSimulator, capsys) -> None:
    setup = echo_setup(tmp_path, pacs.port)
    run = cli(capsys, setup, "echo", "pacs")
    assert run.code == 0
    assert f"echo pacs ({PACS_AE} at 127.0.0.1:{pacs.port}, plain TCP): success, round trip" in run.out
    assert " ms (association set up in " in run.out


def test_echo_over_mutual_tls_uses_the_destinations_client_certificate(
    tmp_path: Path, pki: Pki, capsys
) -> None:
    context = server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca)  # clients must present a certificate
    client = f'cert = "{pki.gateway_client_cert}"\nkey = "{pki.gateway_client_key}"\n'
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        run = cli(capsys, echo_setup(tmp_path, pacs.port, tls=tls_table(pki.ca) + client), "echo", "pacs")
    assert run.code == 0
    assert ", TLS): success" in run.out


def test_echo_without_the_client_certificate_an_archive_requires_says_so(
    tmp_path: Path, pki: Pki, capsys
) -> None:
    context = server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        run = cli(capsys, echo_setup(tmp_path, pacs.port, tls=tls_table(pki.ca)), "echo", "pacs")
    assert run.code == 1
    assert "client certificate" in run.err
    assert "tls.cert" in run.err


def test_echo_to_a_closed_port_says_connection_refused(tmp_path: Path, capsys) -> None:
    run = cli(capsys, echo_setup(tmp_path, free_port()), "echo", "pacs")
    assert run.code == 1
    assert "TCP: connection refused by 127.0.0.1:" in run.err


def test_echo_to_an_unknown_host_says_dns(tmp_path: Path, capsys) -> None:
    run = cli(capsys, echo_setup(tmp_path, 104, host="no-such-archive.invalid"), "echo", "pacs")
    assert run.code == 1
    assert "DNS: cannot resolve 'no-such-archive.invalid'" in run.err


def test_echo_to_a_certificate_from_another_ca_names_the_verification(
    tmp_path: Path, pki: Pki, capsys
) -> None:
    context = server_tls_context(pki.pacs_cert, pki.pacs_key)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        run = cli(capsys, echo_setup(tmp_path, pacs.port, tls=tls_table(pki.other_ca)), "echo", "pacs")
    assert run.code == 1
    assert (
        "TLS handshake failed: certificate verify failed: unable to get local issuer certificate" in run.err
    )
    assert str(pki.other_ca) in run.err  # and which CA file did not vouch for it


def test_echo_to_a_certificate_for_another_host_names_the_mismatch(tmp_path: Path, pki: Pki, capsys) -> None:
    context = server_tls_context(pki.wrong_name_cert, pki.wrong_name_key)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        run = cli(capsys, echo_setup(tmp_path, pacs.port, tls=tls_table(pki.ca)), "echo", "pacs")
    assert run.code == 1
    assert "certificate verify failed: Hostname mismatch" in run.err
    assert "server_hostname" in run.err


def test_echo_to_an_archive_limited_to_tls_1_1_names_the_protocol_version(
    tmp_path: Path, pki: Pki, capsys
) -> None:
    with warnings.catch_warnings():  # building an outdated peer on purpose: Python warns that TLS 1.1 is
        warnings.simplefilter("ignore", DeprecationWarning)
        context = server_tls_context(pki.pacs_cert, pki.pacs_key, maximum_version=ssl.TLSVersion.TLSv1_1)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        run = cli(capsys, echo_setup(tmp_path, pacs.port, tls=tls_table(pki.ca)), "echo", "pacs")
    assert run.code == 1
    assert "TLS handshake failed" in run.err
    assert "protocol version" in run.err


def test_echo_rejected_names_the_reason(tmp_path: Path, pacs: PacsSimulator, capsys) -> None:
    pacs.set_faults(PacsFaults(reject_associations=True))
    run = cli(capsys, echo_setup(tmp_path, pacs.port), "echo", "pacs")
    assert run.code == 1
    assert "association rejected (permanent) by the service user: calling AE title not recognized" in run.err
    assert GATEWAY_AE in run.err


def test_echo_of_an_unknown_destination_lists_the_names(tmp_path: Path, capsys) -> None:
    sections = destination_section("pacs", free_port()) + destination_section("backup", free_port())
    setup = write_config(tmp_path, sections=sections)
    run = cli(capsys, setup, "echo", "nowhere")
    assert run.code == 2
    assert "no destination 'nowhere'" in run.err
    assert "configured: pacs, backup" in run.err


# ---------------------------------------------------------------- against a running gateway


def test_failed_deliveries_retried_by_every_selector_are_delivered_by_the_running_gateway(
    tmp_path: Path, capsys
) -> None:
    spec = StudySpec(modality="CT", studies=3, images_per_series=3, rows=16, columns=16, seed=77)
    refs = list(iter_refs(spec))
    uids = {(ref.study, ref.instance): str(build_dataset(spec, ref).SOPInstanceUID) for ref in refs}
    studies = {ref.study: str(build_dataset(spec, ref).StudyInstanceUID) for ref in refs}
    one, two, three, four = uids[1, 1], uids[2, 1], uids[3, 1], uids[3, 2]
    with (
        PacsSimulator(tmp_path / "a", port=free_port(), ae_title=PACS_AE) as pacs,
        PacsSimulator(tmp_path / "b", port=free_port(), ae_title="BACKUP") as backup,
    ):
        pacs.set_faults(PacsFaults(status_for_uids=dict.fromkeys((one, two, three), 0xC000)))
        backup.set_faults(PacsFaults(status_for_uids={four: 0xC000}))
        sections = (
            destination_section("pacs", pacs.port, called_ae=PACS_AE)
            + destination_section("backup", backup.port, called_ae="BACKUP")
            + '\n[retention]\nkeep_forwarded = "1h"\n'
        )
        setup = write_config(tmp_path, sections=sections)
        with setup.process():
            options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
            assert run_scanner(options).statuses == {0x0000: 9}
            wait_until(lambda: delivery_states(setup) == {"done": 14, "failed": 4}, 60, "14 done, 4 failed")

            # Read beside the running daemon.
            status = cli(capsys, setup, "status", "--json").json()["destinations"]
            assert (status["pacs"]["failed"], status["backup"]["failed"]) == (3, 1)
            assert status["pacs"]["up"] is True  # it answered (with refusals)
            failed = cli(capsys, setup, "queue", "list", "--state", "failed", "--json").json()["deliveries"]
            assert sorted((d["sop_instance_uid"], d["destination"]) for d in failed) == sorted(
                [(one, "pacs"), (two, "pacs"), (three, "pacs"), (four, "backup")]
            )
            assert {d["last_status_hex"] for d in failed} == {"0xC000"}

            pacs.set_faults(PacsFaults())
            backup.set_faults(PacsFaults())

            def still_failed() -> set[tuple[str, str]]:
                rows = setup.rows(
                    "SELECT i.sop_instance_uid, d.destination FROM deliveries d "
                    "JOIN instances i ON i.id = d.instance_id WHERE d.state = 'failed'"
                )
                return {(row[0], row[1]) for row in rows}

            assert "re-queued 1 delivery" in cli(capsys, setup, "queue", "retry", one).out
            assert still_failed() == {(two, "pacs"), (three, "pacs"), (four, "backup")}
            assert "re-queued 1 delivery" in cli(capsys, setup, "queue", "retry", "--study", studies[2]).out
            assert still_failed() == {(three, "pacs"), (four, "backup")}
            by_destination = cli(capsys, setup, "queue", "retry", "--destination", "pacs", "--failed")
            assert "re-queued 1 delivery" in by_destination.out
            assert still_failed() == {(four, "backup")}
            assert "re-queued 1 delivery" in cli(capsys, setup, "queue", "retry", "--all-failed").out
            assert still_failed() == set()

            # Forwarders look for due work at least every 30 s (IDLE_RECHECK).
            wait_until(lambda: delivery_states(setup) == {"done": 18}, 45, "the retried deliveries")
            assert {one, two, three} <= pacs.stored_uids()
            assert four in backup.stored_uids()

            # Purge what is delivered while the daemon runs: rows, deliveries and files go.
            purged = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "-c",
                    str(setup.config),
                    "queue",
                    "purge",
                    "--delivered",
                    "--yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
                check=False,
            )
            assert purged.returncode == 0, purged.stderr
            assert "purged 9 instances" in purged.stdout
            assert not setup.spool_files()
            assert cli(capsys, setup, "status", "--json").json()["instances"]["total"] == 0
            # The daemon carries on: a new image still arrives and is delivered.
            extra = StudySpec(modality="CT", images_per_series=1, rows=16, columns=16, seed=78)
            assert run_scanner(ScanOptions(port=setup.port, calling_ae=SCANNER_AE, study=extra)).stored == 1
            wait_until(lambda: delivery_states(setup) == {"done": 2}, 30, "the new image delivered")


def test_the_installed_command_prints_a_status_table(crafted: GatewaySetup) -> None:
    """End to end through the entry point, as an operator types it (with the config from the environment)."""
    env = {**os.environ, "DICOM_GATEWAY_CONFIG": str(crafted.config)}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("node test-node")
    assert "Traceback" not in result.stderr
