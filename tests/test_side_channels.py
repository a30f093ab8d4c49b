"""Side channels (DESIGN.md invariant 6): no patient data in MQTT, logs or metrics; I/O errors are final.

Patient names and IDs sent in a run must never appear in MQTT payloads, in the gateway's info-level log
(text and JSON) or in /metrics, while the UIDs of the same run do appear there (proof that the capture
works). `tests/test_metrics_e2e.py` and `tests/test_telemetry.py` check /metrics and the MQTT key guard
on their own; here one real run with a real Mosquitto is watched on every channel at once, including a
refused C-STORE, a rejected association and a delivery the archive refuses. Two more ways in for patient
data are tried: a malformed object whose values the header read quotes, and an archive whose error
comment quotes the patient.

An fsync or write error while an object is made durable is final for that object: 0xA700, no row, no
file, no temporary file, never a retried success; the next object stores normally. Those run the gateway
in-process with `os.fsync` / `os.write` failing for the chosen file descriptors.
"""

# ruff: noqa: F811 - the broker fixtures are imported from test_telemetry and requested by parameter name

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.spool import TEMP_PREFIX
from simulators.datasets import StudySpec, build_dataset, encode_dataset, iter_refs
from simulators.harness import free_port
from simulators.pacs import PacsFaults, PacsSimulator
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    SCANNER_AE,
    GatewaySetup,
    delivery_states,
    destination_section,
    wait_until,
    write_config,
)
from tests.test_hostile import RawScu, gateway_process
from tests.test_receiver_protocol import open_association, release
from tests.test_telemetry import broker, brokers, subscriber, until  # noqa: F401 - fixtures used by name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import aiomqtt

    from tests.test_telemetry import Broker

PATIENT_NAME: Final = "Quixote^Zebulon^Ximena"
PATIENT_ID: Final = "PHI-ID-73915-QZX"
# Each part alone is as telling as the whole: a name split on ^ must not leak either.
SECRETS: Final = (PATIENT_NAME, "Quixote", "Zebulon", "Ximena", PATIENT_ID)
TOPIC: Final = "dicom-gateway/test-node"


def mqtt_section(port: int) -> str:
    return f'\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\nhealth_interval = "0.5s"\nkeepalive = "5s"\n'


def set_log_format(setup: GatewaySetup, log_format: str) -> None:
    text = setup.config.read_text(encoding="utf-8")
    setup.config.write_text(
        text.replace('log_level = "info"', f'log_level = "info"\nlog_format = "{log_format}"'),
        encoding="utf-8",
    )


def leaks(text: str) -> list[str]:
    """The secrets found in `text`."""
    return [secret for secret in SECRETS if secret in text]


def non_json_lines(log: str) -> list[str]:
    """Lines of a JSON-format log that are not one JSON object with the documented keys."""
    bad = []
    for line in log.splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(document, dict) or not {"ts", "level", "logger", "msg"} <= set(document):
            bad.append(line)
    return bad


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def collect(client: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
    """Every message on the subscription, as (topic, payload bytes), until cancelled."""
    async for message in client.messages:
        payload = message.payload
        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload).encode()
        into.append((message.topic.value, raw))


def spec_with_phi(seed: int, images: int = 4) -> StudySpec:
    return StudySpec(
        modality="CT",
        images_per_series=images,
        rows=16,
        columns=16,
        seed=seed,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
    )


