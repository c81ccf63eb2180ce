"""DICOMweb STOW-RS: studies stored by HTTP POST, taken as C-STORE takes them.

``POST /studies`` and ``POST /studies/{StudyInstanceUID}`` with a ``multipart/related;
type="application/dicom"`` body (PS3.18 10.5), each part a DICOM file (or, as some clients
send it, the file without its preamble). A request stands for an association: each instance
goes to the spool as a received one does, the receiver hears "stored" for each and "released"
once the response is due, so a study sent this way completes on the same rules (release
grace, quiet period, MPPS) and is routed as if C-STOREd, with no calling AE title. The answer
is the Store Instances Response Module in DICOM JSON: 200 when every instance was stored, 202
when some were, 409 when none was (each failure with its Failure Reason), 400 for a body that
is not the multipart it says, 415 for other media types.

The body goes to a file in the spool's ``.incoming/`` as it arrives (a study may be gigabytes,
sent in chunks) and its parts are read from a memory map of that file, so a request is never
held in memory; a crash leaves a ``.part`` file that the receiver removes at start-up. The
128-byte preamble of each file is stored as zeros: it is free for any content, and a file that
is also an executable must not come out of the spool as one.
"""

from __future__ import annotations

import contextlib
import email.message
import logging
import mmap
import secrets
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

from pipeline.core import observe
from pipeline.core.instances import (
    INCOMING,
    InvalidUIDError,
    OutOfSpaceError,
    check_space,
    check_uid,
)
from pipeline.core.settings import Settings
from pipeline.core.tls import server_context
from pipeline.ingest.access import Accepted, AllowedNetworks
from pipeline.ingest.events import EventSink, Released, Stored
from pipeline.ingest.stow_parts import (
    CANNOT_UNDERSTAND,
    Outcome,
    RequestError,
    response,
    split,
    store_part,
)

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom"
_BLOCK = 1 << 20
_SPACE_CHECK = 64 << 20  # a chunked body: free space checked every 64 MiB
_DRAIN = 64 << 20  # a refused request's body is read to its end up to this size


