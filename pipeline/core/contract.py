"""A model's input contract and preprocessing, declared once beside its ``config.pbtxt``.

``triton_models/<name>/contract.yaml`` is read by the worker (to preprocess and to name the
labels) and by the Triton python backend (to validate requests and pick the activation), so
the two sides cannot drift apart.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONTRACT_FILE = "contract.yaml"
# Larger inputs are refused: by the worker before they are decoded (a 2048^3 float32 volume is
# 32 GiB), and by the python backend when a request carries a whole volume.
MAX_VOXELS = 512 * 512 * 2048


class InputKind(StrEnum):
    IMAGE = "image"  # PNG / JPEG
    NIFTI = "nifti"
    DICOM = "dicom"  # a DICOM file or a whole series (a volume)


class Activation(StrEnum):
    SOFTMAX = "softmax"  # one logit per label
    SIGMOID = "sigmoid"  # one logit: probability of labels[1]


class WeightsFormat(StrEnum):
    """How a model's weights are stored, by their file's suffix."""

    TORCH_EXPORT = "torch_export"  # .pt2: torch.export.save, loaded by torch.export.load
    ONNX = "onnx"  # .onnx: served by ONNX Runtime
    TORCHSCRIPT = "torchscript"  # .pt, .ts: torch.jit (MONAI bundles ship it)
    TENSORRT = "tensorrt"  # .plan: a TensorRT engine, built for one GPU model


WEIGHT_FORMATS = {
    ".pt2": WeightsFormat.TORCH_EXPORT,
    ".onnx": WeightsFormat.ONNX,
    ".pt": WeightsFormat.TORCHSCRIPT,
    ".ts": WeightsFormat.TORCHSCRIPT,
    ".plan": WeightsFormat.TENSORRT,
}


class Backend(StrEnum):
    """The Triton backend that serves a model in production."""

    PYTHON = "python"  # every format but TensorRT; answers probabilities, can run the window
    ONNXRUNTIME = "onnxruntime"  # .onnx, on ONNX Runtime (CUDA or CPU) without Python
    PYTORCH = "pytorch"  # .pt/.ts TorchScript, on LibTorch without Python
    TENSORRT = "tensorrt"  # .plan, on TensorRT (GPU only)


# The formats a native backend loads; the python backend loads all but TensorRT plans.
NATIVE_FORMATS = {
    Backend.ONNXRUNTIME: WeightsFormat.ONNX,
    Backend.PYTORCH: WeightsFormat.TORCHSCRIPT,
    Backend.TENSORRT: WeightsFormat.TENSORRT,
}


class Task(StrEnum):
    CLASSIFICATION = "classification"  # labels for the whole input
    SEGMENTATION = "segmentation"  # a label per voxel, predicted patch by patch


class SlidingWindow(BaseModel):
    """How a segmentation model covers a volume larger than its input: patches of the input
    shape, overlapping, blended, run ``batch_size`` at a time."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0, description="Patches' overlap.")
    batch_size: int = Field(default=4, ge=1, le=64, description="Patches per request.")
    mode: Literal["gaussian", "constant"] = Field(
        default="gaussian", description="How overlapping patches are blended."
    )
    runs_on: Literal["worker", "triton"] = Field(
        default="worker",
        description="worker: the worker cuts and blends, sending patches to Triton, where "
        "concurrent studies' patches batch together; triton: the worker sends the whole "
        "volume in one request and the model's own instance (its GPU in production) cuts and "
        "blends, moving the volume once instead of each patch and its answer",
    )


class TransformSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="A MONAI transform of the allow-list, e.g. ScaleIntensityRange.")
    args: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments.")


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="The tensor's name in the model's config.pbtxt.")
    # Inputs are float32; an output may be float16 (probabilities need no more, and a 3D
    # segmentation's are most of what a request moves).
    dtype: Literal["float32", "float16"] = Field(
        default="float32", description="float16 for an output only."
    )
    shape: tuple[int, ...] = Field(description="Without the batch dimension.")


