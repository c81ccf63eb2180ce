"""The result document: ``data/results/<id>/<model>/result.json``.

Defined as pydantic models so the JSON schema is generated, not hand-written
(``dicom-pipeline config schema`` covers settings; ``pipeline.results.Result`` this file).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputInfo(_Doc):
    source: Literal["inbox"]
    name: str  # relative path as dropped into the inbox
    kind: str  # image | nifti | dicom
    sha256: str
    shape: list[int]  # channel first, as loaded


class ModelInfo(_Doc):
    name: str
    version: str  # the Triton model version that answered


class Prediction(_Doc):
    label: str
    probabilities: dict[str, float]


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


class Result(_Doc):
    schema_version: Literal["1.0"] = "1.0"
    job_id: str
    input: InputInfo
    model: ModelInfo
    prediction: Prediction
    timings: Timings
    worker: WorkerInfo
