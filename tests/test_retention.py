"""Retention: delivered files leave the spool after keep_forwarded (at once under space pressure)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from gateway.delivery_queue import DeliveryQueue
from gateway.index import Index
from gateway.model import DeliveryResult, DeliveryState, DuplicatePolicy, StoredInstance
from gateway.retention import Retention
from gateway.spool import FileMetaSpec, Spool, UidLocks, file_sha256

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

DESTINATIONS = ["pacs", "backup"]
UID_ROOT = "1.2.826.0.1.3680043.8.498"
HOUR = 3600.0


def uid(n: int) -> str:
    return f"{UID_ROOT}.{n}"


def ct_bytes(n: int, description: str = "AXIAL 1mm") -> bytes:
    """A small CT image's data set, encoded as it comes over the wire (explicit VR little endian)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid(n)
    ds.StudyInstanceUID = f"{UID_ROOT}.100"
    ds.SeriesInstanceUID = f"{UID_ROOT}.100.1"
    ds.PatientID = "PAT-0042"
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


class RecordingSpool(Spool):
    """A real spool that also notes, in order, which files retention removed."""

    def __init__(self, directory: Path, min_free_bytes: int) -> None:
        super().__init__(directory, min_free_bytes)
        self.removed: list[str] = []

    def delete(self, file_name: str) -> None:
        self.removed.append(file_name)
        super().delete(file_name)


class SimulatedFreeSpace(RecordingSpool):
    """A spool whose file system reports `free` bytes, and `freed_per_file` more after each removal."""

    def __init__(self, directory: Path, free: int, freed_per_file: int) -> None:
        super().__init__(directory, min_free_bytes=0)
        self.free = free
        self.freed_per_file = freed_per_file

    def free_bytes(self) -> int:
        return self.free

    def delete(self, file_name: str) -> None:
        super().delete(file_name)
        self.free += self.freed_per_file


