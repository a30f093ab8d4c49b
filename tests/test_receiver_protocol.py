"""The receiver against hostile and unusual peers: raw PDUs, slow and idle peers, refusals, access control.

Raw-socket tests speak PS3.8 byte for byte (association PDUs encoded by pynetdicom's own classes) so every
answer can be checked exactly; the others use pynetdicom's AE as an ordinary, well-behaved requestor.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from io import BytesIO
from typing import TYPE_CHECKING

import pydicom.config
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, build_role
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.app import Gateway
from gateway.config import parse_config
from simulators.datasets import InstanceRef, StudySpec, build_dataset, encode_dataset
from simulators.harness import free_port
from simulators.pynetdicom_setup import close_transport
from tests.conftest import GATEWAY_AE, SCANNER_AE, write_config

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

    from tests.conftest import GatewaySetup

_HEADER = struct.Struct(">BxL")  # PDU type, reserved, length (PS3.8 9.3.1)
# Below conftest's deadlines (ARTIM 10 s, network 20 s): a gateway that waits instead of answering fails.
READ_TIMEOUT = 5.0
SPEC = StudySpec(modality="CT", images_per_series=4, rows=16, columns=16, seed=20260301)


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with `reason`."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ with result (1 permanent, 2 transient), source and reason."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


def associate_request(calling: str = "ECHOSCU", called: str = GATEWAY_AE) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing Verification with implicit VR little endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            pytest.fail(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, header included."""
    header = read_exactly(sock, 6)
    _, length = _HEADER.unpack(header)
    return header + read_exactly(sock, length)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes; a socket timeout (the gateway hung on) fails the test."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def establish(sock: socket.socket, calling: str = "ECHOSCU") -> None:
    sock.sendall(associate_request(calling))
    answer = read_pdu(sock)
    assert answer[0] == 0x02, f"expected A-ASSOCIATE-AC, got {answer[:10].hex(' ')}"


