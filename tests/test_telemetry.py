"""MQTT telemetry against a real Mosquitto broker: status and last will, health, events, and reconnection.

Each test starts its own broker on a free loopback port and watches it with an aiomqtt subscriber.
The gateway side never waits for the broker: publish() only touches a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import pytest

from gateway.config import ClientTls, MqttConfig
from gateway.metrics import Metrics
from gateway.model import Event, EventKind
from gateway.telemetry import SCHEMA, Telemetry, backoff
from simulators.harness import ManagedProcess, free_port
from tests.conftest import REPO, Pki, require_tools

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

PREFIX = "dicom-gateway"
NODE = "ct-room-1"
TOPIC = f"{PREFIX}/{NODE}"
TIMEOUT = 10.0
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"  # sbin: often not on a user's PATH
_client_ids = itertools.count()


# ---------------------------------------------------------------- a real broker


class Broker:
    """One Mosquitto process on a fixed port; stop() and start() again keep the port."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        self.port = free_port()
        while f"listener {self.port} " in extra:  # free_port() may hand out an extra listener's port again
            self.port = free_port()
        self.config = directory / f"mosquitto-{self.port}.conf"
        as_root = "user root\n" if os.geteuid() == 0 else ""  # else it drops to `mosquitto`: no tmp_path
        self.config.write_text(
            f"{as_root}persistence false\nlog_dest stdout\nallow_anonymous true\n"
            f"listener {self.port} 127.0.0.1\n{extra}\n",
            encoding="utf-8",
        )
        self.process: ManagedProcess | None = None

    def start(self) -> None:
        self.process = ManagedProcess(
            [MOSQUITTO, "-c", str(self.config)],
            ready_port=self.port,
            timeout=TIMEOUT,
        )
        self.process.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Make brokers (started unless start=False); every one is stopped at the end of the test."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("missing mosquitto: run `make test`, which installs the Debian packages")
    made: list[Broker] = []

    def make(extra: str = "", *, start: bool = True) -> Broker:
        broker = Broker(tmp_path, extra)
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def broker(brokers: Callable[..., Broker]) -> Broker:
    return brokers()


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by mosquitto_passwd."""
    require_tools("mosquitto_passwd")
    for i, (user, password) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(path), user, password], check=True)
    return path


# ---------------------------------------------------------------- the gateway side


def mqtt_config(port: int, **changes: object) -> MqttConfig:
    config = MqttConfig(
        host="127.0.0.1",
        port=port,
        topic_prefix=PREFIX,
        client_id="dicom-gateway-test",
        health_interval=3600.0,
        keepalive=60.0,
        username=None,
        password_file=None,
        queue_size=1000,
        tls=None,
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


class Jitter(random.Random):
    """A jitter source that records each range asked for and answers its top (or a fixed delay)."""

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(0)
        self.delay = delay
        self.bounds: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        assert a == 0.0
        self.bounds.append(b)
        return b if self.delay is None else self.delay


def make_telemetry(config: MqttConfig, metrics: Metrics | None = None, **kwargs) -> Telemetry:
    kwargs.setdefault("rng", Jitter(0.05))
    return Telemetry(config, NODE, metrics or Metrics(), kwargs.pop("health", dict), **kwargs)


@contextlib.asynccontextmanager
async def running(telemetry: Telemetry) -> AsyncIterator[asyncio.Task[None]]:
    """Telemetry.run() in a task; cancelled (as the app would) at the end."""
    task = asyncio.create_task(telemetry.run(), name="telemetry")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"dicom_gateway_{name}")
    assert value is not None, name
    return value


async def backing_off(jitter: Jitter, delay: float = 3600.0) -> None:
    """Make the next reconnect wait `delay` and return once run() sleeps in it (not mid-connect)."""
    jitter.delay = delay
    asked = len(jitter.bounds)
    await until(lambda: len(jitter.bounds) > asked, "the reconnect loop to back off")


async def until(predicate: Callable[[], bool], what: str, seconds: float = TIMEOUT) -> None:
    """Await a state change that offers no awaitable (a counter, a gauge); never a fixed sleep."""
    try:
        async with asyncio.timeout(seconds):
            while not predicate():  # noqa: ASYNC110 - a gauge or counter has nothing to await
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {seconds:g} s waiting for {what}")


# ---------------------------------------------------------------- the watching side


@contextlib.asynccontextmanager
async def subscriber(port: int, topic: str = f"{TOPIC}/#", **kwargs: object) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"test-subscriber-{next(_client_ids)}",
        **kwargs,  # type: ignore[arg-type]
    ) as client:
        await client.subscribe(topic, qos=1)
        yield client


async def expect(
    client: aiomqtt.Client, topic: str, payload: bytes | None = None, seconds: float = TIMEOUT
) -> aiomqtt.Message:
    """The next message on `topic` (with `payload`, if given); others are skipped."""
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                if message.topic.value == topic and payload in {None, message.payload}:
                    return message
    except TimeoutError:
        pytest.fail(f"no message on {topic} {payload!r} within {seconds:g} s")
    raise AssertionError("the subscriber was disconnected")


def document(message: aiomqtt.Message) -> dict[str, object]:
    assert isinstance(message.payload, bytes)
    return json.loads(message.payload)


# ---------------------------------------------------------------- status and last will


async def test_online_is_retained_on_status_after_start(broker):
    metrics = Metrics()
    async with running(make_telemetry(mqtt_config(broker.port), metrics)) as task:
        async with subscriber(broker.port) as live:
            await expect(live, f"{TOPIC}/status", b"online")
        async with subscriber(broker.port, f"{TOPIC}/status") as late:
            message = await expect(late, f"{TOPIC}/status")
        assert message.payload == b"online"
        assert message.retain
        assert message.qos == 1
        assert sample(metrics, "mqtt_connected") == 1
        assert not task.done()


WILL_SCRIPT = """
import asyncio, json, logging, sys
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.telemetry import Telemetry
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
config = parse_config(json.loads(sys.argv[1]))
asyncio.run(Telemetry(config.mqtt, config.gateway.node_id, Metrics(), dict).run())
"""


async def test_killed_gateway_shows_offline_by_its_last_will(broker, tmp_path):
    config = {
        "gateway": {"node_id": NODE, "ae_title": "EDGE_GW", "state_dir": str(tmp_path / "state")},
        "receiver": {"allowed_calling_ae": []},
        "metrics": {"enabled": False},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": "2s", "health_interval": "1h"},
    }
    gateway = ManagedProcess(
        [sys.executable, "-c", WILL_SCRIPT, json.dumps(config)],
        ready_line="MQTT: connected",
        timeout=TIMEOUT,
        env={"PYTHONUNBUFFERED": "1"},
        cwd=REPO,
    )
    with gateway:
        async with subscriber(broker.port, f"{TOPIC}/status") as live:
            assert (await expect(live, f"{TOPIC}/status")).payload == b"online"
            gateway.kill()  # SIGKILL: no DISCONNECT, the broker sees the TCP connection drop
            await expect(live, f"{TOPIC}/status", b"offline")
    async with subscriber(broker.port, f"{TOPIC}/status") as late:
        message = await expect(late, f"{TOPIC}/status")
    assert message.payload == b"offline"
    assert message.retain


async def test_cancelled_run_publishes_retained_offline_and_reraises(broker):
    metrics = Metrics()
    telemetry = make_telemetry(mqtt_config(broker.port), metrics)
    async with subscriber(broker.port, f"{TOPIC}/status") as live:
        task = asyncio.create_task(telemetry.run())
        await expect(live, f"{TOPIC}/status", b"online")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await expect(live, f"{TOPIC}/status", b"offline")
    assert not telemetry.connected
    assert sample(metrics, "mqtt_connected") == 0
    async with subscriber(broker.port, f"{TOPIC}/status") as late:
        message = await expect(late, f"{TOPIC}/status")
    assert message.payload == b"offline"
    assert message.retain


# ---------------------------------------------------------------- health and events


async def test_health_carries_the_apps_fields_plus_schema_node_and_time_at_the_interval(broker):
    calls = []

    def health() -> dict[str, object]:
        calls.append(time.time())
        return {
            "queue_depth": {"central-pacs": {"pending": 3, "failed": 1}},
            "destinations_up": {"central-pacs": True},
            "spool_free_bytes": 12_345_678,
        }

    telemetry = make_telemetry(mqtt_config(broker.port, health_interval=0.2), health=health)
    async with subscriber(broker.port, f"{TOPIC}/health") as sub, running(telemetry):
        first = document(await expect(sub, f"{TOPIC}/health"))
        second = await expect(sub, f"{TOPIC}/health")
    assert not second.retain
    second_doc = document(second)
    assert first == {
        "schema": SCHEMA,
        "node_id": NODE,
        "time": first["time"],
        "queue_depth": {"central-pacs": {"pending": 3, "failed": 1}},
        "destinations_up": {"central-pacs": True},
        "spool_free_bytes": 12_345_678,
    }
    assert isinstance(first["time"], float)
    assert abs(first["time"] - calls[0]) < 1.0
    assert 0.15 <= second_doc["time"] - first["time"] < 2.0


@pytest.mark.parametrize("kind", [kind for kind in EventKind if kind is not EventKind.DEVICE])
async def test_events_go_to_events_kind_as_json(broker, kind):
    telemetry = make_telemetry(mqtt_config(broker.port))
    event = Event(kind, {"calling_ae": "CT_SCANNER_1", "instances": 12}, source="central-pacs", at=1.5e9)
    async with subscriber(broker.port, f"{TOPIC}/events/+") as sub, running(telemetry):
        telemetry.publish(event)
        message = await expect(sub, f"{TOPIC}/events/{kind.value}")
    assert not message.retain
    assert document(message) == {
        "schema": SCHEMA,
        "node_id": NODE,
        "time": 1.5e9,
        "kind": kind.value,
        "source": "central-pacs",
        "calling_ae": "CT_SCANNER_1",
        "instances": 12,
    }
    # one line of compact JSON with sorted keys
    assert message.payload == json.dumps(document(message), separators=(",", ":"), sort_keys=True).encode()


async def test_device_readings_go_to_device_name(broker):
    metrics = Metrics()
    telemetry = make_telemetry(mqtt_config(broker.port), metrics)
    reading = {"values": {"input_voltage": 229.5, "load_percent": 31.0}, "flags": {"utility_fail": False}}
    async with subscriber(broker.port) as sub, running(telemetry):
        telemetry.publish(Event(EventKind.DEVICE, reading, source="ups", at=1.7e9))
        message = await expect(sub, f"{TOPIC}/device/ups")
    assert document(message) == {
        **reading,
        "schema": SCHEMA,
        "node_id": NODE,
        "time": 1.7e9,
        "kind": "device",
        "source": "ups",
    }
    assert sample(metrics, "mqtt_published_messages_total") >= 3  # online, health, the reading


async def test_patient_fields_never_reach_the_broker(broker, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.telemetry")
    telemetry = make_telemetry(mqtt_config(broker.port))
    payload = {
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "patient_id": "PID-4711",
        "PatientName": "DOE^JANE",
        "nested": {"PatientID": "PID-4711", "modality": "CT"},
        "series": [{"patient_name": "DOE^JANE", "images": 3}],
    }
    async with subscriber(broker.port) as sub, running(telemetry):
        telemetry.publish(Event(EventKind.ASSOCIATION, payload))
        telemetry.publish(Event(EventKind.ASSOCIATION, {"PatientID": "PID-0815", "n": 2}))
        first = await expect(sub, f"{TOPIC}/events/association")
        second = await expect(sub, f"{TOPIC}/events/association")
    assert b"PID-" not in first.payload + second.payload
    assert b"DOE" not in first.payload
    doc = document(first)
    assert doc["study_instance_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert doc["nested"] == {"modality": "CT"}
    assert doc["series"] == [{"images": 3}]
    assert document(second)["n"] == 2
    warnings = [r for r in caplog.records if "patient data" in r.getMessage()]
    assert len(warnings) == 1
    assert "PID-" not in caplog.text


# ---------------------------------------------------------------- an absent or restarting broker


async def test_broker_down_at_start_publish_never_blocks_and_the_newest_are_delivered(brokers):
    broker = brokers(start=False)
    metrics = Metrics()
    jitter = Jitter(0.02)
    telemetry = make_telemetry(mqtt_config(broker.port, queue_size=100), metrics, rng=jitter)
    async with running(telemetry):
        await until(lambda: telemetry.connection_attempts >= 2, "a retry against the absent broker")
        started = time.perf_counter()
        for seq in range(10_000):
            telemetry.publish(Event(EventKind.ASSOCIATION, {"seq": seq}))
        assert time.perf_counter() - started < 1.0
        assert sample(metrics, "mqtt_dropped_messages_total") == 9_900
        assert not telemetry.connected
        assert sample(metrics, "mqtt_connected") == 0
        await backing_off(jitter, 1.0)  # hold the next attempt until the subscriber listens
        broker.start()
        async with subscriber(broker.port) as sub:
            await expect(sub, f"{TOPIC}/status", b"online")
            received = [document(await expect(sub, f"{TOPIC}/events/association")) for _ in range(100)]
        assert [doc["seq"] for doc in received] == list(range(9_900, 10_000))
        assert sample(metrics, "mqtt_dropped_messages_total") == 9_900
        assert sample(metrics, "mqtt_connected") == 1


async def test_broker_restart_mid_run_reconnects(broker):
    metrics = Metrics()
    telemetry = make_telemetry(mqtt_config(broker.port), metrics)
    connected = []
    async with running(telemetry):
        async with subscriber(broker.port) as sub:
            await expect(sub, f"{TOPIC}/status", b"online")
        connected.append(sample(metrics, "mqtt_connected"))
        broker.stop()
        await until(lambda: sample(metrics, "mqtt_connected") == 0, "the lost connection to be noticed")
        connected.append(sample(metrics, "mqtt_connected"))
        assert not telemetry.connected
        telemetry.publish(Event(EventKind.DESTINATION, {"up": False}, source="central-pacs"))
        broker.start()  # it keeps nothing: an `online` now comes from the new connection
        async with subscriber(broker.port) as sub:
            assert (await expect(sub, f"{TOPIC}/status")).payload == b"online"
            connected.append(sample(metrics, "mqtt_connected"))
            if document(await expect(sub, f"{TOPIC}/events/destination"))["up"] is not False:
                pytest.fail("the event queued while the broker was down was not delivered")
        assert telemetry.connected
    assert connected == [1, 0, 1]
    assert telemetry.connection_attempts >= 2


# ---------------------------------------------------------------- authentication and TLS


async def test_username_and_password_from_file(brokers, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    users = password_file(tmp_path / "broker.passwd", {"gw": "s3cret-pw", "watcher": "watch"})
    broker = brokers(f"password_file {users}\nallow_anonymous false")
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret-pw\n", encoding="utf-8")  # as editors leave it: with a newline
    config = mqtt_config(broker.port, username="gw", password_file=secret)
    watcher = {"username": "watcher", "password": "watch"}
    async with running(make_telemetry(config)), subscriber(broker.port, **watcher) as sub:
        message = await expect(sub, f"{TOPIC}/status")
    assert message.payload == b"online"
    assert "s3cret" not in caplog.text


async def test_wrong_password_never_connects_and_retries_with_capped_backoff(brokers, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.telemetry")
    users = password_file(tmp_path / "broker.passwd", {"gw": "s3cret-pw"})
    broker = brokers(f"password_file {users}\nallow_anonymous false")
    secret = tmp_path / "mqtt.pass"
    secret.write_text("not-the-password\n", encoding="utf-8")
    metrics = Metrics()
    jitter = Jitter()  # waits the top of each range: 0.05, 0.1, 0.2, 0.2 s
    telemetry = make_telemetry(
        mqtt_config(broker.port, username="gw", password_file=secret),
        metrics,
        rng=jitter,
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    seen_connected = []
    started = time.monotonic()
    async with running(telemetry):
        await until(
            lambda: (
                seen_connected.append(telemetry.connected or sample(metrics, "mqtt_connected") != 0)
                or len(jitter.bounds) >= 5
            ),
            "five refused attempts",
        )
        elapsed = time.monotonic() - started
        attempts = telemetry.connection_attempts
        await backing_off(jitter)  # cancel it in a backoff sleep, never halfway through a connect
    assert not any(seen_connected)
    assert jitter.bounds[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert attempts in {5, 6}  # one attempt per backoff (the sixth may be under way)
    assert elapsed >= 0.05 + 0.1 + 0.2 + 0.2
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(refusals) == 1, "a refused CONNACK is logged once per change, not per retry"
    assert "not-the-password" not in caplog.text


def tls_listener(port: int, cert: Path, key: Path, ca: Path) -> str:
    return f"listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"


async def test_tls_listener_with_a_private_ca(brokers, pki: Pki):
    tls_port = free_port()
    broker = brokers(tls_listener(tls_port, pki.pacs_cert, pki.pacs_key, pki.ca))
    tls = ClientTls(ca=pki.ca, cert=None, key=None, server_hostname=None)
    telemetry = make_telemetry(mqtt_config(tls_port, tls=tls))
    async with running(telemetry):
        context = ssl.create_default_context(cafile=str(pki.ca))
        async with subscriber(tls_port, tls_context=context) as sub:  # the watcher also over TLS
            assert (await expect(sub, f"{TOPIC}/status")).payload == b"online"
    assert broker.process is not None


async def test_tls_server_hostname_is_checked_instead_of_the_host(brokers, pki: Pki):
    tls_port = free_port()
    broker = brokers(tls_listener(tls_port, pki.wrong_name_cert, pki.wrong_name_key, pki.ca))
    tls = ClientTls(ca=pki.ca, cert=None, key=None, server_hostname="somewhere-else.example")
    async with running(make_telemetry(mqtt_config(tls_port, tls=tls))), subscriber(broker.port) as sub:
        assert (await expect(sub, f"{TOPIC}/status")).payload == b"online"


async def test_tls_certificate_for_another_name_is_refused(brokers, pki: Pki, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.telemetry")
    tls_port = free_port()
    brokers(tls_listener(tls_port, pki.wrong_name_cert, pki.wrong_name_key, pki.ca))
    tls = ClientTls(ca=pki.ca, cert=None, key=None, server_hostname=None)
    jitter = Jitter(0.05)
    telemetry = make_telemetry(mqtt_config(tls_port, tls=tls), rng=jitter)
    async with running(telemetry):
        await until(lambda: telemetry.connection_attempts >= 3, "three attempts")
        assert not telemetry.connected
        await backing_off(jitter)
    assert any("certificate" in r.getMessage().lower() for r in caplog.records)


# ---------------------------------------------------------------- the pieces


def test_backoff_is_full_jitter_under_a_capped_exponential():
    rng = random.Random(7)  # noqa: S311 - reproducible jitter
    for failures, bound in [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (10_000, 60.0)]:
        delays = [backoff(failures, 1.0, 60.0, rng) for _ in range(2_000)]
        assert all(0.0 <= d <= bound for d in delays)
        assert min(delays) < 0.05 * bound  # full jitter: the whole range, down to zero
        assert max(delays) > 0.95 * bound


def test_publish_drops_the_oldest_when_full_without_a_loop_or_broker():
    metrics = Metrics()
    telemetry = Telemetry(mqtt_config(1, queue_size=2), NODE, metrics, dict)
    for seq in range(5):
        telemetry.publish(Event(EventKind.RESERVE, {"seq": seq}))
    assert [e.payload["seq"] for e in telemetry._queue] == [3, 4]
    assert sample(metrics, "mqtt_dropped_messages_total") == 3
