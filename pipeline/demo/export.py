"""A network written in the formats models ship in today: a torch.export program (``.pt2``)
or ONNX (``.onnx``), the batch dimension left free, or TorchScript (``.pt``) for the
deployments that still load it. Used for the demo models' weights, and by ``models export``
to convert TorchScript demo weights without training again."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.core.contract import ModelContract, WeightsFormat
from pipeline.demo.nets import SmallCT3DNet, lesion_net, mednist_net

SUFFIX = {
    WeightsFormat.TORCH_EXPORT: ".pt2",
    WeightsFormat.ONNX: ".onnx",
    WeightsFormat.TORCHSCRIPT: ".pt",
}


def demo_net(contract: ModelContract) -> nn.Module:
    """The untrained network of a demo model, by its contract's name."""
    if contract.name == "mednist_classifier":
        return mednist_net(contract)
    if contract.name == "ct_lesion_segmentation":
        return lesion_net(contract)
    if contract.name == "ct_covid_classifier":
        return SmallCT3DNet()
    raise ValueError(f"{contract.name} is not one of the demo models")


def exported(net: nn.Module, contract: ModelContract, fmt: WeightsFormat) -> bytes:
    """The network's weights file in ``fmt``, for batches of any size up to 64."""
    net = net.eval()
    example = torch.zeros((2, *contract.input.shape))
    batch = torch.export.Dim("batch", min=1, max=64)
    if fmt is WeightsFormat.TORCHSCRIPT:
        with torch.no_grad():
            traced = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        return buf.getvalue()
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = Path(tmp) / f"model{SUFFIX[fmt]}"
        if fmt is WeightsFormat.TORCH_EXPORT:
            program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            with warnings.catch_warnings():  # the exporter's notes on torchvision's operators
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    input_names=[contract.input.name],
                    output_names=["LOGITS"],  # what the network answers
                    dynamic_shapes=({0: batch},),
                    dynamo=True,
                    external_data=False,  # one file: the weights inside (up to 2 GB)
                    verbose=False,
                )
        return path.read_bytes()


def from_torchscript(contract: ModelContract, torchscript: Path) -> nn.Module:
    """A demo network with the parameters of its TorchScript weights (same names, same
    answers), to be written in another format."""
    net = demo_net(contract)
    scripted = torch.jit.load(str(torchscript), map_location="cpu")  # type: ignore[no-untyped-call]
    net.load_state_dict(scripted.state_dict())
    return net.eval()


def from_program(contract: ModelContract, program: Path) -> nn.Module:
    """A demo network with the parameters and buffers of its torch.export weights."""
    net = demo_net(contract)
    loaded = torch.export.load(str(program))
    tensors = {**loaded.state_dict, **loaded.constants}
    missing = net.load_state_dict(tensors, strict=False).missing_keys
    if missing:
        raise ValueError(f"{program.name} lacks {len(missing)} of the network's tensors")
    return net.eval()
