"""The result documents.

``result.json`` per model and input: ``data/results/<job id>/<model>/`` for an inbox file,
``data/results/<StudyInstanceUID>/<model>/<SeriesInstanceUID>/`` for a DICOM series; and
``study.json`` per DICOM study: every series, the rule that routed it or why none did.

Defined as pydantic models so the JSON schema is generated, not hand-written
(``dicom-pipeline config schema`` covers settings; ``pipeline.core.results.Result`` this file).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.core.routing import Priority

PREVIEW_FILE = "preview.png"  # beside result.json


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputInfo(_Doc):
    source: Literal["inbox", "dicom"]
    name: str  # inbox: relative path as dropped; DICOM: <StudyInstanceUID>/<SeriesInstanceUID>
    kind: str  # image | nifti | dicom
    sha256: str | None  # of the inbox file; None for a DICOM series (many files)
    shape: list[int]  # channel first, as loaded
    study_uid: str | None = None
    series_uid: str | None = None
    route: str | None = None  # the routing rule that chose this model


class ModelInfo(_Doc):
    name: str
    version: str  # the Triton model version that answered


class Prediction(_Doc):
    label: str
    probabilities: dict[str, float]


class ImageAnswer(_Doc):
    """One image's answer, in a result of a series its rule takes image by image."""

    sop_instance_uid: str
    frame: int | None = None  # 1-based frame of a multi-frame object; None: single-frame
    instance_number: int | None = None
    shape: list[int]  # channel first, as loaded
    prediction: Prediction


class Timings(_Doc):
    received: datetime
    queued: datetime | None
    started: datetime
    finished: datetime
    preprocess_ms: float
    inference_ms: float


class WorkerInfo(_Doc):
    host: str
    pid: int


class Lesion(_Doc):
    voxels: int
    volume_ml: float
    centre_ras_mm: list[float]  # centre of mass, RAS patient coordinates


class SegmentationInfo(_Doc):
    mask: str  # file beside result.json: NIfTI, uint8 labels on the input's voxels and affine
    labels: dict[str, int]  # label name -> value in the mask
    lesions: list[Lesion]  # connected components of the foreground, largest first
    total_volume_ml: float
    patches: int  # sliding-window patches sent to Triton


class DicomIssue(_Doc):
    """A DICOM output that did not pass as made: validation errors (values withheld) that
    came from the source (``inherited``) or from us (``own``), or why it was not made."""

    file: str  # sr.dcm, seg.dcm
    written: bool  # in results (and sent) despite the inherited errors; never with own errors
    inherited: list[str] = []
    own: list[str] = []
    not_made: str | None = None  # the source cannot be referenced (a retired SOP class, ...)


class Result(_Doc):
    # 1.3: priority; 1.4: dicom_issues; 1.5: images; 1.6: report
    schema_version: Literal["1.3", "1.4", "1.5", "1.6"] = "1.6"
    job_id: str
    # The lane its job waited in (docs/guides/routing.md); None: queued by an older
    # version, or processed without a queue (warm-up).
    priority: Priority | None = None
    input: InputInfo
    model: ModelInfo
    prediction: Prediction
    timings: Timings
    worker: WorkerInfo
    segmentation: SegmentationInfo | None = None  # segmentation models only
    preview: str | None = None  # PNG beside result.json: the image (slice) with the answer
    # DICOM objects beside result.json: sr.dcm (TID 1500), seg.dcm, sc-1.dcm.., pr.dcm,
    # report.dcm (the PDF encapsulated), kos.dcm; each was validated before it was written
    dicom: list[str] = []
    dicom_issues: list[DicomIssue] = []  # outputs flagged, withheld or not made, and why
    report: str | None = None  # the PDF report beside result.json (route output pdf)
    # A series its rule takes image by image (per_image): every image's answer, in instance
    # order; ``prediction`` is then the series' (pipeline.inference.decide.decide_series).
    images: list[ImageAnswer] = []


class SeriesOutcome(_Doc):
    series_uid: str
    modality: str
    description: str
    slices: int
    # superseded: more of the study came within the grace period; the next round has it
    status: Literal["done", "skipped", "failed", "superseded"]
    route: str | None
    models: list[str]
    reason: str | None  # skipped: why no rule matched; failed: the error; superseded: that


class StudyResult(_Doc):
    # 1.2: series status "superseded"; 1.3: priority; 1.4: completed_by
    schema_version: Literal["1.1", "1.2", "1.3", "1.4"] = "1.4"
    job_id: str  # the latest round
    priority: Priority | None = None  # the lane the latest round waited in
    rounds: list[str]  # every round's job id, oldest first (inputs in data/archive/<id>/)
    study_uid: str
    calling_aet: str | None
    called_aet: str | None
    # How the latest round came: association-released, mpps-completed, quiet-period, max-wait,
    # inbox-settled, or retrieved (pulled from a PACS, calling_aet then the PACS's AE title)
    completed_by: str | None = None
    series: list[SeriesOutcome]
    not_images: list[str]  # files skipped as localizers or non-images, with the reason
    finished: datetime
