"""`python -m bench.run [--quick]`: every benchmark in one run, one table, and bench/out/results.json.

Order: data sets (made once, cached in bench/out/data), ingest, forwarding and memory, latency, backlog
scaling. Each part starts and stops its own processes in a temporary directory; Ctrl-C stops them all.
The full run takes ~15-25 minutes on 2 cores; `--quick` (~3 minutes) runs smaller sets once each, to
check that everything works. `--only` runs some parts (while working on one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import backlog, data, forward, ingest, latency, peers, report
from gateway import __version__ as gateway_version

OUT = Path(__file__).resolve().parent / "out"
PARTS = ("ingest", "forward", "latency", "backlog")


@dataclass(frozen=True)
class Settings:
    """How much a run measures."""

    repetitions: int  # of every ingest and forwarding case
    latency_objects: int  # sent one at a time per latency path
    backlog_rows: tuple[int, ...]  # index sizes for the backlog scaling


FULL = Settings(repetitions=5, latency_objects=100, backlog_rows=(1_000, 100_000, 1_000_000))
QUICK = Settings(repetitions=1, latency_objects=20, backlog_rows=(1_000, 100_000))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "not installed"
    lines = (result.stdout + result.stderr).strip().splitlines()
    if not lines:
        return "?"
    first, _, rest = lines[0].strip(" $").partition(" ")
    return f"{Path(first).name} {rest}".strip()  # "/usr/sbin/Orthanc 1.10.1" -> "Orthanc 1.10.1"


def _meta(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    return {
        "command": "make bench" if not args.quick else "make bench-quick",
        "argv": ["python", "-m", "bench.run", *sys.argv[1:]],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gateway": gateway_version,
        "gateway_commit": _commit(),
        "storescu": _version(["storescu", "--version"]),
        "orthanc": _version([shutil.which("Orthanc") or "/usr/sbin/Orthanc", "--version"]),
        "load_average_at_start": os.getloadavg(),
        **asdict(settings),
    }


def _commit() -> str:
    """The checkout's commit, `+dirty` when gateway/ has changes not committed."""
    repo = Path(__file__).resolve().parents[1]
    commit = _version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "gateway"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = QUICK if args.quick else FULL
    if args.repetitions:
        settings = replace(settings, repetitions=args.repetitions)
    meta = _meta(args, settings)
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()}: other work on this machine will skew the numbers")
    parts = args.only or PARTS
    sets = data.prepare_all(OUT / "data", quick=args.quick, log=log)
    records: list[report.Record] = []
    repetitions = settings.repetitions
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dicom-gateway-bench-") as tmp:
        workdir = Path(tmp)
        pki = peers.make_pki(workdir / "pki")
        if "ingest" in parts:
            records += ingest.run_ingest(sets, workdir, repetitions=repetitions, log=log)
        if "forward" in parts:
            records += forward.run_forwarding(sets["ct"], workdir, pki, repetitions=repetitions, log=log)
            records.append(forward.receive_and_forward_large(sets["us"], workdir, pki, log=log))
        if "latency" in parts:
            objects = sets["ct"].first(settings.latency_objects)
            records += latency.run_latency(objects, workdir, pki, log=log)
        if "backlog" in parts:
            records += backlog.run_backlog(list(settings.backlog_rows), workdir, log=log)
    meta["seconds"] = round(time.monotonic() - started)
    meta["load_average_at_end"] = os.getloadavg()
    return {"meta": meta, "records": [report.summarize(r) for r in records]}


def render(results: dict[str, Any]) -> dict[str, Any]:
    """Add the table and the goals to measured results."""
    records = results["records"]
    return {
        "meta": results["meta"],
        "table": {"columns": report.COLUMNS, "rows": report.table_rows(records)},
        "goals": report.goals(records),
        "records": records,
    }


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets, one repetition (~3 minutes)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--repetitions", type=int, help="override the repetitions of ingest and forwarding")
    parser.add_argument("--out", type=Path, default=OUT / "results.json", help="where to write the JSON")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: re-render a results file"
    )
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM both unwind the `with` blocks that stop every process started (SIGINT too when
    # a non-interactive shell started us in the background with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        try:
            results = run(args)
        except KeyboardInterrupt:
            log("interrupted: every process the benchmark started has been stopped")
            return 130
        # The measurements first: a problem while rendering must not lose a 10-minute run.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    results = render(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report.markdown(results["table"]["rows"]))
    print()
    print(report.goals_markdown(results["goals"]))
    print()
    log(f"done in {results['meta']['seconds']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
