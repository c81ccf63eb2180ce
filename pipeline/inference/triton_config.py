"""A model's ``config.pbtxt``, written from its contract for the backend that serves it.

The python backend takes patches or, for a segmentation model, whole volumes of any size (its
spatial dimensions left free); a native backend (ONNX Runtime, LibTorch, TensorRT) runs the
network alone, on inputs of the contract's shape, and answers its logits."""

from __future__ import annotations

from pipeline.core.contract import Backend, ModelContract, Task

TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}

CONFIG = """# {origin}
name: "{name}"
backend: "{backend}"{filename}
max_batch_size: {max_batch}
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


def config_text(contract: ModelContract, origin: str, backend: Backend | None = None) -> str:
    """The contract's config for ``backend`` (by default the contract's own). The python
    backend standing in for a native one keeps the native one's shapes and answers."""
    backend = backend or contract.backend
    free = contract.task is Task.SEGMENTATION and not contract.serves_logits
    native = backend is not Backend.PYTHON
    return CONFIG.format(
        origin=origin,
        name=contract.name,
        backend=backend.value,
        # A native backend finds model.onnx, model.pt or model.plan by default; .ts is ours.
        filename=f'\ndefault_model_filename: "{contract.weights}"' if native else "",
        # A segmentation's patches come sliding_window.batch_size at a time from each study.
        max_batch=16 if contract.task is Task.SEGMENTATION else 8,
        input_name=contract.input.name,
        input_dims=_dims(contract.input.shape, free),
        output_name=contract.output.name,
        output_type=TYPES[contract.output.dtype],
        output_dims=_dims(contract.output.shape, free),
    )


def _dims(shape: tuple[int, ...], free: bool) -> str:
    return ", ".join(map(str, (shape[0], *(-1 for _ in shape[1:])) if free else shape))
