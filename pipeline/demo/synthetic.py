"""Synthetic inputs whose right answer is known, for demo weights and for tests.

MedNIST-like 64x64 images of six categories drawn from simple anatomy-like shapes, and
CT-like volumes in Hounsfield units (air, body, two lungs) where COVID-positive ones carry
ground-glass opacities in the lungs. Every sample is a pure function of its seed.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

MEDNIST_LABELS = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
COVID_LABELS = ("COVID Negative", "COVID Positive")


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def mednist_image(label: str, seed: int, size: int = 64) -> np.ndarray:
    """A uint8 (size, size) image of the given MedNIST category."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = size / 64.0 * rng.uniform(0.85, 1.15)
    cy, cx = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    img = np.zeros((size, size), np.float32)
    if label == "AbdomenCT":
        img[_ellipse(yy, xx, cy, cx, 20 * s, 28 * s)] = 0.45
        img[_ellipse(yy, xx, cy + 12 * s, cx, 4 * s, 4 * s)] = 1.0  # spine
        for _ in range(3):
            img[
                _ellipse(
                    yy,
                    xx,
                    cy + rng.uniform(-10, 6) * s,
                    cx + rng.uniform(-16, 16) * s,
                    5 * s,
                    6 * s,
                )
            ] = 0.65
    elif label == "BreastMRI":
        for side in (-1, 1):
            m = _ellipse(yy, xx, cy + 8 * s, cx + side * 14 * s, 18 * s, 13 * s) & (yy < cy + 8 * s)
            img[m] = 0.8
        img[yy > cy + 8 * s] = 0.3
    elif label == "CXR":
        img[:] = 0.75
        for side in (-1, 1):
            img[_ellipse(yy, xx, cy, cx + side * 13 * s, 22 * s, 9 * s)] = 0.15
        img[np.abs(xx - cx) < 3 * s] = 0.95
    elif label == "ChestCT":
        img[_ellipse(yy, xx, cy, cx, 22 * s, 29 * s)] = 0.5
        for side in (-1, 1):
            img[_ellipse(yy, xx, cy - 2 * s, cx + side * 13 * s, 14 * s, 10 * s)] = 0.05
    elif label == "Hand":
        img[(np.abs(xx - cx) < 12 * s) & (yy > cy) & (yy < cy + 22 * s)] = 0.8
        for k in range(-2, 3):
            fx = cx + k * 5.5 * s
            img[
                (np.abs(xx - fx) < 2 * s) & (yy > cy - (18 + 4 * rng.random()) * s) & (yy <= cy)
            ] = 0.8
    elif label == "HeadCT":
        img[_ellipse(yy, xx, cy, cx, 26 * s, 22 * s)] = 1.0
        img[_ellipse(yy, xx, cy, cx, 23 * s, 19 * s)] = 0.4
    else:
        raise ValueError(f"unknown MedNIST label {label!r}")
    img = img * rng.uniform(0.8, 1.0) + rng.normal(0.0, 0.04, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def ct_volume(positive: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT-like volume in HU (X, Y, Z) and its affine (spacing in mm)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = int(rng.integers(96, 144)), int(rng.integers(96, 144)), int(rng.integers(32, 56))
    x, y, z = np.mgrid[0:nx, 0:ny, 0:nz].astype(np.float32)
    cx, cy = nx / 2 + rng.uniform(-4, 4), ny / 2 + rng.uniform(-4, 4)
    vol = np.full((nx, ny, nz), -1000.0, np.float32)
    body = ((x - cx) / (0.42 * nx)) ** 2 + ((y - cy) / (0.34 * ny)) ** 2 <= 1.0
    vol[body] = 40.0
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lx = cx + side * 0.18 * nx
        lungs |= (
            ((x - lx) / (0.14 * nx)) ** 2
            + ((y - cy) / (0.22 * ny)) ** 2
            + ((z - nz / 2) / (0.45 * nz)) ** 2
        ) <= 1.0
    vol[lungs] = -850.0
    if positive:
        inside = np.argwhere(lungs)
        for _ in range(int(rng.integers(6, 12))):
            px, py, pz = inside[rng.integers(len(inside))]
            r = rng.uniform(7.0, 12.0)
            blob = ((x - px) ** 2 + (y - py) ** 2 + ((z - pz) * 2) ** 2) <= r * r
            vol[blob & lungs] = rng.uniform(-350.0, -150.0)
    vol += rng.normal(0.0, 20.0, vol.shape)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return np.round(vol).astype(np.int16), affine


def write_mednist_png(path: Path, label: str, seed: int) -> Path:
    Image.fromarray(mednist_image(label, seed)).save(path)
    return path


def write_ct_nifti(path: Path, positive: bool, seed: int) -> Path:
    vol, affine = ct_volume(positive, seed)
    nib.save(nib.Nifti1Image(vol, affine), path)
    return path


LESION_SPACING = (1.0, 1.0, 1.5)


def lesion_phantom(
    seed: int, lesions: int | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chest-CT-like volume in HU (X, Y, Z) with solid spherical nodules in the lungs, its
    ground-truth mask (the visible part of each nodule) and its RAS affine. ``scale`` widens
    the chest in plane, nodules and voxels alike: at 3 or more a patch may hold air alone or
    body tissue alone, as in an adult's CT of 512x512."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = int(rng.integers(88, 112)), int(rng.integers(80, 104)), int(rng.integers(36, 52))
    nx, ny = int(nx * scale), int(ny * scale)
    sx, sy, sz = LESION_SPACING
    x, y, z = np.mgrid[0:nx, 0:ny, 0:nz].astype(np.float32)
    cx, cy = nx / 2 + rng.uniform(-3, 3), ny / 2 + rng.uniform(-3, 3)
    vol = np.full((nx, ny, nz), -1000.0, np.float32)
    vol[((x - cx) / (0.44 * nx)) ** 2 + ((y - cy) / (0.38 * ny)) ** 2 <= 1.0] = 40.0
    lungs = np.zeros((nx, ny, nz), bool)
    for side in (-1, 1):
        lx = cx + side * 0.2 * nx
        lungs |= (
            ((x - lx) / (0.15 * nx)) ** 2
            + ((y - cy) / (0.26 * ny)) ** 2
            + ((z - nz / 2) / (0.46 * nz)) ** 2
        ) <= 1.0
    vol[lungs] = -850.0
    mask = np.zeros((nx, ny, nz), np.uint8)
    inside = np.argwhere(lungs)
    for _ in range(int(rng.integers(1, 5)) if lesions is None else lesions):
        px, py, pz = inside[rng.integers(len(inside))]
        r_mm = rng.uniform(4.0, 9.0)
        ball = ((x - px) * sx) ** 2 + ((y - py) * sy) ** 2 + ((z - pz) * sz) ** 2 <= r_mm**2
        visible = ball & lungs
        vol[visible] = rng.uniform(10.0, 60.0)
        mask[visible] = 1
    vol += rng.normal(0.0, 15.0, vol.shape)
    affine = np.diag([sx, sy, sz, 1.0])
    return np.round(vol).astype(np.int16), mask, affine
