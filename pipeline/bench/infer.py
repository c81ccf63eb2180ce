"""Inference benchmark: the same weights called in-process, and through Triton.

    python -m pipeline.bench.infer [--seconds 5] [--json out.json]

For the 2D model (mednist_classifier, 1x64x64) and a 3D one (ct_lesion_segmentation, the
1x48^3 patches of the sliding window): the model's weights called directly (loaded as the
python backend loads them, :mod:`pipeline.serving.loaders`, with the same activation and output
the backend computes, :mod:`pipeline.serving.activation`) at batch 1
and 16, against the pipeline's client (``TritonClient``, as the worker calls it, through
shared memory with this local Triton) over gRPC and HTTP at batch 1 and 16, gRPC at batch
16 with the tensors inside the requests instead, and 4 concurrent batch-1 clients (which
Triton's dynamic batcher may batch together). Images/s and the ratio to direct at the same
batch size (4 clients: to direct batch 1). Everything runs on this machine's CPU unless
Triton finds a GPU; measurements are interleaved per model so drift hits all alike. The
client runs with one torch thread, as in a worker pool process; the direct runs with torch's
default, as Triton's python backend.

Then whole-volume segmentation (``--volume``, a 200-slice CT's 256x256x200 by default): the
sliding window in-process against the pipeline's two ways of running it through Triton, the
worker's (patches in requests) and Triton's own (``sliding_window.runs_on: triton``, the
volume in one request); volumes/s and the ratio to direct.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.http as httpclient

from pipeline.core.contract import ModelContract, discover_contracts
from pipeline.core.settings import Settings
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime import embedded_triton
from pipeline.serving.activation import probabilities
from pipeline.serving.loaders import load_net
from pipeline.serving.window import infer_volume, served_volume

MODELS = ("mednist_classifier", "ct_lesion_segmentation")


def _rate(call: Callable[[], int], seconds: float, threads: int) -> float:
    """Images per second with ``threads`` torch threads in this process: ``call`` returns how
    many images it did; warmed up first."""
    torch.set_num_threads(threads)
    call()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += call()
    return done / (time.perf_counter() - started)


def _inputs(contract: ModelContract, batch: int) -> np.ndarray:
    return np.random.default_rng(0).random((batch, *contract.input.shape), np.float32)


def _device() -> torch.device:
    """Where the direct runs compute: the GPU Triton's instance would take, when there is one."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _net(repository: Path, contract: ModelContract, device: torch.device) -> Any:
    weights = repository / contract.name / "1" / contract.weights
    return load_net(contract, weights, device)


def _direct(repository: Path, contract: ModelContract, batch: int) -> Callable[[], int]:
    device = _device()
    net = _net(repository, contract, device)
    x = _inputs(contract, batch)

    def call() -> int:
        # From host memory to host memory, as the backend does: copies count on a GPU too.
        with torch.inference_mode():
            probabilities(contract, net(torch.from_numpy(x).to(device))).cpu().numpy()
        return batch

    return call


def _triton(
    clients: contextlib.ExitStack, url: str, settings: Settings, contract: ModelContract, batch: int
) -> Callable[[], int]:
    # Closed before the server stops, their shared memory regions unregistered and removed
    # (left open, a run once waited the full 20 s for Triton to stop).
    client = clients.enter_context(TritonClient(url, settings.triton))
    x = _inputs(contract, batch)

    def call() -> int:
        client.infer(contract, x)
        return batch

    return call


