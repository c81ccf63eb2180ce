"""Segmentation through Triton: a sliding window whose predictor is the Triton model.

The contract's preprocessing runs once on the whole volume; MONAI's
``sliding_window_inference`` cuts it into overlapping patches of the model's input shape and
hands them to the predictor ``batch_size`` at a time, which sends them to Triton (where patches
of concurrent studies batch together) and blends the answers. With ``sliding_window.runs_on:
triton`` the volume goes to Triton in one request instead, and the same window runs there
(:mod:`pipeline.serving.window`), beside the model. The label map is then brought
back to the source geometry by inverting the preprocessing's spatial steps, so the mask lies on
the input's own voxels and affine. Lesions are the mask's connected components.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipeline.convert import images as convert
from pipeline.core.contract import ModelContract
from pipeline.core.results import Lesion
from pipeline.inference.triton_client import TritonClient
from pipeline.serving.window import patch_count, stream_volume

log = logging.getLogger(__name__)


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 label map on the input's voxels
    affine: np.ndarray  # the input's voxel -> RAS affine
    max_probability: float  # highest foreground probability anywhere
    lesions: list[Lesion]
    lesion_map: np.ndarray  # uint16 on the input's voxels: lesion i (1-based, largest first)
    preprocess_ms: float
    inference_ms: float  # Triton calls only
    model_version: str
    patches: int

    @property
    def total_volume_ml(self) -> float:
        return round(sum(x.volume_ml for x in self.lesions), 4)


def segment(
    image: convert.LoadedImage,
    contract: ModelContract,
    client: TritonClient,
    prep: convert.Preprocessing | None = None,
) -> Segmentation:
    """``prep``: the image's preprocessing, shared with the other models of its route."""
    prep = prep or convert.Preprocessing(image, [contract])
    del image  # prep.image from here: its voxels may be compacted once preprocessed
    log.debug("step=preprocess model=%s", contract.name)  # steps: pipeline.bench.big_study
    pre, compose, pre_ms = prep.spatial(contract)
    infer_ms, version, patches = 0.0, "", 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal infer_ms, version, patches
        out = client.infer(contract, np.ascontiguousarray(batch.numpy(), dtype=np.float32))
        infer_ms += out.milliseconds
        version, patches = out.model_version, patches + len(batch)
        return torch.from_numpy(out.probabilities)  # the client's own float32 copy

    log.debug("step=window model=%s", contract.name)
    window = contract.sliding_window
    roi = contract.input.shape[1:]
    volume = torch.as_tensor(np.asarray(pre), dtype=torch.float32)[None]
    spatial = tuple(volume.shape[2:])
    if window.runs_on == "triton":  # one request; the server cuts, runs and blends
        slabs: Iterable[tuple[int, torch.Tensor]] = [(0, predictor(volume))]
        patches = patch_count(spatial, roi, window.overlap)
    else:  # each slab labelled as it comes: the window holds no whole-volume buffer
        slabs = stream_volume(volume, roi, window, predictor)
    labels, top = _labelled(contract, slabs, spatial)
    del volume, slabs
    log.debug("step=inverse model=%s", contract.name)
    mask = _on_source(labels, pre, compose)
    del pre, labels
    affine = np.asarray(prep.image.array.affine, dtype=np.float64)  # prep's: maybe compacted
    log.debug("step=lesions model=%s", contract.name)
    lesion_map, found = label_lesions(mask, affine, contract.min_lesion_ml)
    mask[lesion_map == 0] = 0  # what is too small to report is not in the mask either
    return Segmentation(
        mask=mask,
        affine=affine,
        max_probability=top,
        lesions=found,
        lesion_map=lesion_map,
        preprocess_ms=pre_ms,
        inference_ms=infer_ms,
        model_version=version,
        patches=patches,
    )


def _labelled(
    contract: ModelContract, slabs: Iterable[tuple[int, torch.Tensor]], spatial: tuple[int, ...]
) -> tuple[np.ndarray, float]:
    """The label map (uint8, in the preprocessed space) of the window's blended slabs, and the
    highest foreground probability anywhere."""
    labels = np.zeros(spatial, np.uint8)
    top = 0.0
    for low, probs in slabs:
        slab, foreground = _slab_labels(contract, probs)
        labels[low : low + slab.shape[0]] = slab.numpy()
        if foreground.numel():
            top = max(top, float(foreground.max()))
    return labels, top


