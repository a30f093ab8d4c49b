"""The scanner simulator against a real gateway process: durability, byte-exactness, refusals, crashes."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from simulators.datasets import StudySpec, build_dataset, encode_dataset, iter_refs
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import GATEWAY_AE, SCANNER_AE, dataset_bytes, write_config

if TYPE_CHECKING:
    from pathlib import Path

    from simulators.harness import ManagedProcess
    from tests.conftest import GatewaySetup


def scan(setup: GatewaySetup, spec: StudySpec, **options: object) -> ScanOptions:
    base = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec, timeout=30.0)
    return replace(base, **options)  # type: ignore[arg-type]


@pytest.mark.usefixtures("gateway")
def test_300_instances_over_3_associations_are_stored_byte_exact(gateway_setup: GatewaySetup) -> None:
    spec = StudySpec(modality="CT", studies=2, series=3, images_per_series=50, rows=64, columns=64, seed=7)
    result = run_scanner(scan(gateway_setup, spec, associations=3))
    assert result.statuses == {0x0000: 300}, result.summary()
    assert result.associations_established == 3

    rows = {row["sop_instance_uid"]: row for row in gateway_setup.rows()}
    assert len(rows) == 300
    files = [p for p in gateway_setup.spool_files() if p.suffix == ".dcm"]
    assert len(files) == 300
    assert not [p for p in gateway_setup.spool_files() if p.name.startswith(".tmp.")]
    for ref in iter_refs(spec):
        ds = build_dataset(spec, ref)
        uid = str(ds.SOPInstanceUID)
        stored = gateway_setup.spool / f"{uid}.dcm"
        assert dataset_bytes(stored) == encode_dataset(ds), f"{uid} differs from what was sent"
        row = rows[uid]
        assert row["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert row["size_bytes"] == stored.stat().st_size
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["patient_id"] == ds.PatientID
        assert row["modality"] == "CT"
        assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        assert row["calling_ae"] == SCANNER_AE
        assert row["peer_address"].startswith("127.0.0.1:")
        assert row["file_state"] == "stored"
        assert stored.stat().st_mode & 0o777 == 0o600


@pytest.mark.usefixtures("gateway")
def test_multiframe_and_rle_objects_span_many_pdus_and_stay_exact(gateway_setup: GatewaySetup) -> None:
    specs = [
        StudySpec(
            modality="US", images_per_series=2, rows=240, columns=320, frames=12, seed=11
        ),  # ~2.7 MB each
        StudySpec(modality="DX", images_per_series=2, rows=256, columns=256, transfer_syntax="rle", seed=12),
    ]
    for spec in specs:
        result = run_scanner(scan(gateway_setup, spec, max_pdu=16382))
        assert result.statuses == {0x0000: 2}, result.summary()
        for ref in iter_refs(spec):
            ds = build_dataset(spec, ref)
            assert dataset_bytes(gateway_setup.spool / f"{ds.SOPInstanceUID}.dcm") == encode_dataset(ds)


@pytest.mark.usefixtures("gateway")
def test_same_instances_again_are_acknowledged_and_not_requeued(gateway_setup: GatewaySetup) -> None:
    spec = StudySpec(modality="MR", images_per_series=5, rows=32, columns=32, seed=3)
    first = run_scanner(scan(gateway_setup, spec))
    before = {row["sop_instance_uid"]: tuple(row) for row in gateway_setup.rows()}
    again = run_scanner(scan(gateway_setup, spec))
    assert first.statuses == again.statuses == {0x0000: 5}
    assert {row["sop_instance_uid"]: tuple(row) for row in gateway_setup.rows()} == before


def test_reserve_answers_a700_and_leaves_nothing_on_disk(tmp_path: Path) -> None:
    setup = write_config(tmp_path, min_free_bytes="1000TB")
    with setup.process():
        spec = StudySpec(modality="CT", images_per_series=4, rows=32, columns=32)
        result = run_scanner(scan(setup, spec))
        assert result.statuses == {0xA700: 4}, result.summary()
        assert result.acked == []
    assert setup.spool_files() == []
    assert setup.rows() == []


def test_acknowledged_instances_survive_kill_9(tmp_path: Path) -> None:
    """SIGKILL mid-stream, restart: every 0x0000 is indexed with a matching file; no temp files remain."""
    setup = write_config(tmp_path)
    ack_file = tmp_path / "acked.txt"
    spec = StudySpec(modality="CT", series=3, images_per_series=100, rows=128, columns=128, seed=21)
    gateway = setup.process().start()
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def send() -> None:
        outcome["result"] = run_scanner(scan(setup, spec, associations=3, ack_file=ack_file), stop)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        _wait_for_acks(ack_file, 60, gateway)
        os.kill(gateway.pid or 0, signal.SIGKILL)
        gateway.wait(10)
    finally:
        stop.set()
        sender.join(60)
        gateway.stop()
    acked = ack_file.read_text().split()
    assert 60 <= len(acked) < 300, "the kill must land mid-stream"

    with setup.process():  # restart: recovery runs before READY
        rows = {row["sop_instance_uid"]: row for row in setup.rows()}
    for uid in acked:
        assert uid in rows, f"acknowledged {uid} lost"
        stored = setup.spool / f"{uid}.dcm"
        assert rows[uid]["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert not [p for p in setup.spool_files() if p.name.startswith(".tmp.")]
    assert {p.name.removesuffix(".dcm") for p in setup.spool_files()} == set(rows)


def _wait_for_acks(ack_file: Path, count: int, gateway: ManagedProcess) -> None:
    """Poll the ack file (written by another thread) until it holds `count` lines."""
    deadline = threading.Event()
    timer = threading.Timer(60, deadline.set)
    timer.start()
    try:
        while not deadline.wait(0.01):
            if ack_file.exists() and len(ack_file.read_text().split()) >= count:
                return
            if not gateway.running:
                pytest.fail(f"gateway died early:\n{gateway.output()}")
        pytest.fail("no acknowledgements within 60 s")
    finally:
        timer.cancel()
