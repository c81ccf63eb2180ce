"""`infer`: each file or series converted, sent to its route's models on Triton and answered
in one line each, as the worker would process it but without the queue or result files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.convert import grouping
from pipeline.convert import images as convert
from pipeline.convert.grouping import SeriesGroup
from pipeline.convert.images import LoadedImage
from pipeline.core.contract import ModelContract, Task
from pipeline.core.errors import PipelineError
from pipeline.core.filekinds import why_extra
from pipeline.core.instances import file_identity
from pipeline.core.routing import Route
from pipeline.core.settings import Settings
from pipeline.inference.decide import decide, decide_segmentation
from pipeline.inference.segment import segment
from pipeline.inference.triton_client import TritonClient
from pipeline.studies.inputs import inbox_facts, series_input
from pipeline.studies.models import Models
from pipeline.studies.per_image import image_frames


def infer_lines(
    settings: Settings,
    paths: list[Path],
    extras: list[Path],
    models: Models,
    client: TritonClient,
) -> Iterator[dict[str, object]]:
    """A line per answer, per file or series skipped (with why) and per error: DICOM files are
    gathered into series, as the pipeline does; a medium's other files are said skipped."""
    dicom = {p for p in paths if p.is_file() and file_identity(p) is not None}
    singles = [p for p in paths if p not in dicom]
    groups, not_images = grouping.group_series(sorted(dicom))
    units: list[SeriesGroup | Path] = [*groups, *singles]
    for unit in units:
        yield from _infer_unit(unit, settings, models, client)
    for skipped in not_images:
        yield {"file": skipped.name, "skipped": skipped.reason}
    for extra in extras:
        yield {"file": str(extra), "skipped": why_extra(extra)}


def _infer_unit(
    unit: SeriesGroup | Path, settings: Settings, models: Models, client: TritonClient
) -> Iterator[dict[str, object]]:
    """``infer``'s lines for one series or file: an answer per model, or why there is none."""
    where: dict[str, object] = (
        {"file": str(unit)}
        if isinstance(unit, Path)
        else {"series": unit.uid, "planes": unit.planes, "files": len(unit.paths)}
    )
    try:
        if isinstance(unit, Path):
            image = convert.load(unit)
            route, chosen = models.choose(settings.routes, inbox_facts(unit, image), image)
        else:
            route = models.route(settings.routes, unit.facts())
            if route.per_image:
                yield from _each_image(unit, route, models, client, where)
                return
            image, _ = series_input(unit, models, route)
            chosen = models.for_route(route, image)
        for line in _answers(image, chosen, client):
            yield {**where, "route": route.name, **line}
    except convert.NotAnImageError as exc:
        yield {**where, "skipped": str(exc)}
    except (PipelineError, OSError) as exc:
        yield {**where, "error": f"{type(exc).__name__}: {exc}"}


def _each_image(
    unit: SeriesGroup,
    route: Route,
    models: Models,
    client: TritonClient,
    where: dict[str, object],
) -> Iterator[dict[str, object]]:
    """A series its rule takes image by image: each image's (each frame's) answers, or why
    an image has none."""
    for path in unit.paths:
        at = {**where, "route": route.name, "instance": path.name}
        try:
            for frame, image in image_frames(convert.load(path)):
                shown = at if frame is None else {**at, "frame": frame + 1}
                for line in _answers(image, models.for_route(route, image), client):
                    yield {**shown, **line}
        except (PipelineError, OSError) as exc:
            yield {**at, "error": f"{type(exc).__name__}: {exc}"}


def _answers(
    image: LoadedImage, chosen: list[ModelContract], client: TritonClient
) -> Iterator[dict[str, object]]:
    """Each chosen model's answer for ``image``, as ``infer`` prints it."""
    prep = convert.Preprocessing(image, chosen)
    for c in chosen:
        found: dict[str, object] = {}
        if c.task is Task.SEGMENTATION:  # the worker's sliding window
            seg = segment(image, c, client, prep)
            pred, ms = decide_segmentation(c, seg), seg.inference_ms
            found = {"lesions": len(seg.lesions), "total_volume_ml": seg.total_volume_ml}
        else:
            out = client.infer(c, prep.model_input(c)[0][np.newaxis])
            pred, ms = decide(c, out.probabilities[0]), out.milliseconds
        yield {
            "model": c.name,
            "label": pred.label,
            "probabilities": pred.probabilities,
            **found,
            "inference_ms": round(ms, 1),
        }
