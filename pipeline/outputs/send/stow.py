"""Results sent by DICOMweb STOW-RS, for destinations that are a DICOMweb service (a cloud
archive, a PACS's web gateway) rather than a DICOM node.

The files of each study go in one ``POST <url>/studies`` request, ``multipart/related;
type="application/dicom"``, each file as it is on disk, streamed. The answer's Store Instances
Response Module (PS3.18 Annex I) says which instances were stored; the others failed for the
reason given. What may pass is retried (by the send task, as for a busy PACS; by ``send
--url``): no answer, a connection refused, 401 (a token about to be refreshed), 408, 429 and
5xx, and Failure Reasons 0xA7xx (out of resources). What will not pass is a refusal for good:
other 4xx, or any other Failure Reason.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.core.tls import client_context
from pipeline.outputs.send.scu import SendReport

MEDIA_TYPE = "application/dicom"
# 401: a bearer token that expired; whatever refreshes it may have done so by the next try.
_TRANSIENT_STATUS = {401, 408, 429}


class StowTarget:
    """Where and how to post: ``url`` the service's base (``…/studies`` is appended)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        tls_files: tuple[Path | None, Path | None, Path | None] = (None, None, None),
        bearer_token_file: Path | None = None,
    ) -> None:
        """``tls_files``: for https, the CA bundle to verify the service against (the
        system's CAs if None), and a client certificate and its key (None: no certificate)."""
        self.url = urllib.parse.urlsplit(url.rstrip("/") + "/studies")
        if self.url.scheme not in ("http", "https") or not self.url.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.timeout_s = timeout_s
        self.context = client_context(*tls_files) if self.url.scheme == "https" else None
        self.bearer_token_file = bearer_token_file

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.url.hostname or "", self.url.port
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout_s, context=self.context
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)

    def headers(self, boundary: str) -> dict[str, str]:
        headers = {
            "Content-Type": f'multipart/related; type="{MEDIA_TYPE}"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if self.bearer_token_file is not None:
            # Read at each sending: a token refresher may have rewritten it meanwhile.
            token = self.bearer_token_file.read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers


def send(paths: Sequence[Path], target: StowTarget) -> SendReport:
    """One attempt at storing every file, a request per study (the receiving end may take a
    request's end as the study's, as ours does); what failed, and whether it may pass."""
    report = SendReport()
    studies: dict[str, dict[str, Path]] = {}  # study UID -> SOP Instance UID -> file
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            studies.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = path
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a refusal of its own
            report.failed[path] = f"not a readable DICOM file ({type(exc).__name__})"
    for sops in studies.values():
        _post(sops, target, report)
    return report


def _post(sops: dict[str, Path], target: StowTarget, report: SendReport) -> None:
    boundary = f"dicom-pipeline-{secrets.token_hex(12)}"
    files = list(sops.values())
    try:
        headers = target.headers(boundary)
    except OSError as exc:  # may be written by the time of the retry
        _all(report, files, f"cannot read the bearer token file: {exc}", transient=True)
        return
    try:
        headers["Content-Length"] = str(body_length(files, boundary))
        conn = target.connection()
        try:
            # A refusal answered before the body was read breaks the pipe; the answer may
            # still be there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # Streamed from the files: a study of gigabytes is never held in memory.
                conn.request("POST", target.url.path, body(files, boundary), headers)
            reply = conn.getresponse()
            status, answer = reply.status, reply.read()
            media = (reply.getheader("Content-Type") or "").split(";")[0].strip()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        _all(report, files, f"no answer from {target.url.netloc}: {exc}", transient=True)
        return
    if status >= 300 and status not in (409,):  # 409: per-instance reasons in the answer
        why = f"HTTP {status} from {target.url.netloc}: {answer[:200].decode(errors='replace')}"
        _all(report, files, why, transient=status in _TRANSIENT_STATUS or status >= 500)
        return
    stored, failed = _instances(answer if media.endswith("json") else b"{}")
    for sop, path in sops.items():
        if sop in stored:
            report.sent.append(path)
        elif sop in failed:
            reason = failed[sop]
            report.failed[path] = f"{target.url.netloc} refused it: Failure Reason 0x{reason:04X}"
            if reason >> 8 == 0xA7:  # out of resources: may pass
                report.transient.add(path)
        elif status == 200:  # "stored every instance", though not listed one by one
            report.sent.append(path)
        else:
            report.failed[path] = f"HTTP {status} from {target.url.netloc}, instance not named"
            report.transient.add(path)


def _delimiters(boundary: str) -> tuple[bytes, bytes]:
    """What comes before each file, and what closes the body."""
    head = b"--%s\r\nContent-Type: %s\r\n\r\n" % (boundary.encode(), MEDIA_TYPE.encode())
    return head, b"--%s--\r\n" % boundary.encode()


def body(files: Sequence[Path], boundary: str) -> Iterator[bytes]:
    """The multipart body holding ``files`` as they are on disk, read a block at a time."""
    head, tail = _delimiters(boundary)
    for path in files:
        yield head
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                yield block
        yield b"\r\n"
    yield tail


def body_length(files: Sequence[Path], boundary: str) -> int:
    head, tail = _delimiters(boundary)
    return sum(len(head) + f.stat().st_size + 2 for f in files) + len(tail)


def _instances(answer: bytes) -> tuple[set[str], dict[str, int]]:
    """The stored SOP Instance UIDs, and the failed ones with their Failure Reasons."""
    try:
        doc = Dataset.from_json(json.loads(answer or b"{}"))
    except (ValueError, TypeError, KeyError):
        return set(), {}
    stored = {
        str(i.get("ReferencedSOPInstanceUID", "")) for i in doc.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(i.get("ReferencedSOPInstanceUID", "")): int(i.get("FailureReason", 0x0110))
        for i in doc.get("FailedSOPSequence", [])
    }
    return stored, failed


def _all(report: SendReport, paths: Iterable[Path], why: str, *, transient: bool) -> None:
    for path in paths:
        report.failed[path] = why
        if transient:
            report.transient.add(path)


def send_retrying(
    paths: Sequence[Path], target: StowTarget, retries: int, advance: Callable[[int], None]
) -> SendReport:
    """:func:`send`, and what failed for a reason that may pass tried again, up to
    ``retries`` times, with backoff; ``advance`` hears how many files each round settled."""
    report = SendReport()
    todo = list(paths)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0**attempt, 30.0))
        batch = send(todo, target)
        report.sent += batch.sent
        todo = [p for p in batch.failed if p in batch.transient and attempt < retries]
        report.failed.update({p: why for p, why in batch.failed.items() if p not in todo})
        advance(len(batch.sent) + len(batch.failed) - len(todo))
        if not todo:
            break
    return report
