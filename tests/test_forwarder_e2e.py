"""Scanner simulator -> gateway -> PACS simulator: delivery, outages, refusals, aborts, TLS, crashes."""

from __future__ import annotations

import os
import signal
import ssl
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from simulators.datasets import StudySpec, build_dataset, encode_dataset, iter_refs
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator, server_tls_context
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    SCANNER_AE,
    dataset_bytes,
    delivery_states,
    destination_section,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.conftest import GatewaySetup, Pki

PACS_AE = "CENTRAL_PACS"


def scan(setup: GatewaySetup, spec: StudySpec, **options: object) -> ScanOptions:
    base = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec, timeout=30.0)
    return replace(base, **options)  # type: ignore[arg-type]


def mutual_tls(pki: Pki) -> str:
    return (
        f'[destination.tls]\nca = "{pki.ca}"\ncert = "{pki.gateway_client_cert}"\n'
        f'key = "{pki.gateway_client_key}"\nserver_hostname = "localhost"\n'
    )


def uids(spec: StudySpec) -> list[str]:
    return [str(build_dataset(spec, ref).SOPInstanceUID) for ref in iter_refs(spec)]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[PacsSimulator]:
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE) as simulator:
        yield simulator


def plain_gateway(tmp_path: Path, pacs: PacsSimulator, **destination: str) -> GatewaySetup:
    keep = destination.pop("keep_forwarded", "1h")
    section = destination_section("pacs", pacs.port, called_ae=PACS_AE, **destination)
    return write_config(tmp_path, sections=f'{section}\n[retention]\nkeep_forwarded = "{keep}"\n')


def test_mutual_tls_end_to_end_300_instances_byte_exact_and_spool_emptied(tmp_path: Path, pki: Pki) -> None:
    context = server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca)
    spec = StudySpec(modality="CT", studies=2, series=3, images_per_series=50, rows=64, columns=64, seed=41)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        section = destination_section("pacs", pacs.port, called_ae=PACS_AE, tls=mutual_tls(pki))
        setup = write_config(tmp_path, sections=section + '\n[retention]\nkeep_forwarded = "0s"\n')
        with setup.process():
            result = run_scanner(scan(setup, spec, associations=3))
            assert result.statuses == {0x0000: 300}, result.summary()
            assert pacs.wait_for(300, 120)
            wait_until(lambda: delivery_states(setup) == {"done": 300}, 60, "300 deliveries done")
            wait_until(lambda: not list(setup.spool.glob("*.dcm")), 30, "retention to empty the spool")
        received = {item.sop_instance_uid: item for item in pacs.received()}
    for ref in iter_refs(spec):
        ds = build_dataset(spec, ref)
        assert dataset_bytes(received[str(ds.SOPInstanceUID)].path) == encode_dataset(ds)
    assert {row["file_state"] for row in setup.rows()} == {"deleted"}


def test_backlog_from_an_outage_drains_and_attempts_follow_the_backoff(
    tmp_path: Path, pacs: PacsSimulator
) -> None:
    """The archive refuses every association while 200 instances arrive; then it comes back."""
    pacs.set_faults(PacsFaults(reject_associations=True))
    setup = plain_gateway(tmp_path, pacs, retry='initial_delay = "0.5s"\nmax_delay = "2s"\njitter = 0.1')
    spec = StudySpec(modality="MR", series=4, images_per_series=50, rows=32, columns=32, seed=42)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, spec, associations=2)).statuses == {0x0000: 200}
        wait_until(lambda: pacs.stats().associations_requested >= 4, 30, "a few refused attempts")
        wait_until(lambda: "is down" in gateway.output(), 10, "the destination reported down")
        attempts_during_outage = pacs.stats().associations_requested
        assert delivery_states(setup) == {"pending": 200}
        pacs.set_faults(PacsFaults())
        assert pacs.wait_for(200, 60)
        wait_until(lambda: delivery_states(setup) == {"done": 200}, 30, "the backlog to drain")
        assert "is up again" in gateway.output()
    # 0.5 s doubling to a 2 s cap: a handful of probes over the few seconds above, never a busy loop.
    assert 4 <= attempts_during_outage <= 12, attempts_during_outage
    assert pacs.stored_uids() == set(uids(spec))


def test_archive_not_listening_then_back_drains_everything(tmp_path: Path, pacs: PacsSimulator) -> None:
    pacs.stop_listening()
    setup = plain_gateway(tmp_path, pacs)
    spec = StudySpec(modality="CT", images_per_series=30, rows=32, columns=32, seed=43)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, spec)).statuses == {0x0000: 30}
        wait_until(lambda: "is down" in gateway.output(), 20, "the destination reported down")
        pacs.start_listening()
        assert pacs.wait_for(30, 60)
        wait_until(lambda: delivery_states(setup) == {"done": 30}, 30, "all delivered")


