"""The simulators against real peers: DCMTK's storescp receives what the scanner simulator sends."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pydicom
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.dsutils import split_dataset

from simulators.datasets import (
    UID_ROOT,
    InstanceRef,
    StudySpec,
    build_dataset,
    encode_dataset,
    iter_study,
    write_study,
)
from simulators.harness import ManagedProcess, ProcessStartError, free_port
from simulators.pixels import _packbits
from simulators.scanner import ScanOptions, TlsOptions, run_scanner

if TYPE_CHECKING:
    from pathlib import Path

    from pydicom.uid import UID

STORESCP_AE = "STORESCP"


@dataclass
class Storescp:
    port: int
    directory: Path
    process: ManagedProcess

    def received(self) -> dict[str, Path]:
        """Received files by SOP Instance UID (storescp names them <modality>.<uid>)."""
        return {path.name.split(".", 1)[1]: path for path in self.directory.iterdir()}


@pytest.fixture
def start_storescp(tmp_path):
    started: list[ManagedProcess] = []

    def start(*extra_args: str) -> Storescp:
        port = free_port()
        directory = tmp_path / f"received-{port}"
        directory.mkdir()
        # --fork: one process per association, so parallel associations really run in parallel;
        # +xa: accept every transfer syntax DCMTK knows (RLE included); +B: store the bytes as received.
        argv = ["storescp", "--fork", "--output-directory", str(directory), "-aet", STORESCP_AE, "+xa", "+B"]
        process = ManagedProcess([*argv, *extra_args, str(port)], ready_port=port, env={"TCP_NODELAY": "1"})
        started.append(process)
        process.start()
        return Storescp(port, directory, process)

    yield start
    for process in started:
        process.stop()


def scan_options(peer: Storescp, spec: StudySpec, **overrides) -> ScanOptions:
    return ScanOptions(port=peer.port, called_ae=STORESCP_AE, study=spec, progress_interval=60.0, **overrides)


def stored_data_set(path: Path) -> tuple[UID, bytes]:
    """Return a stored file's transfer syntax and its data set bytes (everything after the file meta)."""
    file_meta, offset = split_dataset(path)
    return file_meta.TransferSyntaxUID, path.read_bytes()[offset:]


SMALL_CT = StudySpec(modality="CT", series=2, images_per_series=5, rows=64, columns=64, seed=20260101)


@pytest.mark.parametrize("syntax", ["implicit", "explicit", "rle"])
def test_storescp_receives_exactly_the_bytes_sent(start_storescp, tmp_path, syntax):
    peer = start_storescp()
    spec = replace(SMALL_CT, transfer_syntax=syntax)
    expected = {ds.SOPInstanceUID: ds for ds in iter_study(spec)}
    ack_file = tmp_path / "acks.txt"

    result = run_scanner(scan_options(peer, spec, associations=2, ack_file=ack_file))

    assert result.ok, result.summary()
    assert result.statuses == {0x0000: 10}
    assert result.associations_established == 2
    acked_lines = ack_file.read_text().splitlines()
    assert sorted(acked_lines) == sorted(expected) == sorted(result.acked)
    received = peer.received()
    assert sorted(received) == sorted(expected)
    for uid, path in received.items():
        syntax_uid, data_set = stored_data_set(path)
        assert syntax_uid == spec.transfer_syntax_uid
        assert data_set == encode_dataset(expected[uid]), uid


def test_files_are_streamed_exactly_as_stored(start_storescp, tmp_path):
    peer = start_storescp()
    spec = StudySpec(modality="US", images_per_series=3, rows=48, columns=40, frames=4, seed=5)
    paths = write_study(replace(spec, transfer_syntax="rle"), tmp_path / "study")
    paths += write_study(replace(spec, modality="DX", frames=None, seed=6), tmp_path / "dx")

    result = run_scanner(scan_options(peer, spec, files=tuple(paths)))

    assert result.ok, result.summary()
    received = peer.received()
    assert len(received) == len(paths) == 6
    for path in paths:
        file_meta, offset = split_dataset(path)
        stored = received[file_meta.MediaStorageSOPInstanceUID]
        assert stored_data_set(stored) == (file_meta.TransferSyntaxUID, path.read_bytes()[offset:])


