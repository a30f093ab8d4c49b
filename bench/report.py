"""Turn the benchmark's records into one table (Markdown), the goals of issue 4, and JSON.

Throughput is the median over repetitions of instances / seconds (and bytes / seconds); CPU seconds are
the median; peak RSS is the largest of the repetitions. Ratios compare the gateway with the peers
measured in the same run: ingest against Orthanc and storescp, forwarding against storescu.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.data import DESCRIPTIONS

Record = dict[str, Any]

COLUMNS = ("section", "case", "subject", "inst/s", "MB/s", "CPU s", "peak RSS MB", "other", "vs peers")


def summarize(record: Record) -> Record:
    """Add median throughput, CPU and the peak RSS to a record that holds `runs`."""
    runs = record.get("runs")
    if not runs:
        return record
    seconds = [run["seconds"] for run in runs]
    return {
        **record,
        "instances_per_s": statistics.median(record["instances"] / s for s in seconds),
        "mb_per_s": statistics.median(record["bytes"] / s / 1e6 for s in seconds),
        "cpu_seconds": statistics.median(run["cpu_seconds"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_bytes"] for run in runs) / 1e6,
    }


def _find(records: list[Record], **keys: object) -> Record | None:
    for record in records:
        if all(record.get(k) == v for k, v in keys.items()):
            return record
    return None


def _ratio(records: list[Record], record: Record, peer: str, **keys: object) -> float | None:
    """`record`'s throughput over that of `peer` in the record matching `keys`."""
    other = _find(records, subject=peer, **keys)
    if other is None or not other.get("instances_per_s"):
        return None
    return float(record["instances_per_s"] / other["instances_per_s"])


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _smallest_backlog(records: list[Record], shape: str) -> Record | None:
    sized = [r for r in records if r["section"] == "backlog" and r["shape"] == shape]
    return min(sized, key=lambda r: r["rows"]) if sized else None


# Each returns (case, other, versus) for one record of its section.


def _ingest(records: list[Record], r: Record) -> tuple[str, str, str]:
    case = f"{DESCRIPTIONS[r['data']]} x{r['instances']}, {r['associations']} assoc"
    versus = ""
    if r["subject"] == "gateway":
        keys = {"section": "ingest", "data": r["data"], "associations": r["associations"]}
        ratios = [(peer, _ratio(records, r, peer, **keys)) for peer in ("orthanc", "storescp")]
        versus = ", ".join(f"{ratio:.2f}x {peer}" for peer, ratio in ratios if ratio is not None)
    return case, "", versus


def _forward(records: list[Record], r: Record) -> tuple[str, str, str]:
    case = f"{r['instances']} x {DESCRIPTIONS[r['data']]} into storescp, {r['mode']}"
    versus = ""
    if r["subject"] == "gateway":
        ratio = _ratio(records, r, "storescu", section="forward", mode=r["mode"])
        versus = "" if ratio is None else f"{ratio:.2f}x storescu"
    return case, "", versus


def _memory(_records: list[Record], r: Record) -> tuple[str, str, str]:
    run = r["runs"][0]
    case = (
        f"receive {r['instances']} x {DESCRIPTIONS[r['data']]} on {r['associations']} assoc + forward (TLS)"
    )
    return case, f"received in {run['receive_seconds']:.1f} s, all forwarded at {run['seconds']:.1f} s", ""


def _latency(_records: list[Record], r: Record) -> tuple[str, str, str]:
    case = f"{r['path']}, {r['instances']} x {DESCRIPTIONS[r['data']]}, {r['mode']}"
    return case, f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", ""


def _backlog(records: list[Record], r: Record) -> tuple[str, str, str]:
    case = f"{r['rows']:,} index rows, {r['shape']}"
    other = f"claim {r['claim_ms']:.2f} ms, settle {r['settle_ms']:.2f} ms, record {r['record_ms']:.2f} ms"
    base = _smallest_backlog(records, r["shape"])
    versus = ""
    if base is not None and base is not r:
        versus = f"claim {r['claim_ms'] / base['claim_ms']:.2f}x of {base['rows']:,} rows"
    return case, other, versus


def _backlog_rss(records: list[Record], r: Record) -> tuple[str, str, str]:
    sized = [x for x in records if x["section"] == "backlog-rss"]
    base = min(sized, key=lambda x: x["rows"])
    versus = "" if base is r else f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x of {base['rows']:,} rows"
    return f"daemon started on a backlog of {r['rows']:,} instances, archive down", "", versus


