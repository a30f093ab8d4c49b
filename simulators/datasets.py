"""Deterministic synthetic DICOM studies: the objects the simulated scanner sends.

Everything (UIDs, patient, dates, pixels) derives from `StudySpec.seed`, so a test can rebuild the exact
objects a run sent and compare bytes.

May import: pydicom, `simulators.pixels`.
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from simulators.pixels import ImageGeometry, native_pixel_data, rle_frames

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

UID_ROOT = "1.2.826.0.1.3680043.10.1234."
"""Prefix of every UID the simulators make."""

Modality = Literal["CT", "MR", "US", "DX"]
TransferSyntaxName = Literal["implicit", "explicit", "rle"]

TRANSFER_SYNTAXES: dict[TransferSyntaxName, UID] = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
}

_FAMILY_NAMES = ("DOE", "SMITH", "MUELLER", "ROSSI", "TANAKA", "NOVAK", "SILVA", "MARTIN", "KOWALSKI")
_GIVEN_NAMES = ("ALEX", "MARIA", "JOHN", "YUKI", "PETRA", "LUCA", "ANA", "SAM", "NOOR")


@dataclass(frozen=True)
class _Profile:
    """What a modality's objects look like by default."""

    sop_class: UID
    image_type: tuple[str, ...]
    rows: int
    columns: int
    bits_stored: int
    description: str
    body_part: str


_PROFILES: dict[Modality, _Profile] = {
    "CT": _Profile(CTImageStorage, ("ORIGINAL", "PRIMARY", "AXIAL"), 512, 512, 12, "CT CHEST", "CHEST"),
    "MR": _Profile(MRImageStorage, ("ORIGINAL", "PRIMARY", "M", "ND"), 256, 256, 12, "MR BRAIN", "HEAD"),
    "US": _Profile(
        UltrasoundMultiFrameImageStorage, ("ORIGINAL", "PRIMARY"), 480, 640, 8, "US ABD", "ABDOMEN"
    ),
    "DX": _Profile(
        DigitalXRayImageStorageForPresentation, ("ORIGINAL", "PRIMARY"), 2048, 2048, 12, "DX CHEST", "CHEST"
    ),
}


@dataclass(frozen=True)
class StudySpec:
    """What to synthesize: `studies` studies of one modality, each `series` x `images_per_series` objects.

    `rows`, `columns` and `frames` default to the modality's usual size (frames > 1 only for US).
    `photometric` is MONOCHROME2, or RGB for US (the default there). The default `seed` is fresh per spec,
    so unrelated runs never share UIDs while one spec always rebuilds the same objects.
    """

    modality: Modality = "CT"
    studies: int = 1
    series: int = 1
    images_per_series: int = 10
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    transfer_syntax: TransferSyntaxName = "explicit"
    photometric: Literal["MONOCHROME2", "RGB"] | None = None
    seed: int = field(default_factory=lambda: secrets.randbits(48))
    patient_name: str | None = None
    patient_id: str | None = None

    def __post_init__(self) -> None:
        if min(self.studies, self.series, self.images_per_series) < 1:
            raise ValueError("studies, series and images_per_series must be at least 1")
        if min(self.rows or 1, self.columns or 1, self.frames or 1) < 1:
            raise ValueError("rows, columns and frames must be at least 1")
        if self.modality != "US" and (self.frames or 1) != 1:
            raise ValueError(f"{self.modality} objects are single-frame; only US takes frames")
        if self.modality != "US" and self.photometric == "RGB":
            raise ValueError(f"{self.modality} objects are MONOCHROME2; only US can be RGB")

    @property
    def total_instances(self) -> int:
        """How many objects the spec describes."""
        return self.studies * self.series * self.images_per_series

    @property
    def sop_class_uid(self) -> UID:
        """The storage SOP class of every object."""
        return _PROFILES[self.modality].sop_class

    @property
    def transfer_syntax_uid(self) -> UID:
        """The transfer syntax every object is encoded in."""
        return TRANSFER_SYNTAXES[self.transfer_syntax]


@dataclass(frozen=True, order=True)
class InstanceRef:
    """Where one object sits in a spec, numbered from 1 as DICOM numbers series and instances."""

    study: int
    series: int
    instance: int


def iter_refs(spec: StudySpec) -> Iterator[InstanceRef]:
    """Yield every object's position, study by study, series by series."""
    for study in range(1, spec.studies + 1):
        for series in range(1, spec.series + 1):
            for instance in range(1, spec.images_per_series + 1):
                yield InstanceRef(study, series, instance)


def iter_study(spec: StudySpec) -> Iterator[Dataset]:
    """Yield every object of `spec`, built one at a time so large runs never sit in memory."""
    for ref in iter_refs(spec):
        yield build_dataset(spec, ref)


def write_study(spec: StudySpec, directory: Path) -> list[Path]:
    """Write every object of `spec` as a DICOM file (preamble and file meta) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ref in iter_refs(spec):
        path = directory / f"{ref.study:03d}-{ref.series:03d}-{ref.instance:05d}.dcm"
        build_dataset(spec, ref).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def encode_dataset(ds: Dataset) -> bytes:
    """Return the data set encoded in its file meta transfer syntax, without preamble or file meta.

    This is the call pynetdicom makes before a C-STORE (`pynetdicom.dsutils.encode`), so the result is
    exactly the bytes a peer receives.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax.is_implicit_VR
    fp.is_little_endian = syntax.is_little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


