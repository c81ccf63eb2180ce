"""DICOMweb STOW-RS into the receiver, sent by a real DICOMweb client (dicomweb-client, as
viewers and archives use it) and, for what no client would send, by hand over HTTP; a real
embedded Redis behind the receiver, studies checked on disk and in the queue."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.core.instances import INCOMING
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import (
    TEST_PATIENT_ID,
    TEST_PATIENT_NAME,
    ct_slices,
    new_series,
    write_series,
)
from pipeline.outputs.send import dispatch
from pipeline.outputs.send import stow as stow_send
from pipeline.outputs.send.dispatch import Delivery
from pipeline.runtime.process import free_port

from .conftest import make_settings
from .test_receiver import (  # noqa: F401 - receiver: the fixture
    Running,
    _scp_env,
    mutual_tls_files,
    receiver,
    wait_for,
)

FAILED = "00081198"
STORED = "00081199"
REASON = "00081197"
INSTANCE = "00081155"
STOW_METRIC = "dicom_pipeline_stow_requests_total"


def _client(rx: Running, **kwargs: Any) -> DICOMwebClient:
    rs = rx.settings.receiver
    scheme = "https" if rs.tls_certificate else "http"
    return DICOMwebClient(f"{scheme}://127.0.0.1:{rs.dicomweb_port}", **kwargs)


def _part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _post(
    rx: Running, parts: list[bytes], path: str = "/studies", content_type: str | None = None
) -> tuple[int, Any]:
    """A STOW-RS request built by hand: for bodies a client would not send."""
    boundary = "b0undary-5d2c"
    body = (
        b"".join(
            b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p)
            for p in parts
        )
        + b"--%s--\r\n" % boundary.encode()
    )
    conn = http.client.HTTPConnection("127.0.0.1", rx.settings.receiver.dicomweb_port, timeout=30)
    kind = content_type or f'multipart/related; type="application/dicom"; boundary={boundary}'
    conn.request("POST", path, body=body, headers={"Content-Type": kind})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    is_json = reply.getheader("Content-Type") == "application/dicom+json"
    return reply.status, json.loads(data) if is_json else data.decode()


def _uids(doc: dict[str, Any], key: str) -> list[str]:
    return [item[INSTANCE]["Value"][0] for item in doc.get(key, {}).get("Value", [])]


def test_a_study_stored_by_stow_rs_is_one_queued_job_as_by_c_store(
    receiver: Callable[..., Running],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    rx = receiver(dicomweb_port=free_port())
    spec = new_series(30, 64, 64)
    sent = list(ct_slices(spec))
    # 64 KiB chunks: the client streams the 30 instances (250 KB) in chunked transfer encoding.
    answer = _client(rx, chunk_size=64 * 1024).store_instances(sent)

    assert {str(ds.SOPInstanceUID) for ds in sent} == {
        str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence
    }
    assert "FailedSOPSequence" not in answer
    [task] = rx.wait_tasks(1)
    assert task["study"]["study_uid"] == spec.study_uid
    assert task["study"]["instances"] == 30
    assert task["study"]["completed_by"] == "association-released"  # the request's end
    assert task["study"]["calling_aet"] is None  # no AE title over HTTP
    files = rx.job_files(task)
    assert len(files) == 30
    for ds in sent:
        [path] = [f for f in files if f.stem == str(ds.SOPInstanceUID)]
        # The client sends the file meta and data set without preamble (pydicom.dcmwrite):
        # stored whole, the rest byte for byte as sent.
        sent_bytes = BytesIO()
        pydicom.dcmwrite(sent_bytes, ds)
        assert path.read_bytes() == bytes(128) + b"DICM" + sent_bytes.getvalue()
    assert dcmread(files[0]).PatientID == TEST_PATIENT_ID
    assert not list((rx.settings.spool_dir / ".incoming").iterdir())  # no body left behind
    logged = caplog.text
    assert "30 instance(s) stored, 0 refused" in logged
    assert TEST_PATIENT_ID not in logged and str(TEST_PATIENT_NAME) not in logged


def test_each_instance_a_request_could_not_store_is_answered_with_its_reason(
    receiver: Callable[..., Running],  # noqa: F811
) -> None:
    """POST /studies/{uid}: an instance of that study is stored; one of another study (0xA900)
    and a part that is no DICOM file (0xC000) are refused, each named; 202 for the mixture,
    409 when nothing could be stored. The preamble of what is stored is cleared."""
    rx = receiver(dicomweb_port=free_port())
    ours, theirs = new_series(2, 16, 16), new_series(1, 16, 16)
    good, second = (_part10(ds) for ds in ct_slices(ours))
    good = b"\x7fELF" + good[4:]  # a preamble is free for any content: an executable's too
    other = next(ct_slices(theirs))

    answered = REGISTRY.get_sample_value(STOW_METRIC, {"status": "202"}) or 0.0
    status, doc = _post(
        rx, [good, _part10(other), b"not a DICOM file"], path=f"/studies/{ours.study_uid}"
    )
    assert status == 202
    assert REGISTRY.get_sample_value(STOW_METRIC, {"status": "202"}) == answered + 1
    assert _uids(doc, STORED) == [dcmread(BytesIO(good)).SOPInstanceUID]
    failed = doc[FAILED]["Value"]
    assert [item[REASON]["Value"][0] for item in failed] == [0xA900, 0xC000]
    assert failed[0][INSTANCE]["Value"][0] == other.SOPInstanceUID
    [task] = rx.wait_tasks(1)
    assert task["study"]["study_uid"] == ours.study_uid and task["study"]["instances"] == 1
    [stored] = rx.job_files(task)
    assert stored.read_bytes() == bytes(128) + good[128:]  # stored with a cleared preamble

    status, doc = _post(rx, [second], path=f"/studies/{theirs.study_uid}")
    assert status == 409 and _uids(doc, STORED) == []
    assert not (rx.settings.spool_dir / ours.study_uid).exists()  # the second slice refused


def test_requests_that_are_not_stow_rs_are_refused_and_nothing_is_stored(
    receiver: Callable[..., Running],  # noqa: F811
) -> None:
    rx = receiver(dicomweb_port=free_port(), allowed_networks=["127.0.0.0/8"])  # us: allowed
    part = _part10(next(ct_slices(new_series(1, 16, 16))))
    url = f"http://127.0.0.1:{rx.settings.receiver.dicomweb_port}"

    assert _post(rx, [part], content_type="application/dicom")[0] == 415
    assert _post(rx, [part], content_type='multipart/related; type="application/dicom"')[0] == 400
    assert _post(rx, [part], path="/studies/..%2F..%2Fetc")[0] == 400
    assert _post(rx, [part], path="/instances")[0] == 404
    assert _post(rx, [])[0] == 400
    assert requests.get(f"{url}/studies", timeout=30).status_code == 405
    assert not [p for p in rx.settings.spool_dir.iterdir() if not p.name.startswith(".")]
    assert rx.tasks() == []


def test_a_stow_rs_request_from_an_address_not_allowed_is_refused(
    receiver: Callable[..., Running],  # noqa: F811
) -> None:
    rx = receiver(dicomweb_port=free_port(), allowed_networks=["10.0.0.0/8"])
    part = _part10(next(ct_slices(new_series(1, 16, 16))))
    assert _post(rx, [part])[0] == 403
    assert not [p for p in rx.settings.spool_dir.iterdir() if not p.name.startswith(".")]


def test_stow_rs_over_tls_needs_a_client_certificate_from_the_ca(
    receiver: Callable[..., Running],  # noqa: F811
    tmp_path: Path,
) -> None:
    paths = mutual_tls_files(tmp_path)
    rx = receiver(
        dicomweb_port=free_port(),
        tls_certificate=paths["server.pem"],
        tls_private_key=paths["server.key"],
        tls_ca=paths["ca"],
    )
    sent = list(ct_slices(new_series(3, 16, 16)))

    def session(cert: str) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE, where set, would win over verify
        session.verify = str(paths["ca"])
        session.cert = (str(paths[f"{cert}.pem"]), str(paths[f"{cert}.key"]))
        return session

    url = f"https://127.0.0.1:{rx.settings.receiver.dicomweb_port}/studies"
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        # Not through the client: it would retry five times, backing off.
        session("rogue").post(url, data=b"", timeout=30)
    answer = _client(rx, session=session("client")).store_instances(sent)
    assert len(answer.ReferencedSOPSequence) == 3
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == 3
    context = ssl.create_default_context(cafile=str(paths["ca"]))
    address = ("127.0.0.1", rx.settings.receiver.dicomweb_port)
    reply = b""  # and no answer at all without a certificate: refused in the handshake
    with (
        contextlib.suppress(ssl.SSLError, ConnectionError),
        context.wrap_socket(
            socket.create_connection(address, timeout=30), server_hostname="127.0.0.1"
        ) as s,
    ):
        s.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        reply = s.recv(100)
    assert not reply.startswith(b"HTTP")


def test_stow_rs_asks_to_retry_later_while_the_spool_is_below_its_watermark(
    receiver: Callable[..., Running],  # noqa: F811
) -> None:
    rx = receiver(dicomweb_port=free_port(), min_free_disk_mb=10**12)  # more than any disk
    part = _part10(next(ct_slices(new_series(1, 16, 16))))
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n%s\r\n--b--\r\n" % part
    url = f"http://127.0.0.1:{rx.settings.receiver.dicomweb_port}/studies"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    # With its length given, and chunked (of unknown length: checked on the way).
    for data in (body, iter([body[:100], body[100:]])):
        reply = requests.post(url, data=data, headers=headers, timeout=30)
        assert reply.status_code == 503 and reply.headers["Retry-After"] == "60"
        assert "watermark" in reply.text
    assert not [p for p in rx.settings.spool_dir.iterdir() if not p.name.startswith(".")]
    assert not list((rx.settings.spool_dir / ".incoming").iterdir())


def test_the_receiver_names_the_stow_rs_port_it_cannot_listen_on(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        env = _scp_env(tmp_path, settings, free_port(), PROCESSES="1", DICOMWEB_PORT=str(busy))
        out = subprocess.run(
            [sys.executable, "-m", "pipeline", "scp"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert f"error: STOW-RS cannot listen on 127.0.0.1:{busy}" in out.stderr


def test_results_go_to_a_dicomweb_destination_by_stow_rs(
    receiver: Callable[..., Running],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A destination with a url: results sent by STOW-RS (here to our own receiver's STOW-RS,
    a real service, which asks for a bearer token); a service down, or a token refused (it may
    be refreshed), is worth a retry; a file that is not DICOM is not."""
    tokens = tmp_path / "accepted-token"
    tokens.write_text("secret-token\n")
    archive = receiver(dicomweb_port=free_port(), dicomweb_bearer_token_file=tokens)
    token = tmp_path / "token"
    token.write_text("an-expired-token\n")

    def sender(port: int) -> Settings:
        url = f"http://127.0.0.1:{port}/"
        destination = {"url": url, "bearer_token_file": token, "timeout_s": 10}
        return make_settings(tmp_path / "sender", destinations={"archive": destination})

    settings = sender(archive.settings.receiver.dicomweb_port or 0)
    study = new_series(2, 16, 16)
    folder = settings.results_dir / study.study_uid
    folder.mkdir(parents=True)
    names = []
    for ds in ct_slices(study):
        ds.save_as(folder / f"{ds.InstanceNumber}.dcm", enforce_file_format=True)
        names.append(f"{study.study_uid}/{ds.InstanceNumber}.dcm")
    (folder / "result.json").write_text("{}")
    delivery = Delivery(
        job_id="20261206T000000Z-00000000",
        destination="archive",
        files=[*names, f"{study.study_uid}/result.json"],
    )

    refused = dispatch.deliver(settings, delivery)
    assert sorted(refused.pending) == sorted(names) and not refused.sent
    assert not [p for p in archive.settings.spool_dir.iterdir() if not p.name.startswith(".")]

    token.write_text("secret-token\n")  # refreshed
    outcome = dispatch.deliver(settings, delivery)
    assert sorted(outcome.sent) == sorted(names) and not outcome.pending
    assert "not a readable DICOM file" in outcome.refused[f"{study.study_uid}/result.json"]
    [task] = archive.wait_tasks(1)
    assert task["study"]["study_uid"] == study.study_uid and task["study"]["instances"] == 2

    # Accepted once, sent once: the same delivery again sends nothing.
    again = dispatch.deliver(settings, delivery.model_copy(update={"files": names}))
    assert not again.sent and not again.pending and not again.refused
    assert archive.tasks() == [task]

    # Objects the archive does not have yet, while it is down: waiting to be sent.
    fresh = new_series(1, 16, 16, study_uid=study.study_uid)
    ds = next(ct_slices(fresh))
    ds.save_as(folder / "3.dcm", enforce_file_format=True)
    later = [f"{study.study_uid}/3.dcm"]
    down = dispatch.deliver(sender(free_port()), delivery.model_copy(update={"files": later}))
    assert down.pending == later and not down.sent

    token.unlink()  # the token's refresher late: worth a retry, and said so
    path = settings.results_dir / names[0]
    report = stow_send.send([path], dispatch.stow_target(settings.destinations["archive"]))
    assert path in report.transient and "bearer token file" in report.failed[path]


