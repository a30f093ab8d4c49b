"""The PACS simulator against real senders: DCMTK's storescu/echoscu and pynetdicom, faults included."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import pydicom
import pytest
import trustme
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE

from simulators import cli
from simulators.datasets import StudySpec, iter_study, write_study
from simulators.harness import ManagedProcess, free_port, port_accepts
from simulators.pacs import PacsFaults, PacsSimulator, server_tls_context
from simulators.pacs_state import in_fraction
from simulators.pynetdicom_setup import (
    close_transport,
    connection_handlers,
    keep_responses_for_caller,
    wake_caller_on_close,
)
from simulators.scanner import ScanOptions, TlsOptions, run_scanner
from tests.conftest import DCMTK_ENV, REPO, dataset_bytes, require_tools

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

PACS_AE = "CENTRAL_PACS"
SMALL_CT = StudySpec(modality="CT", images_per_series=8, rows=16, columns=16, seed=20260214)


@pytest.fixture
def start_pacs(tmp_path):
    started: list[PacsSimulator] = []

    def start(faults: PacsFaults | None = None, **kwargs) -> PacsSimulator:
        pacs = PacsSimulator(tmp_path / f"pacs-{len(started)}", faults=faults or PacsFaults(), **kwargs)
        started.append(pacs)
        return pacs.start()

    yield start
    for pacs in started:
        pacs.stop()


@pytest.fixture
def pacs(start_pacs):
    return start_pacs()


@contextlib.contextmanager
def associate(
    pacs: PacsSimulator,
    syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,),
    *,
    dimse_timeout: float = 10.0,
) -> Iterator[Association]:
    """One pynetdicom association proposing CT Image Storage in `syntaxes`, closed for sure."""
    ae = AE(ae_title="EDGE_GW")
    ae.acse_timeout = ae.connection_timeout = 10.0
    ae.dimse_timeout = dimse_timeout
    ae.add_requested_context(SMALL_CT.sop_class_uid, list(syntaxes))
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title=PACS_AE, evt_handlers=connection_handlers())
    if assoc.is_established:
        keep_responses_for_caller(assoc)
        wake_caller_on_close(assoc)  # our aborts then cost no DIMSE timeout
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        close_transport(assoc)


def send(assoc: Association, ds: Dataset) -> int | None:
    """C-STORE `ds`; its status, or None when no response came or the association had ended."""
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_store(ds)
    except RuntimeError:  # the association ended between the check and the request
        return None
    return response.get("Status")


def cts(count: int = 8, **overrides) -> list[Dataset]:
    return list(iter_study(replace(SMALL_CT, images_per_series=count, **overrides)))


def storescu(port: int, files: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    require_tools("storescu")
    argv = ["storescu", "-aec", PACS_AE, *options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    require_tools("echoscu")
    argv = ["echoscu", "-aec", PACS_AE, "127.0.0.1", str(port)]
    return subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("syntax", "proposal", "syntax_uid"),
    [
        ("implicit", "-xi", ImplicitVRLittleEndian),
        ("explicit", "-xe", ExplicitVRLittleEndian),
        ("rle", "-xr", RLELossless),
    ],
)
def test_storescu_objects_are_stored_byte_exact(pacs, tmp_path, syntax, proposal, syntax_uid):
    files = write_study(replace(SMALL_CT, images_per_series=3, transfer_syntax=syntax), tmp_path / "in")

    result = storescu(pacs.port, files, proposal)

    assert result.returncode == 0, result.stderr
    assert pacs.wait_for(3, timeout=10)
    received = pacs.received()
    sent_uids = [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files]
    assert [item.sop_instance_uid for item in received] == sent_uids
    for item, source in zip(received, files, strict=True):
        assert item.path == pacs.storage_dir / f"{item.sop_instance_uid}.dcm"
        assert dataset_bytes(item.path) == dataset_bytes(source), item.sop_instance_uid
        assert pydicom.dcmread(item.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax_uid
        assert (item.transfer_syntax_uid, item.sop_class_uid) == (syntax_uid, SMALL_CT.sop_class_uid)
        assert (item.calling_ae, item.association, item.status) == ("STORESCU", 1, 0x0000)
    assert pacs.stored_uids() == set(sent_uids)
    assert pacs.stats().stores_by_status == {0x0000: 3}


def test_echoscu_is_answered(pacs):
    result = echoscu(pacs.port)

    assert result.returncode == 0, result.stderr
    stats = pacs.stats()
    assert (stats.echoes, stats.associations_requested, stats.associations_accepted) == (1, 1, 1)


def test_wait_for_times_out_when_too_few_arrive(pacs):
    with associate(pacs) as assoc:
        assert send(assoc, cts(1)[0]) == 0x0000

    assert pacs.wait_for(1, timeout=5)
    assert not pacs.wait_for(2, timeout=0.05)


def test_rejecting_pacs_refuses_and_counts_every_request(start_pacs, tmp_path):
    pacs = start_pacs(PacsFaults(reject_associations=True))
    files = write_study(replace(SMALL_CT, images_per_series=1), tmp_path / "in")

    stored = storescu(pacs.port, files, "-xe")
    echoed = echoscu(pacs.port)

    for result in (stored, echoed):
        assert result.returncode != 0
        assert "Association Rejected" in result.stderr
        assert "Calling AE Title Not Recognized" in result.stderr
    stats = pacs.stats()
    assert stats.associations_requested == stats.associations_rejected == 2
    assert stats.associations_accepted == 0
    assert list(pacs.storage_dir.iterdir()) == []


def test_only_the_configured_transfer_syntaxes_are_accepted(start_pacs):
    pacs = start_pacs(PacsFaults(transfer_syntaxes=(ImplicitVRLittleEndian,)))
    implicit = cts(1, transfer_syntax="implicit")[0]

    with associate(pacs, (ExplicitVRLittleEndian,)) as explicit_only:
        assert explicit_only.accepted_contexts == []
    with associate(pacs, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)) as both:
        assert [cx.transfer_syntax[0] for cx in both.accepted_contexts] == [ImplicitVRLittleEndian]
        assert send(both, implicit) == 0x0000

    assert [item.transfer_syntax_uid for item in pacs.received()] == [ImplicitVRLittleEndian]


def test_set_faults_changes_transfer_syntaxes_for_new_associations(pacs):
    pacs.set_faults(PacsFaults(transfer_syntaxes=(ImplicitVRLittleEndian,)))

    with associate(pacs, (ExplicitVRLittleEndian,)) as assoc:
        assert assoc.accepted_contexts == []


def test_status_for_uids_reaches_the_sender_and_failures_store_nothing(start_pacs):
    refused, warned, plain = cts(3)
    faults = PacsFaults(status_for_uids={refused.SOPInstanceUID: 0xA900, warned.SOPInstanceUID: 0xB007})
    pacs = start_pacs(faults)

    with associate(pacs) as assoc:
        statuses = [send(assoc, ds) for ds in (refused, warned, plain)]

    assert statuses == [0xA900, 0xB007, 0x0000]
    assert pacs.stored_uids() == {warned.SOPInstanceUID, plain.SOPInstanceUID}
    assert not (pacs.storage_dir / f"{refused.SOPInstanceUID}.dcm").exists()
    assert pacs.stats().stores_by_status == {0xA900: 1, 0xB007: 1, 0x0000: 1}


def test_transient_uid_fails_twice_then_stores(start_pacs):
    (ds,) = cts(1)
    pacs = start_pacs(PacsFaults(transient_for_uids={ds.SOPInstanceUID: 2}))

    with associate(pacs) as assoc:
        statuses = [send(assoc, ds) for _ in range(3)]

    assert statuses == [0xA700, 0xA700, 0x0000]
    assert pacs.stored_uids() == {ds.SOPInstanceUID}
    assert pacs.stats().duplicates == 0


def test_status_fraction_picks_the_same_uids_for_the_same_seed(start_pacs):
    datasets = cts(16)
    uids = [ds.SOPInstanceUID for ds in datasets]
    pacs = start_pacs(PacsFaults(status_fraction=0.5, fraction_status=0xA702, seed=11))

    def refused_uids() -> set[str]:
        with associate(pacs) as assoc:
            statuses = {ds.SOPInstanceUID: send(assoc, ds) for ds in datasets}
        assert set(statuses.values()) <= {0x0000, 0xA702}
        return {uid for uid, status in statuses.items() if status == 0xA702}

    first = refused_uids()
    stored_after_first = pacs.stored_uids()
    again = refused_uids()
    pacs.set_faults(PacsFaults(status_fraction=0.5, fraction_status=0xA702, seed=12))
    other_seed = refused_uids()

    assert 0 < len(first) < 16
    assert first == again == {uid for uid in uids if in_fraction(uid, 0.5, 11)}
    assert stored_after_first == set(uids) - first
    assert other_seed != first


def test_delayed_response_still_arrives(start_pacs):
    pacs = start_pacs(PacsFaults(delay=0.2))

    with associate(pacs) as assoc:
        assert send(assoc, cts(1)[0]) == 0x0000


def test_abort_after_acknowledges_k_then_aborts_every_association(start_pacs):
    pacs = start_pacs(PacsFaults(abort_after=3))
    datasets = cts(10)

    outcomes = []
    for batch in (datasets[:5], datasets[5:]):
        with associate(pacs) as assoc:
            outcomes.append([send(assoc, ds) for ds in batch])
            assoc.join(10)  # the reactor records the A-ABORT once the caller's wait has ended
            assert assoc.is_aborted

    assert outcomes == [[0, 0, 0, None, None]] * 2
    assert pacs.stored_uids() == {ds.SOPInstanceUID for ds in datasets[:3] + datasets[5:8]}
    assert [item.association for item in pacs.received()] == [1, 1, 1, 2, 2, 2]
    assert pacs.stats().associations_aborted_by_us == 2


def test_stall_after_leaves_the_next_request_unanswered_until_stop(start_pacs):
    pacs = start_pacs(PacsFaults(stall_after=1))
    first, second = cts(2)

    with associate(pacs, dimse_timeout=1.0) as assoc:
        statuses = [send(assoc, first), send(assoc, second)]

    assert statuses == [0x0000, None]
    assert pacs._ae.active_associations  # still held open on our side
    pacs.stop()
    assert pacs._ae.active_associations == []
    assert pacs.stored_uids() == {first.SOPInstanceUID}


def test_outage_refuses_connections_while_open_associations_go_on(pacs):
    first, second = cts(2)
    port = pacs.port

    with associate(pacs) as open_before:
        pacs.stop_listening()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert send(open_before, first) == 0x0000
    pacs.start_listening()

    assert pacs.port == port
    with associate(pacs) as after:
        assert send(after, second) == 0x0000
    assert pacs.stats().associations_accepted == 2


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll `predicate` (a listening port has no event to wait on) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def test_scheduled_outage_ends_on_the_same_port(pacs):
    pacs.schedule_outage(0.0, 0.5)

    wait_until(lambda: not port_accepts("127.0.0.1", pacs.port))
    wait_until(lambda: port_accepts("127.0.0.1", pacs.port))
    assert echoscu(pacs.port).returncode == 0


def test_start_raises_when_the_port_is_taken(pacs, tmp_path):
    with pytest.raises(OSError, match="in use"):
        PacsSimulator(tmp_path / "second", port=pacs.port).start()


def test_uid_that_cannot_name_a_file_is_refused(pacs, tmp_path):
    (ds,) = cts(1)
    # pydicom would warn (an error here) on both sides; elements keep the mode they were made under.
    with pydicom.config.disable_value_validation():
        del ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../1.2.3"
        with associate(pacs) as assoc:
            status = send(assoc, ds)

    assert status == 0xC000
    assert list(pacs.storage_dir.iterdir()) == []
    assert not list(tmp_path.rglob("1.2.3.dcm"))
    assert pacs.stats().stores_by_status == {0xC000: 1}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA with a server certificate for localhost and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server, client = ca.issue_cert("localhost"), ca.issue_cert("edge-gateway.example")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    return directory


def test_mutual_tls_stores_and_refuses_clients_without_a_certificate(start_pacs, pki):
    context = server_tls_context(pki / "server.pem", ca_file=pki / "ca.pem")
    pacs = start_pacs(ssl_context=context)
    spec = replace(SMALL_CT, images_per_series=3)
    tls = TlsOptions(pki / "ca.pem", pki / "client.pem", pki / "client.key", "localhost")
    options = ScanOptions(port=pacs.port, called_ae=PACS_AE, study=spec, tls=tls, progress_interval=60.0)

    with_cert = run_scanner(options)
    without_cert = run_scanner(replace(options, tls=replace(tls, cert_file=None, key_file=None)))

    assert with_cert.ok, with_cert.summary()
    assert pacs.stored_uids() == {ds.SOPInstanceUID for ds in iter_study(spec)}
    assert not without_cert.ok
    assert without_cert.associations_established == 0
    assert pacs.stats().associations_accepted == 1


def tls11_client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    with pytest.warns(DeprecationWarning, match="TLSv1_1"):
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def test_tls11_only_simulator_starts_and_handshakes_only_tls11(start_pacs, pki):
    with pytest.warns(DeprecationWarning, match="TLSv1_1"):
        context = server_tls_context(pki / "server.pem", maximum_version=ssl.TLSVersion.TLSv1_1)
    pacs = start_pacs(ssl_context=context)
    modern = ssl.create_default_context(cafile=pki / "ca.pem")
    modern.minimum_version = ssl.TLSVersion.TLSv1_2

    legacy_context = tls11_client_context(pki)
    with (
        socket.create_connection(pacs.address, timeout=10) as raw,
        legacy_context.wrap_socket(raw, server_hostname="localhost") as legacy,
    ):
        version = legacy.version()
    with socket.create_connection(pacs.address, timeout=10) as raw, pytest.raises(ssl.SSLError):
        modern.wrap_socket(raw, server_hostname="localhost").close()

    assert version == "TLSv1.1"


def test_cli_serves_until_sigterm_then_summarizes(tmp_path):
    port = free_port()
    files = write_study(replace(SMALL_CT, images_per_series=1), tmp_path / "in")
    argv = [
        sys.executable,
        "-m",
        "simulators",
        "pacs",
        "--port",
        str(port),
        "--storage",
        str(tmp_path / "st"),
    ]
    process = ManagedProcess(argv, ready_line=f"PACS simulator listening on 127.0.0.1:{port}", cwd=REPO)

    with process:
        echoed = echoscu(port)
        stored = storescu(port, files, "-xe")
        returncode = process.stop()

    assert echoed.returncode == 0, echoed.stderr
    assert stored.returncode == 0, stored.stderr
    assert returncode == 0, process.output()
    output = process.output()
    assert "associations: 2 requested, 2 accepted, 0 rejected, 0 aborted by us" in output
    assert "echoes: 1" in output
    assert "stores by status: 0x0000=1" in output
    assert "instances stored: 1; duplicates: 0" in output
    assert len(list((tmp_path / "st").glob("*.dcm"))) == 1


def test_cli_reject_flag_rejects(tmp_path):
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "simulators",
        "pacs",
        "--port",
        str(port),
        "--storage",
        str(tmp_path),
        "--reject",
    ]

    with ManagedProcess(argv, ready_line="PACS simulator listening on", cwd=REPO) as process:
        echoed = echoscu(port)
        returncode = process.stop()

    assert "Association Rejected" in echoed.stderr
    assert returncode == 0
    assert "associations: 1 requested, 0 accepted, 1 rejected" in process.output()


@pytest.mark.parametrize(
    "bad_option",
    [["--status-for", "1.2.3"], ["--status-for", "1.2.3=banana"], ["--outage", "5"], ["--fraction", "2"]],
)
def test_cli_refuses_malformed_fault_options(tmp_path, capsys, bad_option):
    pynetdicom_logger = logging.getLogger("pynetdicom")
    level = pynetdicom_logger.level
    with pytest.raises(SystemExit) as exited:
        cli.main(["pacs", "--storage", str(tmp_path), *bad_option])

    pynetdicom_logger.setLevel(level)  # main() sets it for the process it normally owns
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err