class CodeSpec(BaseModel):
    """A coded concept (PS3.3 8.8): scheme designator, code value, code meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: str = Field(min_length=1, max_length=16, description="Coding scheme designator.")
    value: str = Field(min_length=1, max_length=64, description="Code value.")
    meaning: str = Field(min_length=1, max_length=64, description="Code meaning.")


# Our private coding scheme (PS3.3 8.2: designators starting with "99" are private): a label
# that has no standard code is written as (99DCMPIPE, <label>, <label>).
PRIVATE_SCHEME = "99DCMPIPE"


class ReportCodes(BaseModel):
    """How the model's answers are coded in DICOM SR and SEG. Labels without a code here are
    written in the private scheme ``99DCMPIPE``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    finding: CodeSpec = Field(
        default=CodeSpec(scheme="DCM", value="121071", meaning="Finding"),
        description="Concept name of the qualitative evaluation whose value is the label.",
    )
    labels: dict[str, CodeSpec] = Field(
        default_factory=dict, description="A code per label (scheme, value, meaning)."
    )
    segment_category: CodeSpec = Field(
        default=CodeSpec(
            scheme="SCT", value="49755003", meaning="Morphologically abnormal structure"
        ),
        description="Segmented property category of each SEG segment.",
    )
    segment_type: CodeSpec = Field(
        default=CodeSpec(scheme="SCT", value="52988006", meaning="Lesion"),
        description="Segmented property type of each SEG segment (one segment per lesion).",
    )

    def label(self, name: str) -> CodeSpec:
        return self.labels.get(name) or CodeSpec(
            scheme=PRIVATE_SCHEME, value=name[:64], meaning=name[:64]
        )


