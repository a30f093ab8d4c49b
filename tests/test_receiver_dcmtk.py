"""Interoperability with DCMTK's echoscu and storescu: a real third-party requestor against the receiver."""

from __future__ import annotations

import hashlib
import subprocess
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from simulators.datasets import StudySpec, write_study
from tests.conftest import DCMTK_ENV, GATEWAY_AE, dataset_bytes, require_tools

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import GatewaySetup

pytestmark = pytest.mark.usefixtures("gateway")


def storescu(
    setup: GatewaySetup, files: list[Path], *options: str, calling: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    require_tools("storescu")
    return subprocess.run(
        [
            "storescu",
            "-aet",
            calling,
            "-aec",
            GATEWAY_AE,
            *options,
            "127.0.0.1",
            str(setup.port),
            *map(str, files),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_echoscu_succeeds(gateway_setup: GatewaySetup) -> None:
    require_tools("echoscu")
    result = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", GATEWAY_AE, "127.0.0.1", str(gateway_setup.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("syntax_name", "proposal", "expected_syntax"),
    [
        ("implicit", "-xi", ImplicitVRLittleEndian),
        ("explicit", "-xe", ExplicitVRLittleEndian),
    ],
)
def test_storescu_uncompressed_is_stored_byte_exact(
    gateway_setup: GatewaySetup, tmp_path: Path, syntax_name: str, proposal: str, expected_syntax: str
) -> None:
    spec = StudySpec(
        modality="MR", series=1, images_per_series=3, rows=64, columns=64, transfer_syntax=syntax_name
    )
    files = write_study(spec, tmp_path / "in")
    result = storescu(gateway_setup, files, proposal)
    assert result.returncode == 0, result.stderr
    _assert_stored_exactly(gateway_setup, files, expected_syntax)


def test_storescu_rle_made_by_dcmcrle_is_stored_compressed_and_byte_exact(
    gateway_setup: GatewaySetup, tmp_path: Path
) -> None:
    require_tools("dcmcrle")
    spec = StudySpec(
        modality="CT", series=1, images_per_series=2, rows=64, columns=64, transfer_syntax="explicit"
    )
    originals = write_study(spec, tmp_path / "in")
    compressed = []
    for path in originals:
        target = tmp_path / f"rle-{path.name}"
        subprocess.run(["dcmcrle", str(path), str(target)], check=True, capture_output=True, timeout=30)
        compressed.append(target)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == RLELossless
    result = storescu(gateway_setup, compressed, "-xr")
    assert result.returncode == 0, result.stderr
    _assert_stored_exactly(gateway_setup, compressed, RLELossless)


def test_calling_ae_not_allowed_is_rejected(gateway_setup: GatewaySetup, tmp_path: Path) -> None:
    spec = StudySpec(modality="CT", images_per_series=1, rows=32, columns=32)
    files = write_study(spec, tmp_path / "in")
    result = storescu(gateway_setup, files, calling="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Calling AE Title Not Recognized" in result.stderr
    assert not [p for p in gateway_setup.spool_files() if p.suffix == ".dcm"]


def test_wrong_called_ae_is_rejected(gateway_setup: GatewaySetup, tmp_path: Path) -> None:
    require_tools("echoscu")
    result = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(gateway_setup.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def _assert_stored_exactly(setup: GatewaySetup, sent: list[Path], syntax: str) -> None:
    rows = {row["sop_instance_uid"]: row for row in setup.rows()}
    assert len(rows) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        uid = str(original.SOPInstanceUID)
        stored = setup.spool / f"{uid}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(path), f"{uid} not byte-identical"
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == syntax
        row = rows[uid]
        assert row["transfer_syntax_uid"] == syntax
        assert row["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert row["size_bytes"] == stored.stat().st_size
        assert row["calling_ae"] == "STORESCU"
        assert row["study_instance_uid"] == original.StudyInstanceUID
        assert row["series_instance_uid"] == original.SeriesInstanceUID
        assert row["patient_id"] == original.PatientID
        assert row["modality"] == original.Modality