def refused_stores_blocking(port: int, spec: StudySpec) -> list[int | None]:
    """Two C-STOREs of the run's patient that the gateway refuses: a UID mismatch and a truncated data set."""
    ds = build_dataset(spec, next(iter_refs(spec)))
    data = encode_dataset(ds)
    class_uid, uid = str(ds.SOPClassUID).encode(), str(ds.SOPInstanceUID).encode()
    with RawScu(port, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)]) as scu:
        other_uid = b"1.2.826.0.1.3680043.10.1234.77"  # valid, but not the data set's
        statuses = [scu.store(1, class_uid, other_uid, data), scu.store(1, class_uid, uid, data[:-100])]
        scu.release()
    return statuses


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_patient_data_never_reaches_mqtt_logs_or_metrics_while_uids_do(
    broker: Broker, tmp_path: Path, log_format: str
) -> None:
    spec = spec_with_phi(seed=6161)
    uids = [str(build_dataset(spec, ref).SOPInstanceUID) for ref in iter_refs(spec)]
    refused = uids[1]  # the archive refuses this one for good: a delivery_failed event and a log line
    metrics_port = free_port()
    messages: list[tuple[str, bytes]] = []
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title="CENTRAL_PACS") as pacs:
        pacs.set_faults(PacsFaults(status_for_uids={refused: 0xC000}))
        section = destination_section("pacs", pacs.port, retry='initial_delay = "0.1s"\nmax_attempts = 1')
        setup = write_config(
            tmp_path, sections=section + mqtt_section(broker.port), metrics_port=metrics_port
        )
        set_log_format(setup, log_format)
        async with subscriber(broker.port, "dicom-gateway/#") as client:
            collecting = asyncio.create_task(collect(client, messages), name="collect")
            try:
                with gateway_process(setup) as gateway:
                    scan = ScanOptions(
                        port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec
                    )
                    stored = await asyncio.to_thread(run_scanner, scan)
                    intruder = ScanOptions(
                        port=setup.port, calling_ae="INTRUDER", called_ae=GATEWAY_AE, study=spec
                    )
                    rejected = await asyncio.to_thread(run_scanner, intruder)
                    refusals = await asyncio.to_thread(refused_stores_blocking, setup.port, spec)
                    await asyncio.to_thread(
                        wait_until,
                        lambda: delivery_states(setup) == {"done": 3, "failed": 1},
                        30,
                        "3 done, 1 failed",
                    )

                    def seen(suffix: str) -> int:
                        return sum(topic == f"{TOPIC}/{suffix}" for topic, _ in messages)

                    await until(
                        lambda: seen("events/delivery_failed") >= 1 and seen("health") >= 2,
                        "a delivery_failed event and two health messages",
                        seconds=20,
                    )
                    metrics = await asyncio.to_thread(metrics_text, metrics_port)
                    log = gateway.output()
            finally:
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
    assert stored.statuses == {0x0000: 4}, stored.summary()
    assert rejected.associations_rejected == 1
    assert refusals == [0xA900, 0xC000]
    topics = {topic for topic, _ in messages}
    assert {f"{TOPIC}/status", f"{TOPIC}/health", f"{TOPIC}/events/association"} <= topics, topics
    everything = b"\n".join(payload for _, payload in messages).decode("utf-8", "replace")
    # The capture works: the refused delivery's UID is in MQTT and in the log ...
    assert refused in everything
    assert refused in log
    # ... and the patient is in neither, nor in /metrics.
    assert leaks(everything) == [], [(t, p) for t, p in messages if leaks(p.decode("utf-8", "replace"))]
    assert leaks(log) == [], [line for line in log.splitlines() if leaks(line)]
    assert leaks(metrics) == []
    if log_format == "json":
        assert non_json_lines(log) == []


async def test_a_malformed_object_cannot_make_the_log_quote_its_patient(tmp_path: Path) -> None:
    """The Patient ID element typed IS (a broken or hostile sender): its value must not reach the log.

    The spool reads the header elements with pydicom, whose value validation warns quoting the value;
    pydicom logs that warning through the root logger (and Python prints it to stderr as a warning).
    """
    spec = spec_with_phi(seed=6262, images=1)
    ds = build_dataset(spec, next(iter_refs(spec)))
    data = encode_dataset(ds)
    header = data.index(b"\x10\x00\x20\x00LO")  # (0010,0020) Patient ID, explicit VR little endian
    retyped = data[: header + 4] + b"IS" + data[header + 6 :]
    setup = write_config(tmp_path)
    set_log_format(setup, "json")
    with gateway_process(setup) as gateway:
        with RawScu(setup.port, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)]) as scu:
            status = scu.store(1, str(ds.SOPClassUID).encode(), str(ds.SOPInstanceUID).encode(), retyped)
            scu.release()
        await asyncio.to_thread(
            wait_until, lambda: "ended: " in gateway.output(), 10, "the association's end"
        )
        log = gateway.output()
    assert status is not None
    offending = [line for line in log.splitlines() if leaks(line)] + non_json_lines(log)
    assert offending == [], "patient data or non-JSON lines in the JSON log:\n" + "\n".join(offending)


class QuotingArchive:
    """A pynetdicom archive that refuses every C-STORE quoting the patient, as real archives do."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ae = AE(ae_title="CENTRAL_PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.refused = threading.Event()

    def _on_c_store(self, _event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = 0xC000
        status.ErrorComment = f"Patient ID {PATIENT_ID} already exists with another name"
        self.refused.set()
        return status

    def __enter__(self) -> Self:
        handlers = [(evt.EVT_C_STORE, self._on_c_store)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()


async def test_an_archive_error_comment_quoting_the_patient_is_not_republished(
    broker: Broker, tmp_path: Path
) -> None:
    """The archive's ErrorComment names the patient; the gateway passes comments on to its log and MQTT."""
    spec = spec_with_phi(seed=6363, images=1)
    messages: list[tuple[str, bytes]] = []
    with QuotingArchive() as archive:
        section = destination_section("pacs", archive.port, retry='initial_delay = "0.1s"\nmax_attempts = 1')
        setup = write_config(tmp_path, sections=section + mqtt_section(broker.port))
        async with subscriber(broker.port, "dicom-gateway/#") as client:
            collecting = asyncio.create_task(collect(client, messages), name="collect")
            try:
                with gateway_process(setup) as gateway:
                    scan = ScanOptions(
                        port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec
                    )
                    assert (await asyncio.to_thread(run_scanner, scan)).statuses == {0x0000: 1}
                    await asyncio.to_thread(
                        wait_until,
                        lambda: delivery_states(setup) == {"failed": 1},
                        30,
                        "the delivery to fail",
                    )
                    await until(
                        lambda: any(t.endswith("/events/delivery_failed") for t, _ in messages),
                        "the delivery_failed event",
                        seconds=20,
                    )
                    log = gateway.output()
            finally:
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
    assert archive.refused.is_set()
    published = [payload.decode("utf-8", "replace") for _, payload in messages]
    assert [p for p in published if leaks(p)] == []
    assert [line for line in log.splitlines() if leaks(line)] == []


