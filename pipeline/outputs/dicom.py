"""A result's DICOM objects, made and validated before anything is written: the SEG
(:mod:`pipeline.outputs.seg`) and the SR (:mod:`pipeline.outputs.sr`) that references it. An
object failing validation is kept with the failed item and nothing of it reaches results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from pipeline.core.contract import ModelContract
from pipeline.core.errors import OutputError
from pipeline.core.results import Result
from pipeline.outputs.seg import build_seg
from pipeline.outputs.sources import Sources
from pipeline.outputs.sr import build_sr
from pipeline.outputs.validation import IodCheck, encode_checked

SR_FILE = "sr.dcm"


SEG_FILE = "seg.dcm"


@dataclass(frozen=True)
class DicomOutputs:
    """What DICOM to make for one result, from what, and where a failing object is kept."""

    kinds: tuple[str, ...]  # the route's outputs: "sr", "seg"
    sources: Sources | None  # None for a PNG or NIfTI input
    key: str  # job and series: with the model, the seed of the objects' UIDs
    manufacturer: str
    institution: str | None
    iod_check: IodCheck
    reject_dir: Path  # in the job's folder, so it moves to data/failed/ with the job


def make_dicom(
    result: Result, contract: ModelContract, lesion_map: np.ndarray | None, out: DicomOutputs
) -> dict[str, bytes]:
    """The validated SR (and SEG) of a result, by file name. An object that fails validation
    is kept in ``out.reject_dir`` and the OutputError names it; nothing goes to results."""
    files: dict[str, bytes] = {}
    key = f"{out.key}/{contract.name}"
    seg = None
    # No lesion, no segment: the SR alone says "absent".
    if "seg" in out.kinds and out.sources and lesion_map is not None and lesion_map.any():
        sources, labels = out.sources, lesion_map
        seg = _built(
            SEG_FILE,
            lambda: build_seg(sources, labels, contract, result, out.manufacturer, key),
        )
        files[SEG_FILE] = _checked(seg, SEG_FILE, SegmentationStorage, out)
    if "sr" in out.kinds:
        sr = _built(
            SR_FILE,
            lambda: build_sr(
                result, contract, out.sources, seg, out.manufacturer, key, out.institution
            ),
        )
        files[SR_FILE] = _checked(sr, SR_FILE, Comprehensive3DSRStorage, out)
    return files


def _built(name: str, build: Callable[[], Dataset]) -> Dataset:
    try:
        return build()
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom refuses what would be invalid (a source value out of its VR, say).
        raise OutputError(f"{name} cannot be built: {exc}") from exc


def _checked(ds: Dataset, name: str, sop_class: str, out: DicomOutputs) -> bytes:
    try:
        return encode_checked(ds, sop_class, out.iod_check)
    except OutputError as exc:
        where = f"; kept as {out.reject_dir.name}/{name} in the failed item"
        try:
            out.reject_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(out.reject_dir / name, enforce_file_format=True)
        except (OSError, ValueError, TypeError, AttributeError):
            where = ""  # the reason is what matters; the object could not even be kept
        raise OutputError(f"{name} {exc}{where}") from None
