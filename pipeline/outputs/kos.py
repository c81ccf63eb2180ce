"""A result's Key Object Selection (KOS), built with highdicom: the source slices through each
lesion and the objects made from them (SR, SEG, key images, presentation state, report),
flagged "Of Interest" for the viewers and worklists that list a study's key images, in a new
series of the source study."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.core.contract import ModelContract
from pipeline.core.results import Result
from pipeline.outputs.sources import Sources, conformant_header, result_uid
from pipeline.outputs.sr import device_observer

KOS_SERIES_NUMBER = 9902  # after the SR's 9901: viewers sort a study's series by number


def key_planes(lesion_map: np.ndarray) -> list[int]:
    """For each lesion of a map (1-based, largest first), the plane (its last axis) where the
    lesion's cross-section is largest: the slice a reader would look at."""
    flat = np.flatnonzero(lesion_map)
    if flat.size == 0:
        return []
    numbers = lesion_map.reshape(-1)[flat].astype(np.int64)
    planes = flat % lesion_map.shape[-1]
    areas = np.zeros((int(numbers.max()) + 1, lesion_map.shape[-1]), np.int64)
    np.add.at(areas, (numbers, planes), 1)
    return [int(np.argmax(row)) for row in areas[1:]]


def build_kos(
    sources: Sources,
    lesion_map: np.ndarray | None,
    made: list[Dataset],
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
) -> Dataset:
    """The key slices (one per lesion, largest lesion first; none for a classifier) and
    ``made`` (the result's other objects), selected by the model as the observing device."""
    planes = key_planes(lesion_map) if lesion_map is not None else []
    slices = dict.fromkeys(sources.slices[p][0] for p in planes)  # in order, each once
    images = [sources.headers[uid] for uid in slices]
    referenced = [*images, *made]
    if not referenced:
        raise ValueError("nothing to select: no key slice and no object made")
    lesions = len(planes)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        observer_device_context=device_observer(result, contract, manufacturer),
        description=(
            f"AI {contract.name}: the slice through each of {lesions} lesion(s), and the results"
            if lesions
            else f"AI {contract.name}: the results"
        ),
    )
    first, *rest = sources.headers.values()
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[conformant_header(first), *rest, *made],
        content=content,
        series_instance_uid=result_uid(key, "kos-series"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "kos"),
        instance_number=1,
        manufacturer=manufacturer,
    )