def build_dataset(spec: StudySpec, ref: InstanceRef) -> Dataset:
    """Build the object at `ref`, with file meta naming its SOP class, instance and transfer syntax."""
    profile = _PROFILES[spec.modality]
    study_rng = random.Random(f"{spec.seed}/study/{ref.study}")  # noqa: S311 - seeded test data, not secrets
    started = dt.datetime(2024, 1, 1, 7, 30, tzinfo=dt.UTC) + dt.timedelta(
        days=study_rng.randrange(365), minutes=study_rng.randrange(600)
    )
    series_time = started + dt.timedelta(minutes=4 * (ref.series - 1))
    content_time = series_time + dt.timedelta(seconds=2 * ref.instance)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(profile.image_type)
    ds.SOPClassUID = profile.sop_class
    ds.SOPInstanceUID = _uid(spec, "instance", ref.study, ref.series, ref.instance)
    ds.StudyDate = started.strftime("%Y%m%d")
    ds.SeriesDate = series_time.strftime("%Y%m%d")
    ds.ContentDate = content_time.strftime("%Y%m%d")
    ds.StudyTime = started.strftime("%H%M%S")
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.ContentTime = content_time.strftime("%H%M%S")
    ds.AccessionNumber = f"A{study_rng.randrange(10**8):08d}"
    ds.Modality = spec.modality
    ds.Manufacturer = "dicom-gateway-sim"
    ds.InstitutionName = "Simulated General Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"SIM{spec.modality}01"
    ds.StudyDescription = profile.description
    ds.SeriesDescription = f"{profile.description} SERIES {ref.series}"
    ds.ManufacturerModelName = "Synthetic"
    # Patient fields come first from the study's generator, so explicit names do not shift the rest.
    family, given = study_rng.choice(_FAMILY_NAMES), study_rng.choice(_GIVEN_NAMES)
    derived_id = f"SIM{study_rng.randrange(10**7):07d}"
    ds.PatientName = spec.patient_name or f"{family}^{given}"
    ds.PatientID = spec.patient_id or derived_id
    ds.PatientBirthDate = f"{study_rng.randrange(1940, 2010)}{study_rng.randrange(1, 13):02d}15"
    ds.PatientSex = study_rng.choice(("F", "M"))
    ds.BodyPartExamined = profile.body_part
    ds.DeviceSerialNumber = f"{spec.seed % 100000:05d}"
    ds.StudyInstanceUID = _uid(spec, "study", ref.study)
    ds.SeriesInstanceUID = _uid(spec, "series", ref.study, ref.series)
    ds.StudyID = f"{ref.study}"
    ds.SeriesNumber = ref.series
    ds.InstanceNumber = ref.instance
    _add_modality_attributes(ds, spec, ref)
    _add_pixels(ds, spec, ref)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = spec.transfer_syntax_uid
    return ds


def _uid(spec: StudySpec, kind: str, *numbers: int) -> UID:
    # One entropy source with separators: generate_uid joins its sources without one, so series 1 image 11
    # and series 11 image 1 would get the same UID.
    return generate_uid(UID_ROOT, entropy_srcs=["/".join([str(spec.seed), kind, *map(str, numbers)])])


def _add_modality_attributes(ds: Dataset, spec: StudySpec, ref: InstanceRef) -> None:
    """Add the few modality-specific attributes viewers and routers look at."""
    if spec.modality in ("CT", "MR"):
        thickness = 1.25 if spec.modality == "CT" else 5.0
        ds.FrameOfReferenceUID = _uid(spec, "frame-of-reference", ref.study, ref.series)
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = thickness
        ds.ImagePositionPatient = [-250.0, -250.0, -thickness * ref.instance]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.9765625, 0.9765625]
    if spec.modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    elif spec.modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.MagneticFieldStrength = 1.5
    elif spec.modality == "US":
        ds.PatientOrientation = ""
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = Tag("FrameTime")
    else:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PatientOrientation = ["P", "F"]
        ds.ImagerPixelSpacing = [0.139, 0.139]
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"


def _geometry(spec: StudySpec) -> ImageGeometry:
    profile = _PROFILES[spec.modality]
    rgb = spec.photometric == "RGB" or (spec.modality == "US" and spec.photometric is None)
    return ImageGeometry(
        rows=spec.rows or profile.rows,
        columns=spec.columns or profile.columns,
        frames=spec.frames or (10 if spec.modality == "US" else 1),
        samples=3 if rgb else 1,
        bits_stored=profile.bits_stored,
    )


def _add_pixels(ds: Dataset, spec: StudySpec, ref: InstanceRef) -> None:
    """Add the Image Pixel module with seeded pixel data, RLE-encoded when the spec asks for it."""
    geo = _geometry(spec)
    ds.SamplesPerPixel = geo.samples
    ds.PhotometricInterpretation = "RGB" if geo.samples == 3 else "MONOCHROME2"
    if geo.samples > 1:
        ds.PlanarConfiguration = 0
    if spec.modality == "US":
        ds.NumberOfFrames = geo.frames
    ds.Rows = geo.rows
    ds.Columns = geo.columns
    ds.BitsAllocated = 8 * geo.bytes_per_sample
    ds.BitsStored = geo.bits_stored
    ds.HighBit = geo.bits_stored - 1
    ds.PixelRepresentation = 0

    # Pixels vary by series (the seeded row) and by instance (how the rows are shifted).
    key = f"{spec.seed}/rows/{ref.study}/{ref.series}"
    if spec.transfer_syntax == "rle":
        ds.add_new(0x7FE00010, "OB", encapsulate(rle_frames(key, geo, ref.instance)))
        ds["PixelData"].is_undefined_length = True
    else:
        vr = "OB" if geo.bytes_per_sample == 1 else "OW"
        ds.add_new(0x7FE00010, vr, native_pixel_data(key, geo, ref.instance))
