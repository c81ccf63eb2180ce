"""The key object selection (route output ``kos``): a lesion CT's slice through each lesion
and the result's SR and SEG, flagged "Of Interest", valid, filed in the source study."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import read_job
from pipeline.core.routing import DEFAULT_ROUTES
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.kos import key_planes
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, spool_study

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
IOD_CHECK = "dciodvfy" if shutil.which("dciodvfy") else "strict-read"


def _selected(kos: Dataset) -> list[str]:
    """The SOP Instance UIDs the document selects, in its order."""
    return [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    ]


def test_a_lesion_ct_gets_its_key_slices_and_results_flagged(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 612, lesions=2)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    slice_of = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): k
        for k, p in enumerate(sorted((tmp_path / "ct").iterdir()))
    }
    routes = [
        r.model_copy(update={"outputs": ("json", "sr", "seg", "kos")})
        if r.name == "ct-volume"
        else r
        for r in DEFAULT_ROUTES
    ]
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": IOD_CHECK},  # every object validated before it is written
        routes=routes,
    )
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    client = new_client(triton.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(MODEL_REPOSITORY)), client)

    source = dcmread(next((tmp_path / "ct").iterdir()), stop_before_pixels=True)
    series = settings.results_dir / source.StudyInstanceUID
    folder = series / "ct_lesion_segmentation" / source.SeriesInstanceUID
    kos = dcmread(folder / "kos.dcm")
    assert kos.SOPClassUID == KOS_CLASS
    assert kos.StudyInstanceUID == source.StudyInstanceUID
    assert kos.SeriesInstanceUID != source.SeriesInstanceUID and kos.SeriesNumber == 9902
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    selected = _selected(kos)
    sr, seg = dcmread(folder / "sr.dcm"), dcmread(folder / "seg.dcm")
    assert selected[-2:] == [str(sr.SOPInstanceUID), str(seg.SOPInstanceUID)]
    result = json.loads((folder / "result.json").read_text())
    assert "kos.dcm" in result["dicom"] and result["dicom_issues"] == []
    # One slice per lesion, each through that lesion of the phantom's truth.
    images = [slice_of[uid] for uid in selected[:-2]]
    assert len(images) == 2
    lesion_planes = [set(np.flatnonzero(part.any(axis=(0, 1)))) for part in _lesions(truth)]
    assert all(any(k in planes for planes in lesion_planes) for k in images)
    assert {frozenset(p) for p in lesion_planes if any(k in p for k in images)} == {
        frozenset(p) for p in lesion_planes
    }

    # The classifier's KOS flags its SR: no lesion, no key slice.
    folder = series / "ct_covid_classifier" / source.SeriesInstanceUID
    kos = dcmread(folder / "kos.dcm")
    assert _selected(kos) == [str(dcmread(folder / "sr.dcm").SOPInstanceUID)]


def _lesions(truth: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, count = ndimage.label(truth > 0, structure=np.ones((3, 3, 3), bool))
    return [labels == i for i in range(1, count + 1)]


def test_the_key_plane_is_each_lesions_widest() -> None:
    lesion_map = np.zeros((20, 20, 10), np.uint16)
    lesion_map[2:8, 2:8, 3] = 1  # lesion 1: widest on plane 3
    lesion_map[3:5, 3:5, 4] = 1
    lesion_map[12:14, 12:14, 7:9] = 2
    lesion_map[11:15, 11:15, 8] = 2  # lesion 2: widest on plane 8
    assert key_planes(lesion_map) == [3, 8]
    assert key_planes(np.zeros((4, 4, 4), np.uint16)) == []