_DESCRIBE = {
    "ingest": _ingest,
    "forward": _forward,
    "memory": _memory,
    "latency": _latency,
    "backlog": _backlog,
    "backlog-rss": _backlog_rss,
}


def table_rows(records: list[Record]) -> list[list[str]]:
    """One row per record, in the order measured."""
    rows = []
    for r in records:
        case, other, versus = _DESCRIBE[r["section"]](records, r)
        rows.append(
            [
                r["section"],
                case,
                r["subject"],
                _num(r.get("instances_per_s")),
                _num(r.get("mb_per_s")),
                _num(r.get("cpu_seconds"), 2),
                _num(r.get("peak_rss_mb"), 0),
                other,
                versus,
            ]
        )
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# The goals of issue 4, each from the records of this run (absent when its part did not run).


def _goal(goal: str, measured: str, met: bool) -> Record:
    return {"goal": goal, "measured": measured, "met": met}


def _ingest_goals(records: list[Record]) -> list[Record]:
    found = []
    for data in ("ct", "small"):
        for associations in (1, 4):
            keys = {"section": "ingest", "data": data, "associations": associations}
            gateway = _find(records, subject="gateway", **keys)
            ratio = None if gateway is None else _ratio(records, gateway, "orthanc", **keys)
            if ratio is not None:
                goal = f"ingest {data} x{associations} >= 1.0x Orthanc"
                found.append(_goal(goal, f"{ratio:.2f}x", ratio >= 1.0))
    return found


def _forward_goals(records: list[Record]) -> list[Record]:
    gateway = _find(records, section="forward", subject="gateway", mode="tls")
    ratio = None if gateway is None else _ratio(records, gateway, "storescu", section="forward", mode="tls")
    if ratio is None:
        return []
    return [_goal("forwarding over TLS >= 0.5x storescu over TLS", f"{ratio:.2f}x", ratio >= 0.5)]


def _memory_goals(records: list[Record]) -> list[Record]:
    memory = _find(records, section="memory")
    if memory is None:
        return []
    peak = memory["peak_rss_mb"]
    goal = "peak RSS < 100 MB receiving 4 x 50 MB on 4 assoc and forwarding"
    return [_goal(goal, f"{peak:.0f} MB", peak < 100)]


def _latency_goals(records: list[Record]) -> list[Record]:
    found = []
    for mode in ("plain", "tls"):
        for latency in records:
            if (
                latency["section"] == "latency"
                and latency["subject"] == "gateway"
                and latency["mode"] == mode
            ):
                p50, where = latency["p50_ms"], latency["path"].split(" -> ")[1]
                goal = f"p50 ack-to-PACS < 50 ms, idle ({mode}, {where})"
                found.append(_goal(goal, f"{p50:.1f} ms", p50 < 50))
    return found


def _backlog_goals(records: list[Record]) -> list[Record]:
    found = []
    sized = sorted((r for r in records if r["section"] == "backlog-rss"), key=lambda r: r["rows"])
    if len(sized) > 1:
        small, large = sized[0], sized[-1]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        goal = f"daemon RSS flat from {small['rows']:,} to {large['rows']:,} backlog (<= 1.1x)"
        found.append(
            _goal(goal, f"{small['peak_rss_mb']:.0f} -> {large['peak_rss_mb']:.0f} MB", ratio <= 1.1)
        )
    for shape in ("backlog", "history"):
        sized = sorted((r for r in records if r.get("shape") == shape), key=lambda r: r["rows"])
        if len(sized) < 2:
            continue
        small, large = sized[0], sized[-1]
        ratio = large["claim_ms"] / small["claim_ms"]
        goal = f"claim at {large['rows']:,} rows <= 2x claim at {small['rows']:,} ({shape})"
        found.append(_goal(goal, f"{ratio:.2f}x", ratio <= 2.0))
    return found


def goals(records: list[Record]) -> list[Record]:
    """Each goal this run measured: what it asks, what was measured, and whether it holds."""
    checks = (_ingest_goals, _forward_goals, _memory_goals, _latency_goals, _backlog_goals)
    return [goal for check in checks for goal in check(records)]


def goals_markdown(found: list[Record]) -> str:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |" for g in found]
    return "\n".join(lines)
