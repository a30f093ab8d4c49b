"""A real gateway process and real signals: SIGTERM mid-transfer, SIGHUP reloads (good and bad)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from simulators.datasets import StudySpec
from simulators.harness import free_port
from simulators.pacs import PacsSimulator
from simulators.scanner import ScanOptions, ScanResult, run_scanner
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

    from simulators.harness import ManagedProcess
    from tests.conftest import GatewaySetup


def scan(setup: GatewaySetup, spec: StudySpec, **options: object) -> ScanOptions:
    base = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec, timeout=30.0)
    return replace(base, **options)  # type: ignore[arg-type]


def in_background(options: ScanOptions) -> tuple[threading.Thread, dict[str, ScanResult]]:
    outcome: dict[str, ScanResult] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_scanner(options)))
    thread.start()
    return thread, outcome


def reload(gateway: ManagedProcess, expected: str) -> None:
    before = gateway.output().count(expected)
    os.kill(gateway.pid or 0, signal.SIGHUP)
    wait_until(lambda: gateway.output().count(expected) > before, 20, f"{expected!r} in the log")


def test_sigterm_mid_transfer_exits_zero_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    ack_file = tmp_path / "acked.txt"
    spec = StudySpec(modality="CT", series=2, images_per_series=200, rows=64, columns=64, seed=61)
    with setup.process() as gateway:
        sender, outcome = in_background(scan(setup, spec, associations=2, rate=100.0, ack_file=ack_file))
        wait_until(lambda: ack_file.exists() and len(ack_file.read_text().split()) >= 40, 30, "40 acks")
        os.kill(gateway.pid or 0, signal.SIGTERM)
        assert gateway.wait(30) == 0
        sender.join(60)
    acked = ack_file.read_text().split()
    assert 40 <= len(acked) < 400, "SIGTERM must land mid-transfer"
    assert outcome["result"].stored == len(acked)
    rows = {row["sop_instance_uid"]: row for row in setup.rows()}
    for uid in acked:
        stored = setup.spool / f"{uid}.dcm"
        assert rows[uid]["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert not [p for p in setup.spool_files() if p.name.startswith(".tmp.")]
    assert "Gateway stopped" in gateway.output()


def test_sighup_applies_a_new_allow_list_without_dropping_an_association(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    newcomer = StudySpec(modality="MR", images_per_series=2, rows=16, columns=16, seed=62)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, newcomer, calling_ae="NEW_SCANNER")).associations_rejected == 1
        long_spec = StudySpec(modality="CT", images_per_series=60, rows=32, columns=32, seed=63)
        sender, outcome = in_background(scan(setup, long_spec, rate=30.0))
        wait_until(lambda: len(setup.rows()) >= 10, 30, "the long association under way")
        text = setup.config.read_text(encoding="utf-8")
        setup.config.write_text(text.replace('"ECHOSCU"]', '"ECHOSCU", "NEW_SCANNER"]'), encoding="utf-8")
        reload(gateway, "Configuration reloaded")
        assert run_scanner(scan(setup, newcomer, calling_ae="NEW_SCANNER")).statuses == {0x0000: 2}
        sender.join(60)
    result = outcome["result"]
    assert result.statuses == {0x0000: 60}
    assert result.associations_established == 1
    assert result.associations_aborted == 0


def test_sighup_with_an_invalid_file_keeps_the_running_config(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    spec = StudySpec(modality="CT", images_per_series=2, rows=16, columns=16, seed=64)
    with setup.process() as gateway:
        good = setup.config.read_text(encoding="utf-8")
        setup.config.write_text(good.replace("[receiver]", "[receiver]\nbogus_key = 1"), encoding="utf-8")
        reload(gateway, "Reload refused")
        assert "receiver.bogus_key: unknown key" in gateway.output()
        assert run_scanner(scan(setup, spec)).statuses == {0x0000: 2}
        assert gateway.running


def test_sighup_adds_a_destination_that_then_receives_new_instances(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    with (
        PacsSimulator(tmp_path / "archive", port=free_port(), ae_title="CENTRAL_PACS") as pacs,
        setup.process() as gw,
    ):
        first = StudySpec(modality="CT", images_per_series=3, rows=16, columns=16, seed=65)
        assert run_scanner(scan(setup, first)).statuses == {0x0000: 3}
        assert delivery_states(setup) == {}
        with setup.config.open("a", encoding="utf-8") as config:
            config.write(destination_section("pacs", pacs.port))
        reload(gw, "Destination pacs started")
        second = StudySpec(modality="CT", images_per_series=4, rows=16, columns=16, seed=66)
        assert run_scanner(scan(setup, second)).statuses == {0x0000: 4}
        assert pacs.wait_for(4, 30)
        wait_until(lambda: delivery_states(setup) == {"done": 4}, 30, "the new instances delivered")
