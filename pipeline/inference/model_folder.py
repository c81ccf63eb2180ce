"""A Triton model folder written from a weights file and its contract: ``contract.yaml``,
``config.pbtxt`` for the python backend (which serves every format the contract names:
:mod:`pipeline.serving.loaders`), ``1/model.py`` and ``1/model.<suffix>``. Used by
``models add`` and ``models import-bundle``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.contract import CONTRACT_FILE, WEIGHT_FORMATS, ModelContract, load_contract
from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_bytes

MODEL_PY = '''"""Triton python-backend entry point of {name} ({origin})."""

from pipeline.serving.torchscript_backend import TorchScriptClassifier


class TritonPythonModel(TorchScriptClassifier):
    pass
'''

CONFIG = """# {origin}
name: "{name}"
backend: "python"
max_batch_size: 8
input [
  {{ name: "{input_name}", data_type: TYPE_FP32, dims: [ {input_dims} ] }}
]
output [
  {{ name: "{output_name}", data_type: {output_type}, dims: [ {output_dims} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ count: 1 }} ]
"""


def write_model_folder(
    repository: Path, data: dict[str, Any], weights: Path, origin: str
) -> ModelContract:
    """``repository/<name>/`` for the contract ``data`` (validated first: InputError names the
    bad field) and the weights file, copied as ``1/model<suffix>``."""
    suffix = weights.suffix.lower()
    if suffix not in WEIGHT_FORMATS:
        raise InputError(f"{weights.name}: weights end .pt2, .onnx, .pt or .ts")
    data = {**data, "weights": f"model{suffix}"}
    name = str(data.get("name", ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise InputError(f"{name!r}: model names are letters, digits, _ and -")
    try:
        contract = ModelContract.model_validate(data)
    except ValueError as exc:
        raise InputError(f"{name}: not a valid contract: {exc}") from None
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    text = f"# {origin}\n" + yaml.safe_dump(_plain(data), sort_keys=False)
    atomic_write_bytes(folder / CONTRACT_FILE, text.encode())
    atomic_write_bytes(folder / "config.pbtxt", _config(contract, origin).encode())
    atomic_write_bytes(
        folder / "1" / "model.py", MODEL_PY.format(name=name, origin=origin).encode()
    )
    tmp = folder / "1" / f".{contract.weights}.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(folder / "1" / contract.weights)
    return load_contract(folder)


def _config(contract: ModelContract, origin: str) -> str:
    # A segmentation model's spatial sizes are left free: patches, or whole volumes when its
    # sliding_window.runs_on is triton.
    free = contract.task == "segmentation"
    return CONFIG.format(
        origin=origin,
        name=contract.name,
        input_name=contract.input.name,
        input_dims=_dims(contract.input.shape, free),
        output_name=contract.output.name,
        output_type="TYPE_FP16" if contract.output.dtype == "float16" else "TYPE_FP32",
        output_dims=_dims(contract.output.shape, free),
    )


def _dims(shape: tuple[int, ...], free: bool) -> str:
    return ", ".join(map(str, (shape[0], *(-1 for _ in shape[1:])) if free else shape))


def _plain(value: Any) -> Any:
    """Tuples as lists, for a YAML file people read."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def contract_like(repository: Path, model: str, name: str) -> dict[str, Any]:
    """An existing model's contract, renamed: for the same model in another format."""
    try:
        contract = load_contract(repository / model)
    except (OSError, ValueError) as exc:
        raise InputError(f"no model {model!r} in {repository} to take the contract of") from exc
    return {**contract.model_dump(mode="json", exclude_defaults=True), "name": name}


def add_model(
    repository: Path, weights: Path, name: str, like: str | None, contract_file: Path | None
) -> ModelContract:
    """``models add``: a weights file and a contract (another model's, or a YAML file with the
    essentials: input shape, labels, activation, preprocessing) as a new model folder."""
    if not weights.is_file():
        raise InputError(f"no weights file {weights}")
    if (like is None) == (contract_file is None):
        raise InputError("give the contract: --like MODEL or --contract FILE")
    if like is not None:
        data = contract_like(repository, like, name)
    else:
        assert contract_file is not None
        try:
            data = {**(yaml.safe_load(contract_file.read_text()) or {}), "name": name}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read the contract {contract_file}: {exc}") from None
    if (repository / name).exists():
        raise InputError(f"a model {name!r} is already in {repository}")
    return write_model_folder(repository, data, weights, f"Added from {weights.name} (models add)")
