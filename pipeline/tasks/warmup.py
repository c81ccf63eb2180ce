"""A fresh worker process's first-use costs, paid before the first study instead of by it.

In a new process the first CT study took 0.4 to 1.4 s longer than the next: highdicom reads
its tables of the standard on first use (0.4 s of JSON), and MONAI, scipy and torch pay their
first calls. The worker's main process therefore runs, before it forks its pool processes
(which inherit what it loaded), the steps of a study without Triton on a small synthetic CT
series (8 slices of 32x32, made here): loading, each 3D model's preprocessing, lesion
labelling, the SR and SEG built and checked. Nothing is written outside a temporary folder,
nothing is sent, nothing is counted in the metrics.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from monai.data import MetaTensor

from pipeline.convert import series
from pipeline.convert.images import LoadedImage, Preprocessing
from pipeline.core.contract import InputKind, ModelContract, Task
from pipeline.core.results import (
    InputInfo,
    ModelInfo,
    Prediction,
    Result,
    SegmentationInfo,
    Timings,
    WorkerInfo,
)
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.inference.segment import label_lesions
from pipeline.outputs.dicom import DicomOutputs, make_dicom
from pipeline.outputs.sources import Sources
from pipeline.outputs.validation import IodCheck


def warm_up(contracts: Iterable[ModelContract], iod_check: IodCheck) -> float:
    """Runs the steps once on a synthetic series; returns the seconds it took. A failure is
    the caller's to log: the first study then pays as before."""
    t0 = time.perf_counter()
    chosen = [c for c in contracts if c.spatial_dims == 3 and InputKind.DICOM in c.accepts]
    with tempfile.TemporaryDirectory(prefix="warm-up-") as tmp:
        folder = Path(tmp)
        write_series(folder / "series", new_series(slices=8, rows=32, cols=32), seed=0)
        volume = series.load_series(sorted((folder / "series").iterdir()))
        array = MetaTensor(volume.array[np.newaxis], affine=volume.affine)
        prep = Preprocessing(LoadedImage(InputKind.DICOM, array), chosen)
        dicom = DicomOutputs(
            kinds=("sr", "seg", "sc", "gsps", "kos", "pdf"),  # each builder's first use
            sources=Sources(volume.headers, volume.slices),
            key="warm-up",
            manufacturer="warm-up",
            institution=None,
            iod_check=iod_check,
            reject_dir=folder / "rejected",
        )
        for contract in chosen:
            lesion_map, found = None, None
            if contract.task is Task.SEGMENTATION:
                prep.spatial(contract)
                mask = np.zeros(volume.array.shape, np.uint8)
                mask[2:6, 2:6, 2:6] = 1
                lesion_map, lesions = label_lesions(mask, volume.affine)
                found = SegmentationInfo(
                    mask="mask.nii.gz",
                    labels={name: i for i, name in enumerate(contract.labels)},
                    lesions=lesions,
                    total_volume_ml=sum(x.volume_ml for x in lesions),
                    patches=1,
                )
            else:
                prep.model_input(contract)
            result = _result(contract, found, list(array.shape))
            make_dicom(result, contract, lesion_map, dicom, array)
    return time.perf_counter() - t0


def _result(contract: ModelContract, found: SegmentationInfo | None, shape: list[int]) -> Result:
    at = datetime.now(UTC)
    label = contract.labels[-1]
    return Result(
        job_id="warm-up",
        input=InputInfo(source="dicom", name="warm-up", kind="dicom", sha256=None, shape=shape),
        model=ModelInfo(name=contract.name, version="1"),
        prediction=Prediction(label=label, probabilities={n: 0.5 for n in contract.labels}),
        segmentation=found,
        timings=Timings(
            received=at, queued=at, started=at, finished=at, preprocess_ms=0, inference_ms=0
        ),
        worker=WorkerInfo(host=socket.gethostname(), pid=os.getpid()),
    )
