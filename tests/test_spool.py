"""The spool: UID grammar, exact durable bytes, atomic adoption, the reserve, duplicate policies."""

from __future__ import annotations

import hashlib
import stat
import warnings
import zlib
from typing import TYPE_CHECKING

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway.errors import StoreError
from gateway.model import DuplicatePolicy, InstanceHeader
from gateway.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    FileMetaSpec,
    Placement,
    Spool,
    encode_file_meta,
    is_valid_uid,
)

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.spool import FinishedObject

UID = "1.2.826.0.1.3680043.8.498.1001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.2001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.3001"
PIXELS = bytes(range(256)) * 2  # 16 x 16 pixels, 16 bits each
HEADER = InstanceHeader(
    sop_class_uid=CTImageStorage,
    sop_instance_uid=UID,
    study_instance_uid=STUDY_UID,
    series_instance_uid=SERIES_UID,
    patient_id="PAT-0042",
    modality="CT",
)


def ct_dataset(uid: str = UID, description: str = "AXIAL 1mm") -> Dataset:
    """A small CT image, as a scanner would make it."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientID = "PAT-0042"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = PIXELS
    return ds


def encoded(ds: Dataset, *, implicit: bool = False) -> bytes:
    """A data set's bytes in little endian, as they come over the wire."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def dataset_bytes(uid: str = UID, *, implicit: bool = False, description: str = "AXIAL 1mm") -> bytes:
    return encoded(ct_dataset(uid, description), implicit=implicit)


def meta_for(
    uid: str = UID, syntax: str = ExplicitVRLittleEndian, form: str = "encoded"
) -> bytes | FileMetaSpec:
    """The writer's file meta: pre-encoded bytes, or a FileMetaSpec (what the receiver passes)."""
    spec = FileMetaSpec(CTImageStorage, uid, syntax, "CT_SCANNER_1")
    return spec if form == "spec" else encode_file_meta(CTImageStorage, uid, syntax, "CT_SCANNER_1")


def store(
    spool: Spool,
    data: bytes,
    policy: DuplicatePolicy = DuplicatePolicy.REPLACE,
    *,
    form: str = "encoded",
    syntax: str = ExplicitVRLittleEndian,
) -> FinishedObject:
    """Write `data` in uneven chunks, as P-DATA fragments arrive; the last one goes to finish as its tail."""
    writer = spool.open_object(UID, meta_for(UID, syntax, form))
    view = memoryview(data)
    cut = max(0, len(data) - 50)
    for start in range(0, cut, 7777):
        writer.write(view[start : min(start + 7777, cut)])
    return writer.finish(policy, bytearray(view[cut:]))


def meta_end(file_bytes: bytes) -> int:
    """Offset of the data set: after preamble, b"DICM" and the file meta its group length announces."""
    # (0002,0000) UL in explicit VR LE: tag (4) + VR (2) + length (2) + value (4), from offset 132.
    assert file_bytes[132:138] == b"\x02\x00\x00\x00UL"
    return 144 + int.from_bytes(file_bytes[140:144], "little")


def names(spool: Spool) -> list[str]:
    return sorted(entry.name for entry in spool.directory.iterdir())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


@pytest.fixture(params=["encoded", "spec"])
def form(request: pytest.FixtureRequest) -> str:
    """Both ways to give a writer its file meta."""
    return str(request.param)


# ---------------------------------------------------------------- UID grammar


@pytest.mark.parametrize(
    "uid",
    [
        "0",
        "1.2",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678",  # 64
        "1." + "2" * 62,  # 64
    ],
)
def test_uid_grammar_accepts_dicom_uids_up_to_64_chars(uid):
    assert len(uid) <= 64
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1." + "2" * 63,  # 65 characters
        "../etc/passwd",
        "/abs",
        "/1.2",
        "1.2/../3",
        "1.2/3",
        "1\\2",
        "..",
        ".",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2a",
        "abc",
        "1.2 3",
        " 1.2",
        "1.2\x00",
        "1.2\x00/../x",
        "1.2\n",  # "$" would match before a final newline: fullmatch must not
        "\u0661.\u0662",  # Arabic-Indic digits match \d but are not [0-9]
        "1.\uff12",  # fullwidth digit two
        "1.2\u200b",  # zero-width space
        "-1.2",
        "1.+2",
    ],
)
def test_uid_grammar_refuses_anything_else(uid):
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../etc/passwd", "/abs", "1.2/../3", "1..2", "1.2\n", "1." + "2" * 63])
def test_open_object_refuses_invalid_uid_with_c001_and_creates_nothing(spool, uid):
    with pytest.raises(StoreError) as info:
        spool.open_object(uid, meta_for("1.2"))
    assert info.value.status == 0xC001
    assert names(spool) == []
    assert [entry.name for entry in spool.directory.parent.iterdir()] == [spool.directory.name]


# ---------------------------------------------------------------- a stored object


