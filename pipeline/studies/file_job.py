"""One job, start to finish: load -> preprocess (MONAI) -> Triton -> result.json.

Plain functions over plain values: no Celery here. Failures come out as ``StageError`` naming
the stage, carrying the original error whose class says whether a retry can help.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import MetaTensor

from pipeline.convert import grouping, series
from pipeline.convert import images as convert
from pipeline.core import observe, routing
from pipeline.core.contract import Activation, InputKind, ModelContract, Task
from pipeline.core.errors import (
    InputError,
    ModelNotFoundError,
    NoModelError,
    PipelineError,
    TransientError,
)
from pipeline.core.fsutil import atomic_write_in_phases, move_into
from pipeline.core.jobs import ENQUEUED_MARKER, REJECTED_OUTPUTS, Job, job_dir, now
from pipeline.core.results import (
    PREVIEW_FILE,
    InputInfo,
    ModelInfo,
    Prediction,
    Result,
    SegmentationInfo,
    Timings,
    WorkerInfo,
)
from pipeline.core.routing import Route, SeriesFacts, dicom_facts
from pipeline.core.settings import Settings
from pipeline.inference.segment import Segmentation, segment, transposed
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs import preview
from pipeline.outputs.dicom import DicomOutputs, make_dicom
from pipeline.outputs.sources import Sources

log = logging.getLogger(__name__)

MASK_FILE = "mask.nii.gz"
RESULT_FILE = "result.json"

# A result file made in memory, to be written complete under its final name.
Output = tuple[Path, bytes]


class StageError(Exception):
    def __init__(self, stage: str, error: PipelineError) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class Models:
    """The served models' contracts, and which of them an input goes to."""

    contracts: dict[str, ModelContract]

    def choose(
        self, routes: tuple[Route, ...], facts: SeriesFacts, image: convert.LoadedImage
    ) -> tuple[Route, list[ModelContract]]:
        """The first matching rule and its models; NoModelError says why no rule matched."""
        route = self.route(routes, facts)
        return route, self.for_route(route, image)

    @staticmethod
    def route(routes: tuple[Route, ...], facts: SeriesFacts) -> Route:
        """The first matching rule; NoModelError says why no rule matched."""
        decision = routing.decide(routes, facts)
        if decision.route is None:
            raise NoModelError(f"no routing rule matches this input ({why_not(decision)})")
        return decision.route

    def for_route(self, route: Route, image: convert.LoadedImage) -> list[ModelContract]:
        chosen = []
        for name in route.models:
            contract = self.contracts.get(name)
            if contract is None:
                raise ModelNotFoundError(
                    f"route {route.name!r} names model {name!r}, which is not in the model "
                    f"repository (models: {', '.join(self.contracts) or 'none'})"
                )
            if image.kind not in contract.accepts or contract.spatial_dims != image.spatial_dims:
                raise InputError(
                    f"route {route.name!r} sends a {image.spatial_dims}D {image.kind} input to "
                    f"{name}, which takes {contract.spatial_dims}D "
                    f"{'/'.join(k.value for k in contract.accepts)}"
                )
            chosen.append(contract)
        return chosen


def series_input(
    group: grouping.SeriesGroup, models: Models, route: Route
) -> tuple[convert.LoadedImage, Sources]:
    """A series as its route's models take it, and its source instances: a volume; or, for one
    image routed to a 2D model (an X-ray, an ultrasound frame, a secondary capture, a single
    slice), that image as a dropped file is read. Such an image need not say where it lies in
    the patient (an X-ray has no ImagePositionPatient), and a 2D model refuses a volume one
    plane thick."""
    contracts = [c for n in route.models if (c := models.contracts.get(n))]
    if group.planes == 1 and any(c.spatial_dims == 2 for c in contracts):
        path = group.paths[0]
        image = convert.load(path)
        sources = _file_sources(pydicom.dcmread(path, stop_before_pixels=True))
        if sources is not None:
            return image, sources
    volume = series.load_series(group.paths)
    array = MetaTensor(volume.array[np.newaxis], affine=volume.affine)
    return convert.LoadedImage(InputKind.DICOM, array), Sources(volume.headers, volume.slices)


