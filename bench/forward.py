"""Forwarding: the gateway draining a backlog into storescp, against storescu sending the same files.

The backlog is built once per benchmark: a gateway whose destination points at a port where nothing
listens ingests the CT series (each object gets a pending delivery), then stops. Each drain run copies
that state directory, starts storescp (`--fork`, plain or mutual TLS) on the destination's port, and
starts a gateway on the copy. The drain is timed from the gateway's ready log line (its JSON `ts`: the
forwarders start right after it) to the last delivery's `updated_at` (the gateway's own clock, the same
`time.time()`); the index is polled read-only every 50 ms to know when all are `done`. The gateway's
CPU is read from /proc between its start and the end of the drain; storescp's received files are
counted. The reference sends the same original files with one storescu into the same kind of storescp.

The gateway forwards with its defaults: `max_parallel = 2` associations, `batch_size = 50` objects per
association; storescu uses one association for all of them.

`receive_and_forward_large` measures memory: the gateway receives 4 ~52 MB objects on 4 associations
while it forwards them over TLS, and reports its peak RSS (VmHWM, whole daemon, from start).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import TYPE_CHECKING

from bench import peers
from bench.measure import TreeMonitor, peak_rss_bytes
from simulators.harness import free_port

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from bench.data import FileSet

_POLL = 0.05
_DRAIN_TIMEOUT = 600.0


def build_backlog(files: FileSet, directory: Path) -> Path:
    """Ingest `files` into a gateway whose archive is down; return its (stopped) state directory."""
    dead_port = free_port()  # nothing listens there: every delivery stays pending
    with peers.gateway(directory, destination=peers.destination_table(dead_port, None)) as gateway:
        peers.storescu([files.files], gateway.port, gateway.ae_title, log_dir=directory / "logs")
        pending = gateway.query("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]
    if pending != files.count:
        raise RuntimeError(f"backlog has {pending} pending deliveries, expected {files.count}")
    return gateway.state_dir


def _ready_ts(output: str) -> float:
    """The `ts` of the gateway's ready line (its logs are JSON lines)."""
    for line in output.splitlines():
        if line.startswith("{") and "ready" in line:
            record = json.loads(line)
            if record.get("msg", "").startswith("Gateway ") and record["msg"].endswith(" ready"):
                return float(record["ts"])
    raise RuntimeError("no ready line in the gateway's output")


def _wait_delivered(gateway: peers.GatewayReceiver, count: int, timeout: float = _DRAIN_TIMEOUT) -> float:
    """Poll until `count` deliveries are done; return the last one's `updated_at`."""
    deadline = time.monotonic() + timeout
    while True:
        done, failed, last = gateway.query(
            "SELECT sum(state = 'done'), sum(state = 'failed'), max(updated_at) FROM deliveries"
        )[0]
        if failed:
            raise RuntimeError(f"{failed} deliveries failed:\n{gateway.process.output()[-3000:]}")
        if done == count:
            return float(last)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {count} delivered after {timeout:g} s")
        time.sleep(_POLL)


def drain_once(template: Path, count: int, directory: Path, pki: peers.Pki | None) -> dict[str, float]:
    """The gateway forwards the backlog in `template` to a fresh storescp; timed as described above."""
    try:
        state_dir = directory / "state"
        shutil.copytree(template, state_dir)
        os.sync()
        port = free_port()
        with peers.storescp(directory / "archive", fork=True, pki=pki, port=port) as archive:
            destination = peers.destination_table(port, pki)
            with peers.gateway(directory / "gw", destination=destination, state_dir=state_dir) as gateway:
                with TreeMonitor(gateway.pid, sample_children=False) as monitor:
                    last = _wait_delivered(gateway, count)
                seconds = last - _ready_ts(gateway.process.output())
            received = archive.count()
        if received != count:
            raise RuntimeError(f"storescp received {received} of {count} forwarded objects")
        usage = monitor.usage
        assert usage is not None  # noqa: S101 - set when the with block ends
        return {"seconds": seconds, "cpu_seconds": usage.cpu_seconds, "peak_rss_bytes": usage.peak_rss_bytes}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def storescu_once(files: FileSet, directory: Path, pki: peers.Pki | None) -> dict[str, float]:
    """storescu sends `files` over one association into a fresh storescp (same options as above)."""
    try:
        with peers.storescp(directory / "archive", fork=True, pki=pki) as archive:
            os.sync()
            seconds, cpu = peers.storescu(
                [files.files], archive.port, archive.ae_title, log_dir=directory / "logs", pki=pki
            )
            received = archive.count()
        if received != files.count:
            raise RuntimeError(f"storescp received {received} of {files.count} objects from storescu")
        return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": 0}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_forwarding(
    files: FileSet, workdir: Path, pki: peers.Pki, *, repetitions: int, log: Callable[[str], None]
) -> list[dict[str, object]]:
    """Gateway drain vs storescu, plain and TLS, `repetitions` times each."""
    template = build_backlog(files, workdir / "backlog")
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for rep in range(repetitions):
            for mode, mode_pki in (("plain", None), ("tls", pki)):
                for subject in ("storescu", "gateway"):
                    where = workdir / f"{subject}-{mode}"
                    if subject == "gateway":
                        result = drain_once(template, files.count, where, mode_pki)
                    else:
                        result = storescu_once(files, where, mode_pki)
                    runs.setdefault((mode, subject), []).append(result)
                    log(
                        f"forward {files.name} {mode} by {subject} (run {rep + 1}/{repetitions}): "
                        f"{files.count / result['seconds']:.1f} inst/s, cpu {result['cpu_seconds']:.1f} s"
                    )
    finally:
        shutil.rmtree(workdir / "backlog", ignore_errors=True)
    return [
        {
            "section": "forward",
            "data": files.name,
            "mode": mode,
            "subject": subject,
            "instances": files.count,
            "bytes": files.total_bytes,
            "runs": results,
        }
        for (mode, subject), results in runs.items()
    ]


def receive_and_forward_large(
    files: FileSet, workdir: Path, pki: peers.Pki, *, log: Callable[[str], None]
) -> dict[str, object]:
    """Peak RSS of the gateway receiving `files` on one association each while forwarding them (TLS)."""
    directory = workdir / "large"
    try:
        port = free_port()
        with peers.storescp(directory / "archive", fork=True, pki=pki, port=port) as archive:
            destination = peers.destination_table(port, pki)
            with peers.gateway(directory / "gw", destination=destination) as gateway:
                started = time.time()
                with TreeMonitor(gateway.pid, sample_children=False) as monitor:
                    peers.storescu(
                        [(path,) for path in files.files],
                        gateway.port,
                        gateway.ae_title,
                        log_dir=directory / "logs",
                    )
                    received_at = time.time()
                    last = _wait_delivered(gateway, files.count)
                peak = peak_rss_bytes(gateway.pid)
            forwarded = archive.count()
        if forwarded != files.count:
            raise RuntimeError(f"storescp received {forwarded} of {files.count} large objects")
        usage = monitor.usage
        assert usage is not None  # noqa: S101 - set when the with block ends
        log(f"receive and forward {files.count} {files.name}: gateway peak RSS {peak / 1e6:.0f} MB")
        return {
            "section": "memory",
            "data": files.name,
            "associations": files.count,
            "subject": "gateway",
            "instances": files.count,
            "bytes": files.total_bytes,
            "runs": [
                {
                    "seconds": last - started,
                    "receive_seconds": received_at - started,
                    "cpu_seconds": usage.cpu_seconds,
                    "peak_rss_bytes": peak,
                }
            ],
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
