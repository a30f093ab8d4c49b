"""The receiver over real TLS (mutual authentication, trustme certificates): who gets in and who does not.

Every refused client must leave nothing behind, and the gateway must go on serving good clients.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from simulators.datasets import StudySpec
from simulators.scanner import ScanOptions, TlsOptions, run_scanner
from tests.conftest import GATEWAY_AE, SCANNER_AE, Pki, write_config
from tests.test_receiver_protocol import associate_request

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.conftest import GatewaySetup

TIMEOUT = 10.0


@pytest.fixture
def tls_gateway(tmp_path: Path, pki: Pki) -> Iterator[GatewaySetup]:
    """A gateway that requires TLS with client certificates signed by `pki.ca`."""
    tls = f'[receiver.tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca}"\n'
    setup = write_config(tmp_path, receiver_extra=tls)  # a sub-table: receiver_extra ends the [receiver] keys
    with setup.process():
        yield setup


def send_study(setup: GatewaySetup, tls: TlsOptions, images: int, seed: int) -> list[str]:
    """Send `images` CT instances over TLS; return the UIDs acknowledged with 0x0000."""
    spec = StudySpec(modality="CT", images_per_series=images, rows=32, columns=32, seed=seed)
    options = ScanOptions(
        port=setup.port,
        calling_ae=SCANNER_AE,
        called_ae=GATEWAY_AE,
        study=spec,
        tls=tls,
        timeout=TIMEOUT,
        progress_interval=60.0,
    )
    result = run_scanner(options)
    assert result.statuses == ({0x0000: images} if result.associations_established else {}), result.summary()
    return result.acked


def assert_still_serves_a_good_client(setup: GatewaySetup, pki: Pki, stored_before: int) -> None:
    acked = send_study(setup, pki.scanner(), images=2, seed=99)
    assert len(acked) == 2
    assert len(setup.rows()) == stored_before + 2


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def tls_connect(setup: GatewaySetup, context: ssl.SSLContext) -> bytes:
    """Handshake, send an A-ASSOCIATE-RQ and return what the gateway answers (b"" when it just closes)."""
    with (
        socket.create_connection(("127.0.0.1", setup.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(associate_request(SCANNER_AE))
        return tls.recv(65536)


# How a client sees the gateway end a handshake. asyncio's TLS server closes the connection without sending
# the fatal alert, so the client usually reads EOF; an alert is accepted too, should asyncio start sending it.
HUNG_UP = frozenset({"UNEXPECTED_EOF_WHILE_READING", "closed", "reset"})


def refused_by_gateway(setup: GatewaySetup, context: ssl.SSLContext) -> str:
    """Try a TLS association; return how the gateway refused it. An answered association fails the test."""
    try:
        answer = tls_connect(setup, context)
    except ssl.SSLCertVerificationError:
        raise  # the client's own verdict, not the gateway's
    except ssl.SSLError as exc:
        return str(exc.reason)
    except ConnectionResetError:
        return "reset"
    assert answer == b"", f"the gateway answered over TLS: {answer[:10].hex(' ')}"
    return "closed"


def test_mutual_tls_scanner_stores_20_instances(tls_gateway: GatewaySetup, pki: Pki) -> None:
    acked = send_study(tls_gateway, pki.scanner(), images=20, seed=1)
    assert len(acked) == 20
    rows = tls_gateway.rows()
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(acked)
    assert {row["calling_ae"] for row in rows} == {SCANNER_AE}
    assert len(tls_gateway.spool_files()) == 20


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_client_without_certificate_is_refused_at_the_handshake(
    tls_gateway: GatewaySetup, pki: Pki, version: ssl.TLSVersion
) -> None:
    context = client_context(pki.ca)
    context.minimum_version = context.maximum_version = version
    # TLS 1.2 fails inside the handshake; with TLS 1.3 the client finishes first and meets the gateway's
    # verdict on its first read. Either way no A-ASSOCIATE-AC ever comes back.
    alerts = {"SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
    assert refused_by_gateway(tls_gateway, context) in HUNG_UP | alerts

    scanner_without_cert = replace(pki.scanner(), cert_file=None, key_file=None)
    assert send_study(tls_gateway, scanner_without_cert, images=2, seed=2) == []
    assert tls_gateway.rows() == []
    assert tls_gateway.spool_files() == []
    assert_still_serves_a_good_client(tls_gateway, pki, stored_before=0)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_client_offering_only_tls_1_1_is_refused(tls_gateway: GatewaySetup, pki: Pki) -> None:
    context = client_context(pki.ca, pki.client_cert, pki.client_key)
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL will not even offer TLS 1.1 from this side
    # The client did offer TLS 1.1 (a client that cannot would fail locally, e.g. NO_PROTOCOLS_AVAILABLE):
    # the gateway hung up on it.
    assert refused_by_gateway(tls_gateway, context) in HUNG_UP | {"TLSV1_ALERT_PROTOCOL_VERSION"}
    assert tls_gateway.rows() == []
    assert_still_serves_a_good_client(tls_gateway, pki, stored_before=0)


def test_client_trusting_another_ca_refuses_the_gateway(tls_gateway: GatewaySetup, pki: Pki) -> None:
    context = client_context(pki.other_ca, pki.client_cert, pki.client_key)
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        tls_connect(tls_gateway, context)
    assert refused.value.reason == "CERTIFICATE_VERIFY_FAILED"

    misconfigured = replace(pki.scanner(), ca_file=pki.other_ca)
    assert send_study(tls_gateway, misconfigured, images=2, seed=3) == []
    assert tls_gateway.rows() == []
    assert_still_serves_a_good_client(tls_gateway, pki, stored_before=0)


def test_plain_tcp_client_gets_no_dicom_answer(tls_gateway: GatewaySetup, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=TIMEOUT) as sock:
        sock.sendall(associate_request(SCANNER_AE))
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer[:1] in {b"", b"\x15"}, f"expected nothing or a TLS alert record, got {answer[:16].hex(' ')}"
    assert tls_gateway.rows() == []
    assert_still_serves_a_good_client(tls_gateway, pki, stored_before=0)
