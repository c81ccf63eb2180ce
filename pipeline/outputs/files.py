"""Result files made in memory and written complete: each under a temporary name, fsynced,
renamed; a result.json only once the files it describes are on disk, a study.json last."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.core.errors import OutputError, TransientError
from pipeline.core.fsutil import atomic_write_in_phases
from pipeline.core.results import PREVIEW_FILE, Result
from pipeline.inference.segment import transposed
from pipeline.outputs.dicom import REPORT_FILE, DicomMade

MASK_FILE = "mask.nii.gz"
RESULT_FILE = "result.json"

# A result file made in memory, to be written complete under its final name.
Output = tuple[Path, bytes]


class IncompleteOutputsError(OutputError):
    """A result was made, but one of its DICOM objects failed validation with errors of our
    own and was withheld: ``outputs`` (result.json included) are written, then the item
    fails with this error."""

    def __init__(self, message: str, outputs: list[Output]) -> None:
        super().__init__(message)
        self.outputs = outputs


def gathered(makers: Iterable[Callable[[], list[Output]]]) -> list[Output]:
    """Every maker's outputs, in order; IncompleteOutputsError with them all when one had a
    DICOM object withheld for errors of our own."""
    outputs: list[Output] = []
    own = []
    for make in makers:
        try:
            outputs += make()
        except IncompleteOutputsError as exc:
            outputs += exc.outputs
            own.append(str(exc))
    if own:
        raise IncompleteOutputsError("; ".join(own), outputs)
    return outputs


def result_files(
    out_dir: Path, doc: Result, png: bytes | None, dicom: DicomMade | None = None
) -> list[Output]:
    """result.json last: its presence says the rest is there. IncompleteOutputsError, carrying
    them, when a DICOM object has errors of our own."""
    dicom = dicom or DicomMade()
    png = dicom.key_image or png  # a key image says more than the plain preview
    made = [(out_dir / name, data) for name, data in [*dicom.files.items(), *dicom.other.items()]]
    doc = doc.model_copy(update={"dicom": list(dicom.files), "dicom_issues": dicom.issues})
    if REPORT_FILE in dicom.other:
        doc = doc.model_copy(update={"report": REPORT_FILE})
    if png is not None:
        made.append((out_dir / PREVIEW_FILE, png))
        doc = doc.model_copy(update={"preview": PREVIEW_FILE})
    made.append((out_dir / RESULT_FILE, (doc.model_dump_json(indent=2) + "\n").encode()))
    if (own := dicom.own_errors) is not None:
        raise IncompleteOutputsError(own, made)
    return made


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


def nifti_gz(mask: np.ndarray, affine: np.ndarray) -> bytes:
    # NIfTI stores voxels in Fortran order: nibabel would reorder the C-ordered mask a plane at
    # a time (0.15 s for a 200-slice CT); the transpose of a sparse mask takes 0.02 s.
    image = nib.Nifti1Image(transposed(mask, np.uint8).T, affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6)
