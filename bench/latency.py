"""End-to-end latency on an idle system: scanner -> gateway -> PACS simulator, one object at a time.

The scanner is driven here, with pynetdicom over one association (TCP_NODELAY set, the file's data set
streamed as stored): for each CT file it sends one C-STORE and notes `time.time()` the moment
`send_c_store` returns with status 0x0000 (the ack: the gateway's row is committed). The PACS simulator
(`simulators.pacs.PacsSimulator`) runs in this process and stamps each stored object with `time.time()`
after writing it, so both ends read the same clock. Latency = PACS receipt - scanner ack. The next object
goes only after the previous one reached the PACS and a pause, so the system is idle at each send.
Plain TCP and mutual TLS toward the PACS; the scanner side is plain TCP in both.

Two more rows tell the gateway's share from the PACS simulator's:
- the floor the simulator sets: the same files sent straight to it, each over a fresh association (as the
  forwarder opens one per batch), from just before associating to its receipt;
- the gateway forwarding to DCMTK's storescp instead: receipt is the mtime of the file storescp wrote
  (the kernel's clock, the same as `time.time()`), read once the index says the delivery is done.
"""

from __future__ import annotations

import math
import shutil
import ssl
import statistics
import time
from typing import TYPE_CHECKING

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from bench import peers
from simulators.harness import free_port
from simulators.pacs import PacsSimulator, server_tls_context
from simulators.pynetdicom_setup import close_transport, configure_pynetdicom, connection_handlers

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from bench.data import FileSet