def test_refused_association_is_counted_and_fails(start_storescp, tmp_path):
    peer = start_storescp("--refuse")
    ack_file = tmp_path / "acks.txt"

    result = run_scanner(scan_options(peer, SMALL_CT, associations=2, ack_file=ack_file))

    assert not result.ok
    assert result.associations_rejected == 2
    assert result.associations_established == 0
    assert result.sent == 0
    assert ack_file.read_text() == ""
    assert any("10 of 10 instances were not sent" in error for error in result.errors)
    assert list(peer.directory.iterdir()) == []


def test_cli_exits_nonzero_when_nobody_listens(tmp_path):
    argv = [sys.executable, "-m", "simulators", "scanner", "--port", str(free_port()), "--images", "2"]
    argv += ["--rows", "16", "--columns", "16", "--ack-file", str(tmp_path / "acks.txt"), "--timeout", "5"]

    completed = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "0 established, 0 rejected, 0 aborted, 1 unreachable" in completed.stdout
    assert "result: FAILED" in completed.stdout
    assert (tmp_path / "acks.txt").read_text() == ""


def test_cli_exits_zero_after_a_clean_run(start_storescp):
    peer = start_storescp()
    argv = [
        sys.executable,
        "-m",
        "simulators",
        "scanner",
        "--port",
        str(peer.port),
        "--called-ae",
        STORESCP_AE,
    ]
    argv += ["--modality", "MR", "--series", "2", "--images", "2", "--rows", "16", "--columns", "16"]

    completed = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "statuses: 0x0000=4" in completed.stdout
    assert len(peer.received()) == 4


