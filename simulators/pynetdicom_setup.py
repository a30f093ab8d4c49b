"""The simulators' one place for pynetdicom's process-wide settings, socket tuning and quirk workarounds.

pynetdicom keeps its options in the module-global `_config`; setting them from several modules would make
behaviour depend on import order, so every simulator calls `configure_pynetdicom()` from here instead.
Where pynetdicom's threads race or block in ways a simulator trips over, the workaround lives here too,
next to the explanation.

May import: pynetdicom only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import socketserver
import ssl
import threading
import weakref
from typing import TYPE_CHECKING, TypeVar

from pynetdicom import _config, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import ThreadedAssociationServer

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import EventHandlerType
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

_Item = TypeVar("_Item")


def configure_pynetdicom() -> None:
    """Set the `_config` flags the simulators rely on; idempotent."""
    # `send_c_store(path)` then streams the file's data set in PDU-sized chunks: memory stays flat for
    # large multi-frame objects and the bytes on the wire are exactly the bytes in the file.
    _config.STORE_SEND_CHUNKED_DATASET = True
    # The PACS simulator takes each received data set from `event.encoded_dataset()`, which needs it in
    # memory: chunked receive (to a temporary file) stays off.
    _config.STORE_RECV_CHUNKED_DATASET = False


def _on_conn_open_set_nodelay(event: evt.Event) -> None:
    """Turn off Nagle's algorithm on a freshly connected association socket (either role).

    pynetdicom leaves Nagle on; a C-STORE ends with a small PDU that then waits for the peer's delayed ACK,
    adding 40-70 ms to every object. EVT_CONN_OPEN fires after connect() and before the first PDU.
    """
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connection_handlers() -> list[EventHandlerType]:
    """Event handlers for `AE.associate()` or `AE.start_server()`: TCP_NODELAY, and a sure close.

    pynetdicom's `AssociationSocket._shutdown_socket()` calls `close()` only when `shutdown()` succeeds,
    then drops its reference: a socket whose peer went first (an abort, a killed gateway) leaks and
    surfaces later as a ResourceWarning. The handlers remember each raw socket at open and close it at
    close; closing twice is harmless.
    """
    sockets: weakref.WeakKeyDictionary[Association, socket.socket] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def remember(event: evt.Event) -> None:
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            with lock:
                sockets[event.assoc] = transport.socket

    def close(event: evt.Event) -> None:
        with lock:
            raw = sockets.pop(event.assoc, None)
        if raw is not None:
            raw.close()

    return [
        (evt.EVT_CONN_OPEN, _on_conn_open_set_nodelay),
        (evt.EVT_CONN_OPEN, remember),
        (evt.EVT_CONN_CLOSE, close),
    ]


def wake_caller_on_close(assoc: Association) -> None:
    """Make a `send_*()` waiting for its response return as soon as the connection closes.

    While `send_c_store()` waits (up to the DIMSE timeout) it pauses the association reactor, so an
    A-ABORT or a dropped connection is noticed only when the wait ends: a peer that aborts costs the
    sender a whole DIMSE timeout. The DUL thread still sees the close (EVT_CONN_CLOSE, fired after it
    queued the abort indication); an empty item in the DIMSE queue then ends the wait, and pynetdicom
    reports the abort as it would have after the timeout. Call once the association is established.
    """
    assoc.bind(evt.EVT_CONN_CLOSE, _on_conn_close_wake_caller)


def _on_conn_close_wake_caller(event: evt.Event) -> None:
    event.assoc.dimse.msg_queue.put((None, None))


def close_transport(assoc: Association) -> None:
    """Close an ended association's socket for sure.

    pynetdicom's `AssociationSocket._shutdown_socket()` calls `close()` only when `shutdown()` succeeds; on
    a TLS socket the peer has already torn down (a refused client certificate) shutdown raises, the
    socket stays open and leaks. Closing twice is harmless, so this closes whatever is left.
    """
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.close()


class _BlockingGetsOnlyQueue(queue.Queue[_Item]):
    """A queue whose non-blocking gets always come back empty: only a waiting caller takes items."""

    def get(self, block: bool = True, timeout: float | None = None) -> _Item:
        if not block:
            raise queue.Empty
        return super().get(block, timeout)


def keep_responses_for_caller(assoc: Association) -> None:
    """Hand every DIMSE message on a requestor-only association to the blocking `send_*()` caller.

    pynetdicom's association reactor polls the DIMSE queue with non-blocking gets while `send_c_store()`
    waits on it with a blocking get. The reactor is meant to pause meanwhile, but its pause handshake
    (`_reactor_checkpoint` / `_is_paused`) is racy: now and then the reactor takes the C-STORE-RSP, logs
    "Received unexpected C-STORE service message", drops it, and the sender waits out its DIMSE timeout.
    The reactor only needs that queue to serve requests from the peer, which a storage SCU never gets,
    so giving it an always-empty view removes the race. Call right after the association is established,
    before the first request (the queue is empty then).
    """
    assoc.dimse.msg_queue = _BlockingGetsOnlyQueue()


_TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a peer gets to finish the handshake before it is dropped
_SERVE_POLL_INTERVAL = 0.1  # how long a shutdown waits for the accept loop to notice, at most


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with the TLS handshake moved off the accept loop.

    pynetdicom wraps each accepted socket with `do_handshake_on_connect=True` inside `get_request()`,
    so the handshake runs on the one thread that accepts, on a blocking socket: a peer that connects and
    stays silent stalls every later connection and `shutdown()` for good. Here the handshake runs in the
    connection's own thread with a timeout. `shutdown()` also leaves the AE's server list alone, so a
    caller may run several servers one after another (an outage and a restart) without `ae.shutdown()`.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept one connection; wrap it for TLS without shaking hands yet."""
        listening = self.socket
        if listening is None:
            raise OSError("server socket closed")
        connection, address = listening.accept()
        if self.ssl_context is not None:
            connection = self.ssl_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        """Connection thread: finish the TLS handshake (if any), then serve the association."""
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(_TLS_HANDSHAKE_TIMEOUT)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:
                log.info("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                return
            request.settimeout(None)  # as pynetdicom expects: blocking, it selects before reading
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket; running associations carry on."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def start_association_server(
    ae: AE,
    address: tuple[str, int],
    *,
    contexts: list[PresentationContext],
    ssl_context: ssl.SSLContext | None,
    evt_handlers: list[EventHandlerType],
) -> tuple[HandshakeInThreadServer, threading.Thread]:
    """Bind and serve `ae` as an SCP on `address` (raises OSError when taken); return server and thread.

    Stop it with `server.shutdown()`, then join the thread. The thread polls for shutdown every 0.1 s
    rather than pynetdicom's 0.5 s, so an outage in a test starts promptly.
    """
    server = HandshakeInThreadServer(ae, address, ae.ae_title, contexts, ssl_context, evt_handlers)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _SERVE_POLL_INTERVAL},
        name=f"association-server[{address[0]}:{server.server_address[1]}]",
        daemon=True,
    )
    thread.start()
    return server, thread