class ModelContract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The model's name in the repository and in routes.")
    description: str = Field(default="", description="For people; shown by `models list`.")
    task: Task = Field(default=Task.CLASSIFICATION, description="A label per input, or per voxel.")
    spatial_dims: Literal[2, 3] = Field(description="2D images or 3D volumes.")
    accepts: tuple[InputKind, ...] = Field(description="The input kinds routed to it.")
    input: TensorSpec = Field(description="The input tensor.")
    output: TensorSpec = Field(
        description="The output tensor as served: with the python backend, the probabilities "
        "(one per label; a segmentation's per voxel); with a native backend, the network's "
        "own output (its logits: one per label, or one for a sigmoid model)"
    )
    activation: Activation = Field(description="How its logits become probabilities.")
    labels: tuple[str, ...] = Field(description="The labels, in the output's order.")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="sigmoid models only")
    preprocessing: tuple[TransformSpec, ...] = Field(
        default=(), description="MONAI transforms the worker applies, in order: name and args."
    )
    weights: str = Field(
        default="model.pt",
        description="The weights file in the version folder; its suffix names its format: "
        ".pt2 a torch.export program, .onnx an ONNX model, .pt or .ts TorchScript, .plan a "
        "TensorRT engine.",
    )
    backend: Backend = Field(
        default=Backend.PYTHON,
        description="The Triton backend that serves it: python (any format but .plan; "
        "applies the activation and can run the sliding window), or a native one that runs "
        "the network without Python and answers its logits, the worker applying the "
        "activation: onnxruntime (.onnx), pytorch (TorchScript), tensorrt (.plan). A Triton "
        "without that backend (the embedded one) serves the model through the python backend "
        "with the same answers, a TensorRT plan excepted",
    )
    sliding_window: SlidingWindow = SlidingWindow()
    min_lesion_ml: float = Field(
        default=0.0,
        ge=0.0,
        description="segmentation models: connected components smaller than this are dropped "
        "from the mask and not reported",
    )
    codes: ReportCodes = ReportCodes()

    @property
    def weights_format(self) -> WeightsFormat:
        return WEIGHT_FORMATS[Path(self.weights).suffix.lower()]

    @property
    def serves_logits(self) -> bool:
        """Whether Triton answers the network's logits (a native backend) rather than the
        probabilities (the python backend applies the activation)."""
        return self.backend is not Backend.PYTHON

    def served_output_shape(self) -> tuple[int, ...]:
        """What a native backend answers for one patch or image: the network's output."""
        return logits_shape(self.task, self.activation, len(self.labels), self.input.shape)

    @model_validator(mode="after")
    def _consistent(self) -> ModelContract:
        if Path(self.weights).suffix.lower() not in WEIGHT_FORMATS or "/" in self.weights:
            raise ValueError(
                f"weights {self.weights!r}: a file name ending .pt2 (torch.export), .onnx "
                "(ONNX), .pt/.ts (TorchScript) or .plan (TensorRT)"
            )
        if len(self.input.shape) != self.spatial_dims + 1:
            raise ValueError(
                f"input.shape {self.input.shape} must be channel + {self.spatial_dims}D"
            )
        if self.input.dtype != "float32":
            raise ValueError("input.dtype must be float32")
        if self.serves_logits:
            self._native_consistent()
        elif self.weights_format is WeightsFormat.TENSORRT:
            raise ValueError("a TensorRT plan (.plan) is served by backend: tensorrt only")
        elif self.task is Task.SEGMENTATION:
            patch = self.input.shape[1:]
            allowed = ((len(self.labels), *patch), (len(self.labels) - 1, *patch))
            if self.output.shape not in allowed or self.activation is not Activation.SOFTMAX:
                raise ValueError(
                    f"a segmentation model has softmax output.shape {allowed[0]} (labels x "
                    f"patch), or {allowed[1]} without the background's channel"
                )
        elif self.output.shape != (len(self.labels),):
            raise ValueError(f"output.shape {self.output.shape} must be ({len(self.labels)},)")
        if unknown := set(self.codes.labels) - set(self.labels):
            raise ValueError(f"codes.labels names labels the model does not have: {unknown}")
        if self.activation is Activation.SIGMOID and len(self.labels) != 2:
            raise ValueError("a sigmoid model has exactly two labels: negative, positive")
        return self

    def _native_consistent(self) -> None:
        served = NATIVE_FORMATS[self.backend]
        if self.weights_format is not served:
            raise ValueError(
                f"backend {self.backend.value} serves {served.value} weights, not {self.weights}"
            )
        if self.output.shape != self.served_output_shape():
            raise ValueError(
                f"backend {self.backend.value} answers the network's output: output.shape "
                f"{self.served_output_shape()} (its logits), not {self.output.shape}"
            )
        if self.task is Task.SEGMENTATION and self.activation is not Activation.SOFTMAX:
            raise ValueError("a segmentation model's logits are one per label: softmax")
        if self.task is Task.SEGMENTATION and self.sliding_window.runs_on == "triton":
            raise ValueError(
                f"backend {self.backend.value} runs the network only: the sliding window runs "
                "on the worker (sliding_window.runs_on: worker)"
            )
        if self.backend is Backend.PYTORCH and not all(
            re.fullmatch(r".+__\d+", name) for name in (self.input.name, self.output.name)
        ):
            raise ValueError(
                "backend pytorch names tensors <name>__<index>, e.g. INPUT__0 and LOGITS__0"
            )

    def output_shape(self, item_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The answer's shape for one input of ``item_shape`` (without the batch dimension):
        a segmentation model answers on the input's own voxels, a patch or a whole volume."""
        if self.task is Task.SEGMENTATION:
            return (self.output.shape[0], *item_shape[1:])
        return self.output.shape

    @property
    def omits_background(self) -> bool:
        """A segmentation output without the first label's (background's) channel: its
        probability is 1 minus the sum of the others'."""
        return self.task is Task.SEGMENTATION and self.output.shape[0] == len(self.labels) - 1


def logits_shape(
    task: Task, activation: Activation, labels: int, input_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """A network's output for one input: a logit per label (per voxel for a segmentation), or
    one for a sigmoid classifier."""
    if task is Task.SEGMENTATION:
        return (labels, *input_shape[1:])
    return (1,) if activation is Activation.SIGMOID else (labels,)


def load_contract(model_dir: Path) -> ModelContract:
    path = model_dir / CONTRACT_FILE
    try:
        data = yaml.safe_load(path.read_text())
        return ModelContract.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid model contract: {exc}") from exc


def discover_contracts(repository: Path) -> dict[str, ModelContract]:
    """Every model folder of a Triton model repository that has a contract, by name."""
    found: dict[str, ModelContract] = {}
    for child in sorted(repository.iterdir()):
        if (child / CONTRACT_FILE).is_file() and (child / "config.pbtxt").is_file():
            contract = load_contract(child)
            if contract.name != child.name:
                raise ValueError(f"{child}: contract name {contract.name!r} != folder name")
            found[contract.name] = contract
    return found
