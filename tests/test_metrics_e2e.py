"""Prometheus metrics, health and readiness of a real gateway after an end-to-end run."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from simulators.datasets import StudySpec
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    SCANNER_AE,
    delivery_states,
    destination_section,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from pathlib import Path

PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "PHI-4711-XYZ"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = get(port, "/metrics")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def pending(port: int) -> float:
    return value(samples(port), "dicom_gateway_queue_depth", destination="pacs", state="pending")


def test_counters_match_an_end_to_end_run_and_no_phi_leaks(tmp_path: Path) -> None:
    metrics_port = free_port()
    spec = StudySpec(
        modality="CT", images_per_series=20, rows=32, columns=32, seed=51,
        patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
    )  # fmt: skip
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title="CENTRAL_PACS") as pacs:
        section = destination_section("pacs", pacs.port)
        setup = write_config(tmp_path, sections=section, metrics_port=metrics_port)
        with setup.process():
            assert get(metrics_port, "/healthz")[0] == 200
            wait_until(lambda: get(metrics_port, "/readyz")[0] == 200, 20, "ready")
            options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
            assert run_scanner(options).statuses == {0x0000: 20}
            intruder = ScanOptions(port=setup.port, calling_ae="INTRUDER", called_ae=GATEWAY_AE, study=spec)
            assert run_scanner(intruder).associations_rejected == 1
            assert pacs.wait_for(20, 60)
            wait_until(lambda: delivery_states(setup) == {"done": 20}, 30, "all delivered")
            wait_until(
                lambda: (
                    value(
                        samples(metrics_port),
                        "dicom_gateway_queue_depth",
                        destination="pacs",
                        state="pending",
                    )
                    == 0
                ),
                20,
                "the status poller to see the empty queue",
            )
            found = samples(metrics_port)
            _, text = get(metrics_port, "/metrics")
    assert value(found, "dicom_gateway_instances_received_total", calling_ae=SCANNER_AE) == 20
    assert value(found, "dicom_gateway_associations_accepted_total", calling_ae=SCANNER_AE) == 1
    assert value(found, "dicom_gateway_associations_rejected_total", reason="calling_ae") == 1
    assert value(found, "dicom_gateway_instances_forwarded_total", destination="pacs") == 20
    assert value(found, "dicom_gateway_forward_latency_seconds_count", destination="pacs") == 20
    assert value(found, "dicom_gateway_destination_up", destination="pacs") == 1
    assert value(found, "dicom_gateway_associations_active") == 0
    assert value(found, "dicom_gateway_ready") == 1
    received_bytes = value(found, "dicom_gateway_received_bytes_total", calling_ae=SCANNER_AE)
    assert received_bytes == value(found, "dicom_gateway_forwarded_bytes_total", destination="pacs") > 0
    assert sum(row["size_bytes"] for row in setup.rows()) == received_bytes
    assert PATIENT_NAME not in text
    assert PATIENT_ID not in text
    assert "Doe" not in text


def test_readiness_reports_why_when_the_destination_is_down_and_the_reserve_is_reached(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title="CENTRAL_PACS") as pacs:
        pacs.set_faults(PacsFaults(reject_associations=True))
        section = destination_section("pacs", pacs.port)
        setup = write_config(tmp_path, sections=section, metrics_port=metrics_port, min_free_bytes="1000TB")
        with setup.process():
            wait_until(lambda: "reserve" in get(metrics_port, "/readyz")[1], 20, "not ready for the reserve")
            code, body = get(metrics_port, "/readyz")
            options = ScanOptions(
                port=setup.port,
                calling_ae=SCANNER_AE,
                called_ae=GATEWAY_AE,
                study=StudySpec(images_per_series=2),
            )
            assert run_scanner(options).statuses == {0xA700: 2}
            found = samples(metrics_port)
    assert code == 503
    assert "spool below its free-space reserve" in body
    assert value(found, "dicom_gateway_store_failures_total", reason="reserve") == 2
    assert value(found, "dicom_gateway_ready") == 0
