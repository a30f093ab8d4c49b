"""A real gateway process with a real Mosquitto and a pty UPS: what ops see, and the power policy."""

# ruff: noqa: F811 - the broker fixtures are imported from test_telemetry and requested by parameter name

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from dataclasses import replace
from typing import TYPE_CHECKING

from simulators.datasets import StudySpec, build_dataset, iter_refs
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator
from simulators.scanner import ScanOptions, run_scanner
from simulators.serialdev import UpsSimulator
from tests.conftest import GATEWAY_AE, SCANNER_AE, destination_section, wait_until, write_config
from tests.test_telemetry import broker, brokers, document, expect, subscriber  # noqa: F401 - fixtures used by name

if TYPE_CHECKING:
    from pathlib import Path

    from tests.test_telemetry import Broker

NODE = "test-node"
TOPIC = f"dicom-gateway/{NODE}"


def mqtt_section(port: int) -> str:
    return f'\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\nhealth_interval = "0.5s"\nkeepalive = "2s"\n'


def scan(port: int, spec: StudySpec, calling_ae: str = SCANNER_AE) -> ScanOptions:
    return ScanOptions(port=port, calling_ae=calling_ae, called_ae=GATEWAY_AE, study=spec, timeout=30.0)


async def test_gateway_reports_online_health_events_and_offline_when_killed(
    broker: Broker, tmp_path: Path
) -> None:
    spec = StudySpec(modality="CT", images_per_series=3, rows=16, columns=16, seed=71)
    refused = str(build_dataset(spec, next(iter_refs(spec))).SOPInstanceUID)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title="CENTRAL_PACS") as pacs:
        pacs.set_faults(PacsFaults(status_for_uids={refused: 0xC000}))
        section = destination_section("pacs", pacs.port, retry='initial_delay = "0.1s"\nmax_attempts = 1')
        setup = write_config(tmp_path, sections=section + mqtt_section(broker.port))
        async with subscriber(broker.port, f"{TOPIC}/#") as client:
            gateway = setup.process().start()
            try:
                await expect(client, f"{TOPIC}/status", b"online")
                result = await asyncio.to_thread(run_scanner, scan(setup.port, spec))
                assert result.statuses == {0x0000: 3}
                association = document(await expect(client, f"{TOPIC}/events/association"))
                failed = document(await expect(client, f"{TOPIC}/events/delivery_failed", seconds=30))
                health = document(await expect(client, f"{TOPIC}/health"))
                os.kill(gateway.pid or 0, signal.SIGKILL)
                gateway.wait(10)
                await expect(client, f"{TOPIC}/status", b"offline", seconds=15)
            finally:
                gateway.stop()
    assert association["stored"] == 3
    assert association["calling_ae"] == SCANNER_AE
    assert association["schema"] == 1
    assert association["node_id"] == NODE
    assert failed["sop_instance_uid"] == refused
    assert failed["status"] == 0xC000
    assert failed["source"] == "pacs"
    assert health["ready"] is True
    assert set(health["destinations"]["pacs"]) >= {"up", "pending", "failed", "oldest_pending_age_seconds"}
    assert health["spool"]["free_bytes"] > 0


async def test_broker_restart_mid_run_never_fails_ingest(broker: Broker, tmp_path: Path) -> None:
    setup = write_config(tmp_path, sections=mqtt_section(broker.port))
    spec = StudySpec(modality="CT", images_per_series=60, rows=16, columns=16, seed=72)
    options = replace(scan(setup.port, spec), rate=20.0)
    with setup.process():
        async with subscriber(broker.port, f"{TOPIC}/#") as client:
            await expect(client, f"{TOPIC}/status", b"online")
        sending = asyncio.create_task(asyncio.to_thread(run_scanner, options))
        await asyncio.to_thread(wait_until, lambda: len(setup.rows()) >= 10, 30, "ingest under way")
        broker.stop()
        await asyncio.to_thread(wait_until, lambda: len(setup.rows()) >= 30, 30, "ingest, broker down")
        broker.start()
        async with subscriber(broker.port, f"{TOPIC}/#") as client:  # the retained status, after reconnecting
            await expect(client, f"{TOPIC}/status", b"online", seconds=30)
        result = await sending
    assert result.statuses == {0x0000: 60}


def readiness(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_ups_power_failure_refuses_new_associations_and_power_back_resumes(tmp_path: Path) -> None:
    metrics_port = free_port()
    spec = StudySpec(modality="CT", images_per_series=2, rows=16, columns=16, seed=73)
    with UpsSimulator() as ups:
        serial = (
            f'\n[[serial]]\nname = "ups"\nport = "{ups.path}"\nprotocol = "megatec-q1"\n'
            'poll_interval = "0.2s"\nread_timeout = "0.5s"\n'
        )
        setup = write_config(tmp_path, sections=serial, metrics_port=metrics_port)
        with setup.process() as gateway:
            wait_until(lambda: readiness(metrics_port)[0] == 200, 20, "ready")
            assert run_scanner(scan(setup.port, spec)).statuses == {0x0000: 2}
            ups.power_fail()
            ups.battery_low()
            wait_until(lambda: "power failure" in readiness(metrics_port)[1], 20, "the power hold")
            held = run_scanner(scan(setup.port, spec))
            assert held.associations_rejected == 1
            assert held.stored == 0
            ups.power_restore()
            wait_until(lambda: readiness(metrics_port)[0] == 200, 20, "ready again")
            assert run_scanner(scan(setup.port, spec)).statuses == {0x0000: 2}
            log = gateway.output()
    assert "Power failure" in log
    assert "Power is back" in log