@pytest.mark.parametrize(
    ("syntax", "implicit"), [(ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True)]
)
def test_stored_file_is_meta_plus_the_exact_data_set_bytes(spool, form, syntax, implicit):
    data = dataset_bytes(implicit=implicit)
    writer = spool.open_object(UID, meta_for(UID, syntax, form))
    for chunk in (data[:7], data[7:150], data[150:151], data[151:-3]):
        writer.write(chunk)
    finished = writer.finish(DuplicatePolicy.REPLACE, data[-3:])

    path = spool.directory / f"{UID}.dcm"
    assert names(spool) == [f"{UID}.dcm"]
    assert finished.file_name == f"{UID}.dcm"
    assert finished.placement is Placement.NEW
    file_bytes = path.read_bytes()
    assert file_bytes[:128] == bytes(128)
    assert file_bytes[128:132] == b"DICM"
    assert file_bytes[meta_end(file_bytes) :] == data
    assert file_bytes == encode_file_meta(CTImageStorage, UID, syntax, "CT_SCANNER_1") + data
    assert finished.size_bytes == len(file_bytes) == path.stat().st_size
    assert finished.sha256 == hashlib.sha256(file_bytes).hexdigest()
    assert finished.header == HEADER

    ds = dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == UID
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.SOPInstanceUID == UID
    assert ds.PatientID == "PAT-0042"
    assert ds.PixelData == PIXELS


def test_header_past_the_first_64_kib_is_still_read_right(spool, form):
    ds = ct_dataset()
    references = []
    for n in range(1500):  # ~100 KB of references before the Study and Series UIDs
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = f"{UID}.{n}"
        references.append(item)
    ds.ReferencedImageSequence = references
    ds.PixelData = bytes(300_000)
    data = encoded(ds)
    assert data.index(SERIES_UID.encode()) > 64 * 1024
    finished = store(spool, data, form=form)
    assert finished.header == HEADER
    file_bytes = (spool.directory / finished.file_name).read_bytes()
    assert file_bytes[meta_end(file_bytes) :] == data