def test_a_full_dicomweb_destination_is_retried_later(
    receiver: Callable[..., Running],  # noqa: F811
    tmp_path: Path,
) -> None:
    full = receiver(dicomweb_port=free_port(), min_free_disk_mb=10**12)
    url = f"http://127.0.0.1:{full.settings.receiver.dicomweb_port}"
    settings = make_settings(tmp_path / "sender", destinations={"archive": {"url": url}})
    ds = next(ct_slices(new_series(1, 16, 16)))
    settings.results_dir.mkdir(parents=True)
    ds.save_as(settings.results_dir / "sr.dcm", enforce_file_format=True)
    delivery = Delivery(job_id="20261206T000000Z-00000000", destination="archive", files=["sr.dcm"])
    outcome = dispatch.deliver(settings, delivery)
    assert outcome.pending == ["sr.dcm"] and not outcome.sent and not outcome.refused


def test_stow_rs_requests_beyond_max_associations_are_asked_to_come_back(
    receiver: Callable[..., Running],  # noqa: F811
) -> None:
    rx = receiver(dicomweb_port=free_port(), max_associations=1)
    part = _part10(next(ct_slices(new_series(1, 16, 16))))
    address = ("127.0.0.1", rx.settings.receiver.dicomweb_port)
    with socket.create_connection(address, timeout=30) as slow:  # a sender on a slow line
        kind = 'multipart/related; type="application/dicom"; boundary=b'
        slow.sendall(
            f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            f"Content-Length: 100000\r\n\r\n--b\r\n".encode()
        )
        # Once the slow request holds the only place (its body is being written to the spool:
        # a probe sent before it got there would take the place itself), another gets 503 (a
        # request with the wrong media type, 415 otherwise, probes it without storing anything).
        incoming = rx.settings.spool_dir / INCOMING
        wait_for(lambda: any(incoming.glob("stow-*.part")), 10, "the slow request's body")
        wait_for(lambda: _post(rx, [part], content_type="text/plain")[0] == 503, 10, "the 503")
        status, text = _post(rx, [part])
        assert status == 503 and "too many requests at once" in text
    # The slow sender gone, its place is free again.
    wait_for(lambda: _post(rx, [part])[0] == 200, 10, "the place to be free")
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == 1


def test_send_with_url_stores_a_folder_by_stow_rs(
    receiver: Callable[..., Running],  # noqa: F811
    tmp_path: Path,
) -> None:
    """`dicom-pipeline send --url`: a 70-slice series in two requests of up to 64 files, the
    bearer token from --token-file; a wrong token is a failure with its reason, exit code 1."""
    accepted = tmp_path / "accepted"
    accepted.write_text("let-me-in")
    rx = receiver(dicomweb_port=free_port(), dicomweb_bearer_token_file=accepted)
    spec = new_series(70, 16, 16)
    folder = tmp_path / "study"
    write_series(folder, spec)
    url = f"http://127.0.0.1:{rx.settings.receiver.dicomweb_port}"
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")

    def send(token: Path) -> subprocess.CompletedProcess[str]:
        command = ["send", str(folder), "--url", url, "--token-file", str(token), "--retries", "0"]
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *command],
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = send(wrong)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert "0 sent, 70 failed" in refused.stdout
    out = send(accepted)
    assert out.returncode == 0, out.stderr
    assert "70 sent, 0 failed" in out.stdout
    [task] = rx.wait_tasks(1)
    assert task["study"]["study_uid"] == spec.study_uid and task["study"]["instances"] == 70
