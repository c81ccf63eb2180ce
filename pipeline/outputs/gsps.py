"""A result as a Grayscale Softcopy Presentation State (GSPS), built with highdicom: the source
slices themselves, shown through the model's input window, with each lesion's outline drawn
as a polyline on every slice it crosses and labelled with its number and volume (a
classification: its answer as text on the middle slice). Most PACS viewers apply a
presentation state over the original images; nothing is burned into the pixels."""

from __future__ import annotations

from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from skimage import measure

from pipeline import __version__
from pipeline.core.contract import ModelContract
from pipeline.core.results import Result
from pipeline.outputs.keyimages import model_window, volumes_ml
from pipeline.outputs.sources import Sources, conformant_header, result_uid, same_body_part

PR_SERIES_NUMBER = 9904  # after the key images' 9903
LAYER = "AI_FINDINGS"
_RED = hd.color.CIELabColor(53.2, 80.1, 67.2)


def outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a 2D mask (rows, columns) as (column, row) points in a
    presentation state's PIXEL units, where a pixel's centre is at +0.5: along the pixels'
    edges, so the outline encloses the lesion's pixels and no other."""
    padded = np.pad(mask.astype(np.float32), 1)
    found = []
    for contour in measure.find_contours(padded, 0.5):
        points = measure.approximate_polygon(contour, tolerance=0.25)
        if len(points) >= 3:
            # padded index p is pixel p - 1, whose centre is at p - 0.5
            found.append(np.ascontiguousarray(points[:, ::-1] - 0.5))
    return found


def build_gsps(
    sources: Sources,
    lesion_map: np.ndarray | None,
    contract: ModelContract,
    result: Result,
    manufacturer: str,
    key: str,
) -> Dataset:
    """The presentation state of a result over the slices its findings are on."""
    layer = hd.pr.GraphicLayer(LAYER, 1, f"AI {contract.name}"[:64], display_color=_RED)
    if lesion_map is None or not lesion_map.any():
        annotations = [_answer(sources, result, layer)]
    else:
        annotations = _lesion_annotations(sources, lesion_map, result, layer)
    images = list({uid: sources.headers[uid] for a in annotations for uid in _uids(a)}.values())
    images[0] = conformant_header(images[0])
    shown = model_window(contract)
    voi = (
        [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=shown[0],
                window_width=shown[1],
                window_explanation=f"{contract.name} input"[:64],
            )
        ]
        if shown
        else None
    )
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=result_uid(key, "pr-series"),
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, "pr"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=contract.name[:64],
        software_versions=__version__,
        device_serial_number=result.model.version or "1",
        content_label="AI_FINDINGS",
        content_description=f"AI {contract.name} findings"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
        series_description=f"AI {contract.name} findings"[:64],
    )
    same_body_part(pr, images[0])
    return pr


def _uids(annotation: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in annotation.ReferencedImageSequence]


def _lesion_annotations(
    sources: Sources, lesion_map: np.ndarray, result: Result, layer: hd.pr.GraphicLayer
) -> list[hd.pr.GraphicAnnotation]:
    """One annotation per slice a lesion crosses: every lesion's outline on it, labelled."""
    volumes = volumes_ml(result)
    planes = np.flatnonzero(lesion_map.any(axis=(0, 1)))
    by_plane: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for plane in planes:
        labels = lesion_map[:, :, plane].T  # (rows, columns) of the source slice
        for number in (int(n) for n in np.unique(labels) if n > 0):
            by_plane[int(plane)].append((number, labels == number))
    annotations = []
    for plane, lesions in sorted(by_plane.items()):
        graphics, texts = [], []
        for number, mask in lesions:
            for points in outlines(mask):
                graphics.append(hd.pr.GraphicObject("POLYLINE", points, "PIXEL"))
            rows, cols = np.nonzero(mask)
            anchor = (float(min(cols.max() + 2, mask.shape[1] - 1)), float(rows.min()))
            volume = f": {volumes[number - 1]:.2f} ml" if number <= len(volumes) else ""
            texts.append(
                hd.pr.TextObject(
                    f"Lesion {number}{volume}",
                    "PIXEL",
                    anchor_point=anchor,
                    anchor_point_visible=False,
                )
            )
        annotations.append(_on_slice(sources, plane, layer, graphics, texts))
    return annotations


def _on_slice(
    sources: Sources,
    plane: int,
    layer: hd.pr.GraphicLayer,
    graphics: list[hd.pr.GraphicObject],
    texts: list[hd.pr.TextObject],
) -> hd.pr.GraphicAnnotation:
    uid, frame = sources.slices[plane]
    return hd.pr.GraphicAnnotation(
        referenced_images=[sources.headers[uid]],
        graphic_layer=layer,
        referenced_frame_number=None if frame is None else frame + 1,
        graphic_objects=graphics or None,
        text_objects=texts or None,
    )


def _answer(sources: Sources, result: Result, layer: hd.pr.GraphicLayer) -> hd.pr.GraphicAnnotation:
    """A classification's answer as text at the top left of the middle slice."""
    plane = len(sources.slices) // 2
    header = sources.headers[sources.slices[plane][0]]
    label = result.prediction.label
    text = f"AI: {label} (p={result.prediction.probabilities.get(label, 0.0):.3f})"
    width = float(header.get("Columns", 64))
    box = (1.0, 1.0, max(2.0, width - 1.0), max(2.0, min(24.0, float(header.get("Rows", 64)) - 1)))
    words = hd.pr.TextObject(text, "PIXEL", bounding_box=box)
    return _on_slice(sources, plane, layer, [], [words])
