"""The real ``tritonserver`` carried by the nvidia-pytriton wheel, on loopback, on CPU.

What it needs (see FIELD_NOTES): a backend directory we own with the python-backend stub for
the running Python copied in (site-packages is never modified), the wheel's library folder on
``LD_LIBRARY_PATH``, and this virtual environment's ``bin/`` first on ``PATH`` so the stub's
embedded interpreter finds torch, monai and this package. The wheel carries the python backend
only: models on native backends are served through it (:mod:`pipeline.runtime.served_models`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.contract import discover_contracts
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_write_json
from pipeline.core.settings import Settings
from pipeline.runtime.process import ManagedProcess, free_port
from pipeline.runtime.served_models import served_repository


def _pytriton_dir() -> Path:
    """Where the wheel put ``pytriton``, found without importing it (its import pulls in
    dozens of modules the server binary does not need)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: it carries the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations)))


_PYTRITON = _pytriton_dir()
SERVER_DIR = _PYTRITON / "tritonserver"
LIBS_DIR = _PYTRITON.parent / "nvidia_pytriton.libs"


@dataclass(frozen=True)
class TritonEndpoints:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # grpc://127.0.0.1:PORT
    metrics: str

    @property
    def url(self) -> str:
        """The URL the pipeline's clients use: gRPC carries tensors as binary."""
        return self.grpc


def endpoints_file(settings: Settings) -> Path:
    """Written by a running embedded Triton, read by `worker` and `infer` on the same data dir."""
    return settings.run_dir / "triton.json"


def read_endpoints(settings: Settings) -> TritonEndpoints | None:
    try:
        return TritonEndpoints(**json.loads(endpoints_file(settings).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def prepare_backends(run_dir: Path) -> Path:
    """A backend directory of our own with the stub for this Python in ``python/``."""
    target = run_dir / "triton" / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = SERVER_DIR / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton carries no python-backend stub for Python {version}")
    marker = target / ".source"
    source = f"{SERVER_DIR}:{version}"
    if not (marker.is_file() and marker.read_text() == source):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(SERVER_DIR / "backends", target)
        shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
        marker.write_text(source)
    return target


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libdirs = [str(LIBS_DIR)]
    # The interpreter's own libpython first, so the stub does not pick up another one.
    pylib = sysconfig.get_config_var("LIBDIR")
    if pylib:
        libdirs.append(str(pylib))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # glibc malloc churn cost ~25% at batch 16 (FIELD_NOTES); keep large blocks mapped.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 * 1024 * 1024))
    return env


def _ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start(settings: Settings) -> tuple[ManagedProcess, TritonEndpoints]:
    """Start tritonserver serving ``settings.triton.model_repository`` and wait until ready."""
    t = settings.triton
    run = settings.run_dir.resolve()
    repo = t.model_repository.resolve()
    if not repo.is_dir():
        raise RuntimeError(f"model repository {repo} does not exist")
    backends = prepare_backends(run)
    repo = served_repository(repo, backends, run / "triton" / "models").repository
    http_port = t.http_port or free_port()
    grpc_port = t.grpc_port or free_port()
    metrics_port = t.metrics_port or free_port()
    shm = t.shm_default_byte_size
    argv = [
        str(SERVER_DIR / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        f"--backend-config=python,shm-default-byte-size={shm}",
        f"--backend-config=python,shm-growth-byte-size={shm}",
        "--backend-config=python,stub-timeout-seconds=120",
        "--log-verbose=0",
    ]
    proc = ManagedProcess("triton", argv, run / "logs" / "triton.log", env=server_env())
    proc.start()
    http = f"http://127.0.0.1:{http_port}"
    proc.wait_ready(lambda: _ready(http), t.startup_timeout_s)
    endpoints = TritonEndpoints(
        http=http,
        grpc=f"grpc://127.0.0.1:{grpc_port}",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    atomic_write_json(endpoints_file(settings), endpoints.__dict__)
    return proc, endpoints


def check_weights(settings: Settings) -> None:
    """PipelineError naming the models of the repository that have no weights: Triton would
    fail to load them."""
    repo = settings.triton.model_repository
    missing = [
        name
        for name, c in discover_contracts(repo).items()
        if not (repo / name / "1" / c.weights).is_file()
    ]
    if missing:
        raise PipelineError(
            f"no weights for {', '.join(missing)} in {repo}: run "
            "`dicom-pipeline models build-demo` (demo weights) or add real "
            "weights with `models add` (see docs/guides/models.md)"
        )
