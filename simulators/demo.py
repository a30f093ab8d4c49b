"""`make demo`: a gateway on a throwaway state directory, fed a CT study by the scanner simulator.

The gateway runs as its own process (``python -m gateway``), exactly as an admin would run it, so this
module never imports the gateway. Everything it starts is stopped again, also on Ctrl-C or failure.

May import: simulators.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from simulators.datasets import StudySpec
from simulators.harness import ManagedProcess, free_port
from simulators.scanner import ScanOptions, run_scanner

GATEWAY_AE = "EDGE_GW"
SCANNER_AE = "CT_SCANNER_1"


def _write_config(directory: Path, port: int) -> Path:
    config = directory / "gateway.toml"
    config.write_text(
        f"""# Written by `make demo`: receive-only gateway on loopback, state in a temporary directory.
[gateway]
node_id = "demo"
ae_title = "{GATEWAY_AE}"
state_dir = "{directory / "state"}"
min_free_bytes = "100MB"

[receiver]
host = "127.0.0.1"
port = {port}
allowed_calling_ae = ["{SCANNER_AE}"]

[metrics]
enabled = false
""",
        encoding="utf-8",
    )
    return config


def _index_summary(index: Path) -> tuple[int, int]:
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        count, size = db.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM instances").fetchone()
    finally:
        db.close()
    return int(count), int(size)


def run_demo(images: int, keep: bool) -> int:
    """Start a gateway, send one CT study, report what was made durable; 0 when every image was."""
    workdir = Path(tempfile.mkdtemp(prefix="dicom-gateway-demo-"))
    port = free_port()
    config = _write_config(workdir, port)
    gateway = ManagedProcess(
        [sys.executable, "-m", "gateway", "-c", str(config), "run"],
        ready_line=r"Gateway \S+ ready",
        timeout=30,
        env={"PYTHONUNBUFFERED": "1"},
    )
    print(f"demo: starting the gateway on 127.0.0.1:{port} (state in {workdir})")
    with gateway:
        spec = StudySpec(
            modality="CT", series=2, images_per_series=max(images // 2, 1), rows=256, columns=256
        )
        print(f"demo: the scanner simulator sends a CT study of {spec.total_instances} images")
        started = time.monotonic()
        result = run_scanner(
            ScanOptions(
                port=port,
                calling_ae=SCANNER_AE,
                called_ae=GATEWAY_AE,
                study=spec,
                associations=2,
                progress_interval=1.0,
            )
        )
        elapsed = time.monotonic() - started
        print(result.summary())
    count, size = _index_summary(workdir / "state" / "index.sqlite")
    print(
        f"demo: the gateway indexed {count} instances ({size / 1e6:.1f} MB) in {elapsed:.1f} s; "
        f"gateway exit status {gateway.returncode}"
    )
    if keep:
        print(f"demo: state kept in {workdir}")
    else:
        shutil.rmtree(workdir)
    return 0 if result.ok and count == spec.total_instances and gateway.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m simulators.demo``."""
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("--images", type=int, default=100, help="images in the CT study (default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory afterwards")
    args = parser.parse_args(argv)
    return run_demo(args.images, args.keep)


if __name__ == "__main__":
    sys.exit(main())
