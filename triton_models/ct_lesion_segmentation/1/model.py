"""Triton python-backend entry point of ct_lesion_segmentation.

The behaviour (contract checks, batching, device choice, per-request errors) is shared and lives
in pipeline.serving.torchscript_backend; this model's specifics are in ../contract.yaml and its
TorchScript weights in ./model.pt.
"""

from pipeline.serving.torchscript_backend import TorchScriptClassifier


class TritonPythonModel(TorchScriptClassifier):
    pass
