"""MONAI bundle import: a bundle built here (the model zoo is not reachable) becomes a Triton
model that the real tritonserver serves and the worker's sliding window uses, with the mask
brought back to the source geometry through the bundle's own resampling."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipeline.convert.images import LoadedImage
from pipeline.core.contract import InputKind, Task, discover_contracts
from pipeline.core.errors import InputError
from pipeline.inference.bundle import import_bundle
from pipeline.inference.segment import segment
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime import embedded_triton

from .conftest import make_settings

A_MIN, A_MAX = -57.0, 164.0  # spleen_ct_segmentation's intensity window
THRESHOLD_HU = A_MIN + 0.5 * (A_MAX - A_MIN)


class Threshold(torch.nn.Module):
    """A stand-in network with a known answer: foreground where the scaled input > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(0.5 - x) * 40.0, (x - 0.5) * 40.0], dim=1)


def write_bundle(root: Path, transforms: list[dict[str, object]] | None = None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(
        json.dumps(
            {
                "name": "Spleen CT segmentation",
                "version": "0.5.9",
                "description": "test bundle",
                "network_data_format": {
                    "inputs": {"image": {"num_channels": 1, "spatial_shape": [32, 32, 32]}},
                    "outputs": {
                        "pred": {
                            "num_channels": 2,
                            "channel_def": {"0": "background", "1": "spleen"},
                        }
                    },
                },
            }
        )
    )
    default = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": A_MIN,
            "a_max": A_MAX,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    (root / "configs" / "inference.json").write_text(
        json.dumps(
            {
                "preprocessing": {"_target_": "Compose", "transforms": transforms or default},
                "inferer": {
                    "_target_": "SlidingWindowInferer",
                    "roi_size": [32, 32, 32],
                    "sw_batch_size": 4,
                    "overlap": 0.5,
                },
            }
        )
    )
    torch.jit.save(torch.jit.script(Threshold()), str(root / "models" / "model.ts"))
    return root


def test_unmappable_preprocessing_is_refused_by_name(tmp_path: Path) -> None:
    bundle = write_bundle(
        tmp_path / "b", [{"_target_": "monai.transforms.RandFlipd", "keys": "image"}]
    )
    with pytest.raises(InputError, match="RandFlipd"):
        import_bundle(bundle, tmp_path / "repo")
    assert not (tmp_path / "repo" / "spleen_ct_segmentation").exists()


def test_imported_bundle_is_served_and_segments_in_the_source_geometry(
    tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    repo = tmp_path / "repo"
    contract = import_bundle(write_bundle(tmp_path / "bundle"), repo)
    assert contract.name == "spleen_ct_segmentation" and contract.task is Task.SEGMENTATION
    assert contract.input.shape == (1, 32, 32, 32)
    assert contract.labels == ("background", "spleen")
    assert [t.name for t in contract.preprocessing] == [
        "Orientation",
        "Spacing",
        "ScaleIntensityRange",
    ]
    assert contract.sliding_window.overlap == 0.5
    assert set(discover_contracts(repo)) == {"spleen_ct_segmentation"}

    # A volume whose spacing differs from the bundle's: the mask must come back resampled to
    # the source voxels, where the known answer is HU > threshold.
    xx, yy, zz = np.mgrid[0:70, 0:60, 0:24].astype(np.float32)
    hu = np.where(
        ((xx - 35) * 0.8) ** 2 + ((yy - 28) * 0.8) ** 2 + ((zz - 12) * 2.5) ** 2 < 15**2,
        200.0,
        -1000.0,
    ).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    settings = make_settings(tmp_path / "data", triton={"model_repository": repo})
    settings.ensure_dirs()
    proc, endpoints = embedded_triton.start(settings)
    try:
        client = new_client(endpoints.grpc, settings.triton)
        image = LoadedImage(InputKind.NIFTI, MetaTensor(hu[np.newaxis], affine=affine))
        seg = segment(image, contract, client)
        # The same from one request, the sliding window run by Triton beside the model: the
        # imported config leaves the spatial sizes free for it.
        window = contract.sliding_window.model_copy(update={"runs_on": "triton"})
        by_triton = segment(image, contract.model_copy(update={"sliding_window": window}), client)
    finally:
        proc.stop()
    assert by_triton.patches == seg.patches
    np.testing.assert_array_equal(by_triton.mask, seg.mask)
    assert seg.mask.shape == hu.shape
    np.testing.assert_allclose(seg.affine, affine)
    truth = hu > THRESHOLD_HU
    mask = seg.mask > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.9, dice
    assert seg.patches > 1 and len(seg.lesions) == 1