def test_mutual_tls(start_storescp, tmp_path):
    ca = trustme.CA()
    server, client = ca.issue_cert("localhost"), ca.issue_cert("scanner.example")
    for name, blob in [
        ("ca.pem", ca.cert_pem),
        ("server.key", server.private_key_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
        ("client.pem", client.cert_chain_pems[0]),
    ]:
        blob.write_to_path(str(tmp_path / name))
    tls_args = ["+tls", str(tmp_path / "server.key"), str(tmp_path / "server.pem")]
    peer = start_storescp(*tls_args, "+cf", str(tmp_path / "ca.pem"), "--require-peer-cert")
    spec = replace(SMALL_CT, series=1, images_per_series=3)
    tls = TlsOptions(tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key", "localhost")

    with_cert = run_scanner(scan_options(peer, spec, tls=tls))
    without_cert = run_scanner(scan_options(peer, replace(spec, seed=1), tls=replace(tls, cert_file=None)))

    assert with_cert.ok, with_cert.summary()
    assert len(peer.received()) == 3
    assert not without_cert.ok
    assert without_cert.associations_established == 0


def test_rate_limit_spaces_requests(start_storescp):
    peer = start_storescp()
    spec = replace(SMALL_CT, series=1, images_per_series=6)

    result = run_scanner(scan_options(peer, spec, rate=25.0, associations=2))

    assert result.ok, result.summary()
    assert result.elapsed >= 5 / 25.0


@pytest.mark.parametrize(
    ("modality", "size"), [("CT", (7, 5)), ("US", (9, 3)), ("DX", (32, 130)), ("MR", (3, 1))]
)
def test_rle_decodes_to_the_native_pixels(tmp_path, modality, size):
    """DCMTK's dcmdrle is an independent decoder of our PackBits segments."""
    rows, columns = size
    spec = StudySpec(modality=modality, images_per_series=2, rows=rows, columns=columns, seed=9)
    (rle_path, *_) = write_study(replace(spec, transfer_syntax="rle"), tmp_path / "rle")
    decoded_path = tmp_path / "decoded.dcm"

    subprocess.run(["dcmdrle", str(rle_path), str(decoded_path)], check=True, timeout=60)

    native = build_dataset(spec, InstanceRef(1, 1, 1))
    assert pydicom.dcmread(decoded_path).PixelData == native.PixelData


def unpackbits(data: bytes) -> bytes:
    """Decode PackBits as PS3.5 G.3.2 describes it (strictly: 0x80 is refused, an encoder never needs it)."""
    out, i = bytearray(), 0
    while i < len(data):
        header = data[i]
        if header < 128:
            out += data[i + 1 : i + 2 + header]
            i += 2 + header
        elif header > 128:
            out += data[i + 1 : i + 2] * (257 - header)
            i += 2
        else:
            raise AssertionError(f"no-op header 0x80 at {i}: an encoder never needs it")
    return bytes(out)


@given(
    st.binary(max_size=700) | st.lists(st.sampled_from([b"\x00" * 130, b"\x01\x02", b"\x07"])).map(b"".join)
)
def test_packbits_round_trips(row):
    encoded = _packbits(row)

    assert unpackbits(encoded) == row


def test_same_seed_rebuilds_identical_objects():
    spec = StudySpec(modality="US", studies=2, series=2, images_per_series=2, rows=8, columns=8, seed=3)

    first = [encode_dataset(ds) for ds in iter_study(spec)]
    again = [encode_dataset(ds) for ds in iter_study(spec)]
    other = [encode_dataset(ds) for ds in iter_study(replace(spec, seed=4))]

    assert first == again
    assert not set(first) & set(other)


def test_uids_are_valid_and_follow_the_hierarchy():
    spec = StudySpec(modality="MR", studies=2, series=3, images_per_series=4, rows=4, columns=4, seed=8)

    datasets = list(iter_study(spec))

    assert len(datasets) == spec.total_instances == 24
    for ds in datasets:
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid
            assert uid.startswith(UID_ROOT)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({ds.SOPInstanceUID for ds in datasets}) == 24
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 6
    assert len({ds.StudyInstanceUID for ds in datasets}) == 2
    assert len({(ds.StudyInstanceUID, ds.PatientID) for ds in datasets}) == 2
    assert sorted({ds.InstanceNumber for ds in datasets}) == [1, 2, 3, 4]


def test_spec_rejects_frames_for_single_frame_modalities():
    with pytest.raises(ValueError, match="only US takes frames"):
        StudySpec(modality="CT", frames=3)


def test_harness_reports_early_exit_with_output_tail():
    process = ManagedProcess(["sh", "-c", "echo boom >&2; exit 3"], ready_port=free_port(), timeout=10)

    with pytest.raises(ProcessStartError) as raised:
        process.start()

    assert raised.value.returncode == 3
    assert "boom" in raised.value.output


def test_harness_times_out_and_cleans_up():
    script = "import time; time.sleep(60)"
    process = ManagedProcess([sys.executable, "-c", script], ready_line="never", timeout=0.3)

    with pytest.raises(ProcessStartError, match="not ready within"):
        process.start()

    assert not process.running


def test_harness_ready_line_then_idempotent_stop():
    script = "import sys, time; print('listening', flush=True); time.sleep(60)"

    with ManagedProcess([sys.executable, "-c", script], ready_line="^listening$") as process:
        assert process.running
        assert "listening" in process.output()

    assert process.stop() == process.stop() == -15


def test_harness_kill_ends_a_process_ignoring_sigterm():
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True)"
    script += "; time.sleep(60)"
    process = ManagedProcess([sys.executable, "-c", script], ready_line="up").start()

    assert process.kill() == -9
    assert not process.running


def test_harness_stop_escalates_to_sigkill_after_grace():
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True)"
    script += "; time.sleep(60)"
    process = ManagedProcess([sys.executable, "-c", script], ready_line="up").start()

    assert process.stop(grace=0.3) == -9


def test_stop_event_ends_a_run_early(start_storescp):
    peer = start_storescp()
    stop = threading.Event()
    stop.set()

    result = run_scanner(scan_options(peer, SMALL_CT), stop=stop)

    assert result.sent == 0
    assert not result.ok


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll `predicate` (for state only a file system shows) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def test_ack_file_stays_accurate_when_the_receiver_dies(start_storescp, tmp_path):
    peer = start_storescp()
    ack_file = tmp_path / "acks.txt"
    spec = replace(SMALL_CT, series=1, images_per_series=500)
    options = scan_options(peer, spec, ack_file=ack_file, rate=100.0, timeout=5.0)
    results = []
    scanner = threading.Thread(target=lambda: results.append(run_scanner(options)))
    scanner.start()

    wait_until(lambda: len(peer.received()) >= 5)
    peer.process.kill()
    scanner.join(60)

    (result,) = results
    assert not result.ok
    assert result.associations_aborted + result.no_response >= 1
    acked = ack_file.read_text().splitlines()
    assert acked == result.acked
    # One association sends request n+1 only after response n, so the fifth file proves four acks.
    assert 4 <= len(acked) < 500
    assert set(acked) <= set(peer.received())
