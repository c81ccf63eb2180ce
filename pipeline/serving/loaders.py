"""A served model's network from its weights file, whatever its format: a callable from a
batch tensor to the model's output tensor, on the instance's device.

- **torch.export** (``.pt2``): ``torch.export.load``, the program's module moved to the device;
- **ONNX** (``.onnx``): an ONNX Runtime session (CUDA where the instance is a GPU and the
  runtime has it, else CPU), fed and read through numpy;
- **TorchScript** (``.pt``, ``.ts``): ``torch.jit.load``, for the models that ship in it (MONAI
  bundles).

A contract may name a native backend instead (``onnxruntime``, ``pytorch``, ``tensorrt``),
which serves the model without Python on a GPU server; where the Triton lacks it, the python
backend serves the model with this loader (docs/guides/models.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.contract import ModelContract, WeightsFormat

Net = Callable[[torch.Tensor], torch.Tensor]


def load_net(contract: ModelContract, weights: Path, device: torch.device) -> Net:
    fmt = contract.weights_format
    if fmt is WeightsFormat.TORCH_EXPORT:
        module = torch.export.load(str(weights)).module()
        moved: Net = module.to(device)
        return moved
    if fmt is WeightsFormat.ONNX:
        return _onnx(contract, weights, device)
    if fmt is WeightsFormat.TENSORRT:
        raise ValueError(f"{weights.name}: a TensorRT plan runs on Triton's tensorrt backend only")
    scripted: Net = torch.jit.load(str(weights), map_location=device).eval()  # type: ignore[no-untyped-call]
    return scripted


def _onnx(contract: ModelContract, weights: Path, device: torch.device) -> Net:
    import onnxruntime as ort  # only a model in ONNX needs it

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    # Its threads wait for work by sleeping, not spinning: between two runs the same cores
    # serve torch (the sliding window's blending, the next request's copies).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(weights), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: batch.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(batch.device)

    return run