def test_deflated_data_set_is_refused_without_inflating_it(spool, form):
    """Checking a deflated object means inflating it (a deflate bomb): it is refused, nothing is kept."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(dataset_bytes()) + compressor.flush()
    with pytest.raises(StoreError) as refused:
        store(spool, data, form=form, syntax=DeflatedExplicitVRLittleEndian)
    assert refused.value.status == 0xC000
    assert list(spool.directory.iterdir()) == []


def test_stored_file_is_private_and_not_executable(spool, form):
    finished = store(spool, dataset_bytes(), form=form)
    mode = (spool.directory / finished.file_name).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert not mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_encode_file_meta_parses_and_has_a_zeroed_preamble():
    meta = encode_file_meta(CTImageStorage, UID, ImplicitVRLittleEndian, "CT_SCANNER_1")
    assert meta[:128] == bytes(128)
    assert meta[128:132] == b"DICM"
    assert meta_end(meta) == len(meta)  # the group length covers exactly the file meta elements
    ds = dcmread(DicomBytesIO(meta))
    assert ds.preamble == bytes(128)
    assert ds.file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == UID
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert ds.file_meta.SourceApplicationEntityTitle == "CT_SCANNER_1"
    assert len(ds) == 0


def test_encode_file_meta_omits_an_empty_source_ae():
    ds = dcmread(DicomBytesIO(encode_file_meta(CTImageStorage, UID, ExplicitVRLittleEndian, "")))
    assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_file_meta_spec_encodes_as_encode_file_meta():
    spec = FileMetaSpec(CTImageStorage, UID, ExplicitVRLittleEndian, "CT_SCANNER_1")
    assert spec.encode() == encode_file_meta(CTImageStorage, UID, ExplicitVRLittleEndian, "CT_SCANNER_1")


# ---------------------------------------------------------------- atomicity


def test_unfinished_object_is_only_a_private_temp_file(spool, form):
    writer = spool.open_object(UID, meta_for(form=form))
    writer.write(dataset_bytes()[:200])
    # A crash here (before finish's fsync + rename) must leave no file under the final name.
    (temp,) = names(spool)
    assert temp.startswith(f".tmp.{UID}.")
    assert not (spool.directory / f"{UID}.dcm").exists()
    assert stat.S_IMODE((spool.directory / temp).stat().st_mode) == 0o600
    writer.discard()
    assert names(spool) == []
    writer.discard()  # idempotent


def test_open_object_creates_no_file_before_the_first_write(spool, form):
    spool.open_object(UID, meta_for(form=form))
    assert names(spool) == []


def test_remove_temp_files_removes_only_leftovers_and_counts_them(spool):
    store(spool, dataset_bytes())
    spool.open_object("1.2.3", meta_for("1.2.3")).write(b"partial")
    (spool.directory / ".tmp.x").write_bytes(b"left by a crash")
    assert spool.remove_temp_files() == 2
    assert names(spool) == [f"{UID}.dcm"]
    assert spool.remove_temp_files() == 0


def test_data_set_with_another_uid_is_refused_with_a900_and_leaves_nothing(spool, form):
    writer = spool.open_object(UID, meta_for(form=form))
    with pytest.raises(StoreError) as info:
        writer.finish(DuplicatePolicy.REPLACE, dataset_bytes("1.2.826.0.1.3680043.8.498.9999"))
    assert info.value.status == 0xA900
    assert names(spool) == []


@pytest.mark.parametrize(
    "garbage",
    [
        hashlib.sha512(b"noise").digest() * 10,  # fixed bytes that look random
        bytes(64),
        b"",
    ],
    ids=["noise", "zeros", "empty"],
)
@pytest.mark.parametrize("warning_action", ["error", "ignore"])
def test_garbage_data_set_is_refused_in_c000_range_and_leaves_nothing(spool, form, garbage, warning_action):
    # pydicom reads hostile bytes leniently and only *warns*; the answer must not depend on whether the
    # process turns warnings into errors (tests do, production does not).
    writer = spool.open_object(UID, meta_for(form=form))
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action)
        with pytest.raises(StoreError) as info:
            writer.finish(DuplicatePolicy.REPLACE, garbage)
    assert 0xC000 <= info.value.status <= 0xCFFF, hex(info.value.status)
    assert names(spool) == []


# ---------------------------------------------------------------- the free-space reserve


def test_reserve_refuses_with_a700_and_leaves_nothing(spool, form):
    full = Spool(spool.directory, min_free_bytes=spool.free_bytes() + 2**50)
    assert not full.has_room()
    writer = full.open_object(UID, meta_for(form=form))
    with pytest.raises(StoreError) as info:
        writer.write(dataset_bytes())
    assert info.value.status == 0xA700
    assert names(spool) == []
    with pytest.raises(StoreError) as info:
        full.open_object(UID, meta_for(form=form)).finish(DuplicatePolicy.REPLACE, dataset_bytes())
    assert info.value.status == 0xA700
    assert names(spool) == []


def test_reserve_counts_the_bytes_about_to_be_written(spool, monkeypatch):
    monkeypatch.setattr(spool, "free_bytes", lambda: 10_000)
    spool.min_free_bytes = 9_000
    assert spool.has_room(1_000)
    assert not spool.has_room(1_001)


def test_reserve_reached_mid_object_removes_the_temp_file(spool, form):
    data = dataset_bytes()
    writer = spool.open_object(UID, meta_for(form=form))
    writer.write(data[:100])
    spool.min_free_bytes = spool.free_bytes() + 2**50  # the disk fills up while the object streams in
    with pytest.raises(StoreError) as info:
        writer.write(data[100:])
    assert info.value.status == 0xA700
    assert names(spool) == []


# ---------------------------------------------------------------- duplicates


def test_same_bytes_again_is_identical_and_leaves_the_file_alone(spool, form):
    data = dataset_bytes()
    first = store(spool, data, form=form)
    before = (spool.directory / first.file_name).stat()
    again = store(spool, data, DuplicatePolicy.REJECT, form=form)
    assert again.placement is Placement.IDENTICAL
    assert again.sha256 == first.sha256
    after = (spool.directory / first.file_name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert names(spool) == [first.file_name]


def test_different_bytes_under_replace_take_the_old_files_place(spool, form):
    store(spool, dataset_bytes(description="first"), form=form)
    newer = dataset_bytes(description="second")
    finished = store(spool, newer, DuplicatePolicy.REPLACE, form=form)
    assert finished.placement is Placement.REPLACED
    file_bytes = (spool.directory / finished.file_name).read_bytes()
    assert file_bytes[meta_end(file_bytes) :] == newer
    assert finished.sha256 == hashlib.sha256(file_bytes).hexdigest()
    assert names(spool) == [finished.file_name]


def test_different_bytes_under_keep_first_keep_the_old_file(spool, form):
    first = store(spool, dataset_bytes(description="first"), form=form)
    old_bytes = (spool.directory / first.file_name).read_bytes()
    finished = store(spool, dataset_bytes(description="second"), DuplicatePolicy.KEEP_FIRST, form=form)
    assert finished.placement is Placement.KEPT_FIRST
    assert (spool.directory / first.file_name).read_bytes() == old_bytes
    assert names(spool) == [first.file_name]


def test_different_bytes_under_reject_answer_0111_and_keep_the_old_file(spool, form):
    first = store(spool, dataset_bytes(description="first"), form=form)
    old_bytes = (spool.directory / first.file_name).read_bytes()
    with pytest.raises(StoreError) as info:
        store(spool, dataset_bytes(description="second"), DuplicatePolicy.REJECT, form=form)
    assert info.value.status == 0x0111
    assert (spool.directory / first.file_name).read_bytes() == old_bytes
    assert names(spool) == [first.file_name]


# ---------------------------------------------------------------- listing


def test_stored_uids_lists_only_uid_named_dcm_files(spool):
    store(spool, dataset_bytes())
    spool.open_object("1.2.3", meta_for("1.2.3")).write(b"partial")  # a temp file
    for name in ["notes.txt", "abc.dcm", "1..2.dcm", ".1.2.dcm", "1.2.dcm.bak", ".dcm", "1.2.DCM"]:
        (spool.directory / name).write_bytes(b"foreign")
    (spool.directory / "1.2.3.4.dcm").write_bytes(b"named right, content not checked here")
    assert sorted(spool.stored_uids()) == ["1.2.3.4", UID]