class ObservedLocks(UidLocks):
    """UID locks that let a test see when someone asks for a lock."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, uid: str) -> AsyncIterator[None]:
        self.asked.append(uid)
        self._changed.set()
        async with super().hold(uid):
            yield

    async def wait_asked(self, uid: str, times: int) -> None:
        async with asyncio.timeout(10):
            while self.asked.count(uid) < times:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running_index(path: Path, destinations: Sequence[str], spool: Spool) -> AsyncIterator[Index]:
    """An open index whose commits make the spool directory durable first, its commit loop running."""
    async with Index(path, destinations, before_commit=spool.sync_directory) as index:
        task = asyncio.create_task(index.run(), name="index-commit")
        try:
            yield index
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def spool(tmp_path: Path) -> RecordingSpool:
    spool = RecordingSpool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


@pytest.fixture
async def index(tmp_path: Path, spool: Spool) -> AsyncIterator[Index]:
    async with running_index(tmp_path / "index.sqlite", DESTINATIONS, spool) as index:
        yield index


@pytest.fixture
def queue(index: Index) -> DeliveryQueue:
    return DeliveryQueue(index)


def write_object(spool: Spool, n: int, description: str) -> StoredInstance:
    """Receive instance `n` into the spool as the receiver does (blocking), and describe its index row."""
    writer = spool.open_object(uid(n), FileMetaSpec(CTImageStorage, uid(n), ExplicitVRLittleEndian, "CT_1"))
    writer.write(ct_bytes(n, description))
    finished = writer.finish(DuplicatePolicy.REPLACE)
    return StoredInstance(
        header=finished.header,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        size_bytes=finished.size_bytes,
        sha256=finished.sha256,
        file_name=finished.file_name,
        calling_ae="CT_1",
        peer_address="10.1.2.3",
        received_at=time.time(),
    )


async def receive(spool: Spool, index: Index, *numbers: int, description: str = "AXIAL 1mm") -> None:
    """Store and index instances, one after the other."""
    for n in numbers:
        await index.record(await asyncio.to_thread(write_object, spool, n, description))


def path(spool: Spool, n: int) -> Path:
    return spool.path_for(f"{uid(n)}.dcm")


async def settle(queue: DeliveryQueue, destination: str, outcomes: dict[int, DeliveryState]) -> None:
    """Claim what is due at `destination`; settle instance n as outcomes[n] (the rest is released)."""
    claim_id, batch = await queue.claim(destination, 1000, time.time() + 1.0)
    by_id = {
        await queue.index.scalar("SELECT id FROM instances WHERE sop_instance_uid = ?", (uid(n),)): state
        for n, state in outcomes.items()
    }
    results = []
    for delivery in batch:
        state = by_id.get(delivery.instance_id)
        if state is None:
            results.append(DeliveryResult(delivery.instance_id, DeliveryState.PENDING, 0.0, attempted=False))
        elif state is DeliveryState.PENDING:  # a transient refusal: retry in an hour
            results.append(DeliveryResult(delivery.instance_id, state, time.time() + HOUR, status=0xA700))
        else:
            results.append(DeliveryResult(delivery.instance_id, state, time.time(), status=0))
    await queue.settle(destination, claim_id, results)


async def deliver(queue: DeliveryQueue, *numbers: int, ago: Sequence[float] = ()) -> None:
    """Every destination accepts these instances; `ago`: how many seconds ago each became delivered."""
    for destination in DESTINATIONS:
        await settle(queue, destination, dict.fromkeys(numbers, DeliveryState.DONE))
    for n, seconds in zip(numbers, ago, strict=False):
        await queue.index.db.execute(
            "UPDATE instances SET delivered_at = ? WHERE sop_instance_uid = ?",
            (time.time() - seconds, uid(n)),
        )


async def row(index: Index, n: int) -> dict[str, Any]:
    rows = await index.fetchall("SELECT * FROM instances WHERE sop_instance_uid = ?", (uid(n),))
    assert len(rows) == 1
    return dict(rows[0])


async def file_state(index: Index, n: int) -> str:
    return str((await row(index, n))["file_state"])


# ---------------------------------------------------------------- age


async def test_delivered_file_older_than_keep_forwarded_is_removed(spool, index, queue):
    await receive(spool, index, 1, 2)
    await deliver(queue, 1, 2, ago=[2 * HOUR, 60])
    retention = Retention(queue, spool, keep_forwarded=HOUR)
    assert await retention.sweep() == 1
    assert not path(spool, 1).exists()
    assert await file_state(index, 1) == "deleted"
    assert path(spool, 2).exists()  # delivered a minute ago: kept for the hour
    assert await file_state(index, 2) == "stored"
    assert retention.deleted == 1
    assert await retention.sweep() == 0  # nothing more is due


async def test_keep_forwarded_zero_removes_delivered_files_at_once(spool, index, queue):
    await receive(spool, index, 1, 2, 3)
    await deliver(queue, 1, 2, 3)
    assert await Retention(queue, spool, keep_forwarded=0).sweep() == 3
    assert list(spool.directory.iterdir()) == []
    assert [await file_state(index, n) for n in (1, 2, 3)] == ["deleted"] * 3


async def test_delivered_file_is_kept_until_keep_forwarded_elapsed(spool, index, queue):
    await receive(spool, index, 1)
    await deliver(queue, 1, ago=[HOUR - 60])
    assert await Retention(queue, spool, keep_forwarded=HOUR).sweep() == 0
    assert path(spool, 1).exists()
    assert await file_state(index, 1) == "stored"


async def test_file_with_a_failed_or_open_delivery_is_kept(spool, index, queue):
    await receive(spool, index, 1, 2, 3, 4)
    await settle(queue, "pacs", dict.fromkeys((1, 2, 3, 4), DeliveryState.DONE))
    # backup: 1 failed, 2 waits for a retry, 3 is being sent right now, 4 is done.
    await settle(queue, "backup", {1: DeliveryState.FAILED, 2: DeliveryState.PENDING, 4: DeliveryState.DONE})
    await queue.claim("backup", 10, time.time() + 1.0)
    assert await Retention(queue, spool, keep_forwarded=0).sweep() == 1
    assert spool.removed == [f"{uid(4)}.dcm"]
    for n in (1, 2, 3):
        assert path(spool, n).exists()
        assert await file_state(index, n) == "stored"


async def test_receive_only_gateway_never_removes_files(tmp_path, spool):
    async with running_index(tmp_path / "receive-only.sqlite", [], spool) as index:
        queue = DeliveryQueue(index)
        await receive(spool, index, 1, 2)
        assert await Retention(queue, spool, keep_forwarded=0).sweep() == 0
        spool.min_free_bytes = spool.free_bytes()  # even when space is short
        assert await Retention(queue, spool, keep_forwarded=0).sweep() == 0
        assert path(spool, 1).exists()
        assert path(spool, 2).exists()
        assert [await file_state(index, n) for n in (1, 2)] == ["stored", "stored"]


# ---------------------------------------------------------------- space pressure


async def test_short_of_space_delivered_files_go_at_once_oldest_delivered_first(spool, index, queue):
    await receive(spool, index, 1, 2, 3, 4)
    await deliver(queue, 1, 2, 3, ago=[30, 50, 40])
    await settle(queue, "pacs", {4: DeliveryState.DONE})  # 4: backup still pending
    spool.min_free_bytes = spool.free_bytes()  # free space is below twice the reserve
    assert await Retention(queue, spool, keep_forwarded=HOUR).sweep() == 3
    assert spool.removed == [f"{uid(n)}.dcm" for n in (2, 3, 1)]
    assert [await file_state(index, n) for n in (1, 2, 3)] == ["deleted"] * 3
    assert path(spool, 4).exists()  # undelivered files stay, whatever the pressure
    assert await file_state(index, 4) == "stored"


async def test_pressure_removal_stops_once_twice_the_reserve_is_free(tmp_path):
    spool = SimulatedFreeSpace(tmp_path / "spool", free=10**9, freed_per_file=300)
    spool.prepare()
    async with running_index(tmp_path / "other.sqlite", DESTINATIONS, spool) as index:
        queue = DeliveryQueue(index)
        await receive(spool, index, 1, 2, 3)
        await deliver(queue, 1, 2, 3, ago=[30, 20, 10])
        spool.min_free_bytes = 1000
        spool.free = 1500  # below 2 x 1000: two removals (+600) bring it back to 2100
        assert await Retention(queue, spool, keep_forwarded=HOUR).sweep() == 2
        assert spool.removed == [f"{uid(1)}.dcm", f"{uid(2)}.dcm"]
        assert path(spool, 3).exists()  # young enough to keep once there is room again
        assert await file_state(index, 3) == "stored"


async def test_without_pressure_young_files_stay_even_with_little_headroom(spool, index, queue):
    await receive(spool, index, 1)
    await deliver(queue, 1, ago=[60])
    spool.min_free_bytes = spool.free_bytes() // 3  # free space is three times the reserve
    assert await Retention(queue, spool, keep_forwarded=HOUR).sweep() == 0
    assert path(spool, 1).exists()


# ---------------------------------------------------------------- the UID lock


async def test_removal_waits_for_the_uid_lock(spool, index, queue):
    spool.locks = ObservedLocks()
    await receive(spool, index, 1)
    await deliver(queue, 1)
    retention = Retention(queue, spool, keep_forwarded=0)
    async with spool.locks.hold(uid(1)):  # a receiver is placing this UID right now
        sweep = asyncio.create_task(retention.sweep())
        await spool.locks.wait_asked(uid(1), 2)
        assert not sweep.done()
        assert path(spool, 1).exists()
        assert await file_state(index, 1) == "stored"
    assert await sweep == 1
    assert not path(spool, 1).exists()
    assert await file_state(index, 1) == "deleted"


async def test_file_replaced_while_removal_waited_for_the_lock_is_kept(spool, index, queue):
    spool.locks = ObservedLocks()
    await receive(spool, index, 1)
    await deliver(queue, 1)
    retention = Retention(queue, spool, keep_forwarded=0)
    async with spool.locks.hold(uid(1)):
        sweep = asyncio.create_task(retention.sweep())
        await spool.locks.wait_asked(uid(1), 2)  # retention chose the file and waits for its lock
        # Meanwhile the scanner sends new bytes under the same UID: the receiver replaces the file and
        # its row starts new deliveries (all under the lock, as the receiver does).
        await receive(spool, index, 1, description="AXIAL 1mm corrected")
    removed = await sweep
    assert path(spool, 1).exists(), "the new, undelivered bytes were removed: they can never be forwarded"
    assert file_sha256(path(spool, 1)) == (await row(index, 1))["sha256"]
    assert await file_state(index, 1) == "stored"
    assert removed == 0
