"""What our DICOM objects share: the source instances a result was drawn from, their patient
and study made conformant where a source's defect would make our objects invalid, and the UIDs
derived from the job, model and series (a redelivered task makes the same objects, never a
second copy)."""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipeline.core.contract import CodeSpec

_UID_NAMESPACE = uuid.UUID("5b0f2f4e-7a3c-4c41-9d1b-2f6f0c1e9a77")


@dataclass(frozen=True)
class Sources:
    """The source instances of one result: headers by SOP Instance UID (no pixel data), and for
    each plane of the volume (or the one image) the instance and 0-based frame it came from."""

    headers: dict[str, Dataset]
    slices: list[tuple[str, int | None]]

    @property
    def modality(self) -> str:
        return str(next(iter(self.headers.values())).get("Modality", ""))


# Patient and study attributes of Type 2 (present, possibly empty) that highdicom reads from the
# first source; a modality may leave them out altogether.
_PATIENT_STUDY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


_DATES_TIMES = ("StudyDate", "StudyTime", "PatientBirthDate", "PatientBirthTime")


_LEGACY_DA = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")


_LEGACY_TM = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")


def conformant_header(ds: Dataset) -> Dataset:
    """``ds``, or a copy of it fixed where highdicom copies its patient and study modules into
    our objects, so that a source's defect does not make them invalid or unbuildable: missing
    Type 2 attributes empty; the ACR-NEMA forms of dates and times (``1997.04.24``,
    ``14:04:38``, still sent by old archives) in today's; and a de-identified source's missing
    method said to be missing."""
    missing = [kw for kw in _PATIENT_STUDY_TYPE2 if kw not in ds]
    legacy = {kw: v for kw in _DATES_TIMES if (v := _current_form(ds, kw)) is not None}
    # PatientIdentityRemoved YES requires a de-identification method (Type 1C): keep the flag,
    # and say truthfully that the source does not state the method.
    no_method = (
        str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
        and "DeidentificationMethod" not in ds
        and "DeidentificationMethodCodeSequence" not in ds
    )
    if not missing and not legacy and not no_method:
        return ds
    patched = copy.deepcopy(ds)  # a header: no pixel data to copy
    for keyword in missing:
        setattr(patched, keyword, "")
    for keyword, value in legacy.items():
        setattr(patched, keyword, value)
    if no_method:
        patched.DeidentificationMethod = "not stated in the source images"
    return patched


def _current_form(ds: Dataset, keyword: str) -> str | None:
    """A date or time in its ACR-NEMA form, rewritten in today's; None for anything else."""
    element = ds.get_item(keyword)
    raw = element.value if element is not None else None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")
    text = text.strip(" \x00")
    if keyword.endswith("Date") and (m := _LEGACY_DA.fullmatch(text)):
        return "".join(m.groups())
    if keyword.endswith("Time") and (m := _LEGACY_TM.fullmatch(text)):
        return "".join(g for g in m.groups() if g)
    return None


def result_uid(*parts: str) -> UID:
    """A 2.25 UID from a name-based UUID (PS3.5 B.2): the same parts, the same UID."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(parts)).int}")


def coded(spec: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=spec.value, scheme_designator=spec.scheme, meaning=spec.meaning)


def same_body_part(ds: Dataset, source: Dataset) -> None:
    """The source's body part and laterality on an object of our own in a new series; with
    neither known, an empty Laterality (Type 2C: the unknown body part may be a paired one)."""
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    if "BodyPartExamined" not in ds and "Laterality" not in ds:
        ds.Laterality = ""
