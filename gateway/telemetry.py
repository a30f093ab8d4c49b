"""MQTT telemetry: the broker connection and every topic under ``<topic_prefix>/<node_id>/``.

Owns the only aiomqtt client of the gateway: the retained ``status`` (``online``, and ``offline`` as the
last will and on a clean stop), the periodic ``health`` JSON, and ``events/<kind>`` / ``device/<name>``
JSON from a bounded queue that drops the oldest entry when full. Callers only ever touch that queue
(`Telemetry.publish`), so a slow or absent broker never blocks ingest or forwarding. The topics and
payloads are documented in docs/mqtt.md; change both together.

Imports: aiomqtt, gateway.config, gateway.metrics, gateway.model, gateway.tls, stdlib.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import ssl
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from gateway.model import Event, EventKind
from gateway.tls import client_context

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from gateway.config import MqttConfig
    from gateway.metrics import Metrics

log = logging.getLogger(__name__)

SCHEMA: Final = 1  # the "schema" field of every JSON payload; bump on an incompatible change
ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
TIMEOUT: Final = 10.0  # seconds for the CONNACK, each publish and the disconnect
STOP_TIMEOUT: Final = 2.0  # seconds for `offline` and the disconnect when cancelled
# Payload keys that would carry PHI, compared lower-case without "_": PatientName, patient_id, ...
_PHI_KEYS: Final = frozenset({"patientname", "patientid"})


def backoff(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after `failures` failed attempts in a row: full jitter over a capped exponential."""
    return (rng or random).uniform(0.0, min(cap, base * 2.0 ** min(failures, 64)))


