"""A Triton model folder written from a weights file and its contract: ``contract.yaml``,
``config.pbtxt`` for the contract's backend (:mod:`pipeline.inference.triton_config`),
``1/model.py`` for the python backend (which serves every format but TensorRT's:
:mod:`pipeline.serving.loaders`, and stands in for a native backend a Triton lacks), and
``1/model.<suffix>``. Used by ``models add`` and ``models import-bundle``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.contract import (
    CONTRACT_FILE,
    WEIGHT_FORMATS,
    Activation,
    Backend,
    ModelContract,
    Task,
    WeightsFormat,
    load_contract,
    logits_shape,
)
from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_bytes
from pipeline.inference.onnx_graph import graph_of
from pipeline.inference.triton_config import config_text

# The backend a weights file gets unless told: the native one where it needs no Python.
DEFAULT_BACKEND = {
    WeightsFormat.ONNX: Backend.ONNXRUNTIME,
    WeightsFormat.TENSORRT: Backend.TENSORRT,
    WeightsFormat.TORCH_EXPORT: Backend.PYTHON,
    WeightsFormat.TORCHSCRIPT: Backend.PYTHON,
}

MODEL_PY = '''"""Triton python-backend entry point of {name} ({origin})."""

from pipeline.serving.torchscript_backend import TorchScriptClassifier


class TritonPythonModel(TorchScriptClassifier):
    pass
'''


def write_model_folder(
    repository: Path, data: dict[str, Any], weights: Path, origin: str
) -> ModelContract:
    """``repository/<name>/`` for the contract ``data`` (validated first: InputError names the
    bad field) and the weights file, copied as ``1/model<suffix>``."""
    suffix = _suffix(weights)
    data = {**data, "weights": f"model{suffix}"}
    if suffix == ".onnx":
        data = _onnx_names(data, weights)
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
    atomic_write_bytes(folder / "config.pbtxt", config_text(contract, origin).encode())
    atomic_write_bytes(
        folder / "1" / "model.py", MODEL_PY.format(name=name, origin=origin).encode()
    )
    tmp = folder / "1" / f".{contract.weights}.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(folder / "1" / contract.weights)
    return load_contract(folder)


def _suffix(weights: Path) -> str:
    """The weights file's suffix, one of a format; InputError otherwise."""
    suffix = weights.suffix.lower()
    if suffix not in WEIGHT_FORMATS:
        raise InputError(f"{weights.name}: weights end .pt2, .onnx, .pt, .ts or .plan")
    return suffix


def _plain(value: Any) -> Any:
    """Tuples as lists, for a YAML file people read."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def contract_like(repository: Path, model: str, name: str) -> dict[str, Any]:
    """An existing model's contract, renamed, without what depends on the backend (the
    output as served, the backend): for the same model in another format."""
    try:
        contract = load_contract(repository / model)
    except (OSError, ValueError) as exc:
        raise InputError(f"no model {model!r} in {repository} to take the contract of") from exc
    data = contract.model_dump(mode="json", exclude_defaults=True)
    if contract.serves_logits:  # the probabilities the python backend answers: every label's
        labels = len(contract.labels)
        shape = logits_shape(contract.task, Activation.SOFTMAX, labels, contract.input.shape)
        data["output"] = {"name": "PROBABILITIES", "shape": list(shape)}
    data.pop("backend", None)
    return {**data, "name": name}


def with_backend(
    data: dict[str, Any], backend: Backend | None, taken: bool = False
) -> dict[str, Any]:
    """The contract ``data`` for ``backend`` (by default its own, else its weights'
    format's): a native backend answers the network's logits, under the names its
    conventions ask (LibTorch: ``<name>__<index>``), the sliding window on the worker.
    ``taken``: the contract is another model's, its output the python backend's choice."""
    fmt = WEIGHT_FORMATS[Path(str(data["weights"])).suffix.lower()]
    chosen = backend or Backend(data.get("backend") or DEFAULT_BACKEND[fmt])
    data = {**data, "backend": chosen.value}
    if chosen is Backend.PYTHON:
        return data
    inp, out = dict(data.get("input") or {}), dict(data.get("output") or {})
    try:
        shape = logits_shape(
            Task(data.get("task", Task.CLASSIFICATION)),
            Activation(data["activation"]),
            len(data["labels"]),
            tuple(inp["shape"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{data.get('name')}: not a valid contract: it needs input.shape, labels and "
            f"activation ({type(exc).__name__}: {exc})"
        ) from None
    out["shape"] = list(shape)
    if taken or chosen is not Backend.TENSORRT:  # an engine may answer float16, if told so
        out["dtype"] = "float32"  # (an ONNX graph's own type is read from it)
    if taken or not out.get("name"):
        out["name"] = "LOGITS"  # (an ONNX graph's own name is read from it)
    if chosen is Backend.PYTORCH:
        if not re.fullmatch(r".+__\d+", str(inp.get("name", ""))):
            inp["name"] = "INPUT__0"
        if not re.fullmatch(r".+__\d+", str(out.get("name", ""))):
            out["name"] = "LOGITS__0"
    window = {**dict(data.get("sliding_window") or {}), "runs_on": "worker"}
    return {**data, "input": inp, "output": out, "sliding_window": window}


def _onnx_names(data: dict[str, Any], weights: Path) -> dict[str, Any]:
    """The contract's tensors named and typed as the ONNX graph names them (a native backend
    looks them up by name); InputError where the graph's input cannot take the contract's."""
    try:
        graph = graph_of(weights)
    except ValueError as exc:
        raise InputError(f"{weights.name}: {exc}") from None
    inp, out = dict(data.get("input") or {}), dict(data.get("output") or {})
    expected = tuple(inp.get("shape") or ())
    if not graph.accepts(expected):
        raise InputError(
            f"{weights.name} takes inputs of shape {list(graph.input_shape)}; the contract's "
            f"input.shape is [batch, {', '.join(map(str, expected))}]"
        )
    if data.get("backend", "python") == "python":  # it feeds and reads the graph by position
        return data
    inp["name"], out["name"], out["dtype"] = graph.input_name, graph.output_name, graph.output_dtype
    return {**data, "input": inp, "output": out}


def add_model(
    repository: Path,
    weights: Path,
    name: str,
    like: str | None,
    contract_file: Path | None,
    backend: Backend | None = None,
) -> ModelContract:
    """``models add``: a weights file and a contract (another model's, or a YAML file with the
    essentials: input shape, labels, activation, preprocessing) as a new model folder, for
    ``backend`` (by default the contract's, else the native one of its format where the
    network alone is served: ONNX Runtime for ``.onnx``, TensorRT for ``.plan``)."""
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
    data = {**data, "weights": f"model{_suffix(weights)}"}
    data = with_backend(data, backend, taken=like is not None)
    return write_model_folder(repository, data, weights, f"Added from {weights.name} (models add)")
