"""A Triton python-backend model that serves a network described by a contract, its weights
in any format :mod:`pipeline.serving.loaders` reads (torch.export, ONNX, TorchScript).

Each ``triton_models/<name>/1/model.py`` subclasses this. It fixes the seed demo's defects:
weights come from the model's own version folder (no download), one forward pass per dynamic
batch, a bad request gets its own error without failing the others, the device follows the
instance group (GPU in production, CPU here), nothing touches the filesystem per request, and
probabilities are returned.

Imported only inside the Triton stub, where ``triton_python_backend_utils`` exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from pipeline.core.contract import MAX_VOXELS, Task, load_contract
from pipeline.serving.activation import served
from pipeline.serving.loaders import load_net


class TorchScriptClassifier:
    def initialize(self, args: dict[str, str]) -> None:
        model_dir = Path(args["model_repository"])
        self.contract = load_contract(model_dir)
        if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        else:
            self.device = torch.device("cpu")
        weights = model_dir / args["model_version"] / self.contract.weights
        if not weights.is_file():
            raise pb_utils.TritonModelException(
                f"{self.contract.name}: weights {weights} not found; run "
                "`dicom-pipeline models build-demo` or put the real TorchScript file there"
            )
        self.net = load_net(self.contract, weights, self.device)
        config = json.loads(args["model_config"])
        self.max_batch = int(config.get("max_batch_size", 0)) or 1

    def _validated(self, request: Any) -> np.ndarray:
        """The request's input, or ValueError with a message meant for the caller."""
        spec = self.contract.input
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is None:
            raise ValueError(f"missing input {spec.name}")
        array = tensor.as_numpy()
        if array.dtype != np.float32:
            raise ValueError(f"{spec.name} must be float32, got {array.dtype}")
        shape = tuple(array.shape[1:])
        if self.contract.task is Task.SEGMENTATION:  # patches, or whole volumes of any size
            if len(shape) != len(spec.shape) or shape[0] != spec.shape[0] or 0 in shape:
                raise ValueError(
                    f"{spec.name} must have shape [batch, {spec.shape[0]}, *spatial], "
                    f"got {array.shape}"
                )
            if int(np.prod(shape[1:])) > MAX_VOXELS:  # the window's sums would not fit
                raise ValueError(f"{spec.name} {array.shape} is larger than {MAX_VOXELS} voxels")
        elif shape != spec.shape:
            raise ValueError(
                f"{spec.name} must have shape [batch, {spec.shape}], got {array.shape}"
            )
        return np.asarray(array)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        accepted: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                accepted.append((i, self._validated(request)))
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if accepted:
            accepted = self._finite(accepted, responses)
        if accepted:
            accepted = self._volumes(accepted, responses)
        if accepted:
            arrays = [a for _, a in accepted]
            # One forward pass for the whole dynamic batch; a lone request is used as it is
            # (a 16-patch 3D request is 7 MB: every copy shows on a GPU).
            host = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            batch = torch.from_numpy(host).to(self.device)
            try:
                with torch.inference_mode():
                    logits = self.net(batch)
                    probabilities = served(self.contract, logits).cpu().numpy()
            except RuntimeError as exc:  # e.g. out of GPU memory: answer, don't crash the stub
                for i, _ in accepted:
                    error = pb_utils.TritonError(f"{self.contract.name} forward pass failed: {exc}")
                    responses[i] = pb_utils.InferenceResponse(error=error)
                return responses
            start = 0
            for i, array in accepted:
                part = probabilities[start : start + len(array)]  # contiguous: no copy
                start += len(array)
                out = pb_utils.Tensor(self.contract.output.name, part)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def _volumes(
        self, accepted: list[tuple[int, np.ndarray]], responses: list[Any]
    ) -> list[tuple[int, np.ndarray]]:
        """Answer the requests that carry whole volumes (anything but one patch's shape) by a
        sliding window on this instance's device; the patches are left for one batch.
        Triton's dynamic batcher batches only requests of one shape, so a volume arrives
        alone or among volumes."""
        patch = self.contract.input.shape
        patches = []
        for i, array in accepted:
            if array.shape[1:] == patch:
                patches.append((i, array))
                continue
            # Imported here: a classifier's stub has no use for MONAI.
            from pipeline.serving.window import served_volume

            volume = torch.from_numpy(array).to(self.device)
            try:
                answer = served_volume(self.contract, self.net, volume).cpu()
                part = np.ascontiguousarray(answer.numpy())  # a cropped view may not be
            except RuntimeError as exc:  # e.g. out of GPU memory for a huge volume
                error = pb_utils.TritonError(f"{self.contract.name} sliding window failed: {exc}")
                responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            out = pb_utils.Tensor(self.contract.output.name, part)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return patches

    def _finite(
        self, accepted: list[tuple[int, np.ndarray]], responses: list[Any]
    ) -> list[tuple[int, np.ndarray]]:
        """The requests free of NaN and infinity; the others answered with an error."""
        kept = []
        for i, array in accepted:
            if np.isfinite(array).all():
                kept.append((i, array))
            else:
                name = self.contract.input.name
                error = pb_utils.TritonError(f"{name} holds NaN or infinite values")
                responses[i] = pb_utils.InferenceResponse(error=error)
        return kept

    def finalize(self) -> None:
        del self.net  # the weights freed with the instance