def open_association(port: int, calling: str = "ECHOSCU", **kwargs: object) -> Association:
    """A pynetdicom association proposing Verification and CT Image Storage; must be accepted."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = READ_TIMEOUT
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE, **kwargs)  # type: ignore[arg-type]
    if not assoc.is_established:
        close_transport(assoc)
        pytest.fail(f"association not accepted (rejected: {assoc.is_rejected}, aborted: {assoc.is_aborted})")
    return assoc


def release(assoc: Association) -> None:
    assoc.release()
    close_transport(assoc)


def echo(port: int, calling: str = "ECHOSCU") -> int:
    """One C-ECHO on a fresh association; returns its status."""
    assoc = open_association(port, calling)
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        release(assoc)


@pytest.fixture
def short_timeouts(tmp_path: Path) -> Iterator[GatewaySetup]:
    """A gateway with acse_timeout = network_timeout = 1 s."""
    setup = write_config(tmp_path, acse_timeout="1s", network_timeout="1s")
    with setup.process():
        yield setup


# --- 1. length guard ---


@pytest.mark.usefixtures("gateway")
def test_pdata_declaring_4_gib_is_aborted_without_waiting_for_the_body(gateway_setup: GatewaySetup) -> None:
    with connect(gateway_setup.port) as sock:
        establish(sock)
        sock.sendall(_HEADER.pack(0x04, 0xFFFFFFF0))  # the header alone: a body read would hang until timeout
        assert read_to_eof(sock) == abort_pdu(6)  # invalid PDU parameter, then the gateway closes
    assert echo(gateway_setup.port) == 0x0000


@pytest.mark.usefixtures("gateway")
def test_associate_request_declaring_10_mb_is_aborted_before_association(gateway_setup: GatewaySetup) -> None:
    with connect(gateway_setup.port) as sock:
        sock.sendall(_HEADER.pack(0x01, 10_000_000))
        assert read_to_eof(sock) == abort_pdu(6)
    assert echo(gateway_setup.port) == 0x0000


# --- 2. garbage ---


@pytest.mark.parametrize(
    ("first_bytes", "answer"),
    [
        # An unknown PDU type with a plausible length: unrecognized PDU (PS3.8 9.3.8 reason 1).
        (b"\x55\x00\x00\x00\x00\x04\xde\xad\xbe\xef", abort_pdu(1)),
        # P-DATA-TF (one command PDV) before any A-ASSOCIATE-RQ: unexpected PDU (reason 2).
        (_HEADER.pack(0x04, 6) + b"\x00\x00\x00\x02\x01\x03", abort_pdu(2)),
        # Other protocols' openings declare absurd lengths: refused on the length, before the type matters.
        (b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", abort_pdu(6)),
        (bytes.fromhex("160301020001000200030300"), abort_pdu(6)),  # a TLS ClientHello to the plain port
        # A-ASSOCIATE-RQ whose body is not a request: invalid PDU parameter (reason 6).
        (_HEADER.pack(0x01, 32) + bytes(range(200, 232)), abort_pdu(6)),
    ],
    ids=["unknown-type-0x55", "p-data-first", "http-request", "tls-client-hello", "garbage-request-body"],
)
@pytest.mark.usefixtures("gateway")
def test_garbage_first_pdu_is_aborted_and_closed(
    gateway_setup: GatewaySetup, first_bytes: bytes, answer: bytes
) -> None:
    with connect(gateway_setup.port) as sock:
        sock.sendall(first_bytes)
        assert read_to_eof(sock) == answer
    assert echo(gateway_setup.port) == 0x0000


@pytest.mark.parametrize(
    ("after_association", "answer"),
    [
        # A PDV item header cut short inside the PDU.
        (_HEADER.pack(0x04, 3) + b"\x00\x00\x00", abort_pdu(6)),
        # A PDV item claiming more bytes than its PDU holds.
        (_HEADER.pack(0x04, 8) + b"\x00\x00\x01\x00\x01\x03\xff\xff", abort_pdu(6)),
        # A PDV on a presentation context that was never negotiated.
        (_HEADER.pack(0x04, 6) + b"\x00\x00\x00\x02\x63\x03", abort_pdu(6)),
        # A second A-ASSOCIATE-RQ on an established association: unexpected PDU.
        (associate_request(), abort_pdu(2)),
        # An unknown PDU type once established: unrecognized PDU.
        (b"\x55\x00\x00\x00\x00\x00", abort_pdu(1)),
    ],
    ids=["truncated-pdv-header", "pdv-longer-than-pdu", "unknown-context", "second-request", "unknown-type"],
)
@pytest.mark.usefixtures("gateway")
def test_garbage_after_association_is_aborted_and_closed(
    gateway_setup: GatewaySetup, after_association: bytes, answer: bytes
) -> None:
    with connect(gateway_setup.port) as sock:
        establish(sock)
        sock.sendall(after_association)
        assert read_to_eof(sock) == answer
    assert echo(gateway_setup.port) == 0x0000


# --- 3 and 4. slow and idle peers ---


def test_trickling_associate_request_is_dropped_at_the_artim_deadline(short_timeouts: GatewaySetup) -> None:
    request = associate_request()
    with connect(short_timeouts.port) as slow:
        started = time.monotonic()
        for count, byte in enumerate(request, 1):
            slow.sendall(bytes([byte]))
            if count == 1:  # the slow peer holds its connection open; others are served meanwhile
                assert echo(short_timeouts.port) == 0x0000
            # Paces the trickle at 0.3 s a byte, and wakes at once when the gateway answers or closes.
            readable, _, _ = select.select([slow], [], [], 0.3)
            if readable:
                break
            if time.monotonic() - started > READ_TIMEOUT:
                pytest.fail(f"still connected after {count} trickled bytes")
        else:
            pytest.fail("the gateway waited for the whole trickled request")
        answer = read_exactly(slow, 10)
        elapsed = time.monotonic() - started
        try:
            rest = slow.recv(1)
        except ConnectionResetError:  # a byte we sent as it closed may be answered with a reset
            rest = b""
    assert answer == abort_pdu(0)
    assert rest == b""
    assert 0.8 <= elapsed < 3.0, f"dropped after {elapsed:.2f} s with acse_timeout = 1 s"
    assert count < len(request)
    assert echo(short_timeouts.port) == 0x0000


def test_idle_established_association_is_aborted_at_the_network_timeout(short_timeouts: GatewaySetup) -> None:
    with connect(short_timeouts.port) as sock:
        establish(sock)
        started = time.monotonic()
        answer = read_to_eof(sock)
        elapsed = time.monotonic() - started
    assert answer == abort_pdu(0)
    assert 0.8 <= elapsed < 3.0, f"aborted after {elapsed:.2f} s with network_timeout = 1 s"
    assert echo(short_timeouts.port) == 0x0000


# --- 5. role selection ---


@pytest.mark.parametrize("scp_role", [False, True], ids=["scu-only", "scu-and-scp-proposed"])
@pytest.mark.usefixtures("gateway")
def test_role_selection_is_answered_and_the_requestor_stays_scu(
    gateway_setup: GatewaySetup, tmp_path: Path, scp_role: bool
) -> None:
    role = build_role(CTImageStorage, scu_role=True, scp_role=scp_role)
    assoc = open_association(gateway_setup.port, SCANNER_AE, ext_neg=[role])
    try:
        replies = [
            item
            for item in assoc.acceptor.primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        ]
        assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in replies] == [(CTImageStorage, True, False)]
        (ct,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
        assert (ct.as_scu, ct.as_scp) == (True, False)
        ds = build_dataset(SPEC, InstanceRef(1, 1, 1))
        assert assoc.send_c_store(write_file(tmp_path / "ct.dcm", ds)).Status == 0x0000
    finally:
        release(assoc)
    assert [row["sop_instance_uid"] for row in gateway_setup.rows()] == [ds.SOPInstanceUID]


# --- 6. C-STORE refusals on a usable association ---


def write_file(path: Path, ds: Dataset, meta_uid: str | None = None, data_set: bytes | None = None) -> Path:
    """A DICOM file whose meta names `meta_uid` (pynetdicom sends it as the Affected SOP Instance UID)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_uid or ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(DicomFileLike(buffer), meta)
    path.write_bytes(buffer.getvalue() + (encode_dataset(ds) if data_set is None else data_set))
    return path


