"""TLS refusals, inbound and outbound: each refused, with a log line that says who and why, and no data moved.

Already covered elsewhere, and not repeated here: inbound, a client trusting another CA and a plain-TCP
client (tests/test_receiver_tls.py, which also refuses TLS 1.1 and clients without a certificate, but
without looking at the log); outbound, an archive certificate from another CA and one for another host
name (tests/test_forwarder_dcmtk.py), an archive limited to TLS 1.1 (tests/test_forwarder_e2e.py).

Inbound, the gateway requires a client certificate signed by its CA: a client with an expired
certificate, one signed by another CA, one without a certificate, and clients limited to TLS 1.0 or 1.1
are refused; nothing is stored; the log names the peer (address:port) and the TLS failure; a good client
still gets in. Outbound, an archive with an expired certificate, one limited to TLS 1.0, and one that
requires a client certificate the gateway lacks: the archive receives nothing, the destination is
reported down with the reason, and the deliveries stay pending.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest
import trustme

from simulators.datasets import StudySpec
from simulators.harness import free_port
from simulators.pacs import PacsSimulator, server_tls_context
from simulators.scanner import ScanOptions, TlsOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    SCANNER_AE,
    delivery_states,
    destination_section,
    wait_until,
    write_config,
)
from tests.test_hostile import gateway_process
from tests.test_receiver_protocol import associate_request

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import GatewaySetup

TIMEOUT: Final = 10.0
PACS_AE: Final = "CENTRAL_PACS"
# How a client sees the gateway end a handshake (asyncio closes without sending the fatal alert), or the
# alert it sends, should it start to; a client that fails on its own (e.g. NO_PROTOCOLS_AVAILABLE) is not.
REFUSED_BY_SERVER: Final = frozenset(
    {
        "UNEXPECTED_EOF_WHILE_READING",
        "closed",
        "reset",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


@dataclass(frozen=True)
class MatrixPki:
    """PEM files for the matrix: one CA that the gateway and archive trust, and one that nobody does."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_client_cert: Path
    expired_client_key: Path
    foreign_client_cert: Path
    foreign_client_key: Path
    pacs_cert: Path
    pacs_key: Path
    expired_pacs_cert: Path
    expired_pacs_key: Path
    gateway_client_cert: Path
    gateway_client_key: Path


@pytest.fixture
def tls_pki(tmp_path: Path) -> MatrixPki:
    ca, foreign = trustme.CA(), trustme.CA()
    now = dt.datetime.now(dt.UTC)
    past = {"not_before": now - dt.timedelta(days=30), "not_after": now - dt.timedelta(days=1)}
    leaves = {
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "client": ca.issue_cert("ct-scanner-1.example", common_name=SCANNER_AE),
        "expired_client": ca.issue_cert("ct-scanner-1.example", common_name=SCANNER_AE, **past),
        "foreign_client": foreign.issue_cert("ct-scanner-1.example", common_name=SCANNER_AE),
        "pacs": ca.issue_cert("localhost", "127.0.0.1"),
        "expired_pacs": ca.issue_cert("localhost", "127.0.0.1", **past),
        "gateway_client": ca.issue_cert("edge-gw.example", common_name=GATEWAY_AE),
    }
    directory = tmp_path / "pki"
    directory.mkdir()
    paths = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for name, leaf in leaves.items():
        paths[f"{name}_cert"] = directory / f"{name}.crt"
        paths[f"{name}_key"] = directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(paths[f"{name}_cert"]))
        leaf.private_key_pem.write_to_path(str(paths[f"{name}_key"]))
    return MatrixPki(**paths)