def reject_association(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Answer the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ; call from an EVT_REQUESTED handler.

    pynetdicom skips its own negotiation once an EVT_REQUESTED handler has rejected, but then closes the
    socket at once: the RJ, only queued for the DUL thread, may never reach the wire and the peer sees a
    dropped connection. pynetdicom's own rejections wait with `kill()` until the DUL is idle (RJ sent and
    the peer gone, or ARTIM expired); this does the same.
    """
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def ends_a_command(pdu: object) -> bool:
    """True for a P-DATA-TF whose last PDV is the final fragment of a command set (a whole DIMSE reply).

    The message control header is the first byte of a PDV: bit 0 set for a command, bit 1 for the last
    fragment. A C-STORE-RSP has no data set, so its command's last fragment completes it.
    """
    if not isinstance(pdu, P_DATA_TF) or not pdu.presentation_data_value_items:
        return False
    value = pdu.presentation_data_value_items[-1].presentation_data_value
    return value is not None and len(value) > 0 and value[0] & 0x03 == 0x03


def abort_after_this_pdu(assoc: Association) -> None:
    """Queue an A-ABORT from an EVT_PDU_SENT handler, so it follows the PDU just written and nothing else.

    The DUL thread (which runs EVT_PDU_SENT) sends queued primitives before it reads the socket again, so
    no further request is read, let alone answered. `abort()` must not block here: a blocking abort waits
    for this very thread to go idle. The association thread then idles until its network timeout unless
    `end_association()` is called once the transport has closed (EVT_CONN_CLOSE).
    """
    assoc.abort(block=False)


def end_association(assoc: Association, name: str) -> threading.Thread:
    """Stop an association's threads from another thread (returned, started; join it).

    After an abort we sent, pynetdicom's acceptor reactor does not notice that the connection is gone
    and waits out the network timeout (60 s by default); `kill()` ends it now. `kill()` waits for the DUL
    thread to return to idle, so it cannot run on the DUL thread, which is where EVT_CONN_CLOSE fires.
    """
    thread = threading.Thread(target=assoc.kill, name=name, daemon=True)
    thread.start()
    return thread


def wake_association(assoc: Association) -> None:
    """Make an association's threads notice at once that it is being ended (before `kill()`).

    `kill()` waits for the DUL to return to idle, which a peer can put off: one that never sends its
    A-ASSOCIATE-RQ, or never closes after our A-ABORT, keeps it waiting for the ARTIM timeout. Shutting
    the socket down makes the DUL read end-of-file instead. An acceptor still waiting for the
    A-ASSOCIATE-RQ waits out the whole ACSE timeout even after the connection closed (no indication
    reaches it); an empty item in its queue reads as that timeout, and it ends.
    """
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        with contextlib.suppress(OSError):  # already closed: nothing left to wake
            transport.socket.shutdown(socket.SHUT_RDWR)
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)  # what its wait returns on a timeout
