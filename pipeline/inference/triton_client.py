"""Calls to a Triton server over gRPC or HTTP (optionally TLS), with errors classified.

A server that cannot be reached, or a model still loading, is a ``TransientError`` (the task
retries); a model the server does not have is ``ModelNotFoundError``; a request the model
rejects is an ``InputError``. Tensors travel as binary in both protocols, or, with a Triton
on this machine, through system shared memory (:mod:`pipeline.inference.shm`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from pipeline.core import observe
from pipeline.core.contract import ModelContract
from pipeline.core.errors import InputError, ModelNotFoundError, ModelOutputError, TransientError
from pipeline.core.sections import TritonSettings
from pipeline.inference import shm as triton_shm

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class InferenceOutput:
    probabilities: np.ndarray  # float32, (batch, *output shape), writable
    model_version: str
    milliseconds: float


class TritonClient:
    """One connection to Triton, for one thread at a time: each call reuses the client's
    shared memory regions (threads that infer at once each make their own client)."""

    def __init__(self, url: str, settings: TritonSettings) -> None:
        parts = urlsplit(url)
        self.url = url
        self.protocol = "grpc" if parts.scheme in {"grpc", "grpcs"} else "http"
        tls = parts.scheme in {"grpcs", "https"}
        target = f"{parts.hostname}:{parts.port}"
        self.timeout = settings.request_timeout_s
        self._client: Any
        # The HTTP client pulls in gevent: imported only by those who use it.
        self._lib: Any = grpcclient
        if self.protocol == "grpc":
            self._client = grpcclient.InferenceServerClient(
                url=target,
                ssl=tls,
                root_certificates=_opt(settings.root_certificates),
                private_key=_opt(settings.private_key),
                certificate_chain=_opt(settings.certificate_chain),
            )
        else:
            ssl_options: dict[str, str] = {}
            if settings.root_certificates:
                ssl_options["ca_certs"] = str(settings.root_certificates)
            if settings.private_key:
                ssl_options["keyfile"] = str(settings.private_key)
            if settings.certificate_chain:
                ssl_options["certfile"] = str(settings.certificate_chain)
            import tritonclient.http as httpclient

            self._lib = httpclient
            self._client = httpclient.InferenceServerClient(
                url=target,
                ssl=tls,
                ssl_options=ssl_options or None,
                connection_timeout=10.0,
                network_timeout=self.timeout,
            )

        self._shm: triton_shm.SharedMemory | None = None
        if settings.shared_memory == "auto" and parts.hostname in LOOPBACK:
            self._shm = triton_shm.SharedMemory(self._client, self.protocol)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except (InferenceServerException, OSError):
            return False

    def computes_on_this_cpu(self) -> bool:
        """Whether this Triton runs on this machine (a loopback URL) with a model's instances
        on the CPU; also when that cannot be told (not reachable yet). A GPU instance of a
        local Triton, or a Triton elsewhere, leaves this machine's cores to the worker."""
        if urlsplit(self.url).hostname not in LOOPBACK:
            return False
        try:
            for model in self.models():
                if model["state"] != "READY":
                    continue
                if self.protocol == "grpc":
                    config = self._client.get_model_config(model["name"], as_json=True)["config"]
                else:
                    config = self._client.get_model_config(model["name"])
                # The server's own config: KIND_AUTO is already resolved to GPU or CPU.
                groups = config.get("instance_group") or [{}]
                if any(g.get("kind") != "KIND_GPU" for g in groups):
                    return True
        except (TransientError, InferenceServerException, OSError, KeyError):
            return True
        return False

    def models(self) -> list[dict[str, str]]:
        """The server's repository index: name, version and state of each model."""
        try:
            if self.protocol == "grpc":
                index = self._client.get_model_repository_index(as_json=True).get("models", [])
            else:
                index = self._client.get_model_repository_index()
        except (InferenceServerException, OSError) as exc:
            raise TransientError(f"Triton at {self.url} unreachable: {_message(exc)}") from exc
        return [
            {
                "name": m.get("name", ""),
                "version": str(m.get("version", "")),
                "state": m.get("state", ""),
            }
            for m in index
        ]

    def infer(self, contract: ModelContract, batch: np.ndarray) -> InferenceOutput:
        for attempt in (1, 2):
            if self._shm is None:
                break
            try:
                return self._infer(contract, batch, self._shm)
            except triton_shm.UnavailableError as exc:
                if not self.is_ready():  # down for now: try shared memory again next time
                    raise TransientError(f"Triton at {self.url} unavailable: {exc}") from exc
                log.warning("%s; tensors go inside the requests from now on", exc)
                self._shm.close()
                self._shm = None
            except triton_shm.ForgottenError:
                log.info("Triton no longer knows this client's shared memory: registering again")
                self._shm.close()
                if attempt == 2:
                    self._shm = None
        return self._infer(contract, batch, None)

    def _infer(
        self, contract: ModelContract, batch: np.ndarray, shm: triton_shm.SharedMemory | None
    ) -> InferenceOutput:
        lib = self._lib
        grpc = self.protocol == "grpc"
        inp = lib.InferInput(contract.input.name, list(batch.shape), "FP32")
        out = lib.InferRequestedOutput(
            contract.output.name, **({} if grpc else {"binary_data": True})
        )
        region = None
        if shm is not None:
            source = shm.region(f"{contract.name}-input", batch.nbytes)
            source.write(batch)
            inp.set_shared_memory(source.name, batch.nbytes)
            itemsize = np.dtype(contract.output.dtype).itemsize
            size = len(batch) * int(np.prod(contract.output_shape(batch.shape[1:]))) * itemsize
            region = shm.region(f"{contract.name}-output", size)
            out.set_shared_memory(region.name, size)
        elif grpc:
            inp.set_data_from_numpy(batch)
        else:
            inp.set_data_from_numpy(batch, binary_data=True)
        started = time.perf_counter()
        try:
            result = self._client.infer(
                contract.name,
                [inp],
                outputs=[out],
                **({"client_timeout": self.timeout} if grpc else {}),
            )
            # The protobuf's field: as_json would base64 the whole output tensor first
            # (14 MB for 16 segmentation patches; it halved the gRPC throughput).
            response = result.get_response()
            version = str(response.model_version if grpc else response.get("model_version", ""))
            probs = self._output(result, contract, region)
            if contract.serves_logits:
                probs = _activated(contract, probs)
        except (InferenceServerException, OSError) as exc:
            if shm is not None and "shared memory" in _message(exc).lower():
                raise triton_shm.ForgottenError(_message(exc)) from exc
            raise self._classify(contract.name, exc) from exc
        ms = (time.perf_counter() - started) * 1000.0
        observe.triton_call(contract.name, ms / 1000.0)
        return InferenceOutput(probs, version, ms)

    def _output(
        self, result: Any, contract: ModelContract, region: triton_shm.Region | None
    ) -> np.ndarray:
        """The output as a float32 array of the caller's own: copied out of the shared memory
        region (reused by the next call) or the response's read-only buffer."""
        name = contract.output.name
        try:
            if region is None:
                probs = result.as_numpy(name)
            else:
                tensor = result.get_output(name)
                if tensor is None:
                    probs = None
                else:
                    grpc = self.protocol == "grpc"
                    shape = list(tensor.shape if grpc else tensor["shape"])
                    dtype = triton_to_np_dtype(tensor.datatype if grpc else tensor["datatype"])
                    probs = region.read(dtype, shape)
        except (ValueError, TypeError) as exc:
            # Seen with Triton 2.51's python backend when the model environment has numpy 2:
            # the output arrives with its shape but no data. Retrying cannot help.
            raise ModelOutputError(
                f"{contract.name} returned a {name} whose data does not fill "
                f"its shape ({exc}); check the Triton model environment (numpy < 2 for Triton "
                "2.51's python backend, see docs/operations/deploy.md)"
            ) from exc
        if probs is None:
            raise InputError(f"{contract.name} returned no {name}")
        if probs.dtype == np.float16:
            return _half_to_float(probs)
        return np.array(probs, dtype=np.float32)

    def _classify(self, model: str, exc: Exception) -> Exception:
        """Decide whether a failed call is worth retrying, by asking the server what it has."""
        detail = _message(exc)
        if not self.is_ready():
            return TransientError(f"Triton at {self.url} unavailable: {detail}")
        try:
            index = {m["name"]: m for m in self.models()}
        except TransientError as unreachable:
            return unreachable
        if model not in index:
            return ModelNotFoundError(f"Triton at {self.url} does not serve model {model!r}")
        if index[model]["state"] != "READY":
            return TransientError(
                f"model {model!r} is {index[model]['state'] or 'not ready'} "
                f"on Triton at {self.url}: {detail}"
            )
        return InputError(f"model {model!r} rejected the request: {detail}")


def _half_to_float(half: np.ndarray) -> np.ndarray:
    """float16 to a float32 array of the caller's own. numpy 1.x converts half floats one by
    one (17 ms for 16 segmentation patches in session 8, the largest cost outside the server);
    torch uses the CPU's conversion instructions (1 ms), with the same values bit for bit."""
    import torch  # the worker has it loaded; other users of this client need not

    # The copy makes the array writable (torch refuses read-only buffers without a warning).
    converted: np.ndarray = torch.from_numpy(np.array(half)).to(torch.float32).numpy()
    return converted


def _activated(contract: ModelContract, logits: np.ndarray) -> np.ndarray:
    """A native backend's logits as the probabilities the python backend would answer."""
    import torch

    from pipeline.serving.activation import probabilities

    p: np.ndarray = probabilities(contract, torch.from_numpy(logits)).float().numpy()
    return p


def _opt(path: Any) -> str | None:
    return str(path) if path else None


def _message(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException):
        return str(exc.message() or exc)
    return f"{type(exc).__name__}: {exc}"
