"""The model repository as a Triton without native backends can serve it.

The embedded ``tritonserver`` carries the python backend only. A model whose contract names a
native backend it lacks (``onnxruntime``, ``pytorch``) is served there by the python backend
instead, answering the network's logits as the native backend would, so the worker and the
results are the same. Its folder is rewritten into a repository of the run directory: the
contract and the weights linked, ``config.pbtxt`` for the python backend, ``model.py``. A
TensorRT plan cannot be served without its backend: it is left out, and said so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.contract import (
    CONTRACT_FILE,
    Backend,
    ModelContract,
    WeightsFormat,
    load_contract,
)
from pipeline.core.fsutil import atomic_write_bytes
from pipeline.inference.model_folder import MODEL_PY
from pipeline.inference.triton_config import config_text

log = logging.getLogger(__name__)


@dataclass
class Served:
    repository: Path  # what tritonserver is given
    stand_ins: list[str] = field(default_factory=list)  # native models on the python backend
    left_out: dict[str, str] = field(default_factory=dict)  # model: why it is not served


def served_repository(repository: Path, backends: Path, target: Path) -> Served:
    """``repository`` itself where this Triton has every backend its models name; else a
    copy in ``target`` (rebuilt each time) with the python backend standing in."""
    missing = {
        folder.name: contract
        for folder in sorted(p for p in repository.iterdir() if (p / CONTRACT_FILE).is_file())
        for contract in [load_contract(folder)]
        if contract.serves_logits and not (backends / contract.backend.value).is_dir()
    }
    if not missing:
        return Served(repository)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    served = Served(target)
    for folder in sorted(p for p in repository.iterdir() if p.is_dir()):
        contract = missing.get(folder.name)
        if contract is None:
            (target / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        elif contract.weights_format is WeightsFormat.TENSORRT:
            served.left_out[folder.name] = (
                "a TensorRT plan is served by Triton's tensorrt backend only (NVIDIA's Triton "
                "image on a GPU server), which this Triton lacks"
            )
            log.error("model %s not served: %s", folder.name, served.left_out[folder.name])
        else:
            _stand_in(folder.resolve(), contract, target / folder.name)
            served.stand_ins.append(folder.name)
            log.info(
                "model %s: this Triton has no %s backend; the python backend serves it, "
                "answering the same logits",
                folder.name,
                contract.backend.value,
            )
    return served


def _stand_in(folder: Path, contract: ModelContract, into: Path) -> None:
    """``folder``'s model on the python backend: its contract and weights linked."""
    into.mkdir()
    (into / CONTRACT_FILE).symlink_to(folder / CONTRACT_FILE)
    origin = f"{folder}: {contract.backend.value} model on the python backend (embedded Triton)"
    config = config_text(contract, origin, Backend.PYTHON)
    atomic_write_bytes(into / "config.pbtxt", config.encode())
    for version in (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        (into / version.name).mkdir()
        code = MODEL_PY.format(name=contract.name, origin=origin)
        atomic_write_bytes(into / version.name / "model.py", code.encode())
        weights = version / contract.weights
        if weights.is_file():
            (into / version.name / contract.weights).symlink_to(weights)
