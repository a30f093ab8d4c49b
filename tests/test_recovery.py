"""Startup recovery: temp files go, orphans get rows, rows without files are flagged, claims are released."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway import recovery
from gateway.index import Index
from gateway.model import DuplicatePolicy, FileState, InstanceHeader, StoredInstance
from gateway.recovery import RecoveryReport, recover
from gateway.spool import Spool, encode_file_meta

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from gateway.spool import FinishedObject

DESTINATIONS = ["pacs-a", "pacs-b"]
UID_ROOT = "1.2.826.0.1.3680043.8.498"


def dataset_bytes(uid: str, implicit: bool) -> bytes:
    """A tiny CT data set, encoded in little endian as a scanner would send it."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = f"{UID_ROOT}.100"
    ds.SeriesInstanceUID = f"{UID_ROOT}.100.1"
    ds.PatientID = "PAT-0042"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(32))
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def store(spool: Spool, n: int, syntax: str = ExplicitVRLittleEndian) -> FinishedObject:
    """Put an object into the spool as the receiver does (durable under its final name), without a row."""
    uid = f"{UID_ROOT}.{n}"
    writer = spool.open_object(uid, encode_file_meta(CTImageStorage, uid, syntax, "CT_SCANNER_1"))
    writer.write(dataset_bytes(uid, implicit=syntax == ImplicitVRLittleEndian))
    return writer.finish(DuplicatePolicy.REPLACE)


def as_instance(finished: FinishedObject) -> StoredInstance:
    return StoredInstance(
        header=finished.header,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        size_bytes=finished.size_bytes,
        sha256=finished.sha256,
        file_name=finished.file_name,
        calling_ae="CT_SCANNER_1",
        peer_address="10.1.2.3",
        received_at=1_700_000_000.0,
    )


async def row(index: Index, n: int) -> dict[str, Any] | None:
    rows = await index.fetchall("SELECT * FROM instances WHERE sop_instance_uid = ?", (f"{UID_ROOT}.{n}",))
    return dict(rows[0]) if rows else None


async def delivery_states(index: Index, n: int) -> dict[str, tuple[str, int | None]]:
    rows = await index.fetchall(
        "SELECT destination, state, claim_id FROM deliveries JOIN instances ON id = instance_id "
        "WHERE sop_instance_uid = ?",
        (f"{UID_ROOT}.{n}",),
    )
    return {r["destination"]: (r["state"], r["claim_id"]) for r in rows}


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


@pytest.fixture
async def index(tmp_path: Path, spool: Spool) -> AsyncIterator[Index]:
    async with Index(tmp_path / "index.sqlite", DESTINATIONS, spool.sync_directory) as index:
        task = asyncio.create_task(index.run(), name="index-commit")
        yield index
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_recovery_after_a_crash(spool, index):
    (spool.directory / ".tmp.x").write_bytes(b"half an object")
    orphan = store(spool, 1, ImplicitVRLittleEndian)  # renamed into place; crash before its row committed
    gone = store(spool, 2)
    await index.record(as_instance(gone))
    (spool.directory / gone.file_name).unlink()
    claimed = store(spool, 3)
    await index.record(as_instance(claimed))
    await index.db.execute(  # a forwarder was sending it when the gateway died
        "UPDATE deliveries SET state = 'in_flight', claim_id = 7 WHERE destination = 'pacs-a' AND "
        "instance_id = (SELECT id FROM instances WHERE sop_instance_uid = ?)",
        (claimed.header.sop_instance_uid,),
    )

    report = await recover(spool, index)

    assert report == RecoveryReport(
        temp_files_removed=1,
        files_reindexed=1,
        files_unreadable=0,
        rows_missing_file=1,
        claims_released=1,
    )
    assert not (spool.directory / ".tmp.x").exists()

    orphan_row = await row(index, 1)
    assert orphan_row is not None
    orphan_bytes = (spool.directory / orphan.file_name).read_bytes()
    assert orphan_row["sha256"] == orphan.sha256 == hashlib.sha256(orphan_bytes).hexdigest()
    assert orphan_row["size_bytes"] == len(orphan_bytes)
    assert orphan_row["transfer_syntax_uid"] == ImplicitVRLittleEndian
    assert orphan_row["file_name"] == orphan.file_name
    assert orphan_row["file_state"] == "stored"
    assert orphan_row["calling_ae"] == "CT_SCANNER_1"
    assert (orphan_row["patient_id"], orphan_row["modality"]) == ("PAT-0042", "CT")
    assert await delivery_states(index, 1) == {"pacs-a": ("pending", None), "pacs-b": ("pending", None)}

    gone_row = await row(index, 2)
    assert gone_row is not None
    assert gone_row["file_state"] == "missing"
    assert await delivery_states(index, 2) == {"pacs-a": ("failed", None), "pacs-b": ("failed", None)}

    assert await delivery_states(index, 3) == {"pacs-a": ("pending", None), "pacs-b": ("pending", None)}
    assert (await row(index, 3) or {})["file_state"] == "stored"

    # A second run finds nothing left to do.
    assert await recover(spool, index) == RecoveryReport(0, 0, 0, 0, 0)