def _raise_if_cancelled() -> None:
    """Re-raise a cancel that was swallowed on the way.

    On Python 3.11, asyncio.wait_for (which aiomqtt awaits every CONNACK, PUBACK and publish with) drops
    a cancel that arrives together with its result; the task's cancel count still shows it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho drops such a socket unclosed (one fd per retry)."""

    def do_handshake(self, block: bool = False) -> None:
        """Handshake as `SSLSocket.do_handshake` does; close the socket if it fails."""
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class _PahoContext(ssl.SSLContext):
    """The gateway's client context (`tls.client_context`), adapted to how paho uses it.

    paho wraps the socket with ``server_hostname=<host>``; ``[mqtt.tls] server_hostname`` has to win.
    """

    sslsocket_class = _ClosingSSLSocket
    server_name: str | None = None

    @classmethod
    def adopt(cls, context: ssl.SSLContext, server_name: str | None) -> _PahoContext:
        """Turn `context` (built by `tls.client_context`, settings and all) into one of ours."""
        context.__class__ = cls
        adopted: _PahoContext = context  # type: ignore[assignment] # it is one now
        adopted.server_name = server_name
        return adopted

    def wrap_socket(  # noqa: PLR0917 - the stdlib's signature
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap `sock` as `SSLContext.wrap_socket` does, checking our server name if one is set."""
        name = self.server_name or server_hostname
        return super().wrap_socket(
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs, name, session
        )


class Telemetry:
    """Publishes events, health and status to the MQTT broker of ``[mqtt]``.

    Args:
        config: the ``[mqtt]`` section.
        node_id: names this box in the topics.
        metrics: counts published and dropped messages, and whether the broker is connected.
        health: returns the ``health`` payload (JSON-serializable; called on the event loop).
        backoff_base: first reconnect delay bound, seconds; it doubles per failure up to `backoff_cap`.
        backoff_cap: largest reconnect delay bound, seconds.
        rng: the jitter's random source (tests make it predictable).
    """

    def __init__(
        self,
        config: MqttConfig,
        node_id: str,
        metrics: Metrics,
        health: Callable[[], Mapping[str, object]],
        *,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._metrics = metrics
        self._health = health
        self._backoff = (backoff_base, backoff_cap, rng)
        self.topic = f"{config.topic_prefix}/{node_id}"
        self._queue: collections.deque[Event] = collections.deque(maxlen=config.queue_size)
        self._wakeup = asyncio.Event()
        self._connected = False
        self._attempts = 0
        self._connections = 0
        self._problem: str | None = None  # the last connection problem logged
        self._phi_warned = False

    @property
    def connected(self) -> bool:
        """True from a successful CONNACK until the connection is lost or closed."""
        return self._connected

    @property
    def connection_attempts(self) -> int:
        """How many times `run()` has tried to connect."""
        return self._attempts

    def publish(self, event: Event) -> None:
        """Queue an event for the broker; never blocks, never raises. Call it on the event loop.

        A full queue drops its oldest event (counted in ``mqtt_dropped``): fresh news beats old news.
        """
        if len(self._queue) == self._queue.maxlen:
            self._metrics.mqtt_dropped.inc()
        self._queue.append(event)
        self._wakeup.set()

    async def run(self) -> None:
        """Connect, publish until cancelled, reconnect with backoff; on cancel say `offline` and re-raise."""
        failures = 0
        try:
            while True:
                self._attempts += 1
                connections = self._connections
                try:
                    await self._session()
                except MqttConnectError as exc:  # a CONNACK with an error code
                    self._note_problem(f"the broker refused the connection: {exc}")
                except aiomqtt.MqttError as exc:
                    lost = self._connections != connections
                    self._note_problem(f"{'connection lost' if lost else 'cannot connect'}: {exc}")
                except OSError as exc:  # the password file or a TLS file could not be read
                    self._note_problem(f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}")
                _raise_if_cancelled()  # a cancel that a failed disconnect replaced
                if self._connections != connections:  # it was connected: start the backoff afresh
                    failures = 0
                base, cap, rng = self._backoff
                delay = backoff(failures, base, cap, rng)
                failures += 1
                log.debug("MQTT: reconnecting in %.2f s", delay)
                await asyncio.sleep(delay)
        finally:
            self._set_connected(connected=False)

    async def _session(self) -> None:
        """One connection, from CONNECT until it is lost (an MqttError) or cancelled."""
        cfg = self._config
        password, tls = await asyncio.to_thread(self._read_secrets)
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=cfg.client_id,
            username=cfg.username,
            password=password,
            tls_context=tls,
            will=aiomqtt.Will(f"{self.topic}/status", OFFLINE, qos=1, retain=True),
            keepalive=max(1, round(cfg.keepalive)),
            clean_session=True,
            timeout=TIMEOUT,
        )
        async with client:  # returns only after an accepted CONNACK
            self._set_connected(connected=True)
            self._connections += 1
            self._problem = None
            log.info("MQTT: connected to %s:%d as %s", cfg.host, cfg.port, cfg.client_id)
            try:
                _raise_if_cancelled()
                await client.publish(f"{self.topic}/status", ONLINE, qos=1, retain=True)
                self._metrics.mqtt_published.inc()
                _raise_if_cancelled()
                await self._serve(client)
            except asyncio.CancelledError:
                await self._say_offline(client)
                raise
            finally:
                self._set_connected(connected=False)

    def _read_secrets(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Read at each connect (in a thread), so a rotated password or certificate is picked up."""
        cfg = self._config
        password = None
        if cfg.password_file is not None:
            password = cfg.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        if cfg.tls is None:
            return password, None
        return password, _PahoContext.adopt(client_context(cfg.tls), cfg.tls.server_hostname)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until the connection drops: re-raises the MqttError of whichever task saw it first."""
        # Two tasks and asyncio.wait rather than a TaskGroup: on Python 3.11 a failing TaskGroup child
        # leaves its parent task with a cancel request that is never withdrawn (fixed in 3.12).
        tasks = {
            asyncio.create_task(self._watch(client), name="mqtt-watch"),
            asyncio.create_task(self._pump(client), name="mqtt-publish"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raise MqttError as soon as the connection drops (we subscribe to nothing, so no messages)."""
        async for _ in client.messages:
            pass
        raise aiomqtt.MqttError("message stream ended")

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Publish health every `health_interval` and events as they come."""
        loop = asyncio.get_running_loop()
        next_health = loop.time()  # health right after connecting
        while True:
            _raise_if_cancelled()
            if loop.time() >= next_health:  # first, so that a flood of events cannot starve health
                next_health = loop.time() + self._config.health_interval
                await self._send_health(client)
            elif self._queue:
                await self._send_event(client)
            else:
                self._wakeup.clear()  # no await since the queue was seen empty: no event is missed
                try:
                    async with asyncio.timeout_at(next_health):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    async def _send_health(self, client: aiomqtt.Client) -> None:
        try:
            fields = dict(self._health())
        except Exception:  # the app's callable: its bug must not take telemetry down
            log.exception("MQTT: health() failed; no health message this time")
            return
        payload = self._json(fields, time.time())
        if payload is not None:
            await client.publish(f"{self.topic}/health", payload, qos=0)
            self._metrics.mqtt_published.inc()

    async def _send_event(self, client: aiomqtt.Client) -> None:
        # Peek, publish, then pop: an event whose publish fails stays queued for the next connection.
        event = self._queue[0]
        topic = self._event_topic(event)
        fields: dict[str, object] = {**event.payload, "kind": str(event.kind)}
        if event.source:
            fields["source"] = event.source
        payload = self._json(fields, event.at) if topic is not None else None
        if topic is not None and payload is not None:
            await client.publish(topic, payload, qos=0)
            self._metrics.mqtt_published.inc()
        else:
            self._metrics.mqtt_dropped.inc()
        if self._queue and self._queue[0] is event:  # unless publish() pushed it out meanwhile
            self._queue.popleft()

    def _event_topic(self, event: Event) -> str | None:
        if event.kind is not EventKind.DEVICE:
            return f"{self.topic}/events/{event.kind}"
        name = event.source
        if not name or any(c in name for c in "/+#\0"):
            log.warning("MQTT: dropped a device reading with an unusable device name %r", name)
            return None
        return f"{self.topic}/device/{name}"

    def _json(self, fields: dict[str, object], at: float) -> bytes | None:
        """The JSON payload: `fields` without PHI, plus schema, node_id and time; None if it cannot be."""
        document = {**self._scrub_mapping(fields), "schema": SCHEMA, "node_id": self._node_id, "time": at}
        try:
            return json.dumps(document, separators=(",", ":"), sort_keys=True, default=str).encode()
        except (TypeError, ValueError) as exc:
            log.warning("MQTT: dropped a message that is not JSON-serializable: %s", exc)
            return None

    def _scrub_mapping(self, mapping: Mapping[str, object]) -> dict[str, object]:
        """Drop keys named like patient fields, at any depth (a guard: callers must not send them)."""
        kept = {}
        for key, item in mapping.items():
            if str(key).replace("_", "").lower() in _PHI_KEYS:
                if not self._phi_warned:
                    log.warning("MQTT: dropped payload key %r: patient data never goes to MQTT", key)
                    self._phi_warned = True
                continue
            kept[key] = self._scrub(item)
        return kept

    def _scrub(self, value: object) -> object:
        if isinstance(value, Mapping):
            return self._scrub_mapping(value)
        if isinstance(value, list | tuple):
            return [self._scrub(item) for item in value]
        return value

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """Best effort, bounded: retained `offline`, then the disconnect (also bounded by the timeout)."""
        client.timeout = STOP_TIMEOUT
        try:
            await client.publish(f"{self.topic}/status", OFFLINE, qos=1, retain=True)
            self._metrics.mqtt_published.inc()
        except aiomqtt.MqttError as exc:
            log.warning("MQTT: could not publish offline: %s", exc)

    def _note_problem(self, problem: str) -> None:
        """Log a connection problem once per change, not once per retry."""
        if problem != self._problem:
            cfg = self._config
            log.warning("MQTT: broker %s:%d: %s (retrying with backoff)", cfg.host, cfg.port, problem)
        self._problem = problem

    def _set_connected(self, *, connected: bool) -> None:
        self._connected = connected
        self._metrics.mqtt_connected.set(1 if connected else 0)
