"""A result's key images as DICOM Secondary Capture, built with highdicom: RGB images with the
findings drawn in (:mod:`pipeline.outputs.keyimages`), in a new series of the source study,
each referencing the source slice it shows. Every viewer shows them, as it shows any image."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from pipeline import __version__
from pipeline.core.contract import ModelContract
from pipeline.core.results import Result
from pipeline.outputs import keyimages
from pipeline.outputs.keyimages import KeyView
from pipeline.outputs.kos import key_planes
from pipeline.outputs.sources import Sources, conformant_header, result_uid, same_body_part

SC_SERIES_NUMBER = 9903  # after the SR's 9901 and the KOS's 9902


def key_views(
    image: np.ndarray,
    lesion_map: np.ndarray | None,
    sources: Sources,
    contract: ModelContract,
    result: Result,
    demo: bool,
    most: int,
) -> list[KeyView]:
    """A segmentation's key images (one per lesion, largest first, at most ``most``); a
    classification's one image, the middle slice of a volume. ``image``: the channel-first
    input as loaded, on the source's pixels."""
    lines = keyimages.banner(contract, result, demo)
    if lesion_map is None:
        plane = len(sources.slices) // 2
        header = sources.headers[sources.slices[plane][0]]
        values = keyimages.source_plane(image, plane if image.ndim == 4 else None)
        rgb = keyimages.classification_view(
            values, keyimages.window(header, contract), _inverted(header), result, lines, demo
        )
        return [KeyView(plane, rgb, f"{result.prediction.label}")]
    volumes = keyimages.volumes_ml(result)
    views = []
    for number, plane in enumerate(key_planes(lesion_map)[:most], start=1):
        header = sources.headers[sources.slices[plane][0]]
        rgb = keyimages.lesion_view(
            keyimages.source_plane(image, plane),
            keyimages.window(header, contract),
            _inverted(header),
            np.ascontiguousarray(lesion_map[:, :, plane].T),
            volumes,
            lines,
            demo,
        )
        views.append(KeyView(plane, rgb, f"Lesion {number}: {volumes[number - 1]:.2f} ml"))
    return views


def _inverted(header: Dataset) -> bool:
    return str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1"


def build_sc(
    sources: Sources,
    view: KeyView,
    number: int,
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
) -> Dataset:
    """Key image ``number`` (1-based) of a result, on its source slice's pixel grid."""
    uid, frame = sources.slices[view.plane]
    source = sources.headers[uid]
    spacing = source.get("PixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=conformant_header(source),
        pixel_array=view.rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(key, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "sc", str(number)),
        instance_number=number,
        manufacturer=manufacturer,
        # highdicom annotates the spacing as ints; it is written as DS, decimals kept
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        patient_orientation=orientation(source),
        series_description=f"AI {contract.name} key images"[:64],
        manufacturer_model_name=contract.name[:64],
        software_versions=__version__,
        transfer_syntax_uid=ExplicitVRLittleEndian,  # as every object of ours
    )
    sc.BurnedInAnnotation = "YES"
    same_body_part(sc, source)
    made_by = f"{contract.name} {result.model.version}"
    sc.DerivationDescription = f"{view.title}; drawn by {made_by}"[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = uid
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    sc.SourceImageSequence = DicomSequence([item])
    return sc


_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS)


def orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column direction) from the source's Image Orientation
    (Patient): ``("L", "P")`` for an axial slice as CT scanners write it."""
    cosines = header.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return ("L", "P")  # what an axial series without the attribute means in practice
    directions = []
    for vector in (cosines[:3], cosines[3:]):
        values = [float(v) for v in vector]
        parts = sorted(range(3), key=lambda i: -abs(values[i]))
        letters = [_AXES[i][0 if values[i] > 0 else 1] for i in parts if abs(values[i]) > 0.25]
        directions.append("".join(letters) or "L")
    return directions[0], directions[1]
