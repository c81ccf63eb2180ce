"""The DICOM receiver: C-ECHO, C-STORE for every storage SOP class, and MPPS.

The pynetdicom handlers are thin: they translate events into calls of
:mod:`pipeline.core.instances` and :mod:`pipeline.ingest.mpps` and translate errors into DICOM
statuses. What they learn (instance stored, association released or broken, MPPS closed) goes
as an event (:mod:`pipeline.ingest.events`) to an event sink;
:class:`pipeline.ingest.receiver.Receiver` reads it and decides when a study is complete.
Handlers run in association threads, possibly in several processes, so they share nothing but
the spool on disk and the sink.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
    register_uid,
)
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_SET
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass

from pipeline.core import observe
from pipeline.core.instances import (
    InvalidUIDError,
    OutOfSpaceError,
    header_text,
    identify,
    store_instance,
)
from pipeline.core.settings import Settings
from pipeline.core.tls import server_context
from pipeline.ingest import mpps
from pipeline.ingest.access import Accepted, AllowedNetworks
from pipeline.ingest.dimse import polling, store_response
from pipeline.ingest.dimse.transport import RequestHandler, Server
from pipeline.ingest.events import Closed, EventSink, MppsCompleted, Released, Stored

log = logging.getLogger(__name__)

# Uncompressed and the common compressed syntaxes: senders need not decompress for us.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# Image storage classes retired from the standard, which pynetdicom's storage contexts leave
# out, but which old modalities still send (an ultrasound of the 1993 class): taken like any
# image, never refused at the association, where the sender would retry them for ever.
RETIRED_IMAGE_STORAGE = {
    "UltrasoundMultiFrameImageStorageRetired": "1.2.840.10008.5.1.4.1.1.3",
    "NuclearMedicineImageStorageRetired": "1.2.840.10008.5.1.4.1.1.5",
    "UltrasoundImageStorageRetired": "1.2.840.10008.5.1.4.1.1.6",
    "XRayAngiographicBiPlaneImageStorageRetired": "1.2.840.10008.5.1.4.1.1.12.3",
}

# pynetdicom.sop_class builds these names at run time, out of the type checker's sight.
VERIFICATION = UID("1.2.840.10008.1.1")
MPPS_SOP_CLASS = UID("1.2.840.10008.3.1.2.3.3")  # Modality Performed Procedure Step
SERIES_INSTANCE_UID = Tag(0x0020, 0x000E)  # the header is read up to it
MODALITY, SOP_CLASS = 0x00080060, 0x00080016  # read before it

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the disk watermark: the sender should retry later
CANNOT_STORE = 0xA701  # writing failed (an out-of-resources code: a later retry may work)
CANNOT_UNDERSTAND = 0xC210  # the data set could not be decoded
INVALID_UID = 0xC220  # Study/Series/SOP Instance UID missing or invalid: nothing written


def _called_aet(event: Event) -> str:
    """The AE title the sender addressed (we accept any; routing may use it)."""
    rq = event.assoc.requestor.primitive
    return str(rq.called_ae_title).strip() if rq is not None else ""


def _assoc_key(event: Event) -> str:
    # Unique across receiving processes; the object lives as long as its association.
    return f"{os.getpid()}-{id(event.assoc)}"


class Handlers:
    """Event handlers for one receiving process."""

    def __init__(self, settings: Settings, sink: EventSink) -> None:
        rs = settings.receiver
        self.spool = settings.spool_dir
        self.sink = sink
        self.min_free = rs.min_free_disk_mb * 2**20
        self.calling_aets = set(rs.allowed_calling_aets)
        self.networks = AllowedNetworks(rs.allowed_networks)
        self.accepted = Accepted(rs.accept_modalities, rs.accept_sop_classes)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # association -> [stored, refused]

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_N_CREATE, self.on_n_create),
            (evt.EVT_N_SET, self.on_n_set),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_broken),
            (evt.EVT_CONN_CLOSE, self.on_broken),
        ]

    # -- association ---------------------------------------------------------------------
    def on_requested(self, event: Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive  # the A-ASSOCIATE-RQ; requestor.ae_title is set later
        calling = str(rq.calling_ae_title).strip() if rq is not None else ""
        address = str(assoc.requestor.address)
        if self.calling_aets and calling not in self.calling_aets:
            log.warning("association from %s (%s) rejected: AE title not allowed", calling, address)
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
            observe.count("associations", "rejected")
        elif not self.networks.admit(address):
            log.warning("association from %s (%s) rejected: address not allowed", calling, address)
            # rejected-permanent, service-user, no-reason-given: there is no code for addresses
            assoc.acse.send_reject(0x01, 0x01, 0x01)
            assoc.kill()
            observe.count("associations", "rejected")
        else:
            observe.count("associations", "accepted")

    def on_released(self, event: Event) -> None:
        self.sink.put(Released(_assoc_key(event)))

    def on_broken(self, event: Event) -> None:
        """Abort or connection closed (a no-op for the tracker after a release)."""
        key = _assoc_key(event)
        self.sink.put(Closed(key))
        with self._lock:
            counts = self._counts.pop(key, None)
        if counts is not None:
            log.info(
                "association from %s ended: %d instance(s) stored, %d refused",
                event.assoc.requestor.ae_title,
                *counts,
            )

    def on_echo(self, event: Event) -> int:
        return SUCCESS

    # -- C-STORE -------------------------------------------------------------------------
    def on_store(self, event: Event) -> int:
        key = _assoc_key(event)
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            header = _header(event)
            uids = identify(header)
        except InvalidUIDError as exc:
            return self._refused(key, INVALID_UID, f"C-STORE from {calling} refused: {exc}")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a status, not a crash
            return self._refused(
                key, CANNOT_UNDERSTAND, f"C-STORE from {calling}: undecodable data set ({exc})"
            )
        modality, sop_class = header_text(header, MODALITY), header_text(header, SOP_CLASS)
        if not self.accepted.keeps(uids.series, modality, sop_class):
            return SUCCESS  # acknowledged, not kept: as the settings ask
        try:
            parts = _file_parts(event)
        except ValueError as exc:  # a UID in the command that is not ASCII
            return self._refused(
                key, CANNOT_UNDERSTAND, f"C-STORE from {calling}: unusable command ({exc})"
            )
        try:
            replaced = store_instance(self.spool, uids, parts, self.min_free)
        except OutOfSpaceError as exc:
            return self._refused(key, OUT_OF_RESOURCES, f"C-STORE from {calling} refused: {exc}")
        except OSError as exc:
            return self._refused(key, CANNOT_STORE, f"C-STORE from {calling}: write failed: {exc}")
        called = _called_aet(event)
        self.sink.put(Stored(uids.study, uids.sop, key, calling, called))
        with self._lock:
            self._counts.setdefault(key, [0, 0])[0] += 1
        observe.count("instances")
        if replaced:
            log.info("instance %s of study %s received again: replaced", uids.sop, uids.study)
        return SUCCESS

    def _refused(self, key: str, status: int, message: str) -> int:
        log.warning("%s (status 0x%04X)", message, status)
        observe.count("refused", f"0x{status:04X}")
        with self._lock:
            self._counts.setdefault(key, [0, 0])[1] += 1
        return status

    # -- MPPS ----------------------------------------------------------------------------
    def on_n_create(self, event: Event) -> tuple[int, Dataset | None]:
        req = cast(N_CREATE, event.request)
        if req.AffectedSOPClassUID != MPPS_SOP_CLASS:
            return 0x0122, None  # SOP class not supported
        uid = str(req.AffectedSOPInstanceUID or generate_uid())
        attributes = event.attribute_list
        try:
            mpps.create(self.spool, uid, attributes)
        except mpps.MppsError as exc:
            log.warning("MPPS N-CREATE refused: %s", exc)
            return exc.status, None
        log.info("MPPS %s in progress", uid)
        if req.AffectedSOPInstanceUID is None:
            attributes.AffectedSOPInstanceUID = uid  # pynetdicom moves it to the response
        return SUCCESS, attributes

    def on_n_set(self, event: Event) -> tuple[int, Dataset | None]:
        req = cast(N_SET, event.request)
        uid = str(req.RequestedSOPInstanceUID)
        modifications = event.modification_list
        try:
            closed = mpps.update(self.spool, uid, modifications)
        except mpps.MppsError as exc:
            log.warning("MPPS N-SET refused: %s", exc)
            return exc.status, None
        if closed is not None:
            log.info("MPPS %s %s, %d instance(s) listed", uid, closed.status, len(closed.sop_uids))
            if closed.status == mpps.COMPLETED:
                self.sink.put(MppsCompleted(closed.study_uid, frozenset(closed.sop_uids)))
        return SUCCESS, modifications


def _header(event: Event) -> Dataset:
    """The C-STORE data set up to its SeriesInstanceUID, which is all ``identify`` needs.

    pynetdicom's ``event.dataset`` reads every element, copying the pixel data; this stops
    after (0020,000E). A deflated data set is inflated and read whole, as pynetdicom does."""
    syntax = event.context.transfer_syntax
    if syntax.is_deflated:
        return event.dataset
    stream = _received(event)
    stream.seek(0)
    return read_dataset(
        stream,
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        stop_when=lambda tag, vr, length: tag > SERIES_INSTANCE_UID,
    )


def _file_parts(event: Event) -> tuple[bytes, memoryview]:
    """The DICOM file as received: preamble and file meta, then the sender's encoded data set
    as it lies in pynetdicom's buffer (``event.encoded_dataset()`` copies it twice)."""
    request = cast(C_STORE, event.request)
    head = file_meta_header(
        str(request.AffectedSOPClassUID or ""),
        str(request.AffectedSOPInstanceUID or ""),
        str(event.context.transfer_syntax),
    )
    return head, _received(event).getbuffer()


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information, byte for byte what
    ``encode_file_meta(event.file_meta)`` gives (pynetdicom's elements, its implementation UID
    and version), in about a twentieth of the time: pydicom builds and validates a data set
    and writes it element by element, some 0.3 ms per instance, a tenth of the receiver's CPU.
    Raises ValueError for a UID that is not ASCII."""
    elements = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # version 00 01
            _short_element(0x0002, b"UI", sop_class.encode("ascii"), b"\x00"),
            _short_element(0x0003, b"UI", sop_instance.encode("ascii"), b"\x00"),
            _short_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _short_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\x00"),
            _short_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(elements))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _short_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """A group 0002 element in Explicit VR Little Endian, padded to an even length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _received(event: Event) -> BytesIO:
    """The C-STORE data set as the sender encoded it, in pynetdicom's buffer."""
    return cast(BytesIO, cast(C_STORE, event.request).DataSet)


