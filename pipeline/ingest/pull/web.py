"""Finding and retrieving studies on a DICOMweb service: QIDO-RS (``GET <url>/studies?...``,
``application/dicom+json``) and WADO-RS (``GET <url>/studies/<uid>``, a multipart body of
``application/dicom`` parts). A retrieved study is streamed to a file in its staging folder,
never held in memory, then split into its instances."""

from __future__ import annotations

import http.client
import json
import mmap
import os
import secrets
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from pipeline.core import tls
from pipeline.core.network_settings import Source
from pipeline.ingest.pull.peer import STUDY_KEYS, Criteria, Match, PeerError, Retrieved, match_of
from pipeline.ingest.stow_parts import RequestError, split

MEDIA_DICOM = "application/dicom"
_CHUNK = 1 << 20


def _request(source: Source, path: str, accept: str) -> http.client.HTTPResponse:
    """GET ``<url><path>``; PeerError when the service cannot be reached or refuses."""
    assert source.url is not None
    base = urllib.parse.urlsplit(source.url.rstrip("/"))
    if base.scheme == "https":
        context = tls.client_context(source.tls_ca, source.tls_certificate, source.tls_private_key)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            base.hostname or "", base.port, timeout=source.timeout_s, context=context
        )
    else:
        conn = http.client.HTTPConnection(base.hostname or "", base.port, timeout=source.timeout_s)
    headers = {"Accept": accept}
    if source.bearer_token_file is not None:
        headers["Authorization"] = f"Bearer {source.bearer_token_file.read_text().strip()}"
    try:
        conn.request("GET", base.path + path, headers=headers)
        reply = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise PeerError(f"no answer from {base.netloc}: {exc}") from exc
    if reply.status >= 300:
        body = reply.read(300).decode(errors="replace")
        conn.close()
        raise PeerError(f"HTTP {reply.status} from {base.netloc}{base.path}{path}: {body}")
    return reply


def find(source: Source, criteria: Criteria) -> list[Match]:
    """QIDO-RS: the studies matching ``criteria``."""
    keys = {
        "StudyInstanceUID": criteria.study_uid,
        "AccessionNumber": criteria.accession,
        "PatientID": criteria.patient_id,
        "StudyDate": criteria.study_date,
        "ModalitiesInStudy": criteria.modality,
        "StudyDescription": criteria.description,
    }
    query = [(k, v) for k, v in keys.items() if v] + [("includefield", k) for k in STUDY_KEYS]
    reply = _request(source, "/studies?" + urllib.parse.urlencode(query), "application/dicom+json")
    with reply:
        body = reply.read()
    if reply.status == 204 or not body.strip():
        return []
    return [m for item in json.loads(body) if (m := match_of(Dataset.from_json(item)))]


def series_of(source: Source, study_uid: str) -> list[Dataset]:
    """QIDO-RS: the study's series (modality, description, body part, instances)."""
    fields = ("Modality", "SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances")
    query = urllib.parse.urlencode([("includefield", k) for k in fields])
    reply = _request(source, f"/studies/{study_uid}/series?{query}", "application/dicom+json")
    with reply:
        body = reply.read()
    return [Dataset.from_json(item) for item in json.loads(body)] if body.strip() else []


def get(
    source: Source,
    study_uid: str,
    into: Path,
    progress: Callable[[int], None],
    expected: int | None,
) -> Retrieved:
    """WADO-RS: the study's instances written whole into ``into``; short of ``expected`` (the
    QIDO-RS count), the rest count as failed."""
    into.mkdir(parents=True, exist_ok=True)
    done = Retrieved()
    media = f'multipart/related; type="{MEDIA_DICOM}"'
    reply = _request(source, f"/studies/{study_uid}", media)
    whole = into / f"wado-{secrets.token_hex(4)}.part"
    try:
        boundary = _boundary(reply.getheader("Content-Type") or "")
    except PeerError:
        reply.close()
        raise
    with reply, whole.open("wb") as f:
        while chunk := reply.read(_CHUNK):
            f.write(chunk)
    try:
        with whole.open("rb") as r, mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ) as body:
            for _headers, start, end in split(body, boundary.encode()):
                path = into / f"{secrets.token_hex(8)}.dcm"
                tmp = path.with_suffix(".tmp")
                with tmp.open("wb") as out:
                    out.write(body[start:end])
                    out.flush()
                    os.fsync(out.fileno())
                tmp.replace(path)
                done.stored.append(path)
                progress(len(done.stored))
    except (RequestError, ValueError) as exc:
        done.error = f"the WADO-RS answer is not a multipart body of instances: {exc}"
    finally:
        whole.unlink(missing_ok=True)
    done.completed = len(done.stored)
    if expected is not None and done.completed < expected:
        done.failed = expected - done.completed
    return done


def _boundary(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    raise PeerError(f"the WADO-RS answer names no multipart boundary ({content_type!r})")