PACS_AE = "CENTRAL_PACS"
_PAUSE = 0.1  # seconds of quiet between one object's arrival at the PACS and the next send
_ARRIVAL_TIMEOUT = 30.0


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _send_one_at_a_time(files: FileSet, port: int, arrival: Callable[[int], float]) -> list[float]:
    """Send each file, note the ack time, and ask `arrival(n)` when the n-th object got there."""
    configure_pynetdicom()
    meta = read_file_meta_info(files.files[0])
    ae = AE(ae_title="CT_SCANNER_1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.network_timeout = None  # the pauses are ours
    assoc = ae.associate("127.0.0.1", port, ae_title=peers.GATEWAY_AE, evt_handlers=connection_handlers())
    if not assoc.is_established:
        close_transport(assoc)
        raise RuntimeError("the gateway refused the scanner's association")
    latencies = []
    try:
        for number, path in enumerate(files.files, start=1):
            response = assoc.send_c_store(path)
            acked = time.time()
            if response.get("Status") != 0:
                raise RuntimeError(f"C-STORE of {path.name} answered {response.get('Status')}")
            latencies.append(arrival(number) - acked)
            time.sleep(_PAUSE)
    finally:
        if assoc.is_established:
            assoc.release()
        close_transport(assoc)
    return latencies


def _pacs_arrival(pacs: PacsSimulator) -> Callable[[int], float]:
    def arrival(number: int) -> float:
        if not pacs.wait_for(number, _ARRIVAL_TIMEOUT):
            raise RuntimeError(f"object {number} did not reach the PACS in {_ARRIVAL_TIMEOUT:g} s")
        return pacs.received()[-1].received_at

    return arrival


def _storescp_arrival(gateway: peers.GatewayReceiver, archive: peers.Receiver) -> Callable[[int], float]:
    """When the n-th object's file was last written by storescp (its mtime), once its delivery is done."""
    seen: set[str] = set()

    def arrival(number: int) -> float:
        deadline = time.monotonic() + _ARRIVAL_TIMEOUT
        while gateway.query("SELECT count(*) FROM deliveries WHERE state = 'done'")[0][0] < number:
            if time.monotonic() > deadline:
                raise RuntimeError(f"object {number} was not delivered in {_ARRIVAL_TIMEOUT:g} s")
            time.sleep(0.005)
        new = [p for p in archive.directory.iterdir() if p.name not in seen]
        if len(new) != 1:
            raise RuntimeError(f"expected one new file in storescp's directory, found {len(new)}")
        seen.add(new[0].name)
        return new[0].stat().st_mtime_ns / 1e9

    return arrival


def _direct_to_pacs(files: FileSet, pacs: PacsSimulator, pki: peers.Pki | None) -> list[float]:
    """Seconds from opening a fresh association to the PACS's receipt, one object per association."""
    configure_pynetdicom()
    meta = read_file_meta_info(files.files[0])
    ae = AE(ae_title=peers.GATEWAY_AE)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    tls_args = None
    if pki is not None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        tls_args = (context, "localhost")
    latencies = []
    for number, path in enumerate(files.files, start=1):
        started = time.time()
        assoc = ae.associate(
            "127.0.0.1", pacs.port, ae_title=PACS_AE, tls_args=tls_args, evt_handlers=connection_handlers()
        )
        try:
            if not assoc.is_established:
                raise RuntimeError("the PACS simulator refused the association")
            status = assoc.send_c_store(path).get("Status")
            if status != 0:
                raise RuntimeError(f"the PACS simulator answered {status}")
            assoc.release()
        finally:
            close_transport(assoc)
        if not pacs.wait_for(number, _ARRIVAL_TIMEOUT):
            raise RuntimeError(f"object {number} did not reach the PACS")
        latencies.append(pacs.received()[-1].received_at - started)
        time.sleep(_PAUSE)
    return latencies


def direct_once(files: FileSet, directory: Path, pki: peers.Pki | None) -> list[float]:
    """The floor: each file straight into the PACS simulator over its own association."""
    context = None if pki is None else server_tls_context(pki.server_cert, pki.server_key, pki.ca)
    try:
        with PacsSimulator(directory / "pacs", ae_title=PACS_AE, ssl_context=context) as pacs:
            return _direct_to_pacs(files, pacs, pki)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def latency_once(files: FileSet, directory: Path, pki: peers.Pki | None) -> list[float]:
    """Seconds from each ack to the PACS simulator's receipt, for every file in order."""
    context = None if pki is None else server_tls_context(pki.server_cert, pki.server_key, pki.ca)
    try:
        with PacsSimulator(directory / "pacs", ae_title=PACS_AE, ssl_context=context) as pacs:
            destination = peers.destination_table(pacs.port, pki, name="pacs", called_ae=PACS_AE)
            with peers.gateway(directory / "gw", destination=destination) as gateway:
                return _send_one_at_a_time(files, gateway.port, _pacs_arrival(pacs))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def storescp_latency_once(files: FileSet, directory: Path, pki: peers.Pki | None) -> list[float]:
    """Seconds from each ack to the moment storescp finished writing the object (its file's mtime)."""
    try:
        port = free_port()
        with peers.storescp(directory / "archive", fork=True, pki=pki, port=port) as archive:
            destination = peers.destination_table(port, pki)
            with peers.gateway(directory / "gw", destination=destination) as gateway:
                return _send_one_at_a_time(files, gateway.port, _storescp_arrival(gateway, archive))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _record(files: FileSet, mode: str, subject: str, path: str, latencies: list[float]) -> dict[str, object]:
    return {
        "section": "latency",
        "data": files.name,
        "mode": mode,
        "subject": subject,
        "path": path,
        "instances": files.count,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "samples_ms": [round(v * 1e3, 2) for v in latencies],
    }


def run_latency(
    files: FileSet, workdir: Path, pki: peers.Pki, *, log: Callable[[str], None]
) -> list[dict[str, object]]:
    """Latency over plain TCP and over mutual TLS toward the PACS, each with its reference."""
    records = []
    for mode, mode_pki in (("plain", None), ("tls", pki)):
        for subject, path, measure in (
            ("gateway", "scanner ack -> PACS sim receipt", latency_once),
            ("pacs-sim", "new association -> PACS sim receipt", direct_once),
            ("gateway", "scanner ack -> storescp file written", storescp_latency_once),
        ):
            record = _record(
                files, mode, subject, path, measure(files, workdir / f"latency-{mode}", mode_pki)
            )
            log(
                f"latency {mode}, {path}: p50 {record['p50_ms']:.1f} ms, p99 {record['p99_ms']:.1f} ms "
                f"over {files.count} objects"
            )
            records.append(record)
    return records