def _slab_labels(contract: ModelContract, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A slab's labels (uint8, spatial) from its probabilities (1, channels, *spatial), and
    its foreground channels."""
    if contract.omits_background:  # labels 1.. only: the background has what they leave
        if probs.shape[1] == 1:  # the lesion where p > 1 - p
            return (probs[0, 0] > 0.5).to(torch.uint8), probs
        best, index = probs[0].max(dim=0)
        labels = torch.where(best > 1.0 - probs[0].sum(dim=0), index + 1, 0)
        return labels.to(torch.uint8), probs
    if probs.shape[1] == 2:  # one comparison instead of argmax: a tenth of the time
        return (probs[0, 1] > probs[0, 0]).to(torch.uint8), probs[:, 1:]
    return probs[0].argmax(dim=0).to(torch.uint8), probs[:, 1:]


# The spatial transforms whose inverse moves voxels without interpolating: a label map goes
# back through them as uint8, a quarter of the float32 copy the others need.
_VOXEL_MOVES = frozenset(
    {"Orientation", "Flip", "Rotate90", "SpatialPad", "BorderPad", "DivisiblePad"}
    | {"CropForeground", "CenterSpatialCrop", "SpatialCrop"}
)


def _on_source(labels: np.ndarray, pre: MetaTensor, compose: Any) -> np.ndarray:
    """The label map brought back to the input's voxels by inverting the preprocessing's
    spatial steps (uint8)."""
    moves_only = all(op.get("class") in _VOXEL_MOVES for op in pre.applied_operations)
    data = torch.from_numpy(labels)[None]
    mapped = MetaTensor(
        data if moves_only else data.to(torch.float32),
        meta=pre.meta,
        applied_operations=list(pre.applied_operations),
    )
    source: np.ndarray = np.asarray(compose.inverse(mapped))[0]
    return source.astype(np.uint8) if moves_only else np.rint(source).astype(np.uint8)


def label_lesions(
    mask: np.ndarray, affine: np.ndarray, min_ml: float = 0.0
) -> tuple[np.ndarray, list[Lesion]]:
    """Connected components (faces and edges touching) of at least ``min_ml``, largest first,
    in ml and RAS mm; and the map numbering them in that order (0 = none, or too small)."""
    lesion_map = np.zeros(mask.shape, np.uint16)
    box = _foreground_box(mask)
    if box is None:
        return lesion_map, []
    # Labelled within the foreground's bounding box: lesions usually fill a small part of a CT.
    components, count = _components(mask[box] > 0)
    # Sizes and centres from the foreground voxels alone (a few percent of the volume): a
    # per-component pass over the volume (find_objects) took 0.2 s on a speckled mask.
    flat = components.ravel()
    where = np.flatnonzero(flat)
    numbers = flat[where]
    sizes = np.bincount(numbers, minlength=count + 1)[1:]  # voxels per component
    coordinates = np.unravel_index(where, components.shape)
    sums = [np.bincount(numbers, weights=c, minlength=count + 1)[1:] for c in coordinates]
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    order = np.argsort(-sizes, kind="stable")  # component index, largest first
    order = order[sizes[order] * voxel_ml >= min_ml]
    offset = np.array([s.start for s in box], dtype=np.float64)
    found = []
    for i in order:
        centre = np.array([total[i] for total in sums]) / sizes[i] + offset
        ras = affine @ np.array([*centre, 1.0])
        found.append(
            Lesion(
                voxels=int(sizes[i]),
                volume_ml=round(float(sizes[i]) * voxel_ml, 4),
                centre_ras_mm=[round(float(v), 2) for v in ras[:3]],
            )
        )
    renumber = np.zeros(count + 1, np.uint16)
    renumber[order + 1] = np.arange(1, len(order) + 1, dtype=np.uint16)
    lesion_map[box][np.unravel_index(where, components.shape)] = renumber[numbers]
    return lesion_map, found


def _components(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected components (faces and edges touching) of a boolean volume, numbered in
    uint16 (half of scipy's default int32) unless there are more than it holds."""
    structure = np.ones((3, 3, 3), bool)
    try:
        out = np.empty(foreground.shape, np.uint16)
        return out, int(ndimage.label(foreground, structure=structure, output=out))
    except RuntimeError:  # scipy: "insufficient bit-depth in requested output type"
        components, count = ndimage.label(foreground, structure=structure)
        return components, int(count)


def transposed(volume: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """``volume.T`` in C order and ``dtype``. Transposing a 200-slice CT's mask voxel by voxel
    takes 0.12 s; a sparse one's (lesions: thousands of voxels, spread too wide for a bounding
    box to help) non-zero voxels scattered into zeroed memory take 0.02 s."""
    flat = np.flatnonzero(volume)
    if flat.size > volume.size // 16:  # dense (an organ, say): scattering would be slower
        return np.ascontiguousarray(volume.T, dtype)
    out = np.zeros(volume.shape[::-1], dtype)
    out.T[np.unravel_index(flat, volume.shape)] = volume.reshape(-1)[flat]
    return out


def _foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of a 3D mask, or None when it is empty."""
    columns_rows = mask.any(axis=2)  # one pass over the volume for the first two axes
    planes = mask.any(axis=(0, 1))
    box = []
    for hits in (columns_rows.any(axis=1), columns_rows.any(axis=0), planes):
        where = np.flatnonzero(hits)
        if where.size == 0:
            return None
        box.append(slice(int(where[0]), int(where[-1]) + 1))
    return tuple(box)
