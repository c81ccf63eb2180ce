"""What a job's models are given: a series as its route's models take it (a volume, or one
image for a 2D model), a dropped file's routing facts, and the source instances its DICOM
results reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from monai.data import MetaTensor

from pipeline.convert import grouping, series
from pipeline.convert import images as convert
from pipeline.core.contract import InputKind
from pipeline.core.routing import Route, SeriesFacts, dicom_facts
from pipeline.outputs.sources import Sources
from pipeline.studies.models import Models


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
        sources = file_sources(pydicom.dcmread(path, stop_before_pixels=True))
        if sources is not None:
            return image, sources
    volume = series.load_series(group.paths)
    array = MetaTensor(volume.array[np.newaxis], affine=volume.affine)
    return convert.LoadedImage(InputKind.DICOM, array), Sources(volume.headers, volume.slices)


def inbox_facts(
    path: Path, image: convert.LoadedImage, header: pydicom.Dataset | None = None
) -> SeriesFacts:
    """Routing facts of an inbox file: its kind and size, and for DICOM its header (read
    here unless the caller has it)."""
    slices = 1 if image.spatial_dims == 2 else int(image.array.shape[-1])
    if image.kind is not InputKind.DICOM:
        kind = image.kind.value
        return SeriesFacts(kind=kind, slices=slices, volume=slices > 1)  # type: ignore[arg-type]
    ds = header if header is not None else pydicom.dcmread(path, stop_before_pixels=True)
    return dicom_facts(ds)


def file_sources(header: pydicom.Dataset | None) -> Sources | None:
    """A DICOM file (dropped into the inbox, or one image of a series) is the source its SR
    references."""
    if header is None:
        return None
    uid = str(header.get("SOPInstanceUID", ""))
    if not uid or "StudyInstanceUID" not in header or "SeriesInstanceUID" not in header:
        return None  # nothing to reference: the SR stands alone, as for a PNG
    return Sources({uid: header}, [(uid, None)])
