"""Serial device telemetry: the Q1 and key=value parsers, the power policy, and `SerialDevice` against the
pty simulators (a real pty, real pyserial)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import gateway.device
from gateway.config import parse_config
from gateway.device import (
    MAX_KEYS,
    Q1_FLAGS,
    PowerPolicy,
    SerialDevice,
    backoff_delay,
    parse_keyvalue,
    parse_q1,
    sanitize_key,
)
from gateway.metrics import Metrics
from gateway.model import DeviceReading, Event, EventKind
from simulators.serialdev import KeyValueSimulator, UpsSimulator

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from gateway.config import SerialConfig

# --- parse_q1 ---


def test_q1_parses_the_protocol_documents_example():
    values, flags = parse_q1(b"(208.4 140.0 208.4 034 59.9 2.05 35.0 00110000\r")

    assert values == {
        "input_voltage": 208.4,
        "input_fault_voltage": 140.0,
        "output_voltage": 208.4,
        "load_percent": 34.0,
        "input_frequency_hz": 59.9,
        "battery_voltage": 2.05,
        "temperature_celsius": 35.0,
    }
    assert flags == {
        "utility_fail": False,
        "battery_low": False,
        "bypass_active": True,
        "ups_failed": True,
        "standby_type": False,
        "test_in_progress": False,
        "shutdown_active": False,
        "beeper_on": False,
    }


@pytest.mark.parametrize(
    ("line", "battery_voltage", "on_battery"),
    [
        ("(215.0 195.0 230.0 014 49.0 2.27 30.0 00101000\r", 2.27, False),  # boost active, standby type
        (b"(000.0 000.0 229.8 021 50.0 12.8 26.0 10001001\r\n", 12.8, True),  # on battery, total voltage
        ("(236.5 236.5 236.5 000 50.1 27.3 25.5 00001000", 27.3, False),  # no CR: str input, stripped
    ],
)
def test_q1_parses_real_world_answers(line, battery_voltage, on_battery):
    values, flags = parse_q1(line)

    assert values["battery_voltage"] == battery_voltage
    assert flags["utility_fail"] is on_battery
    assert len(values) == 7
    assert len(flags) == 8


def test_q1_leaves_out_quantities_a_model_does_not_measure():
    values, _ = parse_q1("(226.0 226.0 229.0 000 50.0 27.3 --.- 00001001\r")

    assert "temperature_celsius" not in values
    assert values["output_voltage"] == 229.0


@pytest.mark.parametrize("bit", range(8))
def test_q1_reads_each_status_bit(bit):
    bits = "".join("1" if i == bit else "0" for i in range(8))

    _, flags = parse_q1(f"(230.0 230.0 230.0 010 50.0 2.25 30.0 {bits}\r")

    assert [name for name, on in flags.items() if on] == [Q1_FLAGS[bit]]


def test_q1_flags_are_b7_to_b0_in_order():
    assert Q1_FLAGS == (
        "utility_fail",
        "battery_low",
        "bypass_active",
        "ups_failed",
        "standby_type",
        "test_in_progress",
        "shutdown_active",
        "beeper_on",
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "must start with"),
        (b"NAK\r", "NAK"),
        (b"(NAK\r", "NAK"),
        (b"Q1\r", "echoed"),
        (b"230.0 230.0 230.0 010 50.0 2.25 30.0 00001000\r", "must start with"),
        (b"(230.0 230.0 230.0 010 50.0 2.25 00001000\r", "7 fields"),
        (b"(230.0 230.0 230.0 010 50.0 2.25 30.0 30.0 00001000\r", "9 fields"),
        (b"(23O.0 230.0 230.0 010 50.0 2.25 30.0 00001000\r", "input_voltage is not a number"),
        (b"(230.0 230.0 230.0 010 nan 2.25 30.0 00001000\r", "input_frequency_hz is not a finite"),
        (b"(230.0 230.0 230.0 010 50.0 2.25 30.0 0000100\r", "8 bits"),
        (b"(230.0 230.0 230.0 010 50.0 2.25 30.0 000010002\r", "8 bits"),
        (b"(230.0 230.0 230.0 010 50.0 2.25 30.0 0000100x\r", "8 bits"),
        (b"\xff\xfe garbage at the wrong baud rate\r", "must start with"),
    ],
)
def test_q1_rejects_malformed_answers(line, message):
    with pytest.raises(ValueError, match=message):
        parse_q1(line)


# --- parse_keyvalue ---


def test_keyvalue_numeric_pairs_become_values():
    assert parse_keyvalue(b"temp=21.5 humidity=40.2 door=0\r\n") == {
        "temp": 21.5,
        "humidity": 40.2,
        "door": 0.0,
    }


def test_keyvalue_accepts_spaces_commas_semicolons_and_tabs():
    assert parse_keyvalue("a=1,b=2; c=3\td=-4.5e1 ,, ;") == {"a": 1.0, "b": 2.0, "c": 3.0, "d": -45.0}


@pytest.mark.parametrize(
    "line", ["door=open", "status=OK", "banner", "=5", "___=5", "x=", "x=nan", "x=inf", "x=1,5", ""]
)
def test_keyvalue_ignores_what_is_not_a_numeric_pair(line):
    values = parse_keyvalue(line)

    assert values in ({}, {"x": 1.0})  # "x=1,5": the comma separates, "5" alone is no pair


def test_keyvalue_keeps_the_last_of_a_repeated_key():
    assert parse_keyvalue("t=1 T=2 t=3") == {"t": 3.0}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Temp.C", "temp_c"),
        ("Rel-Humidity%", "rel_humidity_"),
        ("co2_ppm", "co2_ppm"),
        ("Temp°", "temp_"),
        ("Door:Open", "door_open"),
        ("x" * 100, "x" * 64),
    ],
)
def test_keys_are_sanitized_to_label_safe_names(raw, clean):
    assert sanitize_key(raw) == clean
    assert parse_keyvalue(f"{raw}=1") == {clean: 1.0}


def test_keyvalue_non_ascii_bytes_do_not_raise():
    assert parse_keyvalue(b"t\xe9mp=1 ok=2") == {"t_mp": 1.0, "ok": 2.0}


def test_keyvalue_keeps_at_most_max_keys_per_line():
    line = " ".join(f"k{i}={i}" for i in range(MAX_KEYS + 10)) + " k0=99"

    values = parse_keyvalue(line)

    assert len(values) == MAX_KEYS == 32
    assert set(values) == {f"k{i}" for i in range(MAX_KEYS)}
    assert values["k0"] == 99.0  # a known key still updates past the cap


# --- backoff ---


def test_backoff_is_jittered_below_a_doubling_ceiling_capped_at_60s():
    random.seed(5)
    for attempt in range(12):
        ceiling = min(60.0, 2.0**attempt)
        delays = [backoff_delay(attempt) for _ in range(50)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert 0.0 <= backoff_delay(100_000) <= 60.0  # days of retries do not overflow


# --- PowerPolicy ---


def ups(device: str = "ups", *, utility_fail: bool = False, battery_low: bool = False) -> DeviceReading:
    return DeviceReading(
        device, {"input_voltage": 0.0}, {"utility_fail": utility_fail, "battery_low": battery_low}
    )


@pytest.fixture
def policy_changes() -> tuple[PowerPolicy, list[tuple[bool, str]]]:
    changes: list[tuple[bool, str]] = []
    return PowerPolicy(lambda held, reason: changes.append((held, reason))), changes


def test_power_policy_needs_utility_fail_and_battery_low_to_hold(policy_changes):
    policy, changes = policy_changes

    policy.observe(ups(utility_fail=True))  # on battery, charge left: keep working
    policy.observe(ups(battery_low=True))  # on mains with a worn battery: keep working
    assert changes == []
    assert not policy.held

    policy.observe(ups(utility_fail=True, battery_low=True))

    assert policy.held
    assert changes == [(True, "UPS ups: utility power failed and battery low")]


def test_power_policy_reports_only_changes(policy_changes):
    policy, changes = policy_changes

    for _ in range(3):
        policy.observe(ups(utility_fail=True, battery_low=True))
    policy.observe(ups(utility_fail=True))  # battery no longer reported low, still on battery: held
    for _ in range(3):
        policy.observe(ups())

    assert changes == [
        (True, "UPS ups: utility power failed and battery low"),
        (False, "UPS ups: utility power is back"),
    ]
    assert not policy.held


def test_power_policy_releases_when_utility_returns_even_with_battery_low(policy_changes):
    policy, changes = policy_changes

    policy.observe(ups(utility_fail=True, battery_low=True))
    policy.observe(ups(battery_low=True))

    assert [held for held, _ in changes] == [True, False]


def test_power_policy_ignores_readings_without_ups_flags(policy_changes):
    policy, changes = policy_changes

    policy.observe(ups(utility_fail=True, battery_low=True))
    policy.observe(DeviceReading("room", {"temp": 21.0}))

    assert [held for held, _ in changes] == [True]


def test_power_policy_holds_until_every_failing_ups_has_power_back(policy_changes):
    policy, changes = policy_changes

    policy.observe(ups("ups-a", utility_fail=True, battery_low=True))
    policy.observe(ups("ups-b", utility_fail=True, battery_low=True))
    policy.observe(ups("ups-a"))
    assert policy.held
    policy.observe(ups("ups-b"))

    assert changes == [
        (True, "UPS ups-a: utility power failed and battery low"),
        (False, "UPS ups-b: utility power is back"),
    ]


# --- SerialDevice against the pty simulators ---

POLL = 0.1
READ_TIMEOUT = 0.2
WAIT = 10.0


def serial_config(port: str | Path, protocol: str = "megatec-q1", **settings: object) -> SerialConfig:
    """One [[serial]] entry through the real config parser."""
    table = {
        "name": "ups" if protocol == "megatec-q1" else "room",
        "port": str(port),
        "baudrate": 2400,
        "protocol": protocol,
        "poll_interval": POLL,
        "read_timeout": READ_TIMEOUT,
        **settings,
    }
    document = {
        "gateway": {"node_id": "test", "ae_title": "EDGE_GW"},
        "receiver": {"allowed_calling_ae": []},
        "serial": [table],
    }
    return parse_config(document).serial[0]


@dataclass
class Recorder:
    """What a device hands the app: events and readings."""

    events: list[Event] = field(default_factory=list)
    readings: list[DeviceReading] = field(default_factory=list)

    def statuses(self) -> list[dict[str, object]]:
        return [dict(e.payload) for e in self.events if e.kind is EventKind.DEVICE_STATUS]

    def ups(self) -> list[dict[str, object]]:
        return [dict(e.payload) for e in self.events if e.kind is EventKind.DEVICE]


async def wait_for(condition: Callable[[], object], seconds: float = WAIT) -> None:
    """Poll a condition that threads (the simulator, pyserial's workers) make true."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - no event to wait on: the state changes in other threads
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(device: SerialDevice) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(device.run(), name=f"device[{device.name}]")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Ticker:
    """A loop task that records the longest gap between its wake-ups: a blocked loop shows here."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest_gap = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            self.longest_gap = max(self.longest_gap, now - last)
            self.ticks += 1
            last = now


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    try:
        yield ticker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"dicom_gateway_{name}", labels)


def opened(path: str) -> int:
    """How many descriptors of this process point at `path` (the simulator itself holds one)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += str(fd.readlink()) == path
    return count


@pytest.fixture
def ups_sim() -> Iterator[UpsSimulator]:
    with UpsSimulator() as simulator:
        yield simulator


async def test_ups_readings_reach_metrics_events_and_the_callback(ups_sim):
    metrics, seen = Metrics(), Recorder()
    device = SerialDevice(serial_config(ups_sim.path), metrics, seen.events.append, seen.readings.append)
    assert value(metrics, "device_up", device="ups") == 0.0  # the series exists before the first poll

    async with running(device):
        await wait_for(lambda: len(seen.readings) >= 2)

    assert value(metrics, "device_value", device="ups", quantity="input_voltage") == 230.0
    assert value(metrics, "device_value", device="ups", quantity="load_percent") == 21.0
    assert value(metrics, "device_value", device="ups", quantity="battery_voltage") == 2.27
    assert value(metrics, "device_up", device="ups") == 1.0
    assert value(metrics, "ups_on_battery", device="ups") == 0.0
    assert value(metrics, "ups_battery_low", device="ups") == 0.0
    assert seen.events[0].kind is EventKind.DEVICE_STATUS
    assert seen.statuses() == [{"up": True}]
    reading_event = next(e for e in seen.events if e.kind is EventKind.DEVICE)
    assert reading_event.source == "ups"
    assert reading_event.payload["values"] == seen.readings[0].values
    assert reading_event.payload["flags"] == seen.readings[0].flags
    assert seen.readings[0].flags["standby_type"] is True
    assert device.up
    assert device.latest == seen.readings[-1]
    assert opened(ups_sim.path) == 1  # the port is closed again: only the simulator's own end is left


async def test_scripted_power_failure_holds_and_recovery_releases(ups_sim):
    metrics, seen = Metrics(), Recorder()
    changes: list[tuple[bool, str]] = []
    policy = PowerPolicy(lambda held, reason: changes.append((held, reason)))

    def on_reading(reading: DeviceReading) -> None:
        seen.readings.append(reading)
        policy.observe(reading)

    device = SerialDevice(serial_config(ups_sim.path), metrics, seen.events.append, on_reading)
    async with running(device):
        await wait_for(lambda: seen.readings)
        ups_sim.run_script([(0.3, "power_fail"), (0.8, "battery_low"), (1.5, "power_restore")])
        await wait_for(lambda: any(r.flags["utility_fail"] for r in seen.readings))
        assert value(metrics, "ups_on_battery", device="ups") == 1.0
        assert changes == []  # on battery with charge left: keep working
        await wait_for(lambda: changes)
        assert changes == [(True, "UPS ups: utility power failed and battery low")]
        assert value(metrics, "ups_battery_low", device="ups") == 1.0
        assert seen.readings[-1].values["input_voltage"] == 0.0
        await wait_for(lambda: len(changes) == 2)

    assert changes[1] == (False, "UPS ups: utility power is back")
    assert value(metrics, "ups_on_battery", device="ups") == 0.0
    assert value(metrics, "ups_battery_low", device="ups") == 0.0
    assert seen.statuses() == [{"up": True}]


async def test_silent_device_is_reported_down_once_and_up_again(ups_sim):
    metrics, seen = Metrics(), Recorder()
    config = serial_config(ups_sim.path, read_timeout=0.3)
    device = SerialDevice(config, metrics, seen.events.append, backoff_base=0.05, backoff_cap=0.2)
    async with ticking() as ticker, running(device):
        await wait_for(lambda: device.up)
        ups_sim.silence()
        await wait_for(lambda: len(seen.statuses()) == 2)
        assert value(metrics, "device_up", device="ups") == 0.0
        assert not device.up
        polls, attempts = ups_sim.polls, device.open_attempts
        await wait_for(lambda: ups_sim.polls >= polls + 6 and device.open_attempts >= attempts + 2)
        assert seen.statuses() == [
            {"up": True},
            {"up": False, "error": "no answer within 0.3 s (3 polls in a row)"},
        ]
        readings = len(seen.ups())
        ups_sim.resume()
        await wait_for(lambda: len(seen.statuses()) == 3)

        assert seen.statuses()[2] == {"up": True}
        assert value(metrics, "device_up", device="ups") == 1.0
        assert len(seen.ups()) > readings
        # Reads blocked 0.3 s at a time in worker threads; the loop never waited for them.
        assert ticker.longest_gap < 0.15


async def test_missing_port_is_down_retried_with_backoff_and_found_when_plugged_in(tmp_path, monkeypatch):
    attempts: list[int] = []

    def recording_backoff(attempt: int, base: float, cap: float) -> float:
        attempts.append(attempt)
        return min(cap, base * 2**attempt)

    monkeypatch.setattr(gateway.device, "backoff_delay", recording_backoff)
    port = tmp_path / "ttyUSB0"
    metrics, seen = Metrics(), Recorder()
    device = SerialDevice(
        serial_config(port), metrics, seen.events.append, backoff_base=0.01, backoff_cap=0.04
    )

    async with ticking() as ticker, running(device):
        await wait_for(lambda: len(attempts) >= 6)
        assert value(metrics, "device_up", device="ups") == 0.0
        [down] = seen.statuses()
        assert down["up"] is False
        assert str(down["error"]).startswith(f"cannot open {port}: ")
        assert attempts[:6] == [0, 1, 2, 3, 4, 5]  # the exponent grows while nothing answers
        assert ticker.ticks > 0

        with UpsSimulator() as simulator:
            port.symlink_to(simulator.path)  # the cable is plugged in
            await wait_for(lambda: device.up)
            assert seen.statuses()[1:] == [{"up": True}]
            simulator.silence()
            before = len(attempts)
            await wait_for(lambda: len(attempts) > before)
            assert attempts[before] == 0  # a reading reset the backoff


async def test_vanished_device_is_down_at_once(ups_sim):
    metrics, seen = Metrics(), Recorder()
    device = SerialDevice(serial_config(ups_sim.path), metrics, seen.events.append, backoff_base=0.05)
    async with running(device):
        await wait_for(lambda: device.up)
        ups_sim.stop()  # the pty goes away under the reader: a USB adapter pulled out
        await wait_for(lambda: not device.up)

    error = str(seen.statuses()[1]["error"])
    assert "polls in a row" not in error
    assert value(metrics, "device_up", device="ups") == 0.0


async def test_cancel_wakes_a_blocked_read_and_closes_the_port(ups_sim):
    ups_sim.silence()
    device = SerialDevice(serial_config(ups_sim.path, read_timeout=10), Metrics(), Recorder().events.append)
    task = asyncio.create_task(device.run())
    await wait_for(lambda: ups_sim.polls >= 1)  # the worker now waits for an answer, up to 10 s
    assert opened(ups_sim.path) == 2

    task.cancel()
    async with asyncio.timeout(2):
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert opened(ups_sim.path) == 1


async def test_keyvalue_lines_become_gauges_without_ups_flags():
    metrics, seen = Metrics(), Recorder()
    with KeyValueSimulator(interval=POLL) as sim:
        device = SerialDevice(serial_config(sim.path, "keyvalue"), metrics, seen.events.append)
        async with running(device):
            await wait_for(seen.ups)
            sim.set_values(temp=23.25, status="OK")
            await wait_for(lambda: value(metrics, "device_value", device="room", quantity="temp") == 23.25)

    assert value(metrics, "device_value", device="room", quantity="humidity") == 40.2
    assert value(metrics, "device_value", device="room", quantity="door") == 0.0
    assert value(metrics, "device_value", device="room", quantity="status") is None
    assert value(metrics, "ups_on_battery", device="room") is None
    assert seen.ups()[0] == {"values": {"temp": 21.5, "humidity": 40.2, "door": 0.0}, "flags": {}}
    assert seen.statuses() == [{"up": True}]


async def test_keyvalue_line_split_across_polls_is_joined():
    metrics, seen = Metrics(), Recorder()
    with KeyValueSimulator({"first": 1.0}, interval=POLL) as sim:
        device = SerialDevice(serial_config(sim.path, "keyvalue"), metrics, seen.events.append)
        async with running(device):
            await wait_for(seen.ups)
            sim.silence()  # no more periodic lines: only what the test writes
            sim.write(b"temp=1")
            await wait_for(lambda: device._pending == b"temp=1")  # one poll took the first half
            sim.write(b"2.5\r\n")
            await wait_for(lambda: value(metrics, "device_value", device="room", quantity="temp") is not None)

    assert value(metrics, "device_value", device="room", quantity="temp") == 12.5


async def test_keyvalue_quantities_are_capped_per_device(caplog):
    metrics, seen = Metrics(), Recorder()
    with KeyValueSimulator({"k0": 0.0}, interval=POLL) as sim:
        device = SerialDevice(serial_config(sim.path, "keyvalue"), metrics, seen.events.append)
        async with running(device):
            await wait_for(seen.ups)
            sim.silence()
            for start in range(1, 60, 20):
                sim.write((" ".join(f"k{i}={i}" for i in range(start, start + 20)) + "\n").encode())
            sim.write(b"k0=7 k59=1\n")
            await wait_for(lambda: value(metrics, "device_value", device="room", quantity="k0") == 7.0)

    quantities = {
        sample.labels["quantity"]
        for metric in metrics.registry.collect()
        if metric.name == "dicom_gateway_device_value"
        for sample in metric.samples
        if sample.labels["device"] == "room"
    }
    assert quantities == {f"k{i}" for i in range(MAX_KEYS)}
    assert len([r for r in caplog.records if "quantities" in r.getMessage()]) == 1


async def test_keyvalue_device_that_sends_nothing_is_silent():
    metrics, seen = Metrics(), Recorder()
    with KeyValueSimulator(interval=POLL) as sim:
        device = SerialDevice(
            serial_config(sim.path, "keyvalue"),
            metrics,
            seen.events.append,
            backoff_base=0.05,
            backoff_cap=0.1,
        )
        async with running(device):
            await wait_for(lambda: device.up)
            sim.silence()
            await wait_for(lambda: not device.up)
            sim.resume()
            await wait_for(lambda: device.up)

    assert seen.statuses() == [
        {"up": True},
        {"up": False, "error": "sent nothing (3 polls in a row)"},
        {"up": True},
    ]
