"""Tensors passed to a Triton on the same machine through system shared memory.

A 16-patch request of the 3D model is 7 MB: sent inside a gRPC or HTTP message it is copied
into the message, through the loopback socket and out again, which cost a quarter of the
request's time on a 2-core machine. With shared memory the client copies it once into a
region the server has mapped, and the request carries only the region's name.

Regions belong to one client: one for each model's input and one for its output, created on
first use, grown when a larger batch comes, unregistered and removed by :meth:`close`. Their
names carry host and process id (``dcmpipe-<host>-<pid>-<n>-...``) so that regions a killed
worker left registered can be told apart and dropped by the next client on that host.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)

PREFIX = "dcmpipe-"
IN_USE_WAIT_S = 5.0  # how long a region the server still holds may take to be let go
_NAME = re.compile(rf"^{PREFIX}(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-\d+-")
_clients = itertools.count()


class UnavailableError(Exception):
    """The server cannot use this process's shared memory (another machine, another
    container's /dev/shm, or /dev/shm full): tensors go in the messages instead."""


class ForgottenError(Exception):
    """The server no longer knows a region of this client (it restarted, or someone
    unregistered it): register them again."""


@dataclass
class Region:
    name: str
    handle: Any
    size: int

    def write(self, array: np.ndarray) -> None:
        shm.set_shared_memory_region(self.handle, [array])

    def read(self, dtype: Any, shape: list[int]) -> np.ndarray:
        """A view of the region's contents: copy it before the region's next use."""
        return np.asarray(shm.get_contents_as_numpy(self.handle, dtype, shape))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive all the same
        pass
    return True


class SharedMemory:
    """The system shared memory regions of one Triton client (``client``: tritonclient's
    gRPC or HTTP ``InferenceServerClient``)."""

    def __init__(self, client: Any, protocol: str) -> None:
        self._client = client
        self._protocol = protocol
        self._prefix = f"{PREFIX}{_host()}-{os.getpid()}-{next(_clients)}-"
        self._regions: dict[str, Region] = {}
        self._swept = False

    def region(self, key: str, size: int) -> Region:
        """The region for ``key`` (model and direction), at least ``size`` bytes."""
        found = self._regions.get(key)
        if found is not None and found.size >= size:
            return found
        if found is not None:
            self._drop(key)
        if not self._swept:
            self._sweep()
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self._prefix}{key}")
        try:
            handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
        except shm.SharedMemoryException as exc:
            raise UnavailableError(f"cannot create a shared memory region: {exc}") from exc
        try:
            self._client.register_system_shared_memory(name, f"/{name}", size)
        except (InferenceServerException, OSError) as exc:
            shm.destroy_shared_memory_region(handle)
            raise UnavailableError(
                f"Triton cannot map this process's shared memory: {exc}"
            ) from exc
        self._regions[key] = Region(name, handle, size)
        return self._regions[key]

    def close(self) -> None:
        for key in list(self._regions):
            self._drop(key)

    def _drop(self, key: str) -> None:
        region = self._regions.pop(key)
        # Triton refuses to unregister a region that a request it has just answered still
        # holds ("currently in use"): it lets go a moment after the response. Without waiting,
        # regions closed right after a call stayed mapped by the server (2 clients of 15 in a
        # loop), and a regrown region's name was then taken.
        deadline, pause = time.monotonic() + IN_USE_WAIT_S, 0.005
        while True:
            try:
                self._client.unregister_system_shared_memory(region.name)
                break
            except (InferenceServerException, OSError) as exc:  # the server may be gone
                if "in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(2 * pause, 0.1)
                    continue
                log.debug("could not unregister %s: %s", region.name, exc)
                break
        shm.destroy_shared_memory_region(region.handle)

    def _sweep(self) -> None:
        """Unregister regions that dead processes of this host left with the server."""
        self._swept = True
        try:
            if self._protocol == "grpc":
                status = self._client.get_system_shared_memory_status(as_json=True)
            else:
                status = self._client.get_system_shared_memory_status()
            # gRPC: {"regions": {name: ...}}; HTTP: [{"name": ...}, ...]
            if isinstance(status, dict):
                names = list(status.get("regions", {}))
            else:
                names = [str(r.get("name", "")) for r in status]
        except (InferenceServerException, OSError) as exc:  # housekeeping, never a failure
            log.debug("no shared memory status: %s", exc)
            return
        for name in names:
            match = _NAME.match(name)
            if match and match["host"] == _host() and not _alive(int(match["pid"])):
                try:
                    self._client.unregister_system_shared_memory(name)
                    log.info("unregistered %s, left by a process that is gone", name)
                except (InferenceServerException, OSError) as exc:
                    log.debug("could not unregister %s: %s", name, exc)