def why_not(decision: routing.Decision) -> str:
    """Why no rule matched, rule by rule, in one line."""
    return "; ".join(f"{name}: {', '.join(why)}" for name, why in decision.why_not.items())


def inbox_facts(
    path: Path, image: convert.LoadedImage, header: pydicom.Dataset | None = None
) -> SeriesFacts:
    """Routing facts of an inbox file: its kind and size, and for DICOM its header (read
    here unless the caller has it)."""
    slices = 1 if image.spatial_dims == 2 else int(image.array.shape[-1])
    if image.kind is not InputKind.DICOM:
        return SeriesFacts(kind=image.kind.value, slices=slices)  # type: ignore[arg-type]
    ds = header if header is not None else pydicom.dcmread(path, stop_before_pixels=True)
    return dicom_facts(ds, slices)


def decide(contract: ModelContract, probabilities: np.ndarray) -> Prediction:
    probs = {
        label: round(float(p), 6) for label, p in zip(contract.labels, probabilities, strict=True)
    }
    if contract.activation is Activation.SIGMOID:
        label = contract.labels[1] if probabilities[1] >= contract.threshold else contract.labels[0]
    else:
        label = contract.labels[int(np.argmax(probabilities))]
    return Prediction(label=label, probabilities=probs)


def decide_segmentation(contract: ModelContract, seg: Segmentation) -> Prediction:
    """Positive when a lesion large enough to report was found; the probability is the
    highest foreground probability anywhere."""
    lesion = float(seg.max_probability)
    return Prediction(
        label=contract.labels[1] if seg.lesions else contract.labels[0],
        probabilities={
            contract.labels[0]: round(1.0 - lesion, 6),
            contract.labels[1]: round(lesion, 6),
        },
    )


# Hands a route's DICOM results to its destinations (the worker queues a send task for each).
Dispatch = Callable[[Route, list[Path]], None]


def run_job(
    job: Job,
    settings: Settings,
    models: Models,
    client: TritonClient,
    dispatch: Dispatch | None = None,
) -> list[Path]:
    """Process a spooled job; returns the result files written. Idempotent: a job whose spool
    folder is gone was finished by an earlier delivery and is skipped."""
    folder = job_dir(settings.spool_dir, job.id)
    if not (folder / job.input_file).exists():
        log.info("job %s: already processed, nothing to do", job.id)
        return []
    started = now()
    stage = "load"
    try:
        path = folder / job.input_file
        image = convert.load(path)
        header = None
        if image.kind is InputKind.DICOM:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        route, chosen = models.choose(settings.routes, inbox_facts(path, image, header), image)
        info = InputInfo(
            source=job.source,
            name=job.original_name,
            kind=image.kind.value,
            sha256=_sha256(path),
            shape=[int(s) for s in image.array.shape],
            route=route.name,
        )
        dicom = dicom_outputs(settings, job, route, _file_sources(header), "")
        stage = "infer"
        out_dir = settings.results_dir / job.id
        prep = convert.Preprocessing(image, chosen)
        outputs = [
            o
            for c in chosen
            for o in infer_model(job, info, prep, c, client, started, out_dir / c.name, dicom)()
        ]
        stage = "write"
        written = write_outputs(outputs)
        stage = "dispatch"
        if dispatch is not None:
            dispatch(route, [p for p in written if p.suffix == ".dcm"])
    except PipelineError as exc:
        raise StageError(stage, exc) from exc
    finish_job(folder, settings)
    log.info("job %s: %d result file(s) by %s", job.id, len(written), route.name)
    return written


def dicom_outputs(
    settings: Settings, job: Job, route: Route, sources: Sources | None, series_uid: str
) -> DicomOutputs:
    return DicomOutputs(
        kinds=route.outputs,
        sources=sources,
        key=f"{job.id}/{series_uid}",
        manufacturer=settings.output.manufacturer,
        institution=settings.output.institution_name,
        iod_check=settings.output.iod_check,
        reject_dir=job_dir(settings.spool_dir, job.id) / REJECTED_OUTPUTS,
    )


