"""The composition root: resources in an AsyncExitStack, components in one TaskGroup, staged shutdown.

Start order: spool directory, index (open + migrate), the group-commit loop, recovery, the receiver, then
forwarders and retention; READY goes to systemd only when the receiver listens and recovery is done. Stop
order (SIGTERM/SIGINT): stop accepting, let in-flight C-STOREs finish within `receiver.shutdown_timeout`,
stop the receiver, stop forwarders (their claims go back to pending) and retention, then the commit loop
(so every acknowledged row is committed), then close the index.

Imports: everything below it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from gateway import config as config_module
from gateway.delivery_queue import DeliveryQueue
from gateway.dul import LocalIdentity
from gateway.forwarder import Forwarder
from gateway.index import Index
from gateway.receiver import Receiver
from gateway.recovery import recover
from gateway.retention import Retention
from gateway.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Spool
from gateway.systemd import Notifier
from gateway.tls import client_context, server_context

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)


class Gateway:
    """One running gateway; `run()` until `stop()` (or a signal) is called."""

    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
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
        self.forwarders = [
            Forwarder(
                destination,
                self.queue,
                self.spool,
                self.identity,
                ssl_context=client_context(destination.tls) if destination.tls is not None else None,
            )
            for destination in config.destinations
        ]
        self.retention = Retention(self.queue, self.spool, config.retention.keep_forwarded)
        self.receiver: Receiver | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run every component until stopped; returns after a clean shutdown."""
        for warning in config_module.warnings(self.config):
            log.warning("%s", warning)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
        async with AsyncExitStack() as stack:
            self.config.gateway.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            await asyncio.to_thread(self.spool.prepare)
            await stack.enter_async_context(self.index)
            async with asyncio.TaskGroup() as tg:
                commit_loop = tg.create_task(self.index.run(), name="index-commit")
                await recover(self.spool, self.index)
                receiver = self._make_receiver()
                receiving = tg.create_task(receiver.run(), name="receiver")
                await _first(receiver.listening.wait(), receiving)
                background = [
                    tg.create_task(forwarder.run(), name=f"forwarder[{forwarder.config.name}]")
                    for forwarder in self.forwarders
                ]
                background.append(tg.create_task(self.retention.run(), name="retention"))
                self.ready.set()
                self.notifier.ready(f"receiving on port {receiver.port}")
                log.info("Gateway %s ready", self.config.gateway.node_id)
                await _first(self._stop.wait(), receiving)
                self.notifier.stopping()
                log.info(
                    "Shutting down: draining associations (up to %.0f s)",
                    self.config.receiver.shutdown_timeout,
                )
                if not await receiver.drain(self.config.receiver.shutdown_timeout):
                    log.warning("Associations still open at the shutdown deadline are aborted")
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                for task in background:  # an association in progress is aborted; its claim released
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                commit_loop.cancel()
        log.info("Gateway stopped")

    def _make_receiver(self) -> Receiver:
        tls = self.config.receiver.tls
        self.receiver = Receiver(
            self.config.receiver,
            self.config.gateway.ae_title,
            self.spool,
            self.index,
            server_context(tls) if tls is not None else None,
        )
        return self.receiver


async def _first(waiter: object, task: asyncio.Task[None]) -> None:
    """Wait for `waiter`, or re-raise at once if `task` ends first (its failure must not hang us)."""
    waiting = asyncio.ensure_future(waiter)  # type: ignore[call-overload]
    done, _ = await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiting.cancel()
        task.result()
        raise RuntimeError(f"{task.get_name()} ended unexpectedly")
