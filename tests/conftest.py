"""Shared fixtures: a real gateway process on a free loopback port, its config and state, and helpers."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

from simulators.harness import ManagedProcess, free_port
from simulators.scanner import TlsOptions

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
GATEWAY_AE = "EDGE_GW"
SCANNER_AE = "CT_SCANNER_1"
# DCMTK tools leave Nagle on unless told: each C-STORE would wait 40-70 ms for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
READY_LINE = r"Gateway \S+ ready"


def require_tools(*names: str) -> None:
    """Fail (never skip) when a peer tool is missing: `make test` installs them."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `make test`, which installs the Debian packages")


@dataclass
class GatewaySetup:
    """Where one test gateway keeps its config and state, and the port it listens on."""

    config: Path
    state_dir: Path
    port: int

    @property
    def spool(self) -> Path:
        return self.state_dir / "spool"

    @property
    def index(self) -> Path:
        return self.state_dir / "index.sqlite"

    def rows(
        self, sql: str = "SELECT * FROM instances", params: tuple[object, ...] = ()
    ) -> list[sqlite3.Row]:
        """Query the index with a plain reader connection (as the CLI would, beside the daemon)."""
        db = sqlite3.connect(f"file:{self.index}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def spool_files(self) -> list[Path]:
        return sorted(self.spool.iterdir()) if self.spool.exists() else []

    def process(self, *, timeout: float = 30.0) -> ManagedProcess:
        """A gateway process for this setup (not started yet)."""
        return ManagedProcess(
            [sys.executable, "-m", "gateway", "-c", str(self.config), "run"],
            ready_line=READY_LINE,
            timeout=timeout,
            env={"PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )


def write_config(
    directory: Path,
    *,
    port: int | None = None,
    allowed_calling_ae: tuple[str, ...] = (SCANNER_AE, "STORESCU", "ECHOSCU"),
    min_free_bytes: str = "1MB",
    acse_timeout: str = "10s",
    network_timeout: str = "20s",
    receiver_extra: str = "",
    sections: str = "",
    metrics_port: int | None = None,
) -> GatewaySetup:
    """Write a gateway config for tests: loopback, a free port, state under `directory`."""
    port = port or free_port()
    state_dir = directory / "state"
    callers = ", ".join(f'"{ae}"' for ae in allowed_calling_ae)
    config = directory / "gateway.toml"
    metrics = (
        "[metrics]\nenabled = false"
        if metrics_port is None
        else f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"'
    )
    config.write_text(
        f"""
[gateway]
node_id = "test-node"
ae_title = "{GATEWAY_AE}"
state_dir = "{state_dir}"
min_free_bytes = "{min_free_bytes}"
log_level = "info"

[receiver]
host = "127.0.0.1"
port = {port}
allowed_calling_ae = [{callers}]
acse_timeout = "{acse_timeout}"
network_timeout = "{network_timeout}"
{receiver_extra}

{metrics}
{sections}
""",
        encoding="utf-8",
    )
    return GatewaySetup(config=config, state_dir=state_dir, port=port)


@pytest.fixture
def gateway_setup(tmp_path: Path) -> GatewaySetup:
    return write_config(tmp_path)


@pytest.fixture
def gateway(gateway_setup: GatewaySetup) -> Iterator[ManagedProcess]:
    """A running gateway process; stopped with SIGTERM at the end of the test."""
    with gateway_setup.process() as process:  # entering starts it and waits for the ready line
        yield process


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after preamble, prefix and file meta group."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        raise AssertionError(f"{path.name}: no DICM prefix")
    # (0002,0000) UL, explicit VR little endian: tag(4) VR(2) length(2) value(4)
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return raw[132 + 12 + group_length :]


@dataclass(frozen=True)
class Pki:
    """PEM files made by trustme for one test: a CA, certificates it signed, and an unrelated CA.

    `server_*` is the gateway's receiver certificate, `client_*` the scanner's; `pacs_*` the archive's,
    `gateway_client_*` the gateway's own toward the archive, `wrong_name_*` an archive certificate
    issued for another host name, `other_ca` a CA that signed nothing here.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    pacs_cert: Path
    pacs_key: Path
    gateway_client_cert: Path
    gateway_client_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path

    def scanner(self) -> TlsOptions:
        """What a correctly configured scanner presents and trusts."""
        return TlsOptions(self.ca, self.client_cert, self.client_key, server_hostname="localhost")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other_ca = trustme.CA(), trustme.CA()
    directory = tmp_path / "pki"
    directory.mkdir()
    blobs = {
        "ca": ca.cert_pem,
        "other_ca": other_ca.cert_pem,
    }
    for prefix, cert in {
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "client": ca.issue_cert("ct-scanner-1.example", common_name=SCANNER_AE),
        "pacs": ca.issue_cert("localhost", "127.0.0.1"),
        "gateway_client": ca.issue_cert("edge-gw.example", common_name=GATEWAY_AE),
        "wrong_name": ca.issue_cert("somewhere-else.example"),
    }.items():
        blobs[f"{prefix}_cert"] = cert.cert_chain_pems[0]
        blobs[f"{prefix}_key"] = cert.private_key_pem
    paths = {}
    for name, blob in blobs.items():
        paths[name] = directory / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return Pki(**paths)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll another process's state (the index, a directory) until `predicate` holds, or fail the test.

    Only for state of a separate process that offers nothing to await; never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def destination_section(
    name: str,
    port: int,
    *,
    called_ae: str = "CENTRAL_PACS",
    tls: str = "tls = false",
    retry: str = 'initial_delay = "0.2s"\nmax_delay = "1s"\njitter = 0.1\nmax_attempts = 3',
    extra: str = "",
) -> str:
    """A [[destination]] table for write_config(sections=...); `tls` is a key or a [destination.tls] table."""
    tls_key, tls_table = (tls, "") if tls.startswith("tls =") else ("", tls)
    return f"""
[[destination]]
name = "{name}"
host = "127.0.0.1"
port = {port}
called_ae = "{called_ae}"
{tls_key}
{extra}
{tls_table}
[destination.retry]
{retry}
"""


def delivery_states(setup: GatewaySetup, destination: str | None = None) -> dict[str, int]:
    """Deliveries by state (for one destination, or all)."""
    sql = "SELECT state, count(*) FROM deliveries"
    params: tuple[object, ...] = ()
    if destination is not None:
        sql += " WHERE destination = ?"
        params = (destination,)
    return {row[0]: row[1] for row in setup.rows(sql + " GROUP BY state", params)}
