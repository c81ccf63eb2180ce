"""pynetdicom's association server, connection socket and request handler, each changed where
pynetdicom offers no hook: TCP_NODELAY and SO_REUSEPORT, the TLS handshake off the accepting
thread, PDUs read with few system calls, and the DUL's wake-ups (:mod:`.polling`)."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.transport import RequestHandler as _PynetdicomHandler

from pipeline.ingest.dimse import polling

log = logging.getLogger(__name__)


class Server(ThreadedAssociationServer):
    """pynetdicom's server with three changes: TCP_NODELAY on each connection (without it
    small PDUs wait for Nagle's timer), SO_REUSEPORT so several receiving processes can share
    the port, and the TLS handshake done in the connection's own thread with a timeout, so a
    silent client cannot stall the accept loop."""

    handshake_timeout_s = 30.0

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
                request.settimeout(previous)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _Socket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU with few system calls.

    pynetdicom reads 4 KiB per ``recv`` and appends each piece to a growing bytearray: a 512 KB
    instance costs some 130 reads and as many copies, each taking the GIL twice. This reads
    straight into a buffer of the PDU's length, as much as the socket has each time.

    Each read also asks the kernel to acknowledge at once (TCP_QUICKACK). A sender with Nagle's
    algorithm on (most do not set TCP_NODELAY) holds the last small segment of each PDU until
    its earlier data is acknowledged, and Linux delays that acknowledgement by up to 40 ms in
    a request-response exchange such as C-STORE. Measured with storescu without TCP_NODELAY,
    200 instances of 512x512 in one association: 1.3-4.6 s with such stalls, 1.1-1.4 s
    without."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        done = 0
        while done < nr_bytes:
            if QUICKACK is not None:  # the kernel clears it again: set before each read
                self.socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            got = self.socket.recv_into(view[done:], nr_bytes - done)
            if not got:  # closed: pynetdicom sees the short read and reports it
                del view
                del buffer[done:]
                return buffer
            done += got
        return buffer


class RequestHandler(_PynetdicomHandler):
    """pynetdicom's handler, with our socket reads and DUL wake-ups for each association.

    ``_create_association`` is where pynetdicom builds the association before its threads
    start; it has no public hook for either."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _Socket
        polling.attach(assoc)
        return assoc
