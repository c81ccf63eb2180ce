"""A series its rule takes image by image (``per_image: true``): radiograph and mammography
views, secondary captures and, where a rule lets multi-frame objects in, each frame of a cine
loop. Each image is read as a dropped file is (it need not say where it lies in the patient),
goes to each of the rule's models on its own, and is dropped: memory holds one image and the
preview's thumbnails, however long the series. One result per model and series lists every
image's answer in instance order (``images``), with the series' answer drawn from theirs
(:func:`pipeline.inference.decide.decide_series`). An image that cannot be read does not cost
the others their answers: theirs are written, then the series fails naming it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from monai.data import MetaTensor
from pydicom.dataset import Dataset

from pipeline.convert import grouping
from pipeline.convert import images as convert
from pipeline.core import observe
from pipeline.core.contract import ModelContract, Task
from pipeline.core.errors import InputError
from pipeline.core.jobs import Job
from pipeline.core.results import ImageAnswer, InputInfo, Result
from pipeline.core.routing import Route
from pipeline.core.settings import Settings
from pipeline.inference.decide import decide, decide_series
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs import preview
from pipeline.outputs.dicom import DicomOutputs, make_dicom
from pipeline.outputs.files import IncompleteOutputsError, Output, gathered, result_files
from pipeline.outputs.sources import Sources
from pipeline.studies.model_run import make_result, safe_preview
from pipeline.studies.models import Models
from pipeline.studies.steps import dicom_outputs


@dataclass
class _Answers:
    """One model's answers so far, and the time they took."""

    contract: ModelContract
    images: list[ImageAnswer] = field(default_factory=list)
    version: str = ""
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0


@dataclass
class _Run:
    """What the images gave: each model's answers, the sources the SR references, a
    thumbnail per image, and the images that could not be read."""

    answers: list[_Answers] = field(default_factory=list)
    headers: dict[str, Dataset] = field(default_factory=dict)
    slices: list[tuple[str, int | None]] = field(default_factory=list)
    thumbnails: list[np.ndarray] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    load_s: float = 0.0


def image_results(
    job: Job,
    group: grouping.SeriesGroup,
    route: Route,
    settings: Settings,
    models: Models,
    client: TritonClient,
    started: datetime,
) -> list[Output]:
    """Each image of ``group`` to each of ``route``'s models; one result per model.
    IncompleteOutputsError, carrying the results, when an image could not be read (or a DICOM
    object had errors of our own); InputError when no image could."""
    assert job.study is not None
    run = _Run()
    for path, header in _in_instance_order(group.paths, run):
        _each_image(path, header, route, models, client, run)
    study = job.study.study_uid
    observe.stage("loaded", job=job.id, study=study, seconds=run.load_s, series=group.uid)
    if not run.slices:
        raise InputError("no image of the series could be read: " + "; ".join(run.unread))
    info = InputInfo(
        source="dicom",
        name=f"{study}/{group.uid}",
        kind="dicom",
        sha256=None,
        shape=run.answers[0].images[0].shape,
        study_uid=study,
        series_uid=group.uid,
        route=route.name,
    )
    dicom = dicom_outputs(settings, job, route, Sources(run.headers, run.slices), group.uid)
    out_dir = settings.results_dir / study
    make = partial(_result, job, info, run, started, dicom)
    outputs = gathered(partial(make, a, out_dir / a.contract.name / group.uid) for a in run.answers)
    if run.unread:
        raise IncompleteOutputsError("; ".join(run.unread), outputs)
    return outputs


def _in_instance_order(paths: list[Path], run: _Run) -> list[tuple[Path, Dataset]]:
    """The series' files by InstanceNumber (then SOP Instance UID), as the views are
    numbered; a file whose header cannot be read is named in ``run.unread``."""
    keyed = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
            run.unread.append(f"{path.name}: not readable DICOM: {exc}")
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        run.headers[uid] = ds
        keyed.append((_number(ds) or 0, uid, path, ds))
    keyed.sort(key=lambda k: k[:3])
    return [(path, ds) for *_, path, ds in keyed]


def _each_image(
    path: Path, header: Dataset, route: Route, models: Models, client: TritonClient, run: _Run
) -> None:
    """One object's images (its frames) through every model; an unreadable one recorded."""
    loading = time.perf_counter()
    try:
        loaded = convert.load(path)
    except (InputError, OSError) as exc:
        run.unread.append(f"instance {path.stem}: {exc}")
        return
    finally:
        run.load_s += time.perf_counter() - loading
    uid = str(header.get("SOPInstanceUID", ""))
    for frame, image in image_frames(loaded):
        if not run.answers:
            run.answers = [_Answers(c) for c in _classifiers(route, models, image)]
        prep = convert.Preprocessing(image, [a.contract for a in run.answers])
        for answers in run.answers:
            x, pre_ms = prep.model_input(answers.contract)
            out = client.infer(answers.contract, x[np.newaxis])
            answers.images.append(
                ImageAnswer(
                    sop_instance_uid=uid,
                    frame=None if frame is None else frame + 1,
                    instance_number=_number(header),
                    shape=[int(s) for s in image.array.shape],
                    prediction=decide(answers.contract, out.probabilities[0]),
                )
            )
            answers.version = out.model_version
            answers.preprocess_ms += pre_ms
            answers.inference_ms += out.milliseconds
        run.slices.append((uid, frame))
        run.thumbnails.append(preview.thumbnail(image.array))


def image_frames(loaded: convert.LoadedImage) -> Iterator[tuple[int | None, convert.LoadedImage]]:
    """A single-frame image as it is (frame None); a multi-frame object's frames, each as a
    2D image (0-based)."""
    if loaded.spatial_dims == 2:
        yield None, loaded
        return
    planes = np.asarray(loaded.array[0])  # (columns, rows, frames), as a volume is loaded
    for k in range(planes.shape[-1]):
        plane = np.ascontiguousarray(planes[:, :, k].T)[np.newaxis]
        yield k, convert.LoadedImage(loaded.kind, MetaTensor(plane))


def _classifiers(route: Route, models: Models, image: convert.LoadedImage) -> list[ModelContract]:
    """The route's models, which must take a 2D image and answer for it as a whole."""
    contracts = models.for_route(route, image)
    for c in contracts:
        if c.task is not Task.CLASSIFICATION:
            raise InputError(
                f"route {route.name!r} takes its series image by image (per_image), and "
                f"{c.name} is a {c.task.value} model: per_image routes take classifiers"
            )
    return contracts


def _result(
    job: Job,
    info: InputInfo,
    run: _Run,
    started: datetime,
    dicom: DicomOutputs,
    answers: _Answers,
    out_dir: Path,
) -> list[Output]:
    """One model's result for the series, its preview and its SR."""
    contract = answers.contract
    series = decide_series(contract, [a.prediction for a in answers.images])
    doc: Result = make_result(
        job,
        info,
        contract,
        series,
        answers.version,
        started,
        answers.preprocess_ms,
        answers.inference_ms,
    ).model_copy(update={"images": answers.images})
    tiles = [(t, _caption(a)) for t, a in zip(run.thumbnails, answers.images, strict=True)]
    png = safe_preview(lambda: preview.images_preview(tiles))
    return result_files(out_dir, doc, png, make_dicom(doc, contract, None, dicom))


def _caption(answer: ImageAnswer) -> str:
    label = answer.prediction.label
    number = answer.instance_number if answer.instance_number is not None else "?"
    frame = f".{answer.frame}" if answer.frame is not None else ""
    return f"#{number}{frame} {label} p={answer.prediction.probabilities[label]:.2f}"


def _number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