def make_ae(settings: Settings) -> AE:
    rs = settings.receiver
    ae = AE(ae_title=rs.ae_title)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    for keyword, uid in RETIRED_IMAGE_STORAGE.items():
        # pynetdicom serves a SOP class only once it knows which service it belongs to.
        register_uid(uid, keyword, StorageServiceClass)
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES[:3])
    ae.add_supported_context(MPPS_SOP_CLASS, TRANSFER_SYNTAXES[:3])
    ae.maximum_associations = rs.max_associations
    ae.maximum_pdu_size = rs.maximum_pdu_size
    ae.network_timeout = rs.network_timeout_s
    ae.acse_timeout = rs.acse_timeout_s
    ae.dimse_timeout = rs.dimse_timeout_s
    return ae


def start_server(settings: Settings, sink: EventSink, port: int | None = None) -> Server:
    """Listen and serve in background threads; ``server.server_address`` has the real port."""
    rs = settings.receiver
    polling.install()
    store_response.install()
    # pynetdicom logs data set identifiers (patient names, IDs) at some levels: keep it to
    # warnings, and never identifiers.
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    # Its "standard" handlers format every PDU and DIMSE message for info and debug lines,
    # which the warning level then drops: work for nothing on each instance. Without them it
    # still logs warnings and errors. Set before the server and its associations bind them.
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ssl_context = None
    if rs.tls_certificate is not None and rs.tls_private_key is not None:
        ssl_context = server_context(rs.tls_certificate, rs.tls_private_key, rs.tls_ca)
    ae = make_ae(settings)
    handlers = Handlers(settings, sink)
    server = ae.make_server(
        (rs.host, rs.port if port is None else port),
        ssl_context=ssl_context,
        evt_handlers=handlers.bindings(),
        server_class=Server,
        request_handler=RequestHandler,
    )
    assert isinstance(server, Server)
    ae._servers.append(server)  # as pynetdicom's start_server does; its shutdown() expects it
    thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
    thread.start()
    return server
