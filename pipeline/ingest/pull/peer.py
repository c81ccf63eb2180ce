"""Finding and retrieving studies on a PACS by DIMSE (pynetdicom): C-FIND at study level
(Study Root), and C-GET, whose instances come back on our own association and are staged as
files, or C-MOVE to our receiver. Each retrieve reports what the PACS counted: the
instances it sent, those that failed, and what it said when it stopped."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pipeline.core import tls
from pipeline.core.instances import InvalidUIDError, check_uid
from pipeline.core.network_settings import Source

log = logging.getLogger(__name__)

# The study's attributes asked of the PACS (returned empty where it has no value).
STUDY_KEYS = (
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "SOPClassesInStudy",
)
MAX_STORAGE_CONTEXTS = 126  # PS3.8: 128 contexts in all; one is the C-GET's own


@dataclass(frozen=True)
class Criteria:
    """A C-FIND's matching keys; empty ones match everything. ``study_date`` is a DICOM
    range (``20260101-20260131``), ``description`` may hold ``*`` and ``?``."""

    study_uid: str = ""
    accession: str = ""
    patient_id: str = ""
    study_date: str = ""
    modality: str = ""
    description: str = ""


@dataclass(frozen=True)
class Match:
    study_uid: str
    accession: str
    date: str
    modalities: str
    description: str
    instances: int | None
    sop_classes: tuple[str, ...] = ()  # SOPClassesInStudy, where the PACS answers it


@dataclass
class Retrieved:
    """What one retrieve brought: the PACS's counts and its last word."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: list[Path] = field(default_factory=list)  # C-GET: the staged files
    error: str | None = None  # the retrieve as a whole failed: why

    @property
    def whole(self) -> bool:
        return self.error is None and self.failed == 0


class PeerError(ConnectionError):
    """The PACS could not be reached, or refused the association: nothing was done."""


def _associate(source: Source, contexts: list[Any], **kwargs: Any) -> Association:
    assert source.host and source.port and source.ae_title  # a DIMSE source
    ae = AE(ae_title=source.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_s
    for context in contexts:
        if isinstance(context, str):
            ae.add_requested_context(context)
        else:  # a storage context, with its transfer syntaxes
            ae.add_requested_context(context.abstract_syntax, context.transfer_syntax)
    context = (
        tls.client_context(source.tls_ca, source.tls_certificate, source.tls_private_key)
        if source.tls
        else None
    )
    tls_args = (context, source.host) if context is not None else None
    assoc = ae.associate(
        source.host, source.port, ae_title=source.ae_title, tls_args=tls_args, **kwargs
    )
    if not assoc.is_established:
        what = "refused the association" if assoc.is_rejected else "did not answer"
        raise PeerError(
            f"{source.ae_title} at {source.host}:{source.port} {what}: check its host, port and "
            f"AE title, and that it knows us as {source.calling_ae_title}"
        )
    return assoc


def find(source: Source, criteria: Criteria) -> list[Match]:
    """The studies matching ``criteria``, in the order the PACS answered."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = criteria.study_uid
    query.PatientID = criteria.patient_id
    for keyword in STUDY_KEYS:
        setattr(query, keyword, "")
    query.AccessionNumber = criteria.accession
    query.StudyDate = criteria.study_date
    query.ModalitiesInStudy = criteria.modality
    query.StudyDescription = criteria.description
    assoc = _associate(source, [StudyRootQueryRetrieveInformationModelFind])
    matches = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.get("Status", 0xC000)) if status else 0xC000
            if code in (0xFF00, 0xFF01) and identifier is not None:
                if (match := match_of(identifier)) is not None:
                    matches.append(match)
            elif code != 0x0000:
                raise PeerError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        assoc.release()
    return matches


def series_of(source: Source, study_uid: str) -> list[Dataset]:
    """The study's series as the PACS describes them (modality, description, body part,
    instances): what routing would look at, for a dry run."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    for keyword in (
        "SeriesInstanceUID",
        "Modality",
        "SeriesDescription",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ):
        setattr(query, keyword, "")
    assoc = _associate(source, [StudyRootQueryRetrieveInformationModelFind])
    try:
        return [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and int(status.get("Status", 0)) in (0xFF00, 0xFF01) and identifier
        ]
    finally:
        assoc.release()