def _concurrent(
    stack: contextlib.ExitStack, url: str, settings: Settings, contract: ModelContract, clients: int
) -> Callable[[], int]:
    calls = [_triton(stack, url, settings, contract, 1) for _ in range(clients)]
    rounds = 8  # each client sends this many requests per measured call

    def call() -> int:
        threads = [threading.Thread(target=lambda c=c: [c() for _ in range(rounds)]) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return clients * rounds

    return call


def _volume(args: argparse.Namespace) -> np.ndarray:
    """A CT-sized volume (batch, channel, *spatial) of random values in the model's range."""
    shape = (1, 1, *args.volume)
    return np.random.default_rng(1).random(shape, np.float32)


def _direct_volume(
    repository: Path, contract: ModelContract, volume: np.ndarray
) -> Callable[[], int]:
    """The sliding window over a whole volume in this process, patches and blending on the
    device the server's instance would use, from and to host memory."""
    device = _device()
    net = _net(repository, contract, device)

    def call() -> int:
        x = torch.from_numpy(volume).to(device)
        served_volume(contract, net, x).cpu().numpy()  # what the server answers
        return 1

    return call


def _triton_volume(
    clients: contextlib.ExitStack,
    url: str,
    settings: Settings,
    contract: ModelContract,
    volume: np.ndarray,
    runs_on: str,
) -> Callable[[], int]:
    """The pipeline's segmentation path (:func:`pipeline.inference.segment.segment` without the
    preprocessing and labelling): patches from the worker, or the volume in one request."""
    client = clients.enter_context(TritonClient(url, settings.triton))
    roi = contract.input.shape[1:]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(client.infer(contract, batch.numpy()).probabilities)

    def call() -> int:
        if runs_on == "triton":
            client.infer(contract, volume)
        else:
            infer_volume(torch.from_numpy(volume), roi, contract.sliding_window, predictor)
        return 1

    return call


def _server_ns(http: str, model: str) -> dict[str, int]:
    """Triton's cumulative per-phase times (ns) and request count for one model."""
    client = httpclient.InferenceServerClient(http.split("//", 1)[1])
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    ns = {phase: int(v.get("ns", 0)) for phase, v in stats.items()}
    return {**ns, "requests": int(stats["success"]["count"])}


def split(http: str, call: Callable[[], int], model: str, calls: int = 20) -> dict[str, float]:
    """Where a request's time goes, in ms per request: Triton's own phases (queue, copying
    inputs into the backend, the forward pass, copying outputs back) and what is left outside
    the server (client encoding, transport, decoding)."""
    call()
    before = _server_ns(http, model)
    started = time.perf_counter()
    for _ in range(calls):
        call()
    wall_ms = (time.perf_counter() - started) * 1000.0 / calls
    after = _server_ns(http, model)
    n = after["requests"] - before["requests"]
    per = {k: (after[k] - before[k]) / max(n, 1) / 1e6 for k in after if k != "requests"}
    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    out = {"client_ms": round(wall_ms, 2), **{f"{k}_ms": round(per.get(k, 0.0), 2) for k in phases}}
    out["outside_server_ms"] = round(wall_ms - per.get("success", 0.0), 2)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    repository = Path(args.model_repository).resolve()
    contracts = discover_contracts(repository)
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    settings = Settings(data_dir=work, triton={"model_repository": repository})  # type: ignore[arg-type]
    settings.ensure_dirs()
    proc, endpoints = embedded_triton.start(settings)
    plain = settings.model_copy(
        update={"triton": settings.triton.model_copy(update={"shared_memory": "off"})}
    )
    device = _device()
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    # The direct runs get torch's default threads, as Triton's python backend does. The
    # pipeline's client runs in a worker pool process with one torch thread (pipeline.tasks.worker):
    # here too, or the float16 answers' conversion would wake torch's other threads, which spin
    # after it while the server computes (8 ms of a core per 3D batch of 16: 0.85x against
    # 0.92x, side by side).
    direct_threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as clients:
            for name in args.models:
                contract = contracts[name]
                runs = {
                    "direct b1": _direct(repository, contract, 1),
                    "direct b16": _direct(repository, contract, 16),
                    "grpc b1": _triton(clients, endpoints.grpc, settings, contract, 1),
                    "grpc b16": _triton(clients, endpoints.grpc, settings, contract, 16),
                    "http b1": _triton(clients, endpoints.http, settings, contract, 1),
                    "http b16": _triton(clients, endpoints.http, settings, contract, 16),
                    # The same without shared memory (triton.shared_memory off): what it buys.
                    "grpc b16 no shm": _triton(clients, endpoints.grpc, plain, contract, 16),
                    "grpc 4 clients b1": _concurrent(
                        clients, endpoints.grpc, settings, contract, 4
                    ),
                }
                rates: dict[str, list[float]] = {k: [] for k in runs}
                for _ in range(args.repeats):
                    for key, call in runs.items():
                        threads = direct_threads if key.startswith("direct") else 1
                        rates[key].append(_rate(call, args.seconds, threads))
                med = {k: statistics.median(v) for k, v in rates.items()}
                figures[name] = {
                    k: {
                        "images_per_s": round(v, 1),
                        "x_direct": round(v / med["direct b16" if "b16" in k else "direct b1"], 2),
                    }
                    for k, v in med.items()
                }
                torch.set_num_threads(1)
                figures[name]["grpc b16 split"] = split(endpoints.http, runs["grpc b16"], name)
            if all(args.volume):
                figures["volume"] = _volumes(
                    args, repository, contracts, endpoints, settings, direct_threads
                )
    finally:
        proc.stop()
    return figures


def _volumes(
    args: argparse.Namespace,
    repository: Path,
    contracts: dict[str, ModelContract],
    endpoints: embedded_triton.TritonEndpoints,
    settings: Settings,
    direct_threads: int,
) -> dict[str, Any]:
    """Whole-volume segmentation, volumes/s: direct, the worker's sliding window through
    Triton, and Triton's own (``sliding_window.runs_on: triton``), at the sliding window's
    batch size of the served contract, over gRPC with shared memory."""
    contract = contracts["ct_lesion_segmentation"]
    volume = _volume(args)
    with contextlib.ExitStack() as clients:
        runs = {
            "direct": _direct_volume(repository, contract, volume),
            "worker window": _triton_volume(
                clients, endpoints.grpc, settings, contract, volume, "worker"
            ),
            "triton window": _triton_volume(
                clients, endpoints.grpc, settings, contract, volume, "triton"
            ),
        }
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, call in runs.items():
                threads = direct_threads if key == "direct" else 1
                rates[key].append(_rate(call, args.seconds, threads))
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows: dict[str, Any] = {
        "shape": list(volume.shape),
        "sliding window batch": contract.sliding_window.batch_size,
    }
    for key, value in med.items():
        rows[key] = {"volumes_per_s": round(value, 3), "x_direct": round(value / med["direct"], 2)}
    return rows


def main() -> None:
    # glibc's malloc churn costs ~25% at batch 16 (FIELD_NOTES); the embedded Triton runs with
    # these, so the direct runs get them too: they must be set before the process starts.
    tuned = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
    if any(os.environ.get(k) != v for k, v in tuned.items()):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **tuned})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-repository",
        default=os.environ.get("PIPELINE_TRITON__MODEL_REPOSITORY", "triton_models"),
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="Per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Median of this many.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--models",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(MODELS),
        help="Comma-separated models of the per-batch rows; empty skips them.",
    )
    parser.add_argument(
        "--volume",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(256, 256, 200),
        help="Whole-volume segmentation of this size (x,y,z); 0 skips it.",
    )
    args = parser.parse_args()
    figures = run(args)
    print(f"device: {figures['device']}")
    for model, rows in figures.items():
        if not isinstance(rows, dict):
            continue
        print(model)
        for key, row in rows.items():
            if not isinstance(row, dict):
                print(f"  {key:>18}: {row}")
                continue
            if "volumes_per_s" in row:
                rate, ratio = row["volumes_per_s"], row["x_direct"]
                print(f"  {key:>18}: {rate:8.3f} volumes/s {ratio:.2f}x direct")
                continue
            if "images_per_s" not in row:
                print(f"  {key:>18}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
                continue
            print(
                f"  {key:>18}: {row['images_per_s']:8.1f} images/s  {row['x_direct']:.2f}x direct"
            )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