def test_out_of_resources_is_retried_and_a_refusal_ends_failed_with_its_status(
    tmp_path: Path, pacs: PacsSimulator
) -> None:
    spec = StudySpec(modality="CT", images_per_series=20, rows=32, columns=32, seed=44)
    every = uids(spec)
    refused, busy = every[3], every[5:8]
    pacs.set_faults(PacsFaults(status_for_uids={refused: 0xC000}, transient_for_uids=dict.fromkeys(busy, 2)))
    setup = plain_gateway(tmp_path, pacs)
    with setup.process():
        assert run_scanner(scan(setup, spec)).statuses == {0x0000: 20}
        wait_until(lambda: delivery_states(setup) == {"done": 19, "failed": 1}, 60, "19 done and 1 failed")
    assert pacs.stored_uids() == set(every) - {refused}
    (row,) = setup.rows(
        "SELECT d.state, d.last_status, d.refusals, d.last_error FROM deliveries d "
        "JOIN instances i ON i.id = d.instance_id WHERE i.sop_instance_uid = ?",
        (refused,),
    )
    assert (row["state"], row["last_status"], row["refusals"]) == ("failed", 0xC000, 3)
    assert "0xC000" in row["last_error"]
    for uid in busy:
        (attempts,) = setup.rows(
            "SELECT d.attempts FROM deliveries d JOIN instances i ON i.id = d.instance_id "
            "WHERE i.sop_instance_uid = ?",
            (uid,),
        )
        assert attempts[0] == 3  # twice 0xA700, then stored
    assert setup.spool_files(), "a failed delivery keeps its file"
    assert (setup.spool / f"{refused}.dcm").exists()


def test_abort_mid_association_still_delivers_everything(tmp_path: Path, pacs: PacsSimulator) -> None:
    pacs.set_faults(PacsFaults(abort_after=7))
    pacs.stop_listening()  # a backlog first, so that every batch is a full 20 and is cut after 7
    setup = plain_gateway(tmp_path, pacs, extra="batch_size = 20\nmax_parallel = 1")
    spec = StudySpec(modality="CT", images_per_series=60, rows=32, columns=32, seed=45)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, spec)).statuses == {0x0000: 60}
        wait_until(lambda: "is down" in gateway.output(), 20, "the destination reported down")
        pacs.start_listening()
        assert pacs.wait_for(60, 90)
        wait_until(lambda: delivery_states(setup) == {"done": 60}, 30, "all delivered")
    stats = pacs.stats()
    assert stats.associations_aborted_by_us >= 3  # batches of 20 cut after every 7th instance
    # Each abort can duplicate at most the one instance that was in flight when it came.
    assert stats.duplicates <= stats.associations_aborted_by_us


def test_archive_limited_to_tls_1_1_is_refused(tmp_path: Path, pki: Pki) -> None:
    with warnings.catch_warnings():  # building an outdated peer on purpose: Python warns that TLS 1.1 is
        warnings.simplefilter("ignore", DeprecationWarning)
        context = server_tls_context(pki.pacs_cert, pki.pacs_key, maximum_version=ssl.TLSVersion.TLSv1_1)
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        section = destination_section("pacs", pacs.port, called_ae=PACS_AE, tls=mutual_tls(pki))
        setup = write_config(tmp_path, sections=section)
        with setup.process() as gateway:
            assert run_scanner(scan(setup, StudySpec(images_per_series=2, rows=16, columns=16))).stored == 2
            wait_until(lambda: "is down" in gateway.output(), 20, "the destination reported down")
            assert "tls" in gateway.output().lower()
            assert delivery_states(setup) == {"pending": 2}
        assert pacs.received() == []


def test_kill_9_during_forwarding_loses_nothing(tmp_path: Path, pacs: PacsSimulator) -> None:
    pacs.set_faults(PacsFaults(delay=0.01))  # slow enough that the kill lands mid-forwarding
    setup = plain_gateway(tmp_path, pacs)
    spec = StudySpec(modality="CT", series=3, images_per_series=100, rows=32, columns=32, seed=46)
    gateway = setup.process().start()
    try:
        assert run_scanner(scan(setup, spec, associations=3)).statuses == {0x0000: 300}
        wait_until(lambda: len(pacs.stored_uids()) >= 30, 60, "forwarding under way")
        os.kill(gateway.pid or 0, signal.SIGKILL)
        gateway.wait(10)
    finally:
        gateway.stop()
    assert len(pacs.stored_uids()) < 300, "the kill must land mid-forwarding"
    assert "in_flight" in delivery_states(setup) or len(pacs.stored_uids()) < 300
    pacs.set_faults(PacsFaults())
    with setup.process():
        assert pacs.wait_for(300, 120)
        wait_until(lambda: delivery_states(setup) == {"done": 300}, 60, "all delivered after restart")
    assert pacs.stored_uids() == set(uids(spec))


def test_sigterm_releases_claims_and_exits_zero(tmp_path: Path, pacs: PacsSimulator) -> None:
    pacs.set_faults(PacsFaults(delay=0.05))
    setup = plain_gateway(tmp_path, pacs)
    spec = StudySpec(modality="CT", images_per_series=40, rows=32, columns=32, seed=47)
    with setup.process() as gateway:
        assert run_scanner(scan(setup, spec)).statuses == {0x0000: 40}
        wait_until(lambda: len(pacs.stored_uids()) >= 5, 30, "forwarding under way")
        assert gateway.stop(grace=20) == 0
    assert "in_flight" not in delivery_states(setup)