async def test_file_flagged_missing_that_is_back_is_stored_again_and_redelivered(spool, index):
    # A spool on a mount that came up late: one start flags the row missing, the next finds the file.
    finished = store(spool, 1)
    await index.record(as_instance(finished))
    hidden = spool.directory / "hidden"
    (spool.directory / finished.file_name).rename(hidden)
    assert (await recover(spool, index)).rows_missing_file == 1
    hidden.rename(spool.directory / finished.file_name)

    report = await recover(spool, index)

    assert report == RecoveryReport(0, 1, 0, 0, 0)
    assert (await row(index, 1) or {})["file_state"] == "stored"
    assert await delivery_states(index, 1) == {"pacs-a": ("pending", None), "pacs-b": ("pending", None)}


async def test_unreadable_uid_named_file_is_counted_and_left_in_place(spool, index):
    foreign = spool.directory / f"{UID_ROOT}.9.dcm"
    foreign.write_bytes(b"MZ\x90\x00 not a DICOM file at all")

    report = await recover(spool, index)

    assert report.files_unreadable == 1
    assert report.files_reindexed == 0
    assert foreign.read_bytes() == b"MZ\x90\x00 not a DICOM file at all"
    assert await index.count_instances() == 0


async def test_file_holding_another_uid_than_its_name_is_left_unindexed(spool, index):
    finished = store(spool, 1)
    renamed = spool.directory / f"{UID_ROOT}.8.dcm"
    (spool.directory / finished.file_name).rename(renamed)

    report = await recover(spool, index)

    assert (report.files_unreadable, report.files_reindexed) == (1, 0)
    assert renamed.exists()
    assert await index.count_instances() == 0


def tiny_indexed_stand_in(n: int) -> StoredInstance:
    """A row for a one-byte stand-in file: its content is never looked at by a correct recovery."""
    uid = f"{UID_ROOT}.{n}"
    header = InstanceHeader(CTImageStorage, uid, f"{UID_ROOT}.100", f"{UID_ROOT}.100.1", "PAT-0042", "CT")
    return StoredInstance(
        header=header,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        size_bytes=1,
        sha256="0" * 64,
        file_name=f"{uid}.dcm",
        calling_ae="CT_SCANNER_1",
        peer_address="10.1.2.3",
        received_at=1_700_000_000.0,
    )


async def test_recovery_reads_and_hashes_only_files_without_rows(spool, index, monkeypatch):
    stand_ins = [tiny_indexed_stand_in(n) for n in range(2000)]
    for stand_in in stand_ins:
        (spool.directory / stand_in.file_name).write_bytes(b"x")
    await asyncio.gather(*(index.record(stand_in) for stand_in in stand_ins))
    orphan = store(spool, 5000)
    hashed: list[str] = []
    read: list[str] = []
    real_sha256, real_read = recovery.file_sha256, recovery.read_stored_file
    monkeypatch.setattr(recovery, "file_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    monkeypatch.setattr(recovery, "read_stored_file", lambda path: read.append(path.name) or real_read(path))

    report = await recover(spool, index)

    assert report == RecoveryReport(0, 1, 0, 0, 0)
    assert hashed == [orphan.file_name]
    assert read == [orphan.file_name]
    assert await index.count_instances(FileState.STORED) == 2001
