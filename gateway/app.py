"""The composition root: resources in an AsyncExitStack, components in one TaskGroup, staged shutdown.

Start order: metrics endpoint (so /healthz answers during startup), spool directory, index (open and
migrate), the group-commit loop, recovery, the receiver, then forwarders, retention, the status poller
and telemetry; READY goes to systemd only when the receiver listens and recovery is done. Stop order
(SIGTERM/SIGINT): stop accepting, let in-flight C-STOREs finish within `receiver.shutdown_timeout`, stop
the receiver, stop forwarders (their claims go back to pending) and the other background tasks, then the
commit loop (so every acknowledged row is committed), then close the index.

Components never import each other: they meet here, through the index, the metrics object and the
`emit` callable (events to telemetry, which drops rather than blocks).

Imports: everything below it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from gateway import __version__
from gateway import config as config_module
from gateway.delivery_queue import DeliveryQueue
from gateway.device import PowerPolicy, SerialDevice
from gateway.dul import LocalIdentity
from gateway.errors import ConfigError
from gateway.forwarder import Forwarder
from gateway.index import Index
from gateway.logs import set_level
from gateway.metrics import Metrics, MetricsServer
from gateway.model import Event, EventKind
from gateway.receiver import Receiver
from gateway.recovery import recover
from gateway.retention import Retention
from gateway.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Spool
from gateway.status import StatusPoller
from gateway.systemd import Notifier
from gateway.telemetry import Telemetry
from gateway.tls import client_context, server_context

if TYPE_CHECKING:
    from gateway.config import Config, DestinationConfig

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0


class Gateway:
    """One running gateway; `run()` until `stop()` (or a signal) is called."""

    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics(allowed_calling_ae=config.receiver.allowed_calling_ae, version=__version__)
        self.spool = Spool(config.gateway.state_dir / "spool", config.gateway.min_free_bytes)
        self.index = Index(
            config.gateway.state_dir / "index.sqlite",
            [d.name for d in config.destinations],
            self.spool.sync_directory,
        )
        self.queue = DeliveryQueue(self.index)
        self.identity = LocalIdentity(
            IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, config.receiver.max_pdu_length
        )
        tls = config.receiver.tls
        self.receiver = Receiver(
            config.receiver,
            config.gateway.ae_title,
            self.spool,
            self.index,
            metrics=self.metrics,
            emit=self.emit,
            ssl_context=server_context(tls) if tls is not None else None,
        )
        self.forwarders = {d.name: self._make_forwarder(d) for d in config.destinations}
        self._forwarding: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._reloading = asyncio.Lock()
        self.retention = Retention(self.queue, self.spool, config.retention.keep_forwarded)
        self.status = StatusPoller(
            self.index,
            self.spool,
            self.metrics,
            destinations=lambda: {name: f.health.up for name, f in self.forwarders.items()},
            not_ready=self._not_ready,
            associations=self.receiver.active_associations,
            on_space=self._space_changed,
            emit=self.emit,
        )
        self.telemetry = self._make_telemetry(config)
        self.power = PowerPolicy(self._power_changed)
        self.devices = self._make_devices(config)
        self._device_tasks: list[asyncio.Task[None]] = []
        self._telemetry_task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def _make_telemetry(self, config: Config) -> Telemetry | None:
        self.metrics.mqtt_enabled.set(1 if config.mqtt is not None else 0)
        if config.mqtt is None:
            return None
        return Telemetry(config.mqtt, config.gateway.node_id, self.metrics, self._health_payload)

    def _make_devices(self, config: Config) -> list[SerialDevice]:
        return [
            SerialDevice(cfg, self.metrics, self.emit, on_reading=self.power.observe) for cfg in config.serial
        ]

    def _health_payload(self) -> dict[str, object]:
        """The MQTT health message: the status poller's last snapshot and the serial devices."""
        devices = {
            device.name: {
                "up": device.up,
                "values": dict(device.latest.values) if device.latest else {},
                "flags": dict(device.latest.flags) if device.latest else {},
            }
            for device in self.devices
        }
        snapshot = self.status.latest
        if snapshot is None:
            return {"ready": False, "not_ready": ["starting"], "devices": devices}
        return snapshot.as_payload({"devices": devices, "power_hold": self.power.held})

    def _power_changed(self, held: bool, reason: str) -> None:
        """The UPS is on battery with a low battery (held), or power is back: refuse or accept again."""
        self.metrics.power_hold.set(1 if held else 0)
        self.receiver.hold(f"power failure: {reason}" if held else None)
        if held:
            log.warning("Power failure (%s): refusing new associations, finishing those in flight", reason)
        else:
            log.warning("Power is back (%s): accepting associations again", reason)
        self.emit(Event(EventKind.POWER, {"held": held, "reason": reason}))

    def _make_forwarder(self, destination: DestinationConfig) -> Forwarder:
        return Forwarder(
            destination,
            self.queue,
            self.spool,
            self.identity,
            ssl_context=client_context(destination.tls) if destination.tls is not None else None,
            metrics=self.metrics,
            emit=self.emit,
        )

    def _start_forwarder(self, forwarder: Forwarder) -> None:
        assert self._tg is not None  # noqa: S101 - only called while running
        name = forwarder.config.name
        self._forwarding[name] = self._tg.create_task(forwarder.run(), name=f"forwarder[{name}]")

    def emit(self, event: Event) -> None:
        """Report an event to telemetry; never blocks (and is a no-op without telemetry)."""
        if self.telemetry is not None:
            self.telemetry.publish(event)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stop.set()

    def _not_ready(self) -> list[str]:
        reasons = []
        if not self.receiver.listening.is_set():
            reasons.append("receiver not listening")
        if self.receiver.held is not None:
            reasons.append(f"not accepting associations: {self.receiver.held}")
        if self.index.failing:
            reasons.append("index commits failing")
        return reasons

    def _space_changed(self, has_room: bool) -> None:
        if has_room:
            self.receiver.reserve_reached = False
        else:
            self.retention.wake()  # delivered files go first

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run every component until stopped; returns after a clean shutdown."""
        for warning in config_module.warnings(self.config):
            log.warning("%s", warning)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        async with AsyncExitStack() as stack:
            if self.config.metrics is not None:
                server = MetricsServer(self.metrics, self.config.metrics.host, self.config.metrics.port)
                server.start()
                stack.callback(server.stop)
            self.config.gateway.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            await asyncio.to_thread(self.spool.prepare)
            await stack.enter_async_context(self.index)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
                self._start_telemetry()
                commit_loop = tg.create_task(self.index.run(), name="index-commit")
                await recover(self.spool, self.index)
                receiving = tg.create_task(self.receiver.run(), name="receiver")
                await _first(self.receiver.listening.wait(), receiving)
                for forwarder in self.forwarders.values():
                    self._start_forwarder(forwarder)
                background = [tg.create_task(self.retention.run(), name="retention")]
                background.append(tg.create_task(self.status.run(), name="status"))
                self._start_devices()
                background.append(heartbeat)
                self.ready.set()
                self.notifier.ready(f"receiving on port {self.receiver.port}")
                log.info("Gateway %s ready", self.config.gateway.node_id)
                await _first(self._stop.wait(), receiving)
                await self._shutdown(receiving, background)
                commit_loop.cancel()
            self._tg = None
        log.info("Gateway stopped")

    async def _shutdown(self, receiving: asyncio.Task[None], background: list[asyncio.Task[None]]) -> None:
        self.notifier.stopping()
        self.metrics.set_readiness(["shutting down"])
        grace = self.config.receiver.shutdown_timeout
        log.info("Shutting down: draining associations (up to %.0f s)", grace)
        if not await self.receiver.drain(grace):
            log.warning("Associations still open at the shutdown deadline are aborted")
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        background = [*self._forwarding.values(), *self._device_tasks, *background]
        for task in background:  # an association in progress is aborted; its claim released
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await _cancel(self._telemetry_task)  # last: it publishes the retained `offline`

    def _start_telemetry(self) -> None:
        if self.telemetry is not None and self._tg is not None:
            self._telemetry_task = self._tg.create_task(self.telemetry.run(), name="telemetry")

    def _start_devices(self) -> None:
        if self._tg is not None:
            self._device_tasks = [
                self._tg.create_task(device.run(), name=f"device[{device.name}]") for device in self.devices
            ]

    def request_reload(self) -> None:
        """SIGHUP: reload the config file in the background (safe to call from a signal handler)."""
        if self._tg is not None:
            self._tg.create_task(self.reload(), name="reload")

    async def reload(self) -> bool:
        """Re-read the config file and apply what can change without dropping associations.

        Allow lists, limits and timeouts, destinations (added, removed, changed), retention and the log
        level apply at once; listen address, TLS, state directory and node id need a restart (warned).
        An invalid file is refused with every problem logged, and the running config stays.
        """
        async with self._reloading:
            source = self.config.source
            if source is None:
                log.warning("Reload ignored: the configuration did not come from a file")
                return False
            try:
                new = await asyncio.to_thread(config_module.load_config, source)
            except ConfigError as exc:
                for key, message in exc.problems:  # the problems are the message; no traceback
                    log.error("Reload refused, keeping the running config: %s: %s", key or source, message)  # noqa: TRY400
                return False
            self._warn_restart_only(new)
            set_level(new.gateway.log_level)
            self.metrics.set_known_callers(new.receiver.allowed_calling_ae)
            for key in self.receiver.reconfigure(new.receiver):
                log.warning("receiver.%s changed: takes effect after a restart", key)
            self.retention.keep_forwarded = new.retention.keep_forwarded
            await self._apply_destinations(new)
            if new.mqtt != self.config.mqtt or new.gateway.node_id != self.config.gateway.node_id:
                await _cancel(self._telemetry_task)
                self.telemetry = self._make_telemetry(new)
                self._start_telemetry()
                log.info("Telemetry restarted with the new settings")
            if new.serial != self.config.serial:
                for task in self._device_tasks:
                    task.cancel()
                await asyncio.gather(*self._device_tasks, return_exceptions=True)
                self.devices = self._make_devices(new)
                self._start_devices()
                log.info("Serial devices restarted with the new settings")
            self.config = new
            log.info("Configuration reloaded from %s", source)
            return True

    def _warn_restart_only(self, new: Config) -> None:
        old = self.config
        for key, before, after in [
            ("gateway.node_id", old.gateway.node_id, new.gateway.node_id),
            ("gateway.ae_title", old.gateway.ae_title, new.gateway.ae_title),
            ("gateway.state_dir", old.gateway.state_dir, new.gateway.state_dir),
            ("gateway.min_free_bytes", old.gateway.min_free_bytes, new.gateway.min_free_bytes),
            ("metrics", old.metrics, new.metrics),
        ]:
            if before != after:
                log.warning("%s changed: takes effect after a restart", key)

    async def _apply_destinations(self, new: Config) -> None:
        """Stop removed and changed forwarders (their claims go back to pending), start new ones."""
        wanted = {d.name: d for d in new.destinations}
        for name, forwarder in list(self.forwarders.items()):
            if wanted.get(name) != forwarder.config:
                task = self._forwarding.pop(name, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                del self.forwarders[name]
                log.info("Destination %s %s", name, "changed" if name in wanted else "removed")
        await self.index.set_destinations(list(wanted))
        for name, destination in wanted.items():
            if name not in self.forwarders:
                self.forwarders[name] = self._make_forwarder(destination)
                self._start_forwarder(self.forwarders[name])
                log.info("Destination %s started", name)

    async def _heartbeat(self) -> None:
        """Prove the event loop turns: /healthz, and the systemd watchdog when it is enabled."""
        while True:
            self.metrics.beat()
            self.notifier.watchdog()
            await asyncio.sleep(HEARTBEAT_SECONDS)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait until it has finished its cleanup."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _first(waiter: object, task: asyncio.Task[None]) -> None:
    """Wait for `waiter`, or re-raise at once if `task` ends first (its failure must not hang us)."""
    waiting = asyncio.ensure_future(waiter)  # type: ignore[call-overload]
    done, _ = await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiting.cancel()
        task.result()
        raise RuntimeError(f"{task.get_name()} ended unexpectedly")
