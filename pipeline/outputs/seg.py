"""A segmentation result as a DICOM Segmentation (SEG), built with highdicom: one segment per
lesion, frames on the source slices, in a new series of the source study."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline import __version__
from pipeline.core.contract import ModelContract
from pipeline.core.errors import OutputError
from pipeline.core.results import Result
from pipeline.inference.segment import transposed
from pipeline.outputs.sources import Sources, coded, conformant_header, result_uid

SEG_SERIES_NUMBER = 9801


def build_seg(
    sources: Sources,
    lesion_map: np.ndarray,
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
) -> Dataset:
    """One segment per lesion (numbered as in result.json), frames on the source slices.

    ``lesion_map`` is on the volume's voxels, (column, row, plane) as the volume is."""
    count = int(lesion_map.max())
    if count == 0:
        raise ValueError("no lesion: nothing to segment")
    images, frames = _on_sources(sources, lesion_map, count)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=contract.name,
        family=codes.DCM.ArtificialIntelligence,
        version=result.model.version or "1",
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"Lesion {i}",
            segmented_property_category=coded(contract.codes.segment_category),
            segmented_property_type=coded(contract.codes.segment_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=result_uid(key, "lesion", str(i)),
            tracking_id=f"Lesion {i}",
        )
        for i in range(1, count + 1)
    ]
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=result_uid(key, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "seg"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=contract.name[:64],
        software_versions=__version__,
        device_serial_number=result.model.version or "1",
        series_description=f"AI {contract.name}"[:64],
        content_label="LESIONS",
        content_description=f"{contract.name} lesions"[:64],
    )


def _on_sources(
    sources: Sources, lesion_map: np.ndarray, count: int
) -> tuple[list[Dataset], np.ndarray]:
    """The source images the SEG's frames lie on, and the frames in their order."""
    # (plane, row, column), in the smallest type that holds the lesion numbers
    frames = transposed(lesion_map, np.uint8 if count < 256 else np.uint16)
    instances = list(dict.fromkeys(uid for uid, _ in sources.slices))
    if all(frame is None for _, frame in sources.slices):
        images = [sources.headers[uid] for uid, _ in sources.slices]  # one per plane, in order
    elif len(instances) == 1:  # one multi-frame instance: frames in its own frame order
        images = [sources.headers[instances[0]]]
        by_frame = np.empty_like(frames)
        for plane, (_, frame) in enumerate(sources.slices):
            by_frame[frame or 0] = frames[plane]
        frames = by_frame
    else:
        raise OutputError("a SEG over several multi-frame instances is not supported")
    images[0] = conformant_header(images[0])
    return images, frames
