"""MONAI bundle -> Triton model folder: ``dicom-pipeline models import-bundle PATH``.

A bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.ts``) carries its
network as TorchScript and its preprocessing as MONAI dictionary transforms. The importer copies
the TorchScript weights and derives the model's contract: the spatial preprocessing
(orientation, spacing) and intensity scaling become the contract's array transforms, the sliding
window's ROI size becomes the input shape, ``channel_def`` the labels. Loading and channel-first
steps are the pipeline's own business and are dropped; any other transform is an error that
names it, so nothing is silently left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.contract import CONTRACT_FILE, ModelContract, load_contract
from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_bytes

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

_MODEL_PY = '''"""Triton python-backend entry point of {name}, imported from a MONAI bundle."""

from pipeline.serving.torchscript_backend import TorchScriptClassifier


class TritonPythonModel(TorchScriptClassifier):
    pass
'''

_CONFIG = """# Imported from the MONAI bundle {bundle} {version} (models import-bundle).
name: "{name}"
backend: "python"
max_batch_size: 8
input [
  {{ name: "INPUT__0", data_type: TYPE_FP32, dims: [ {input_dims} ] }}
]
output [
  {{ name: "PROBABILITIES", data_type: {output_type}, dims: [ {output_dims} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ count: 1 }} ]
"""


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
    contract_data = _contract_data(name, meta, inference)
    contract = ModelContract.model_validate(contract_data)  # names the bad field
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        folder / CONTRACT_FILE,
        (
            f"# Derived from the MONAI bundle {bundle.name} {meta.get('version', '')}.\n"
            + yaml.safe_dump(contract_data, sort_keys=False)
        ).encode(),
    )
    atomic_write_bytes(
        folder / "config.pbtxt",
        _CONFIG.format(
            bundle=bundle.name,
            version=meta.get("version", ""),
            name=name,
            # Spatial sizes left free: patches, or whole volumes when the contract's
            # sliding_window.runs_on is triton.
            input_dims=", ".join(map(str, _free_spatial(contract.input.shape))),
            output_dims=", ".join(map(str, _free_spatial(contract.output.shape))),
            output_type="TYPE_FP16" if contract.output.dtype == "float16" else "TYPE_FP32",
        ).encode(),
    )
    atomic_write_bytes(folder / "1" / "model.py", _MODEL_PY.format(name=name).encode())
    tmp = folder / "1" / ".model.pt.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(folder / "1" / "model.pt")
    return load_contract(folder)


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
        "weights": "model.pt",
    }


def _free_spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *(-1 for _ in shape[1:]))
