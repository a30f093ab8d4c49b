"""`make demo`: the whole gateway on this machine, end to end, in well under a minute.

A throwaway CA and certificates (trustme), a PACS simulator that requires mutual TLS, a UPS simulator on a
pty pair, and the gateway itself as its own process (``python -m gateway``, exactly as an admin runs it,
so this module never imports the gateway). The scanner simulator sends a CT study; the demo prints live
progress (received, forwarded), then a summary with the receive-to-archive latency and the UPS reading
from the gateway's metrics. Everything it starts is stopped again, also on Ctrl-C or failure.

May import: simulators, trustme (the test extra `make venv` installs).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import trustme

from simulators.datasets import StudySpec
from simulators.harness import ManagedProcess, free_port
from simulators.pacs import PacsSimulator, server_tls_context
from simulators.scanner import ScanOptions, ScanResult, run_scanner
from simulators.serialdev import UpsSimulator

GATEWAY_AE = "EDGE_GW"
SCANNER_AE = "CT_SCANNER_1"
PACS_AE = "CENTRAL_PACS"


def _certificates(directory: Path) -> dict[str, Path]:
    """A demo CA, the archive's server certificate and the gateway's client certificate, as PEM files."""
    ca = trustme.CA()
    pacs = ca.issue_cert("localhost", "127.0.0.1")
    gateway = ca.issue_cert("edge-gw.demo", common_name=GATEWAY_AE)
    paths = {name: directory / f"{name}.pem" for name in ("ca", "pacs", "pacs_key", "gw", "gw_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    pacs.cert_chain_pems[0].write_to_path(str(paths["pacs"]))
    pacs.private_key_pem.write_to_path(str(paths["pacs_key"]))
    gateway.cert_chain_pems[0].write_to_path(str(paths["gw"]))
    gateway.private_key_pem.write_to_path(str(paths["gw_key"]))
    return paths


def _write_config(directory: Path, ports: dict[str, int], certs: dict[str, Path], ups: str) -> Path:
    config = directory / "gateway.toml"
    config.write_text(
        f"""# Written by `make demo`: a gateway on loopback, state in a temporary directory.
[gateway]
node_id = "demo"
ae_title = "{GATEWAY_AE}"
state_dir = "{directory / "state"}"
min_free_bytes = "100MB"

[receiver]
host = "127.0.0.1"
port = {ports["dicom"]}
allowed_calling_ae = ["{SCANNER_AE}"]

[[destination]]
name = "central-pacs"
host = "127.0.0.1"
port = {ports["pacs"]}
called_ae = "{PACS_AE}"
[destination.tls]
ca = "{certs["ca"]}"
cert = "{certs["gw"]}"
key = "{certs["gw_key"]}"
server_hostname = "localhost"

[retention]
keep_forwarded = "0s"

[metrics]
listen = "127.0.0.1:{ports["metrics"]}"

[[serial]]
name = "ups"
port = "{ups}"
protocol = "megatec-q1"
poll_interval = "1s"
""",
        encoding="utf-8",
    )
    return config


def _received(index: Path) -> dict[str, float]:
    """SOP Instance UID -> receipt time, from the gateway's index (read-only, beside the daemon)."""
    if not index.exists():
        return {}
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT sop_instance_uid, received_at FROM instances").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def _metric(port: int, name: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return "; ".join(line for line in lines if line.startswith(name)) or "(none)"


def _progress(index: Path, pacs: PacsSimulator, total: int, done: threading.Event) -> None:
    while not done.wait(0.5):
        received, forwarded = len(_received(index)), len(pacs.stored_uids())
        print(f"demo: received {received:4d}/{total}   forwarded {forwarded:4d}/{total}")


def run_demo(images: int, keep: bool) -> int:
    """Run everything once; 0 when every image was received, forwarded and the gateway stopped cleanly."""
    workdir = Path(tempfile.mkdtemp(prefix="dicom-gateway-demo-"))
    ports = {"dicom": free_port(), "pacs": free_port(), "metrics": free_port()}
    certs = _certificates(workdir)
    index = workdir / "state" / "index.sqlite"
    context = server_tls_context(certs["pacs"], certs["pacs_key"], certs["ca"])
    spec = StudySpec(modality="CT", series=2, images_per_series=max(images // 2, 1), rows=256, columns=256)
    result: ScanResult | None = None
    try:
        with (
            PacsSimulator(
                workdir / "archive", port=ports["pacs"], ae_title=PACS_AE, ssl_context=context
            ) as pacs,
            UpsSimulator() as ups,
        ):
            config = _write_config(workdir, ports, certs, ups.path)
            print(
                f"demo: PACS simulator (mutual TLS) on 127.0.0.1:{ports['pacs']}, UPS simulator on {ups.path}"
            )
            gateway = ManagedProcess(
                [sys.executable, "-m", "gateway", "-c", str(config), "run"],
                ready_line=r"Gateway \S+ ready",
                timeout=30,
                env={"PYTHONUNBUFFERED": "1"},
            )
            with gateway:
                print(f"demo: gateway receiving on 127.0.0.1:{ports['dicom']}, forwarding over TLS")
                print(f"demo: metrics at http://127.0.0.1:{ports['metrics']}/metrics (and /healthz, /readyz)")
                print(f"demo: the scanner simulator sends a CT study of {spec.total_instances} images")
                done = threading.Event()
                reporter = threading.Thread(target=_progress, args=(index, pacs, spec.total_instances, done))
                reporter.start()
                try:
                    options = ScanOptions(
                        port=ports["dicom"],
                        calling_ae=SCANNER_AE,
                        called_ae=GATEWAY_AE,
                        study=spec,
                        associations=2,
                    )
                    result = run_scanner(options)
                    pacs.wait_for(spec.total_instances, 60)
                finally:
                    done.set()
                    reporter.join()
                ups_line = _metric(
                    ports["metrics"], 'dicom_gateway_device_value{device="ups",quantity="load_percent"}'
                )
            received = _received(index)
            latencies = [
                item.received_at - received[item.sop_instance_uid]
                for item in pacs.received()
                if item.sop_instance_uid in received
            ]
        ok = bool(result and result.ok) and len(latencies) == spec.total_instances and gateway.returncode == 0
        print("demo: ---- summary ----")
        print(f"demo: scanner: {result.summary().splitlines()[0] if result else 'did not run'}")
        print(f"demo: received {len(received)}, forwarded {len(latencies)} of {spec.total_instances}")
        if latencies:
            p50 = statistics.median(latencies) * 1000
            p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000
            print(f"demo: receipt -> archive latency p50 {p50:.0f} ms, p95 {p95:.0f} ms")
        print(f"demo: UPS reading from the metrics: {ups_line}")
        print(f"demo: gateway exit status {gateway.returncode}; result: {'OK' if ok else 'FAILED'}")
    finally:
        if keep:
            print(f"demo: everything kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m simulators.demo``."""
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("--images", type=int, default=100, help="images in the CT study (default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory afterwards")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        status = run_demo(args.images, args.keep)
    except KeyboardInterrupt:
        print("demo: interrupted; everything stopped")
        return 130
    print(f"demo: done in {time.monotonic() - started:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