def legacy_context(context: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    """Limit `context` to one outdated TLS version (OpenSSL 3 offers those only at security level 0)."""
    with (
        warnings.catch_warnings()
    ):  # an outdated peer on purpose: Python warns that the version is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


# ---------------------------------------------------------------- inbound


def client_context(pki: MatrixPki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class Inbound:
    client: Callable[[MatrixPki], ssl.SSLContext]
    causes: tuple[str, ...]  # one of these (lower case) belongs in the gateway's log line


INBOUND: Final = {
    "expired-client-certificate": Inbound(
        lambda pki: client_context(pki, pki.expired_client_cert, pki.expired_client_key),
        ("certificate has expired", "certificate_expired"),
    ),
    "client-certificate-from-another-ca": Inbound(
        lambda pki: client_context(pki, pki.foreign_client_cert, pki.foreign_client_key),
        ("unable to get local issuer certificate", "unknown ca", "unknown_ca", "certificate verify failed"),
    ),
    "client-without-certificate": Inbound(
        lambda pki: client_context(pki, None, None),
        ("peer did not return a certificate", "peer_did_not_return_a_certificate", "certificate required"),
    ),
    "tls-1.0-only-client": Inbound(
        lambda pki: legacy_context(
            client_context(pki, pki.client_cert, pki.client_key), ssl.TLSVersion.TLSv1
        ),
        ("unsupported protocol", "unsupported_protocol", "protocol version", "wrong version"),
    ),
    "tls-1.1-only-client": Inbound(
        lambda pki: legacy_context(
            client_context(pki, pki.client_cert, pki.client_key), ssl.TLSVersion.TLSv1_1
        ),
        ("unsupported protocol", "unsupported_protocol", "protocol version", "wrong version"),
    ),
}


def attempt(port: int, context: ssl.SSLContext) -> tuple[int, str]:
    """Handshake and send an A-ASSOCIATE-RQ; return our source port and how the gateway refused us."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        source_port = raw.getsockname()[1]
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(associate_request(SCANNER_AE))
                answer = tls.recv(65536)
        except ssl.SSLCertVerificationError:
            raise  # the client's own verdict on the gateway, not the gateway's on the client
        except ssl.SSLError as exc:
            return source_port, str(exc.reason)
        except ConnectionResetError:
            return source_port, "reset"
    assert answer == b"", f"the gateway answered over TLS: {answer[:10].hex(' ')}"
    return source_port, "closed"


def good_client_stores(setup: GatewaySetup, pki: MatrixPki) -> list[str]:
    tls = TlsOptions(pki.ca, pki.client_cert, pki.client_key, server_hostname="localhost")
    spec = StudySpec(modality="CT", images_per_series=2, rows=16, columns=16)
    options = ScanOptions(
        port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec, tls=tls, timeout=TIMEOUT
    )
    result = run_scanner(options)
    assert result.statuses == {0x0000: 2}, result.summary()
    return result.acked


@pytest.mark.parametrize("case", list(INBOUND))
def test_inbound_tls_refusal_is_logged_with_peer_and_cause_and_stores_nothing(
    tmp_path: Path, tls_pki: MatrixPki, case: str
) -> None:
    tls = (
        f'[receiver.tls]\ncert = "{tls_pki.server_cert}"\nkey = "{tls_pki.server_key}"\nca = "{tls_pki.ca}"\n'
    )
    setup = write_config(tmp_path, receiver_extra=tls)
    with gateway_process(setup) as gateway:
        source_port, how = attempt(setup.port, INBOUND[case].client(tls_pki))
        assert how in REFUSED_BY_SERVER, f"refused how? {how}"
        assert setup.rows() == []
        assert setup.spool_files() == []
        acked = good_client_stores(setup, tls_pki)
        # The good client's association is logged after the refusal was: once it is there, so is the other.
        wait_until(lambda: "ended: 2 stored" in gateway.output(), 10, "the good client's association to end")
        log = gateway.output()
    assert sorted(row["sop_instance_uid"] for row in setup.rows()) == sorted(acked)
    peer = f"127.0.0.1:{source_port}"
    naming_peer = [line for line in log.splitlines() if peer in line]
    causes = INBOUND[case].causes
    assert any(cause in line.lower() for line in naming_peer for cause in causes), (
        f"no log line names {peer} and the TLS failure (one of {causes}); lines naming it: {naming_peer}"
    )


# ---------------------------------------------------------------- outbound


@dataclass(frozen=True)
class Outbound:
    archive: Callable[[MatrixPki], ssl.SSLContext]
    gateway_has_client_certificate: bool
    causes: tuple[str, ...]


def _archive_tls_1_0(pki: MatrixPki) -> ssl.SSLContext:
    with warnings.catch_warnings():  # server_tls_context builds an outdated peer on purpose; Python warns
        warnings.simplefilter("ignore", DeprecationWarning)
        return server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca, maximum_version=ssl.TLSVersion.TLSv1)


OUTBOUND: Final = {
    "archive-certificate-expired": Outbound(
        lambda pki: server_tls_context(pki.expired_pacs_cert, pki.expired_pacs_key, pki.ca),
        gateway_has_client_certificate=True,
        causes=("certificate has expired",),
    ),
    "archive-limited-to-tls-1.0": Outbound(
        _archive_tls_1_0,
        gateway_has_client_certificate=True,
        causes=("protocol version", "unsupported protocol", "wrong version"),
    ),
    "archive-requires-a-client-certificate-the-gateway-lacks": Outbound(
        lambda pki: server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca),
        gateway_has_client_certificate=False,
        causes=("certificate required", "handshake failure"),
    ),
}


@pytest.mark.parametrize("case", list(OUTBOUND))
def test_outbound_tls_refusal_sends_nothing_reports_the_destination_down_with_the_cause(
    tmp_path: Path, tls_pki: MatrixPki, case: str
) -> None:
    outbound = OUTBOUND[case]
    client = (
        f'cert = "{tls_pki.gateway_client_cert}"\nkey = "{tls_pki.gateway_client_key}"\n'
        if outbound.gateway_has_client_certificate
        else ""
    )
    tls = f'[destination.tls]\nca = "{tls_pki.ca}"\n{client}server_hostname = "localhost"\n'
    spec = StudySpec(modality="CT", images_per_series=2, rows=16, columns=16)
    archive = outbound.archive(tls_pki)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=archive) as pacs:
        setup = write_config(
            tmp_path, sections=destination_section("pacs", pacs.port, called_ae=PACS_AE, tls=tls)
        )
        with gateway_process(setup) as gateway:
            options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
            assert run_scanner(options).statuses == {0x0000: 2}
            wait_until(lambda: "is down" in gateway.output(), 20, "the destination to be reported down")
            down = [line for line in gateway.output().splitlines() if "Destination pacs is down" in line]
            states = delivery_states(setup)
        received, stats = pacs.received(), pacs.stats()
    assert len(down) == 1, down
    assert any(cause in down[0].lower() for cause in outbound.causes), down[0]
    assert states == {"pending": 2}
    assert received == []
    assert stats.associations_requested == 0  # not even an A-ASSOCIATE-RQ got through
