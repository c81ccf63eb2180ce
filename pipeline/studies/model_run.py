"""One model on one input: preprocess, Triton, the decision and the result document now; the
result's files (result.json, preview, DICOM objects, report, mask) made by a callable
returned for later, so that a study's next model can wait on Triton meanwhile."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.convert import images as convert
from pipeline.core import observe
from pipeline.core.contract import ModelContract, Task
from pipeline.core.jobs import Job, now
from pipeline.core.results import (
    InputInfo,
    ModelInfo,
    Prediction,
    Result,
    SegmentationInfo,
    Timings,
    WorkerInfo,
)
from pipeline.inference.decide import decide, decide_segmentation
from pipeline.inference.segment import segment
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs import preview
from pipeline.outputs.dicom import DicomOutputs, make_dicom
from pipeline.outputs.files import MASK_FILE, IncompleteOutputsError, Output, nifti_gz, result_files

log = logging.getLogger(__name__)


def infer_model(
    job: Job,
    info: InputInfo,
    prep: convert.Preprocessing,
    contract: ModelContract,
    client: TritonClient,
    started: datetime,
    out_dir: Path,
    dicom: DicomOutputs,
) -> Callable[[], list[Output]]:
    """One model on one input, in two parts: the inference now, and a callable that makes
    ``out_dir/result.json``, ``preview.png``, the objects the route asks for (DICOM, the PDF
    report; ``mask.nii.gz`` for a segmentation) in memory, not yet written (see
    :func:`write_outputs`), so that a study's next model can wait on Triton meanwhile. They are
    validated there (:mod:`pipeline.outputs.dicom`): one with errors of our own raises
    IncompleteOutputsError with the rest. ``prep``: the input's preprocessing, shared."""
    if contract.task is not Task.SEGMENTATION:
        doc = classify(job, info, prep, contract, client, started)

        def classified() -> list[Output]:
            label = doc.prediction.label
            png = safe_preview(
                lambda: preview.classification_preview(
                    prep.image.array, label, doc.prediction.probabilities[label]
                )
            )
            objects = make_dicom(doc, contract, None, dicom, prep.image.array)
            return result_files(out_dir, doc, png, objects)

        return classified
    seg = segment(prep.image, contract, client, prep)
    total = seg.total_volume_ml
    doc = make_result(
        job,
        info,
        contract,
        decide_segmentation(contract, seg),
        seg.model_version,
        started,
        seg.preprocess_ms,
        seg.inference_ms,
        SegmentationInfo(
            mask=MASK_FILE,
            labels={name: i for i, name in enumerate(contract.labels)},
            lesions=seg.lesions,
            total_volume_ml=total,
            patches=seg.patches,
        ),
    )

    def segmented() -> list[Output]:
        log.debug("step=outputs model=%s", contract.name)
        objects = make_dicom(doc, contract, seg.lesion_map, dicom, prep.image.array)
        caption = f"{len(seg.lesions)} lesion(s), {total:.2f} ml"
        source = prep.image.array
        png = safe_preview(lambda: preview.segmentation_preview(source, seg.mask, caption))
        mask = (out_dir / MASK_FILE, nifti_gz(seg.mask, seg.affine))
        return _with(mask, lambda: result_files(out_dir, doc, png, objects))

    return segmented


def _with(first: Output, make: Callable[[], list[Output]]) -> list[Output]:
    """``first`` and what ``make`` makes, also when the result is incomplete."""
    try:
        return [first, *make()]
    except IncompleteOutputsError as exc:
        exc.outputs.insert(0, first)
        raise


def safe_preview(render: Callable[[], bytes]) -> bytes | None:
    """A preview that cannot be drawn is logged, never a reason to lose the result."""
    try:
        return render()
    except (ValueError, OSError, IndexError) as exc:
        log.warning("preview not drawn: %s", exc)
        return None


def classify(
    job: Job,
    info: InputInfo,
    prep: convert.Preprocessing,
    contract: ModelContract,
    client: TritonClient,
    started: datetime,
) -> Result:
    """One model's result for one input: preprocess, call Triton, decide."""
    x, pre_ms = prep.model_input(contract)
    out = client.infer(contract, x[np.newaxis])
    return make_result(
        job,
        info,
        contract,
        decide(contract, out.probabilities[0]),
        out.model_version,
        started,
        pre_ms,
        out.milliseconds,
    )


def make_result(
    job: Job,
    info: InputInfo,
    contract: ModelContract,
    prediction: Prediction,
    version: str,
    started: datetime,
    pre_ms: float,
    infer_ms: float,
    segmentation: SegmentationInfo | None = None,
) -> Result:
    observe.stage(
        "inferred",
        job=job.id,
        study=info.study_uid or "",
        seconds=(pre_ms + infer_ms) / 1000.0,
        series=info.series_uid or "",
        model=contract.name,
        preprocess_s=round(pre_ms / 1000.0, 3),
        triton_s=round(infer_ms / 1000.0, 3),
    )
    return Result(
        job_id=job.id,
        priority=job.priority,
        input=info,
        model=ModelInfo(name=contract.name, version=version),
        prediction=prediction,
        segmentation=segmentation,
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