class _Handler(BaseHTTPRequestHandler):
    server: StowServer
    protocol_version = "HTTP/1.1"
    server_version = "dicom-pipeline"

    def setup(self) -> None:
        super().setup()
        # A silent client must not hold its thread for ever.
        self.connection.settimeout(self.server.settings.receiver.network_timeout_s)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, not in the accepting thread

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("STOW-RS %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._answer(HTTPStatus.METHOD_NOT_ALLOWED, "only STOW-RS (POST) is served here")

    do_PUT = do_DELETE = do_GET  # noqa: N815

    def do_POST(self) -> None:
        self._body_read = False
        slot = self.server.slots.acquire(blocking=False)
        try:
            if not slot:  # as max_associations turns associations away: the sender retries
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "too many requests at once")
            study = self._target()
            boundary = self._boundary()
            if not self.server.networks.admit(self.client_address[0]):
                raise RequestError(HTTPStatus.FORBIDDEN, "this address may not store")
            self._authorize()
            outcomes = self._store(study, boundary)
        except RequestError as exc:
            log.warning("STOW-RS from %s refused: %s", self.client_address[0], exc)
            self._drain()
            self._answer(exc.status, str(exc))
            return
        finally:
            if slot:
                self.server.slots.release()
        status, body = response(outcomes)
        stored = sum(o.failure is None for o in outcomes)
        log.info(
            "STOW-RS from %s: %d instance(s) stored, %d refused",
            self.client_address[0],
            stored,
            len(outcomes) - stored,
        )
        self._answer(status, body, "application/dicom+json")

    def _drain(self) -> None:
        """Read the rest of a refused request's body, up to _DRAIN bytes: a client still
        sending it when the connection closes gets a broken pipe, not the answer (a 401, a
        503). A larger or chunked body: the connection is closed."""
        self.close_connection = True
        length = self.headers.get("Content-Length", "")
        if self._body_read or not length.isdigit() or int(length) > _DRAIN:
            return
        with contextlib.suppress(OSError):
            left = int(length)
            while left > 0 and (block := self.rfile.read(min(left, _BLOCK))):
                left -= len(block)

    def _authorize(self) -> None:
        token_file = self.server.settings.receiver.dicomweb_bearer_token_file
        if token_file is None:
            return
        try:
            expected = token_file.read_text().strip()  # at each request: it may be rotated
        except OSError as exc:
            log.error("STOW-RS: cannot read the bearer token file: %s", exc)
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "cannot check tokens") from None
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if not (
            expected
            and scheme.lower() == "bearer"
            and secrets.compare_digest(token.strip().encode(), expected.encode())
        ):
            raise RequestError(HTTPStatus.UNAUTHORIZED, "a valid bearer token is needed")

    def _target(self) -> str | None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/studies":
            return None
        prefix, _, uid = path.rpartition("/")
        if prefix == "/studies":
            try:
                return check_uid(uid, "the study in the request's path")
            except InvalidUIDError as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        raise RequestError(HTTPStatus.NOT_FOUND, "POST /studies or /studies/{StudyInstanceUID}")

    def _boundary(self) -> bytes:
        header = email.message.Message()
        header["content-type"] = self.headers.get("Content-Type", "")
        boundary = header.get_param("boundary")
        kind = header.get_param("type") or MEDIA_TYPE
        if header.get_content_type() != "multipart/related" or str(kind).lower() != MEDIA_TYPE:
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f'only multipart/related; type="{MEDIA_TYPE}" is accepted',
            )
        if not isinstance(boundary, str) or not boundary:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the Content-Type names no boundary")
        return boundary.encode("latin-1")

    def _store(self, study: str | None, boundary: bytes) -> list[Outcome]:
        settings = self.server.settings
        incoming = settings.spool_dir / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        self._check_space(int(length))
        body_file = incoming / f"stow-{secrets.token_hex(8)}.part"
        try:
            with body_file.open("w+b") as f:
                if self._receive(f) == 0:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body is empty")
                f.flush()
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
                    return self._store_parts(body, boundary, study)
        finally:
            body_file.unlink(missing_ok=True)

    def _store_parts(self, body: mmap.mmap, boundary: bytes, study: str | None) -> list[Outcome]:
        key = f"stow-{secrets.token_hex(8)}"  # this request's "association"
        sink, called = self.server.sink, self.server.settings.receiver.ae_title
        accepted = self.server.accepted
        found = split(body, boundary)
        if not found:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body holds no part")
        outcomes: list[Outcome] = []
        try:
            for headers, start, end in found:
                media = headers.get("content-type", MEDIA_TYPE).split(";")[0].strip().lower()
                if media != MEDIA_TYPE:
                    outcomes.append(Outcome(failure=CANNOT_UNDERSTAND))
                    continue
                # One instance at a time in memory: a copy, as a memory map cannot close
                # while views into it live.
                part = body[start:end]
                outcome, stored_in = store_part(self.server.settings, part, study, accepted)
                outcomes.append(outcome)
                if stored_in is not None:
                    sink.put(Stored(stored_in, outcome.sop_instance, key, None, called))
                    observe.count("instances")
                elif outcome.failure is not None:  # else dropped, as accept_* ask: counted
                    observe.count("refused", f"0x{outcome.failure:04X}")
        finally:
            sink.put(Released(key))  # what was stored completes as after an association
        return outcomes

    def _receive(self, dest: BinaryIO) -> int:
        """Copy the request's body to ``dest`` (Content-Length or chunked); its size."""
        self._body_read = True  # from here on, whatever fails has consumed some of it
        settings = self.server.settings
        limit = settings.receiver.dicomweb_max_request_mb * 2**20
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while size := self._chunk_size():
                if total // _SPACE_CHECK != (total + size) // _SPACE_CHECK:
                    # Of unknown size until its end: the watermark is checked on the way.
                    self._check_space(0)
                total += size
                if total > limit:
                    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the body is too large")
                self._copy(dest, size)
                self.rfile.readline(8)  # the CRLF after the chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return total
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length or chunks needed")
        if int(length) > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the body is too large")
        self._copy(dest, int(length))
        return int(length)

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024).split(b";")[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            size = -1
        if size < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "a chunk has no size")
        return size

    def _check_space(self, incoming: int) -> None:
        settings = self.server.settings
        try:
            check_space(settings.spool_dir, incoming, settings.receiver.min_free_disk_mb * 2**20)
        except OutOfSpaceError as exc:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None

    def _copy(self, dest: BinaryIO, size: int) -> None:
        while size > 0:
            block = self.rfile.read(min(size, _BLOCK))
            if not block:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body ended early")
            dest.write(block)
            size -= len(block)

    def _answer(self, status: HTTPStatus, body: bytes | str, media: str = "text/plain") -> None:
        if self.command == "POST":
            observe.count("stow_requests", str(int(status)))
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "60")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="dicom-pipeline"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class StowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: Settings, sink: EventSink) -> None:
        rs = settings.receiver
        assert rs.dicomweb_port is not None
        self.settings = settings
        self.sink = sink
        self.slots = threading.BoundedSemaphore(rs.max_associations)  # requests at once
        self.networks = AllowedNetworks(rs.allowed_networks)
        self.accepted = Accepted(rs.accept_modalities, rs.accept_sop_classes)
        self.ssl_context = None
        if rs.tls_certificate is not None and rs.tls_private_key is not None:
            self.ssl_context = server_context(rs.tls_certificate, rs.tls_private_key, rs.tls_ca)
        super().__init__((rs.dicomweb_host, rs.dicomweb_port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        if self.ssl_context is not None:  # the handshake happens in the request's thread
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone or a TLS handshake refused (no or a wrong certificate): not ours to
        # trace back; anything stored before it is in the spool and completes as usual.
        log.warning("STOW-RS connection from %s failed: %s", client_address[0], sys.exc_info()[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host!s}:{port}/studies"


def start(settings: Settings, sink: EventSink) -> StowServer:
    """Listen and serve in background threads (stop with ``shutdown()``)."""
    server = StowServer(settings, sink)
    threading.Thread(target=server.serve_forever, name="stow-rs", daemon=True).start()
    return server
