"""Modality Performed Procedure Step: the modality's own word that a procedure is done.

N-CREATE opens a step (IN PROGRESS), N-SET closes it (COMPLETED or DISCONTINUED) and lists the
series and instances it produced. Each step's state is a small JSON file in
``spool/.mpps/<SOP Instance UID>.json``, so N-CREATE and N-SET may arrive on different
associations, even in different receiving processes, and a restart forgets nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_write_json
from pipeline.core.instances import InvalidUIDError, check_uid

MPPS_DIR = ".mpps"
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"


class MppsError(PipelineError):
    """Carries the DIMSE status the peer gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# PS3.4 F.7.2 / PS3.7 C: the statuses an MPPS SCP answers with.
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
MAY_NO_LONGER_BE_UPDATED = 0xA710
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StepClosed:
    """An N-SET that closed a step: COMPLETED (with what it produced) or DISCONTINUED."""

    study_uid: str | None
    status: str
    sop_uids: frozenset[str]


def _path(spool: Path, mpps_uid: str) -> Path:
    try:
        check_uid(mpps_uid, "MPPS SOP Instance UID")
    except InvalidUIDError as exc:
        raise MppsError(INVALID_ATTRIBUTE_VALUE, str(exc)) from None
    return spool / MPPS_DIR / f"{mpps_uid}.json"


def _study_of(ds: Dataset) -> str | None:
    for item in ds.get("ScheduledStepAttributesSequence", []):
        uid = item.get("StudyInstanceUID")
        if uid:
            try:
                return check_uid(uid, "StudyInstanceUID")
            except InvalidUIDError:
                return None
    return None


def produced_instances(ds: Dataset) -> frozenset[str]:
    """SOP instances listed in Performed Series Sequence (images and other objects)."""
    sops: set[str] = set()
    for series in ds.get("PerformedSeriesSequence", []):
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(key, []):
                uid = ref.get("ReferencedSOPInstanceUID")
                if uid:
                    sops.add(str(uid))
    return frozenset(sops)


def create(spool: Path, mpps_uid: str, attributes: Dataset) -> None:
    path = _path(spool, mpps_uid)
    if path.exists():
        raise MppsError(DUPLICATE_INSTANCE, f"MPPS {mpps_uid} exists already")
    status = str(attributes.get("PerformedProcedureStepStatus", "") or IN_PROGRESS)
    if status != IN_PROGRESS:
        raise MppsError(INVALID_ATTRIBUTE_VALUE, f"N-CREATE with status {status!r}")
    atomic_write_json(path, {"status": status, "study_uid": _study_of(attributes)})


def update(spool: Path, mpps_uid: str, modifications: Dataset) -> StepClosed | None:
    """Apply an N-SET; returns what closed when it closed the step."""
    path = _path(spool, mpps_uid)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise MppsError(NO_SUCH_INSTANCE, f"no MPPS {mpps_uid}") from None
    except (OSError, ValueError) as exc:
        raise MppsError(PROCESSING_FAILURE, f"MPPS {mpps_uid} unreadable: {exc}") from None
    if state["status"] != IN_PROGRESS:
        raise MppsError(MAY_NO_LONGER_BE_UPDATED, f"MPPS {mpps_uid} is {state['status']}")
    status = str(modifications.get("PerformedProcedureStepStatus", "") or IN_PROGRESS)
    if status not in {IN_PROGRESS, COMPLETED, DISCONTINUED}:
        raise MppsError(INVALID_ATTRIBUTE_VALUE, f"status {status!r}")
    state["status"] = status
    atomic_write_json(path, state)
    if status == IN_PROGRESS:
        return None
    return StepClosed(state.get("study_uid"), status, produced_instances(modifications))