def match_of(identifier: Dataset) -> Match | None:
    """A study as the PACS described it; None without a valid Study Instance UID."""
    try:
        uid = check_uid(str(identifier.get("StudyInstanceUID", "")), "StudyInstanceUID")
    except InvalidUIDError:
        log.warning("a C-FIND match without a valid Study Instance UID, left out")
        return None
    count = str(identifier.get("NumberOfStudyRelatedInstances", "") or "").strip()
    return Match(
        study_uid=uid,
        accession=str(identifier.get("AccessionNumber", "") or ""),
        date=str(identifier.get("StudyDate", "") or ""),
        modalities="\\".join(_values(identifier.get("ModalitiesInStudy"))),
        description=str(identifier.get("StudyDescription", "") or ""),
        instances=int(count) if count.isdigit() else None,
        sop_classes=_values(identifier.get("SOPClassesInStudy")),
    )


def _values(value: object) -> tuple[str, ...]:
    """A multi-valued attribute's values (pydicom's MultiValue, or one string)."""
    if not value:
        return ()
    items = str(value).split("\\") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    return tuple(str(v) for v in items if str(v))


def _identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def get(
    source: Source,
    study_uid: str,
    into: Path,
    progress: Callable[[int], None],
    sop_classes: tuple[str, ...] = (),
) -> Retrieved:
    """C-GET the study; each instance is written whole into ``into`` (a staging folder) as it
    arrives, ``progress`` told the count so far. The storage classes proposed are the study's
    own (``sop_classes``, from the C-FIND) where the PACS said them, else pynetdicom's 120
    most common: an association carries at most 128 presentation contexts, and an instance
    of a class not proposed cannot be sent (counted as failed)."""
    into.mkdir(parents=True, exist_ok=True)
    done = Retrieved()

    def store(event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        path = into / f"{secrets.token_hex(8)}.dcm"
        tmp = path.with_suffix(".part")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        done.stored.append(path)
        progress(len(done.stored))
        return 0x0000

    contexts = (
        [build_context(uid) for uid in sop_classes[:MAX_STORAGE_CONTEXTS]]
        if sop_classes
        else list(StoragePresentationContexts)
    )
    roles = [build_role(str(c.abstract_syntax), scp_role=True) for c in contexts]
    assoc = _associate(
        source,
        [StudyRootQueryRetrieveInformationModelGet, *contexts],
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    try:
        responses = assoc.send_c_get(
            _identifier(study_uid), StudyRootQueryRetrieveInformationModelGet
        )
        _count(responses, done)
    finally:
        assoc.release()
    if (done.error or done.failed) and not sop_classes:
        done.error = (done.error or f"{done.failed} instances were not sent") + (
            "; the PACS did not say the study's storage classes at C-FIND, and one of them "
            "may be outside the 120 proposed"
        )
    return done


def move(source: Source, study_uid: str, destination: str) -> Retrieved:
    """C-MOVE the study to ``destination`` (our receiver's AE title, as the PACS knows it)."""
    done = Retrieved()
    assoc = _associate(source, [StudyRootQueryRetrieveInformationModelMove])
    try:
        responses = assoc.send_c_move(
            _identifier(study_uid), destination, StudyRootQueryRetrieveInformationModelMove
        )
        _count(responses, done)
    finally:
        assoc.release()
    if done.error and done.completed == 0:
        # 0xA801 says so; many PACS (Orthanc among them) answer a bare failure instead
        known = "does not know" if "0xA801" in done.error else "may not know"
        done.error += (
            f": the PACS {known} {destination} as a move destination; add our receiver (its "
            "AE title, host and port) to the PACS's modalities, or use retrieve: get"
        )
    return done


def _count(responses: Any, done: Retrieved) -> None:
    """Read a retrieve's responses: the sub-operation counts of the last, and its status."""
    for status, _identifier in responses:
        if not status:
            done.error = "no response from the PACS (timed out or aborted)"
            return
        code = int(status.get("Status", 0xC000))
        done.completed = int(status.get("NumberOfCompletedSuboperations", done.completed) or 0)
        done.failed = int(status.get("NumberOfFailedSuboperations", done.failed) or 0)
        done.warning = int(status.get("NumberOfWarningSuboperations", done.warning) or 0)
        if code == 0xFF00:
            continue  # pending: more to come
        if code == 0xB000:
            done.failed = max(done.failed, 1)  # some sub-operations failed
        elif code not in (0x0000, 0xFE00):
            comment = str(status.get("ErrorComment", "") or "").strip()
            done.error = f"the retrieve failed with status 0x{code:04X}" + (
                f" ({comment})" if comment else ""
            )
