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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipeline.convert import images as convert
from pipeline.core.contract import ModelContract
from pipeline.core.results import Lesion
from pipeline.inference.triton_client import TritonClient
from pipeline.serving.window import infer_volume, patch_count

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
    if window.runs_on == "triton":  # one request; the server cuts, runs and blends
        probs = predictor(volume)
        patches = patch_count(tuple(volume.shape[2:]), roi, window.overlap)
    else:
        probs = infer_volume(volume, roi, window, predictor)
    log.debug("step=inverse model=%s", contract.name)
    if contract.omits_background:  # labels 1.. only: the background has what they leave
        foreground = probs
        if probs.shape[1] == 1:  # the lesion where p > 1 - p
            labels = (probs[:, 0] > 0.5).to(torch.float32)
        else:
            best, index = probs.max(dim=1)
            labels = torch.where(best > 1.0 - probs.sum(dim=1), index + 1, 0).to(torch.float32)
    elif probs.shape[1] == 2:  # one comparison instead of argmax: a tenth of the time
        foreground = probs[:, 1:]
        labels = (probs[:, 1] > probs[:, 0]).to(torch.float32)
    else:
        foreground = probs[:, 1:]
        labels = probs.argmax(dim=1).to(torch.float32)  # (1, *spatial) in preprocessed space
    mapped = MetaTensor(labels, meta=pre.meta, applied_operations=pre.applied_operations)
    source = np.asarray(compose.inverse(mapped))[0]
    mask = np.rint(source).astype(np.uint8)
    affine = np.asarray(image.array.affine, dtype=np.float64)
    log.debug("step=lesions model=%s", contract.name)
    lesion_map, found = label_lesions(mask, affine, contract.min_lesion_ml)
    mask[lesion_map == 0] = 0  # what is too small to report is not in the mask either
    return Segmentation(
        mask=mask,
        affine=affine,
        max_probability=float(foreground.max()) if foreground.numel() else 0.0,
        lesions=found,
        lesion_map=lesion_map,
        preprocess_ms=pre_ms,
        inference_ms=infer_ms,
        model_version=version,
        patches=patches,
    )


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
    components, count = ndimage.label(mask[box] > 0, structure=np.ones((3, 3, 3), bool))
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
    local = np.zeros(components.shape, np.uint16)
    local.ravel()[where] = renumber[numbers]
    lesion_map[box] = local
    return lesion_map, found


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
