"""Forwarding to a real third-party archive: DCMTK's storescp over mutual TLS, and TLS refusals."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pydicom

from simulators.datasets import StudySpec, build_dataset, encode_dataset, iter_refs
from simulators.harness import ManagedProcess, free_port
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    DCMTK_ENV,
    GATEWAY_AE,
    SCANNER_AE,
    dataset_bytes,
    delivery_states,
    destination_section,
    require_tools,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import GatewaySetup, Pki


def storescp_tls(directory: Path, port: int, pki: Pki) -> ManagedProcess:
    """DCMTK's storescp with TLS, requiring a client certificate signed by the test CA."""
    require_tools("storescp")
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        "storescp", "--output-directory", str(directory), "+B", "--fork",
        "+tls", str(pki.pacs_key), str(pki.pacs_cert), "-pw", "+cf", str(pki.ca), "-rc",
        str(port),
    ]  # fmt: skip
    return ManagedProcess(argv, ready_port=port, env=DCMTK_ENV, timeout=15)


def mutual_tls(pki: Pki, *, ca: Path | None = None, hostname: str = "localhost") -> str:
    return (
        f'[destination.tls]\nca = "{ca or pki.ca}"\ncert = "{pki.gateway_client_cert}"\n'
        f'key = "{pki.gateway_client_key}"\nserver_hostname = "{hostname}"\n'
    )


def send(setup: GatewaySetup, spec: StudySpec) -> None:
    options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
    result = run_scanner(options)
    assert result.statuses == {0x0000: spec.total_instances}, result.summary()


def received_by_uid(directory: Path) -> dict[str, Path]:
    files = [p for p in directory.iterdir() if p.is_file()]
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def test_storescp_over_mutual_tls_receives_every_instance_byte_exact(tmp_path: Path, pki: Pki) -> None:
    pacs_port = free_port()
    section = destination_section("dcmtk", pacs_port, called_ae="STORESCP", tls=mutual_tls(pki))
    setup = write_config(tmp_path, sections=section)
    spec = StudySpec(modality="MR", series=2, images_per_series=15, rows=64, columns=64, seed=31)
    with storescp_tls(tmp_path / "archive", pacs_port, pki), setup.process():
        send(setup, spec)
        wait_until(lambda: delivery_states(setup) == {"done": 30}, 60, "all 30 deliveries done")
    received = received_by_uid(tmp_path / "archive")
    assert len(received) == 30
    for ref in iter_refs(spec):
        ds = build_dataset(spec, ref)
        assert dataset_bytes(received[str(ds.SOPInstanceUID)]) == encode_dataset(ds)


def _refused_run(tmp_path: Path, pki: Pki, tls_table: str) -> tuple[GatewaySetup, str]:
    pacs_port = free_port()
    section = destination_section("dcmtk", pacs_port, called_ae="STORESCP", tls=tls_table)
    setup = write_config(tmp_path, sections=section)
    with storescp_tls(tmp_path / "archive", pacs_port, pki), setup.process() as gateway:
        send(setup, StudySpec(modality="CT", images_per_series=3, rows=32, columns=32))
        wait_until(lambda: "is down" in gateway.output(), 30, "the destination to be reported down")
        log = gateway.output()
        assert delivery_states(setup) == {"pending": 3}
    assert not list((tmp_path / "archive").iterdir())
    return setup, log


def test_archive_certificate_from_another_ca_is_refused_and_receives_nothing(
    tmp_path: Path, pki: Pki
) -> None:
    _, log = _refused_run(tmp_path, pki, mutual_tls(pki, ca=pki.other_ca))
    assert "certificate verify failed" in log


def test_archive_certificate_for_another_host_name_is_refused(tmp_path: Path, pki: Pki) -> None:
    _, log = _refused_run(tmp_path, pki, mutual_tls(pki, hostname="pacs.elsewhere.example"))
    assert "certificate verify failed" in log
    assert "Hostname mismatch" in log or "hostname" in log.lower()


def test_storescu_reference_still_works_against_the_same_storescp(tmp_path: Path, pki: Pki) -> None:
    """Guards the setup above: the same storescp accepts DCMTK's own TLS client."""
    require_tools("storescu")
    port = free_port()
    files = [tmp_path / "one.dcm"]
    spec = StudySpec(modality="CT", images_per_series=1, rows=16, columns=16)
    build_dataset(spec, next(iter_refs(spec))).save_as(files[0], enforce_file_format=True)
    with storescp_tls(tmp_path / "archive", port, pki):
        result = subprocess.run(
            [
                "storescu",
                "+tls",
                str(pki.gateway_client_key),
                str(pki.gateway_client_cert),
                "-pw",
                "+cf",
                str(pki.ca),
                "-aec",
                "STORESCP",
                "127.0.0.1",
                str(port),
                str(files[0]),
            ],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
