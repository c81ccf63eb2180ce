"""Routing: which models see which series. The same rules serve the receiver and the inbox.

Rules (``routes`` in the configuration) are tried in order and the first whose every condition
holds decides the series' models; a series no rule matches is recorded as skipped, which is not
an error. :func:`explain` says, rule by rule, why each did or did not match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

Kind = Literal["dicom", "nifti", "image"]


class Priority(StrEnum):
    """Which queue a job waits in (:mod:`pipeline.tasks.lanes`): workers empty the urgent one
    first."""

    ROUTINE = "routine"
    URGENT = "urgent"


class Match(BaseModel):
    """Every condition given must hold; lists match any of their values (case-insensitive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: tuple[Kind, ...] = ()
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = Field(default=(), description="BodyPartExamined")
    series_description: str | None = Field(
        default=None, description="Regular expression searched in SeriesDescription (any case)."
    )
    sop_class_uid: tuple[str, ...] = ()
    min_slices: int | None = Field(
        default=None, ge=1, description="Planes in the series: images, or frames of them."
    )
    max_slices: int | None = Field(default=None, ge=1)
    max_frames: int | None = Field(
        default=None,
        ge=1,
        description="Frames in any one object of the series: 1 keeps multi-frame objects "
        "(cine loops, enhanced CT/MR) out.",
    )
    volume: bool | None = Field(
        default=None,
        description="true: the series is a stack of planes at distinct positions in the "
        "patient (a CT or MR volume, enhanced multi-frame); false: it is not (radiograph or "
        "mammography views, secondary captures, an ultrasound image, a single slice).",
    )
    calling_aet: tuple[str, ...] = ()
    called_aet: tuple[str, ...] = ()

    @field_validator("series_description")
    @classmethod
    def _valid_regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    match: Match = Match()
    models: tuple[str, ...] = Field(min_length=1)
    outputs: tuple[Literal["json", "sr", "seg", "sc", "gsps", "kos", "pdf"], ...] = Field(
        default=("json", "sr", "seg", "sc", "kos"),
        description="What to write beside each result: json (always); sr (a DICOM "
        "Comprehensive 3D SR, TID 1500); seg (a DICOM SEG, segmentation models); sc (key "
        "images: DICOM secondary captures of the slice through each lesion, outlined, or of "
        "the image with a classifier's answer, which every viewer shows); gsps (a DICOM "
        "presentation state drawing each lesion's outline over the source slices); kos (a "
        "DICOM Key Object Selection flagging the key slices and the objects above); pdf (a "
        "PDF report, report.pdf, and for DICOM input an Encapsulated PDF). sr, seg, sc, gsps "
        "and kos are made for DICOM input only; sc and gsps not for a series taken image by "
        "image.",
    )
    send_to: tuple[str, ...] = Field(
        default=(),
        description="Names of `destinations` the DICOM results (every object `outputs` makes) "
        "are sent to by C-STORE, retried with backoff while a destination is down.",
    )
    per_image: bool = Field(
        default=False,
        description="true: each image of the series (each frame of a multi-frame object) goes "
        "to the models on its own, and the series' one result per model lists every image's "
        "answer (radiograph or mammography views, secondary captures); for 2D classifiers. "
        "false: the series is one input, a volume (or its one image).",
    )
    priority: Priority = Field(
        default=Priority.ROUTINE,
        description="urgent: a study or file with a series this rule matches waits in the "
        "urgent queue, which every worker empties before the routine one (a stroke or trauma "
        "CT ahead of a backlog), and its results are sent ahead of routine ones.",
    )

    @field_validator("outputs")
    @classmethod
    def _json_always(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "json" not in v:
            raise ValueError("json is always written (status, retries and the SR read it)")
        return v


DEFAULT_ROUTES: tuple[Route, ...] = (
    Route(
        name="ct-volume",
        match=Match(kind=("dicom",), modality=("CT",), min_slices=16),
        models=("ct_covid_classifier", "ct_lesion_segmentation"),
    ),
    Route(
        name="nifti-volume",
        match=Match(kind=("nifti",)),
        models=("ct_covid_classifier", "ct_lesion_segmentation"),
    ),
    Route(
        name="2d-image",
        match=Match(kind=("image", "dicom"), max_frames=1, volume=False),
        models=("mednist_classifier",),
        per_image=True,
    ),
)


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can look at, for one series (or one inbox file)."""

    kind: Kind
    slices: int  # planes: images, or the frames of multi-frame objects
    frames: int = 1  # the most frames in any one object
    volume: bool = False  # planes at distinct positions in the patient
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    sop_class_uid: str = ""
    calling_aet: str = ""
    called_aet: str = ""


@dataclass
class Decision:
    route: Route | None
    why_not: dict[str, list[str]] = field(default_factory=dict)  # rule name -> failed checks


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str | None:
    if not allowed or value.upper() in {a.upper() for a in allowed}:
        return None
    return f"{name} {value or '(none)'} not in {list(allowed)}"


def mismatches(match: Match, facts: SeriesFacts) -> list[str]:
    """The conditions of ``match`` that ``facts`` fail, in words; empty when it matches."""
    found = [
        _one_of("kind", facts.kind, match.kind),
        _one_of("modality", facts.modality, match.modality),
        _one_of("body part", facts.body_part, match.body_part),
        _one_of("SOP class", facts.sop_class_uid, match.sop_class_uid),
        _one_of("calling AE title", facts.calling_aet, match.calling_aet),
        _one_of("called AE title", facts.called_aet, match.called_aet),
    ]
    if match.series_description is not None and not re.search(
        match.series_description, facts.series_description, re.IGNORECASE
    ):
        found.append(
            f"series description {facts.series_description!r} does not match "
            f"/{match.series_description}/"
        )
    if match.min_slices is not None and facts.slices < match.min_slices:
        found.append(f"{facts.slices} slice(s) < {match.min_slices}")
    if match.max_slices is not None and facts.slices > match.max_slices:
        found.append(f"{facts.slices} slice(s) > {match.max_slices}")
    if match.max_frames is not None and facts.frames > match.max_frames:
        found.append(f"{facts.frames} frames in one object > {match.max_frames}")
    if match.volume is not None and facts.volume != match.volume:
        found.append("a volume" if facts.volume else "not a volume")
    return [m for m in found if m]


def decide(routes: tuple[Route, ...], facts: SeriesFacts) -> Decision:
    decision = Decision(route=None)
    for route in routes:
        failed = mismatches(route.match, facts)
        if not failed:
            decision.route = route
            return decision
        decision.why_not[route.name] = failed
    return decision


def dicom_facts(ds: Dataset, objects: int = 1, calling: str = "", called: str = "") -> SeriesFacts:
    """What routing looks at in a DICOM header, for ``objects`` like it (a series' first
    header stands for the rest, where only the queue is being chosen)."""
    frames = frames_of(ds)
    # Single-frame images say where they lie (CT, MR, PET); projections and captures do not.
    # An enhanced multi-frame object gives each frame its position; a cine loop does not.
    where = "PerFrameFunctionalGroupsSequence" if frames > 1 else "ImagePositionPatient"
    placed = where in ds
    return SeriesFacts(
        kind="dicom",
        slices=objects * frames,
        frames=frames,
        volume=placed and objects * frames > 1,
        modality=str(ds.get("Modality", "")),
        body_part=str(ds.get("BodyPartExamined", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        calling_aet=calling,
        called_aet=called,
    )


def frames_of(ds: Dataset) -> int:
    """NumberOfFrames, 1 where it is absent or not a number."""
    try:
        return max(1, int(str(ds.get("NumberOfFrames", 1) or 1)))
    except (TypeError, ValueError):
        return 1