# ---------------------------------------------------------------- injected I/O errors, in-process


def _fd_path(fd: int) -> Path:
    try:
        return Path(f"/proc/self/fd/{fd}").readlink()
    except OSError:
        return Path()


class FailingCalls:
    """Stands in for os.fsync or os.write: calls on matching descriptors fail `times` times, then pass."""

    def __init__(
        self, real: Callable[..., object], error: int, times: int, matches: Callable[[Path], bool]
    ) -> None:
        self.real = real
        self.error = error
        self.remaining = times
        self.matches = matches
        self.lock = threading.Lock()  # the spool's worker threads call in
        self.failed: list[Path] = []
        self.passed: list[Path] = []

    def __call__(self, fd: int, *args: object) -> object:
        path = _fd_path(fd)
        if self.matches(path):
            with self.lock:
                failing = self.remaining > 0
                self.remaining -= failing
                (self.failed if failing else self.passed).append(path)
            if failing:
                raise OSError(self.error, os.strerror(self.error))
        return self.real(fd, *args)


@contextlib.asynccontextmanager
async def in_process_gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, GatewaySetup]]:
    """A Gateway running in this event loop, ready; stopped at the end."""
    port = free_port()
    state_dir = tmp_path / "state"
    config = parse_config(
        {
            "gateway": {
                "node_id": "io-errors",
                "ae_title": GATEWAY_AE,
                "state_dir": str(state_dir),
                "min_free_bytes": "1MB",
            },
            "receiver": {"host": "127.0.0.1", "port": port, "allowed_calling_ae": [SCANNER_AE]},
            "metrics": {"enabled": False},
        }
    )
    gateway = Gateway(config)
    running = asyncio.create_task(gateway.run(), name="gateway")
    try:
        ready = asyncio.create_task(gateway.ready.wait())
        done, _ = await asyncio.wait({ready, running}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        assert ready in done, "the in-process gateway did not become ready"
        yield gateway, GatewaySetup(config=tmp_path / "in-process", state_dir=state_dir, port=port)
    finally:
        gateway.stop()
        await asyncio.wait_for(running, 30)


def store_blocking(port: int, ds: Dataset) -> int:
    assoc = open_association(port, SCANNER_AE)
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        release(assoc)


def _temp_file(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX)


@dataclass(frozen=True)
class IoFault:
    call: str  # the os function that fails
    error: int
    target: str  # temp-file or spool-directory
    reason: str  # the store_failures label it must count under


@pytest.mark.parametrize(
    "fault",
    [
        IoFault("fsync", errno.EIO, "temp-file", "io_error"),
        IoFault("fsync", errno.EIO, "spool-directory", "index"),  # the group commit's directory fsync
        IoFault("write", errno.ENOSPC, "temp-file", "disk_full"),
        IoFault("write", errno.EIO, "temp-file", "io_error"),
    ],
    ids=["fsync-eio-file", "fsync-eio-directory", "write-enospc", "write-eio"],
)
async def test_an_io_error_is_final_a700_for_that_object_and_the_next_one_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: IoFault
) -> None:
    spec = StudySpec(modality="CT", images_per_series=2, rows=16, columns=16, seed=6464)
    first, second = (build_dataset(spec, ref) for ref in iter_refs(spec))
    async with in_process_gateway(tmp_path) as (gateway, setup):
        spool = gateway.spool.directory
        matches = _temp_file if fault.target == "temp-file" else (lambda path: path == spool)
        # Patched once the gateway is ready: its own start-up fsyncs are not the ones under test.
        failing = FailingCalls(getattr(os, fault.call), fault.error, times=1, matches=matches)
        monkeypatch.setattr(f"gateway.spool.os.{fault.call}", failing)
        refused = await asyncio.to_thread(store_blocking, setup.port, first)
        failed_calls = list(failing.failed)
        rows_after_refusal = setup.rows()
        files_after_refusal = setup.spool_files()
        stored = await asyncio.to_thread(store_blocking, setup.port, second)
        registry = gateway.metrics.registry
        failures = registry.get_sample_value("dicom_gateway_store_failures_total", {"reason": fault.reason})
        received = registry.get_sample_value(
            "dicom_gateway_instances_received_total", {"calling_ae": SCANNER_AE}
        )
    assert refused == 0xA700
    assert len(failed_calls) == 1, failed_calls  # failed once, and not retried into a success
    assert rows_after_refusal == []
    assert files_after_refusal == [], files_after_refusal  # neither the file nor its temporary
    assert not failed_calls[0].exists() or failed_calls[0] == gateway.spool.directory
    assert stored == 0x0000
    assert failing.passed, f"os.{fault.call} was not called for the second object before its ack"
    assert (failures, received) == (1, 1)
    assert [row["sop_instance_uid"] for row in setup.rows()] == [str(second.SOPInstanceUID)]
    assert [p.name for p in setup.spool_files()] == [f"{second.SOPInstanceUID}.dcm"]
