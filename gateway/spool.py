"""The on-disk spool: durable adoption of received objects, UID-named files, the free-space reserve.

Every method of `ObjectWriter` and `Spool` that touches the disk is blocking and is meant to run in a
worker thread, never on the event loop. Layout: one flat directory of ``<SOP Instance UID>.dcm`` files,
temporary files ``.tmp.<uid>.<random>`` beside them (so a rename never crosses a directory, and one
directory fsync makes a whole group of renames durable).

Imports: model, errors (and pydicom for the file meta and the header read).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.filewriter import write_data_element
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway.errors import StoreError
from gateway.model import DuplicatePolicy, InstanceHeader

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

log = logging.getLogger(__name__)

# Our implementation class UID, generated once under pydicom's root from a fixed entropy source.
IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.8.498.29945370796021960805521038944648247226"
IMPLEMENTATION_VERSION_NAME: Final = "DICOM_GW_010"

# DIMSE statuses that the spool decides (see PS3.4 Annex B.2.3).
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DATASET_MISMATCH: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC000
STATUS_INVALID_UID: Final = 0xC001
STATUS_DUPLICATE: Final = 0x0111

SUFFIX: Final = ".dcm"
TEMP_PREFIX: Final = ".tmp."
# A UID names a file only if it passes the grammar: digit components separated by single dots, <= 64 chars.
_UID_GRAMMAR: Final = re.compile(r"[0-9]+(\.[0-9]+)*")
_HEADER_TAGS: Final = [
    0x00080016,  # SOP Class UID
    0x00080018,  # SOP Instance UID
    0x00080060,  # Modality
    0x00100020,  # Patient ID
    0x0020000D,  # Study Instance UID
    0x0020000E,  # Series Instance UID
]
_DEFER_VALUES_OVER: Final = 256  # bytes: longer values are skipped with a seek, never read
_PREAMBLE: Final = bytes(128)  # zeroed: a peer can never plant an executable header here


def is_valid_uid(uid: str) -> bool:
    """True when `uid` follows the DICOM UID grammar closely enough to name a file safely."""
    return 0 < len(uid) <= 64 and _UID_GRAMMAR.fullmatch(uid) is not None


class Placement(enum.Enum):
    """How a finished object relates to what the spool already held under its UID."""

    NEW = "new"
    IDENTICAL = "identical"  # same bytes again: nothing changes, nothing is re-queued
    REPLACED = "replaced"  # different bytes, policy replace: the new file took the old one's place
    KEPT_FIRST = "kept-first"  # different bytes, policy keep-first: the new bytes were dropped


@dataclass(frozen=True, slots=True)
class FinishedObject:
    """What the spool knows of an object once it is durable under its final name."""

    header: InstanceHeader
    file_name: str
    size_bytes: int
    sha256: str
    placement: Placement


@dataclass(frozen=True, slots=True)
class FileMetaSpec:
    """What the file meta of one received object says; encoded in a worker thread, off the event loop."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    source_ae: str

    def encode(self) -> bytes:
        """Preamble, prefix and file meta group."""
        return encode_file_meta(
            self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid, self.source_ae
        )


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """Preamble, prefix and file meta group (explicit VR little endian) for one object.

    pydicom writes each element; they are built without its value validation (the UIDs passed the
    grammar check already, the rest is ours), which is most of the cost of a meta header otherwise.
    """
    elements = [
        trusted_element(0x00020001, "OB", b"\x00\x01"),
        trusted_element(0x00020002, "UI", sop_class_uid),
        trusted_element(0x00020003, "UI", sop_instance_uid),
        trusted_element(0x00020010, "UI", transfer_syntax_uid),
        trusted_element(0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        trusted_element(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
    ]
    if source_ae:
        elements.append(trusted_element(0x00020016, "AE", source_ae))
    return _PREAMBLE + b"DICM" + encode_group(0x0002, elements, implicit_vr=False)


def trusted_element(tag: int, vr: str, value: object) -> DataElement:
    """An element of our own making: values are already checked, so pydicom's validation is skipped."""
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def encode_group(group: int, elements: list[DataElement], *, implicit_vr: bool) -> bytes:
    """Elements in tag order behind their group length element, little endian, written by pydicom.

    Shared by the file meta (group 0002, explicit VR) and DIMSE command sets (group 0000, implicit VR).
    """
    body = _write_elements(elements, implicit_vr=implicit_vr)
    length = trusted_element(group << 16, "UL", len(body))
    return _write_elements([length], implicit_vr=implicit_vr) + body


def _write_elements(elements: list[DataElement], *, implicit_vr: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit_vr
    for element in elements:
        write_data_element(fp, element)
    return fp.getvalue()


def scan_dataset(fp: BinaryIO, size: int, transfer_syntax_uid: str) -> InstanceHeader:
    """Walk every top-level element from `fp`'s position to `size`, skipping values; return the header.

    This is the structural check a received object gets before it is acknowledged: pydicom reads each
    element's tag, VR and length and seeks past its value (undefined-length sequences and encapsulated
    pixel data are followed to their delimiters), so memory stays flat for any size. A data set is
    refused when its last element runs past the end (truncated) or bytes follow it that are no element.

    Raises:
        ValueError: the data set is truncated or has trailing bytes (pydicom raises its own errors on
            other malformations).
    """
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        # Never inflated here: a small hostile object can inflate to gigabytes (the receiver does not
        # negotiate this syntax either).
        raise ValueError("Deflated Explicit VR Little Endian is not accepted")
    values: dict[int, object] = {}
    end = fp.tell()
    for element in data_element_generator(
        fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER_VALUES_OVER
    ):
        end = fp.tell()
        if element.tag in _HEADER_TAGS and isinstance(element, RawDataElement):
            values[element.tag] = element.value  # raw bytes: no pydicom value checks (they log values)
    if end != size:
        raise ValueError(f"data set ends at byte {end} of {size}: truncated, or trailing bytes")
    return InstanceHeader(
        sop_class_uid=_text(values.get(0x00080016)),
        sop_instance_uid=_text(values.get(0x00080018)),
        study_instance_uid=_text(values.get(0x0020000D)),
        series_instance_uid=_text(values.get(0x0020000E)),
        patient_id=_text(values.get(0x00100020)),
        modality=_text(values.get(0x00080060)),
    )


def _text(value: object) -> str:
    """A raw string value as text (latin-1 keeps every byte; the index only compares and shows it)."""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip("\x00 ")
    return "" if value is None else str(value).strip()


def dataset_offset(fp: BinaryIO) -> int:
    """Where the data set starts in a Part 10 file: after preamble, prefix and the meta group length."""
    fp.seek(0)
    head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a DICOM file with a file meta group length")
    return 144 + int.from_bytes(head[140:144], "little")


def read_stored_file(path: Path) -> tuple[InstanceHeader, str, str]:
    """Header, transfer syntax and source AE title of a spool file, its structure checked."""
    meta = read_file_meta_info(path)
    syntax = str(meta.TransferSyntaxUID)
    with path.open("rb") as fp:
        fp.seek(dataset_offset(fp))
        header = scan_dataset(fp, os.fstat(fp.fileno()).st_size, syntax)
    return header, syntax, str(meta.get("SourceApplicationEntityTitle", "")).strip()


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, read in chunks so large objects never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class UidLocks:
    """One lock per SOP Instance UID in use, so two tasks never place or remove the same file at once."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, uid: str) -> AsyncIterator[None]:
        """Hold the lock of `uid` (created on first use, dropped after the last)."""
        lock, users = self._locks.get(uid, (asyncio.Lock(), 0))
        self._locks[uid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[uid]
            if users == 1:
                del self._locks[uid]
            else:
                self._locks[uid] = (lock, users - 1)


class Spool:
    """The spool directory: names, the free-space reserve, directory syncs and the recovery sweep."""

    def __init__(self, directory: Path, min_free_bytes: int) -> None:
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self.locks = UidLocks()  # on the event loop: receivers placing and retention removing files

    def prepare(self) -> None:
        """Create the directory (mode 0700) and make its entry durable."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _fsync_directory(self.directory.parent)

    def path_for(self, file_name: str) -> Path:
        """The path of a spool file given its stored name."""
        return self.directory / file_name

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    def used_bytes(self) -> int:
        """Bytes taken by the spool's files (a directory walk: for status, not for hot paths)."""
        return sum(entry.stat().st_size for entry in os.scandir(self.directory) if entry.is_file())

    def has_room(self, extra_bytes: int = 0) -> bool:
        """True when writing `extra_bytes` more would keep the free-space reserve."""
        return self.free_bytes() - extra_bytes >= self.min_free_bytes

    def sync_directory(self) -> None:
        """Make every rename into the spool so far durable (one fsync serves a whole group)."""
        _fsync_directory(self.directory)

    def open_object(self, sop_instance_uid: str, meta: bytes | FileMetaSpec) -> ObjectWriter:
        """Start a temporary file for one object; the UID must already be validated."""
        if not is_valid_uid(sop_instance_uid):
            raise StoreError(
                STATUS_INVALID_UID, "invalid SOP Instance UID", sop_instance_uid, reason="invalid_uid"
            )
        return ObjectWriter(self, sop_instance_uid, meta)

    def remove_temp_files(self) -> int:
        """Delete temporary files left by a crash; returns how many were removed."""
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith(TEMP_PREFIX):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        if removed:
            self.sync_directory()
        return removed

    def stored_uids(self) -> Iterator[str]:
        """SOP Instance UIDs of the files in the spool (names not of our making are skipped)."""
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(SUFFIX) and is_valid_uid(uid := name.removesuffix(SUFFIX)):
                yield uid

    def delete(self, file_name: str) -> None:
        """Remove a delivered file (retention); a file already gone is not an error."""
        self.path_for(file_name).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _out_of_resources(exc: OSError, uid: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(STATUS_OUT_OF_RESOURCES, "spool file system full", uid, reason="disk_full")
    return StoreError(STATUS_OUT_OF_RESOURCES, f"spool I/O error ({exc.strerror})", uid, reason="io_error")


class ObjectWriter:
    """One object on its way into the spool: a private temporary file written in order, then adopted.

    The file is created lazily by the first `write`, so a refused object costs no file at all. Any failure
    removes the temporary file; nothing half-written is ever visible under a final name. Given a
    `FileMetaSpec`, the meta is encoded and the header read from memory, in the writing thread.
    """

    def __init__(self, spool: Spool, sop_instance_uid: str, meta: bytes | FileMetaSpec) -> None:
        self._spool = spool
        self.uid = sop_instance_uid
        self.file_name = sop_instance_uid + SUFFIX
        self._temp = spool.directory / f"{TEMP_PREFIX}{sop_instance_uid}.{secrets.token_hex(4)}"
        self._fd: int | None = None
        self._digest = hashlib.sha256()
        self._meta_spec = meta if isinstance(meta, FileMetaSpec) else None
        self._pending_meta = meta if isinstance(meta, bytes) else b""
        self._dataset_offset = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data set bytes (blocking); the reserve is checked before each chunk."""
        if self._meta_spec is not None and self._fd is None:
            self._pending_meta = self._meta_spec.encode()
        if not self._spool.has_room(len(data) + len(self._pending_meta)):
            self.discard()
            raise StoreError(
                STATUS_OUT_OF_RESOURCES, "free-space reserve reached", self.uid, reason="reserve"
            )
        try:
            if self._fd is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
                self._fd = os.open(self._temp, flags, 0o600)
            if self._pending_meta:
                self._write_all(self._pending_meta)
                self._dataset_offset = len(self._pending_meta)
                self._pending_meta = b""
            self._write_all(data)
        except OSError as exc:
            self.discard()
            raise _out_of_resources(exc, self.uid) from exc

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None  # noqa: S101 - write() opened it
        self._digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def finish(self, policy: DuplicatePolicy, tail: bytes | bytearray = b"") -> FinishedObject:
        """Write the last bytes, validate, fsync and rename into place under the duplicate policy (blocking).

        Raises:
            StoreError: with the status the peer gets; the temporary file is gone by then.
        """
        if tail or self._fd is None:
            self.write(tail)  # an empty data set still gets its file, and is then refused below
        try:
            header = self._validated_header()
            assert self._fd is not None  # noqa: S101 - write() opened it
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            sha256 = self._digest.hexdigest()
            placement = self._place(sha256, policy)
        except OSError as exc:
            # An fsync failure is final for this object: the page cache may have dropped the data.
            self.discard()
            raise _out_of_resources(exc, self.uid) from exc
        except StoreError:
            self.discard()
            raise
        return FinishedObject(header, self.file_name, self.size, sha256, placement)

    def _validated_header(self) -> InstanceHeader:
        try:
            if self._meta_spec is not None:
                syntax = self._meta_spec.transfer_syntax_uid
            else:
                syntax = str(read_file_meta_info(self._temp).TransferSyntaxUID)
            with self._temp.open("rb") as fp:
                fp.seek(self._dataset_offset)
                header = scan_dataset(fp, self.size, syntax)
        except Exception as exc:  # pydicom raises many types on hostile bytes: all mean "unreadable"
            raise StoreError(
                STATUS_CANNOT_UNDERSTAND,
                f"unreadable data set ({type(exc).__name__}: {exc})"[:120],
                self.uid,
                reason="unreadable",
            ) from exc
        if not header.sop_instance_uid or not header.sop_class_uid:
            message = "data set lacks SOP Class or Instance UID"
            raise StoreError(STATUS_CANNOT_UNDERSTAND, message, self.uid, reason="unreadable")
        if self._meta_spec is not None and header.sop_class_uid != self._meta_spec.sop_class_uid:
            message = "data set SOP Class UID differs from the command's"
            raise StoreError(STATUS_DATASET_MISMATCH, message, self.uid, reason="mismatch")
        if header.sop_instance_uid != self.uid:
            message = "data set SOP Instance UID differs from the command's"
            raise StoreError(STATUS_DATASET_MISMATCH, message, self.uid, reason="mismatch")
        return header

    def _place(self, sha256: str, policy: DuplicatePolicy) -> Placement:
        final = self._spool.path_for(self.file_name)
        if not final.exists():
            self._temp.rename(final)
            return Placement.NEW
        if file_sha256(final) == sha256:
            self._temp.unlink()
            return Placement.IDENTICAL
        if policy is DuplicatePolicy.REPLACE:
            self._temp.rename(final)
            return Placement.REPLACED
        self._temp.unlink()
        if policy is DuplicatePolicy.KEEP_FIRST:
            return Placement.KEPT_FIRST
        message = "duplicate SOP Instance UID with different content"
        raise StoreError(STATUS_DUPLICATE, message, self.uid, reason="duplicate")

    def discard(self) -> None:
        """Drop the temporary file (blocking); safe to call more than once."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()
