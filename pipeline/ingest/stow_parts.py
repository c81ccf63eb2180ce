"""A STOW-RS request's body: its multipart parts (RFC 2046), each DICOM file stored as a
received instance, and the Store Instances Response (PS3.18 Annex I) that answers them.
The HTTP service around it is :mod:`pipeline.ingest.stow`."""

from __future__ import annotations

import json
import logging
import mmap
from dataclasses import dataclass
from http import HTTPStatus
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.core.instances import InvalidUIDError, OutOfSpaceError, identify, store_instance
from pipeline.core.settings import Settings
from pipeline.ingest.access import Accepted

log = logging.getLogger(__name__)


# Failure Reason (0008,1197) values, PS3.18 Table I.2-2.
OUT_OF_RESOURCES = 0xA700  # the disk watermark
CANNOT_STORE = 0xA701  # writing failed (as C-STORE answers it)
NOT_THIS_STUDY = 0xA900  # an instance of another study than the one the request named
CANNOT_UNDERSTAND = 0xC000  # not a DICOM file, or its UIDs are not valid UIDs


class RequestError(ValueError):
    """The request is not what it says it is; answered with ``status`` and nothing stored."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Outcome:
    """One part of the request: the instance it holds, as far as it could be read."""

    sop_class: str = ""
    sop_instance: str = ""
    failure: int | None = None  # None: stored


def split(body: mmap.mmap | bytes, boundary: bytes) -> list[tuple[dict[str, str], int, int]]:
    """The parts of a multipart body (RFC 2046): each one's headers, and where its content
    starts and ends. The whole body is checked before any part is stored: RequestError if it
    is not delimited as it must be."""
    delimiter = b"\r\n--" + boundary
    if body[: len(delimiter) - 2] == delimiter[2:]:
        pos = len(delimiter) - 2  # no preamble
    elif (found := body.find(delimiter)) >= 0:
        pos = found + len(delimiter)
    else:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body holds no part with the boundary")
    found_parts = []
    while body[pos : pos + 2] != b"--":  # "--" right after a delimiter: the last one
        line_end = body.find(b"\r\n", pos)  # after any transport padding
        end = body.find(delimiter, line_end) if line_end >= 0 else -1
        if end < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "a part is not closed by the boundary")
        head_end = body.find(b"\r\n\r\n", line_end, end)  # at line_end: no headers
        if head_end < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "a part has no blank line after its headers")
        headers = {}
        for line in body[line_end + 2 : head_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        found_parts.append((headers, head_end + 4, end))
        pos = end + len(delimiter)
    return found_parts


def store_part(
    settings: Settings, part: bytes, study: str | None, accepted: Accepted | None = None
) -> tuple[Outcome, str | None]:
    """Store one DICOM file of a request; its outcome, and its study's UID when stored (None
    for one refused, or dropped as ``accepted`` says: then its outcome has no failure)."""
    outcome = Outcome()
    # A PS3.10 file; or its file meta and data set without the preamble and "DICM", as
    # dicomweb-client sends a data set that was not read from a file: made whole here.
    whole = part[128:132] == b"DICM"
    try:
        if not whole and part[:2] != b"\x02\x00":
            raise ValueError("neither a preamble nor a file meta group")
        ds = dcmread(BytesIO(part), stop_before_pixels=True, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            raise ValueError("no transfer syntax in the file meta")
        outcome.sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        outcome.sop_instance = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
        uids = identify(ds)
        outcome.sop_instance = uids.sop
    except InvalidUIDError as exc:
        log.warning("STOW-RS: instance refused: %s", exc)
        outcome.failure = CANNOT_UNDERSTAND
        return outcome, None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a status, not a crash
        log.warning("STOW-RS: a part is not a readable DICOM file (%s)", type(exc).__name__)
        outcome.failure = CANNOT_UNDERSTAND
        return outcome, None
    if study is not None and uids.study != study:
        log.warning("STOW-RS: instance %s is not of the study the request names", uids.sop)
        outcome.failure = NOT_THIS_STUDY
        return outcome, None
    modality = str(ds.get("Modality", "") or "")
    if accepted is not None and not accepted.keeps(uids.series, modality, outcome.sop_class):
        return outcome, None
    min_free = settings.receiver.min_free_disk_mb * 2**20
    try:
        view = memoryview(part)
        pieces: list[bytes | memoryview] = (
            [bytes(128), view[128:]] if whole else [bytes(128), b"DICM", view]
        )
        store_instance(settings.spool_dir, uids, pieces, min_free)
    except OutOfSpaceError as exc:
        log.warning("STOW-RS: instance %s refused: %s", uids.sop, exc)
        outcome.failure = OUT_OF_RESOURCES
        return outcome, None
    except OSError as exc:
        log.error("STOW-RS: instance %s: write failed: %s", uids.sop, exc)
        outcome.failure = CANNOT_STORE
        return outcome, None
    return outcome, uids.study


def response(outcomes: list[Outcome]) -> tuple[HTTPStatus, bytes]:
    """The HTTP status and the Store Instances Response Module (PS3.18 Annex I) as DICOM
    JSON."""
    doc = Dataset()
    doc.add_new(0x00081190, "UR", None)  # Retrieve URL, type 2: no WADO-RS here
    stored, failed = [], []
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class or None
        item.ReferencedSOPInstanceUID = o.sop_instance or None
        if o.failure is None:
            stored.append(item)
        else:
            item.FailureReason = o.failure
            failed.append(item)
    if failed:
        doc.FailedSOPSequence = failed
    if stored:
        doc.ReferencedSOPSequence = stored
    if not failed:
        status = HTTPStatus.OK
    elif stored:
        status = HTTPStatus.ACCEPTED
    else:
        status = HTTPStatus.CONFLICT
    return status, json.dumps(doc.to_json_dict()).encode()
