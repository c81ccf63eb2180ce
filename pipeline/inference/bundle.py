"""MONAI bundle -> Triton model folder: ``dicom-pipeline models import-bundle PATH``.

A bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.ts``) carries its
network as TorchScript and its preprocessing as MONAI dictionary transforms. The importer copies
the TorchScript weights (``1/model.ts``) and derives the model's contract: the spatial preprocessing
(orientation, spacing) and intensity scaling become the contract's array transforms, the sliding
window's ROI size becomes the input shape, ``channel_def`` the labels. Loading and channel-first
steps are the pipeline's own business and are dropped; any other transform is an error that
names it, so nothing is silently left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.contract import ModelContract
from pipeline.core.errors import InputError
from pipeline.inference.model_folder import write_model_folder

# Bundle transform (dictionary form) -> our allowed array transform, and the arguments kept.
_MAPPED: dict[str, tuple[str, tuple[str, ...]]] = {
    "Orientationd": ("Orientation", ("axcodes",)),
    "Spacingd": ("Spacing", ("pixdim", "mode")),
    "ScaleIntensityRanged": ("ScaleIntensityRange", ("a_min", "a_max", "b_min", "b_max", "clip")),
    "NormalizeIntensityd": ("NormalizeIntensity", ("nonzero", "channel_wise")),
    "ScaleIntensityd": ("ScaleIntensity", ("minv", "maxv")),
}
# Steps the pipeline does itself (loading, channel first, types, device).
_DROPPED = {
    "LoadImaged",
    "EnsureChannelFirstd",
    "AddChanneld",
    "EnsureTyped",
    "CastToTyped",
    "ToTensord",
    "ToDeviced",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"bundle file {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"bundle file {path.name}: not a JSON object")
    return data


def _preprocessing(inference: dict[str, Any]) -> list[dict[str, Any]]:
    pre = inference.get("preprocessing", {})
    transforms = pre.get("transforms", []) if isinstance(pre, dict) else []
    steps: list[dict[str, Any]] = []
    unknown: list[str] = []
    for t in transforms:
        target = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        if target in _DROPPED:
            continue
        if target not in _MAPPED:
            unknown.append(target or "?")
            continue
        name, kept = _MAPPED[target]
        args = {k: _plain(t[k]) for k in kept if k in t}
        if name == "Orientation":  # MONAI's labels default is changing: say what bundles mean
            args["labels"] = [["L", "R"], ["P", "A"], ["I", "S"]]
        if "mode" in args and isinstance(args["mode"], list):  # per key: the image's
            args["mode"] = args["mode"][0]
        steps.append({"name": name, "args": args})
    if unknown:
        raise InputError(f"bundle preprocessing has transforms the importer cannot map: {unknown}")
    return steps


def _plain(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(("@", "$", "%")):
        raise InputError(f"bundle expression {value!r} in preprocessing: not supported")
    return value


def import_bundle(bundle: Path, repository: Path, name: str | None = None) -> ModelContract:
    """Write ``repository/<name>/`` from ``bundle``; returns the contract (validated)."""
    meta = _read_json(bundle / "configs" / "metadata.json")
    inference = _read_json(bundle / "configs" / "inference.json")
    weights = bundle / "models" / "model.ts"
    if not weights.is_file():
        raise InputError("bundle has no models/model.ts (TorchScript weights)")
    name = name or str(meta.get("name", bundle.name)).strip().lower().replace(" ", "_")
    origin = f"Imported from the MONAI bundle {bundle.name} {meta.get('version', '')}".strip()
    data = _contract_data(name, meta, inference)
    return write_model_folder(repository, data, weights, origin + " (models import-bundle)")


def _contract_data(name: str, meta: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
    """contract.yaml's content, from the bundle's metadata (inputs, output channels) and its
    inference config (the inferer's window, the preprocessing)."""
    fmt = meta.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image", {})
    pred = fmt.get("outputs", {}).get("pred", {})
    channel_def = pred.get("channel_def") or {}
    labels = [str(channel_def[k]) for k in sorted(channel_def, key=int)]
    inferer = inference.get("inferer", {})
    roi = inferer.get("roi_size") or image.get("spatial_shape")
    if not roi or not labels:
        raise InputError("bundle metadata lacks the ROI size or the output channel_def")
    channels = int(image.get("num_channels", 1))
    return {
        "name": name,
        "description": str(meta.get("description", "")).strip(),
        "task": "segmentation",
        "spatial_dims": len(roi),
        "accepts": ["nifti", "dicom"],
        "input": {"name": "INPUT__0", "shape": [channels, *roi]},
        "output": {"name": "PROBABILITIES", "shape": [len(labels), *roi]},
        "activation": "softmax",
        "labels": labels,
        "preprocessing": _preprocessing(inference),
        "sliding_window": {
            "overlap": float(inferer.get("overlap", 0.25)),
            "batch_size": int(inferer.get("sw_batch_size", 4)),
        },
    }
