"""Orthanc (Debian's package) as a real PACS for the tests: an instance of the test's own, with
its own configuration, free ports and storage folder, stopped when the test ends."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.runtime.process import free_port

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None, reason="needs Orthanc: apt-get install orthanc orthanc-dicomweb"
)


@dataclass(frozen=True)
class Orthanc:
    url: str  # its REST API, http://127.0.0.1:<port>
    dicom_port: int
    ae_title: str

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            data: bytes = response.read()
            return data

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def post(self, path: str, data: bytes) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


@contextmanager
def running_orthanc(
    folder: Path, ae_title: str = "ORTHANC", modalities: dict[str, list[object]] | None = None
) -> Iterator[Orthanc]:
    """A fresh Orthanc listening on loopback, ready when its REST API answers; ``modalities``
    are the DICOM peers it knows ({name: [AE title, host, port]}), its log verbose
    (``folder/orthanc.log``: the associations it served)."""
    assert ORTHANC is not None
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = {
        "Name": "pipeline-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        # Its DICOMweb plugin (Debian's orthanc-dicomweb), at <url>/dicom-web, where installed
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
        "DicomModalities": modalities or {},
        "DicomAlwaysAllowEcho": True,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [ORTHANC, "--verbose", str(folder / "orthanc.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    peer = Orthanc(f"http://127.0.0.1:{http}", dicom, ae_title)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                peer.json("/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield peer
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