def _file_sources(header: pydicom.Dataset | None) -> Sources | None:
    """A DICOM file (dropped into the inbox, or one image of a series) is the source its SR
    references."""
    if header is None:
        return None
    uid = str(header.get("SOPInstanceUID", ""))
    if not uid or "StudyInstanceUID" not in header or "SeriesInstanceUID" not in header:
        return None  # nothing to reference: the SR stands alone, as for a PNG
    return Sources({uid: header}, [(uid, None)])


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
    ``out_dir/result.json``, ``preview.png``, the DICOM SR (and for a segmentation model
    ``mask.nii.gz`` and the DICOM SEG) in memory, not yet written (see :func:`write_outputs`),
    so that a study's next model can wait on Triton while this one's outputs are built. The
    DICOM objects are validated there: if one is invalid, nothing of this result is made
    (OutputError). ``prep``: the input's preprocessing, shared by its models."""
    image = prep.image
    if contract.task is not Task.SEGMENTATION:
        doc = classify(job, info, prep, contract, client, started)

        def classified() -> list[Output]:
            label = doc.prediction.label
            png = _preview(
                lambda: preview.classification_preview(
                    image.array, label, doc.prediction.probabilities[label]
                )
            )
            return _finish_model(out_dir, doc, png, make_dicom(doc, contract, None, dicom))

        return classified
    seg = segment(image, contract, client, prep)
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
        objects = make_dicom(doc, contract, seg.lesion_map, dicom)
        caption = f"{len(seg.lesions)} lesion(s), {total:.2f} ml"
        png = _preview(lambda: preview.segmentation_preview(image.array, seg.mask, caption))
        mask = (out_dir / MASK_FILE, _nifti_gz(seg.mask, seg.affine))
        return [mask, *_finish_model(out_dir, doc, png, objects)]

    return segmented


def _preview(render: Callable[[], bytes]) -> bytes | None:
    """A preview that cannot be drawn is logged, never a reason to lose the result."""
    try:
        return render()
    except (ValueError, OSError, IndexError) as exc:
        log.warning("preview not drawn: %s", exc)
        return None


def _finish_model(
    out_dir: Path, doc: Result, png: bytes | None, objects: dict[str, bytes]
) -> list[Output]:
    """result.json last: its presence says the rest is there."""
    made = [(out_dir / name, data) for name, data in objects.items()]
    doc = doc.model_copy(update={"dicom": list(objects)})
    if png is not None:
        made.append((out_dir / PREVIEW_FILE, png))
        doc = doc.model_copy(update={"preview": PREVIEW_FILE})
    return [*made, (out_dir / RESULT_FILE, (doc.model_dump_json(indent=2) + "\n").encode())]


def write_outputs(outputs: list[Output], last: Output | None = None) -> list[Path]:
    """Each file complete (temporary name, fsync, rename), the result.json files only once the
    files they describe are on disk, and ``last`` (a study's study.json) after them all."""
    results = [o for o in outputs if o[0].name == RESULT_FILE]
    others = [o for o in outputs if o[0].name != RESULT_FILE]
    after = [last] if last is not None else []
    try:
        atomic_write_in_phases([others, results, after])
    except OSError as exc:  # disk full or unwritable: nothing partial was left; retry later
        raise TransientError(f"cannot write the results: {exc}") from exc
    return [path for path, _ in [*outputs, *after]]


def _nifti_gz(mask: np.ndarray, affine: np.ndarray) -> bytes:
    # NIfTI stores voxels in Fortran order: nibabel would reorder the C-ordered mask a plane at
    # a time (0.15 s for a 200-slice CT); the transpose of a sparse mask takes 0.02 s.
    image = nib.Nifti1Image(transposed(mask, np.uint8).T, affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6)


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


def finish_job(folder: Path, settings: Settings) -> None:
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
