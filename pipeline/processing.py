"""One job, start to finish: load -> preprocess (MONAI) -> Triton -> result.json.

Plain functions over plain values: no Celery here. Failures come out as ``StageError`` naming
the stage, carrying the original error whose class says whether a retry can help.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from monai.transforms import Compose

from pipeline import convert
from pipeline.contract import Activation, ModelContract
from pipeline.errors import NoModelError, NotSupportedError, PipelineError, TransientError
from pipeline.fsutil import atomic_write_bytes, move_into
from pipeline.jobs import ENQUEUED_MARKER, Job, job_dir, now
from pipeline.results import InputInfo, ModelInfo, Prediction, Result, Timings, WorkerInfo
from pipeline.settings import Settings
from pipeline.triton_client import TritonClient

log = logging.getLogger(__name__)


class StageError(Exception):
    def __init__(self, stage: str, error: PipelineError) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class Models:
    """The served models' contracts and their (reusable) preprocessing pipelines."""

    contracts: dict[str, ModelContract]
    _composes: dict[str, Compose] = field(default_factory=dict)

    def compose(self, contract: ModelContract) -> Compose:
        if contract.name not in self._composes:
            self._composes[contract.name] = convert.preprocessor(contract)
        return self._composes[contract.name]

    def choose(self, image: convert.LoadedImage) -> list[ModelContract]:
        """The models that take this input; NoModelError when none does."""
        chosen = [
            c
            for c in self.contracts.values()
            if image.kind in c.accepts and c.spatial_dims == image.spatial_dims
        ]
        if not chosen:
            raise NoModelError(
                f"no served model takes a {image.spatial_dims}D {image.kind} "
                f"input (models: {', '.join(self.contracts) or 'none'})"
            )
        return chosen

    def batch(self, image: convert.LoadedImage, contract: ModelContract) -> np.ndarray:
        """The contract's preprocessing applied, with a batch dimension of 1 added."""
        return convert.to_model_input(image, contract, self.compose(contract))[np.newaxis]


def decide(contract: ModelContract, probabilities: np.ndarray) -> Prediction:
    probs = {
        label: round(float(p), 6) for label, p in zip(contract.labels, probabilities, strict=True)
    }
    if contract.activation is Activation.SIGMOID:
        label = contract.labels[1] if probabilities[1] >= contract.threshold else contract.labels[0]
    else:
        label = contract.labels[int(np.argmax(probabilities))]
    return Prediction(label=label, probabilities=probs)


def run_job(job: Job, settings: Settings, models: Models, client: TritonClient) -> list[Path]:
    """Process a spooled job; returns the result files written. Idempotent: a job whose spool
    folder is gone was finished by an earlier delivery and is skipped."""
    folder = job_dir(settings.spool_dir, job.id)
    if not (folder / job.input_file).exists():
        log.info("job %s: already processed, nothing to do", job.id)
        return []
    started = now()
    stage = "load"
    try:
        if job.source == "dicom":
            raise NotSupportedError(
                "DICOM studies received over the network are not processed yet in this "
                "version (series-to-volume conversion comes next); the study's instances are "
                "kept in this folder"
            )
        path = folder / job.input_file
        image = convert.load(path)
        chosen = models.choose(image)
        info = InputInfo(
            source=job.source,
            name=job.original_name,
            kind=image.kind.value,
            sha256=_sha256(path),
            shape=[int(s) for s in image.array.shape],
        )
        docs: list[tuple[str, Result]] = []
        for contract in chosen:
            stage = "preprocess"
            t0 = time.perf_counter()
            x = models.batch(image, contract)
            pre_ms = (time.perf_counter() - t0) * 1000.0
            stage = "infer"
            out = client.infer(contract, x)
            docs.append(
                (
                    contract.name,
                    _result(
                        job,
                        info,
                        contract,
                        out.probabilities[0],
                        out.model_version,
                        started,
                        pre_ms,
                        out.milliseconds,
                    ),
                )
            )
        stage = "write"
        written = [
            _write(settings.results_dir / job.id / name / "result.json", doc) for name, doc in docs
        ]
    except PipelineError as exc:
        raise StageError(stage, exc) from exc
    _finish(folder, settings)
    log.info(
        "job %s: %d result(s), %s",
        job.id,
        len(written),
        ", ".join(f"{n}={d.prediction.label}" for n, d in docs),
    )
    return written


def _result(
    job: Job,
    info: InputInfo,
    contract: ModelContract,
    probabilities: np.ndarray,
    version: str,
    started: datetime,
    pre_ms: float,
    infer_ms: float,
) -> Result:
    return Result(
        job_id=job.id,
        input=info,
        model=ModelInfo(name=contract.name, version=version),
        prediction=decide(contract, probabilities),
        timings=Timings(
            received=job.received_at,
            queued=job.queued_at,
            started=started,
            finished=now(),
            preprocess_ms=round(pre_ms, 2),
            inference_ms=round(infer_ms, 2),
        ),
        worker=WorkerInfo(host=socket.gethostname(), pid=os.getpid()),
    )


def _write(path: Path, doc: Result) -> Path:
    try:
        atomic_write_bytes(path, (doc.model_dump_json(indent=2) + "\n").encode())
    except OSError as exc:  # disk full or unwritable: nothing partial was left; retry later
        raise TransientError(f"cannot write {path}: {exc}") from exc
    return path


def _finish(folder: Path, settings: Settings) -> None:
    """The input leaves the spool only after every result is on disk."""
    (folder / ENQUEUED_MARKER).unlink(missing_ok=True)
    if settings.worker.archive_inputs:
        dest = settings.archive_dir / folder.name
        if dest.exists():
            shutil.rmtree(dest)
        move_into(folder, settings.archive_dir)
    else:
        shutil.rmtree(folder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
