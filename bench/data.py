"""The benchmark's data sets: deterministic DICOM files, made once and cached under bench/out/data.

Three sets, each from a fixed `StudySpec` seed (so every run and every machine sends the same bytes):
- `ct`: one CT series of 400 images, 512 x 512 x 16 bit, explicit VR little endian (~526 KB each);
- `small`: 2000 CT images of 44 x 44 (~5 KB each), four series of 500;
- `us`: 4 ultrasound multi-frame objects, 56 frames of 480 x 640 RGB (~52 MB each).

A set is rebuilt when its manifest (the spec it was made from) differs, or a file is missing.
A quick run uses the first files of each set.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from simulators.datasets import StudySpec, write_study

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

SPECS: dict[str, StudySpec] = {
    "ct": StudySpec(modality="CT", series=1, images_per_series=400, seed=4_000_001),
    "small": StudySpec(modality="CT", series=4, images_per_series=500, rows=44, columns=44, seed=4_000_002),
    "us": StudySpec(modality="US", series=1, images_per_series=4, frames=56, seed=4_000_003),
}
DESCRIPTIONS = {
    "ct": "CT 512x512x16",
    "small": "small CT 44x44",
    "us": "US 56 x 480x640 RGB",
}
QUICK_COUNTS = {"ct": 100, "small": 500, "us": 4}


@dataclass(frozen=True)
class FileSet:
    """Files of one data set, in sending order, and their total size."""

    name: str
    files: tuple[Path, ...]

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def first(self, count: int) -> FileSet:
        return FileSet(self.name, self.files[:count])

    def chunks(self, parts: int) -> list[tuple[Path, ...]]:
        """Split into `parts` contiguous runs of nearly equal length (one per sender)."""
        size, extra = divmod(len(self.files), parts)
        runs, start = [], 0
        for part in range(parts):
            end = start + size + (1 if part < extra else 0)
            runs.append(self.files[start:end])
            start = end
        return [run for run in runs if run]


def _manifest(spec: StudySpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def prepare(root: Path, name: str, log: Callable[[str], None] = print) -> FileSet:
    """Return data set `name`, writing it under `root/name` unless a matching copy is there."""
    spec = SPECS[name]
    directory = root / name
    manifest = directory / "manifest.json"
    files = sorted(directory.glob("*.dcm")) if directory.is_dir() else []
    if manifest.is_file() and manifest.read_text() == _manifest(spec) and len(files) == spec.total_instances:
        return FileSet(name, tuple(files))
    log(f"generating data set {name!r}: {spec.total_instances} x {DESCRIPTIONS[name]} ...")
    shutil.rmtree(directory, ignore_errors=True)
    files = write_study(spec, directory)
    manifest.write_text(_manifest(spec))
    return FileSet(name, tuple(files))


def prepare_all(root: Path, *, quick: bool, log: Callable[[str], None] = print) -> dict[str, FileSet]:
    """Every data set, cut to the quick run's sizes when `quick`."""
    sets = {name: prepare(root, name, log) for name in SPECS}
    if quick:
        sets = {name: fs.first(QUICK_COUNTS[name]) for name, fs in sets.items()}
    return sets