def tree(directory: Path) -> set[str]:
    """Every file name under `directory` except the index's own files (they change with every commit)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if "index.sqlite" not in p.name}


@pytest.fixture
def hostile_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process write and send a hostile peer's files: invalid UIDs, data sets sent byte for byte."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's data set bytes as is


BAD = build_dataset(SPEC, InstanceRef(1, 1, 2))
GOOD = build_dataset(SPEC, InstanceRef(1, 1, 3))
_ENCODED = encode_dataset(BAD)


@pytest.mark.parametrize(
    ("meta_uid", "data_set", "expected"),
    [
        pytest.param("1.2.3.abc", None, 0xC001, id="uid-with-letters"),
        pytest.param("../../etc/x", None, 0xC001, id="uid-path-traversal"),
        pytest.param("/tmp/x", None, 0xC001, id="uid-absolute-path"),  # noqa: S108 - a hostile UID
        pytest.param(GOOD.SOPInstanceUID, None, 0xA900, id="command-uid-differs-from-data-set"),
        # Bytes that are no DICOM data set at all: "cannot understand".
        pytest.param(None, bytes((i * 7919 + 13) % 256 for i in range(2000)), 0xC000, id="garbage-data-set"),
        # Pixel Data declares 512 bytes; the data set ends 200 bytes short of that.
        pytest.param(None, _ENCODED[:-200], 0xC000, id="truncated-data-set"),
    ],
)
@pytest.mark.usefixtures("gateway", "hostile_files")
def test_refused_c_store_leaves_nothing_and_the_association_usable(
    gateway_setup: GatewaySetup, tmp_path: Path, meta_uid: str | None, data_set: bytes | None, expected: int
) -> None:
    bad_file = write_file(tmp_path / "bad.dcm", BAD, meta_uid, data_set)
    good_file = write_file(tmp_path / "good.dcm", GOOD)
    before = tree(tmp_path)

    assoc = open_association(gateway_setup.port, SCANNER_AE)
    try:
        refused = assoc.send_c_store(bad_file)
        accepted = assoc.send_c_store(good_file)
    finally:
        release(assoc)

    assert refused.Status == expected, f"0x{refused.Status:04X}: {refused.get('ErrorComment')}"
    assert accepted.Status == 0x0000
    assert [p.name for p in gateway_setup.spool_files()] == [f"{GOOD.SOPInstanceUID}.dcm"]
    assert [row["sop_instance_uid"] for row in gateway_setup.rows()] == [GOOD.SOPInstanceUID]
    assert tree(tmp_path) - before == {f"state/spool/{GOOD.SOPInstanceUID}.dcm"}


# --- 7 and 8. association limits and access control ---


def test_association_beyond_max_associations_is_rejected_transiently(tmp_path: Path) -> None:
    setup = write_config(tmp_path, receiver_extra="max_associations = 2")
    with setup.process():
        held = [open_association(setup.port) for _ in range(2)]
        try:
            assert [int(assoc.send_c_echo().Status) for assoc in held] == [0x0000, 0x0000]
            with connect(setup.port) as sock:
                sock.sendall(associate_request())
                # transient, service-provider (presentation) source, local limit exceeded
                assert read_pdu(sock) == reject_pdu(2, 3, 2)
            release(held.pop())
            assert echo(setup.port) == 0x0000  # the released slot is free again at once
        finally:
            for assoc in held:
                release(assoc)


@pytest.mark.parametrize(
    ("networks", "calling", "answer"),
    [
        ('["10.0.0.0/8"]', "ECHOSCU", reject_pdu(1, 1, 1)),  # permanent, user, no reason given
        ('["127.0.0.0/8"]', "INTRUDER", reject_pdu(1, 1, 3)),  # permanent, user, calling AE not recognized
    ],
    ids=["address-outside-allowed-networks", "calling-ae-not-allowed"],
)
def test_access_control_rejects_permanently(
    tmp_path: Path, networks: str, calling: str, answer: bytes
) -> None:
    setup = write_config(tmp_path, receiver_extra=f"allowed_networks = {networks}")
    with setup.process():
        with connect(setup.port) as sock:
            sock.sendall(associate_request(calling))
            assert read_pdu(sock) == answer
        if networks == '["127.0.0.0/8"]':  # the same address with an allowed AE title gets in
            assert echo(setup.port) == 0x0000


# --- 9. TCP_NODELAY, in-process ---


def _associate_blocking(port: int) -> Association:
    return open_association(port)


async def test_accepted_sockets_have_tcp_nodelay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio turns Nagle off on every TCP transport by itself; switch that off so the test sees (and can
    # miss) only the gateway's own setsockopt.
    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", lambda _sock: None)
    port = free_port()
    config = parse_config(
        {
            "gateway": {
                "node_id": "nodelay",
                "ae_title": GATEWAY_AE,
                "state_dir": str(tmp_path / "state"),
                "min_free_bytes": "1MB",
            },
            "receiver": {"host": "127.0.0.1", "port": port, "allowed_calling_ae": ["ECHOSCU"]},
            "metrics": {"enabled": False},
        }
    )
    gateway = Gateway(config)
    running = asyncio.create_task(gateway.run(), name="gateway")
    try:
        ready = asyncio.create_task(gateway.ready.wait())
        done, _ = await asyncio.wait({ready, running}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        assert ready in done, "the in-process gateway did not become ready"
        assoc = await asyncio.to_thread(_associate_blocking, port)
        try:
            assert gateway.receiver is not None
            associations = list(gateway.receiver._associations)
            assert len(associations) == 1
            raw = associations[0].writer.get_extra_info("socket")
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            await asyncio.to_thread(release, assoc)
    finally:
        gateway.stop()
        await asyncio.wait_for(running, 30)
