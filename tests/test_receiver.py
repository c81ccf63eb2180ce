"""The DICOM receiver against real peers: dcmtk's storescu/echoscu and pynetdicom associations
on loopback, a real embedded Redis behind it, studies checked on disk and in the queue."""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
import redis
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from pipeline.core.jobs import ENQUEUED_MARKER, STUDY_FOLDER
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import (
    TEST_PATIENT_ID,
    TEST_PATIENT_NAME,
    ct_slices,
    new_series,
    new_uid,
    write_series,
)
from pipeline.ingest.dimse import polling
from pipeline.ingest.receiver import Receiver
from pipeline.outputs.send.scu import Peer, answers_only, echo, send
from pipeline.runtime import embedded_redis
from pipeline.runtime.process import ManagedProcess, descendants, free_port
from pipeline.tasks import broker
from pipeline.tasks.app import QUEUE
from pipeline.tasks.enqueue import producer

from .conftest import make_settings, needs_dcmtk

MPPS = "1.2.840.10008.3.1.2.3.3"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def storescu(
    port: int, files: list[Path], aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", "PIPELINE", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Running:
    settings: Settings
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def peer(self, calling_aet: str = "PIPELINE_SCU") -> Peer:
        return Peer("127.0.0.1", self.port, self.settings.receiver.ae_title, calling_aet)

    def tasks(self) -> list[dict[str, Any]]:
        """The job messages queued in Redis, oldest first."""
        client = redis.Redis(unix_socket_path=str(broker.socket_path(self.settings)))
        try:
            raw = client.lrange(QUEUE, 0, -1)
        except redis.ConnectionError:
            return []
        # kombu pushes to the head of the list: reversed is oldest first.
        bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in reversed(raw)]
        return [body[0][0] for body in bodies]

    def wait_tasks(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = wait_for(
            lambda: (t := self.tasks()) and len(t) >= n and t, timeout, f"{n} task(s)"
        )
        return tasks

    def job_files(self, task: dict[str, Any]) -> list[Path]:
        return sorted((self.settings.spool_dir / task["id"] / STUDY_FOLDER).glob("*/*.dcm"))


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a receiver (in this process) with a real embedded Redis behind it."""
    started: list[Running] = []
    redis_procs: list[ManagedProcess] = []

    def start(with_redis: bool = True, **receiver_settings: Any) -> Running:
        options = {
            "host": "127.0.0.1",
            "port": free_port(),
            "min_free_disk_mb": 0,
            "release_grace_s": 0.5,
            "quiet_period_s": 30.0,
            "processes": 1,
            **receiver_settings,
        }
        settings = make_settings(tmp_path / "data", receiver=options)
        settings.ensure_dirs()
        if with_redis:
            redis_procs.append(embedded_redis.start(settings))
        rx = Receiver(settings, producer(settings))
        running = Running(settings, options["port"])
        ready = threading.Event()
        running.thread = threading.Thread(
            target=rx.run, args=(running.stop, lambda *_: ready.set()), daemon=True
        )
        running.thread.start()
        assert ready.wait(60), "receiver did not start"
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop.set()
        if running.thread is not None:
            running.thread.join(30)
    for proc in redis_procs:
        proc.stop()


def _associate(ae: AE, port: int) -> Any:
    """An association as a modality's pynetdicom would make it, minus a pynetdicom race on
    the sender's side: its reactor thread can take the response a store waits for, which
    then waits for the DIMSE timeout (a minute; seen in this file's tests on a loaded CI
    machine). The receiver under test is the same either way."""
    assoc = ae.associate("127.0.0.1", port, ae_title="PIPELINE")
    answers_only(assoc)
    return assoc


def _datasets(n: int, study_uid: str | None = None, size: int = 32) -> list[Dataset]:
    return list(ct_slices(new_series(n, size, size, study_uid=study_uid)))


@needs_dcmtk
def test_ct_series_arrives_whole_one_task_on_release_no_patient_data_in_logs(
    receiver: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    rx = receiver()
    spec = new_series(200, 64, 64)
    files = write_series(tmp_path / "series", spec)
    out = storescu(rx.port, files)
    sent_at = time.monotonic()
    assert out.returncode == 0, out.stderr
    [task] = rx.wait_tasks(1)
    latency = time.monotonic() - sent_at
    assert latency < rx.settings.receiver.quiet_period_s / 4  # the release, not the timer
    study = task["study"]
    assert task["source"] == "dicom" and task["input_file"] == STUDY_FOLDER
    assert study["study_uid"] == spec.study_uid
    assert study["series"] == {spec.series_uid: 200} and study["instances"] == 200
    assert (study["calling_aet"], study["called_aet"]) == ("STORESCU", "PIPELINE")
    assert study["completed_by"] == "association-released"
    # Early start: handed over at the release, its results held until the grace period ends.
    assert datetime.fromisoformat(study["hold_until"]) > datetime.fromisoformat(task["queued_at"])
    stored = rx.job_files(task)
    assert len(stored) == 200
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    for path in stored:
        ds = dcmread(path)
        assert path.stem == ds.SOPInstanceUID
        assert ds.PixelData == originals[path.stem].PixelData
    assert (rx.settings.spool_dir / task["id"] / ENQUEUED_MARKER).exists()
    time.sleep(1.0)
    assert len(rx.tasks()) == 1  # exactly one task for the study
    assert TEST_PATIENT_NAME.split("^")[0] not in caplog.text
    assert TEST_PATIENT_ID not in caplog.text
    assert spec.study_uid in caplog.text  # UIDs are what the logs carry


@needs_dcmtk
def test_two_studies_interleaved_on_two_associations_stay_apart(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver()
    specs = [new_series(80, 32, 32), new_series(60, 32, 32)]
    files = [write_series(tmp_path / f"s{i}", s) for i, s in enumerate(specs)]
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "PIPELINE", "127.0.0.1", str(rx.port), *map(str, f)],
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for f in files
    ]
    assert [s.wait(120) for s in senders] == [0, 0]
    tasks = rx.wait_tasks(2)
    by_study = {t["study"]["study_uid"]: t for t in tasks}
    for spec, sent in zip(specs, files, strict=True):
        task = by_study[spec.study_uid]
        assert task["study"]["instances"] == len(sent)
        sops = {p.stem for p in rx.job_files(task)}
        assert sops == {str(dcmread(f).SOPInstanceUID) for f in sent}


def test_mpps_completed_completes_the_study_while_the_association_is_open(
    receiver: Callable[..., Running],
) -> None:
    rx = receiver()
    slices = _datasets(5)
    study_uid = str(slices[0].StudyInstanceUID)
    ae = AE(ae_title="CT01")
    ae.add_requested_context(MPPS)
    ae.add_requested_context(CT_STORAGE)
    assoc = _associate(ae, rx.port)
    assert assoc.is_established
    try:
        mpps_uid = new_uid()
        create = Dataset()
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        step = Dataset()
        step.StudyInstanceUID = study_uid
        create.ScheduledStepAttributesSequence = [step]
        status, _ = assoc.send_n_create(create, MPPS, mpps_uid)
        assert status.Status == 0x0000
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0x0000
        assert rx.tasks() == []  # association open, quiet period far away
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        series = Dataset()
        series.SeriesInstanceUID = slices[0].SeriesInstanceUID
        refs = []
        for ds in slices:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            refs.append(ref)
        series.ReferencedImageSequence = refs
        done.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(done, MPPS, mpps_uid)
        assert status.Status == 0x0000
        [task] = rx.wait_tasks(1, timeout=5)
        assert task["study"]["completed_by"] == "mpps-completed"
        assert task["study"]["instances"] == 5
        # A closed step cannot be changed again; an unknown one does not exist.
        status, _ = assoc.send_n_set(done, MPPS, mpps_uid)
        assert status.Status == 0xA710
        status, _ = assoc.send_n_set(done, MPPS, new_uid())
        assert status.Status == 0x0112
    finally:
        assoc.release()


@needs_dcmtk
def test_calling_ae_title_not_allowed_is_rejected_with_the_reason(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver(allowed_calling_aets=["CT01"])
    files = write_series(tmp_path / "s", new_series(3, 16, 16))
    out = storescu(rx.port, files, aet="INTRUDER")
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stderr + out.stdout
    assert not any(rx.settings.spool_dir.glob("*/*/*.dcm"))
    assert storescu(rx.port, files, aet="CT01").returncode == 0
    echo_out = subprocess.run(
        ["echoscu", "-aet", "CT01", "-aec", "PIPELINE", "127.0.0.1", str(rx.port)],
        capture_output=True,
        timeout=30,
    )
    assert echo_out.returncode == 0


def test_peer_address_not_allowed_is_rejected(receiver: Callable[..., Running]) -> None:
    rx = receiver(allowed_networks=["10.99.0.0/16"])
    with pytest.raises(ConnectionError, match="rejected"):
        echo(rx.peer())
    rx2 = receiver(allowed_networks=["127.0.0.0/8"])
    assert echo(rx2.peer()) == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_associations_leave_no_descriptors_open(receiver: Callable[..., Running]) -> None:
    """A receiver runs for months: what an association opens is closed when it ends, not
    whenever the garbage collector gets round to it."""
    rx = receiver()
    assert echo(rx.peer()) == 0  # first use opens what stays open (metrics files, logs)
    before = len(list(Path("/proc/self/fd").iterdir()))
    gc.disable()  # the collector does not get round to it: nothing may depend on it
    try:
        for _ in range(40):
            assert echo(rx.peer()) == 0
        wait_for(
            lambda: len(list(Path("/proc/self/fd").iterdir())) <= before + 2,
            5,
            "the associations' descriptors to be closed",
        )
    finally:
        gc.enable()


@needs_dcmtk
def test_established_associations_wake_on_events_not_on_a_timer(
    receiver: Callable[..., Running],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once established, an association's threads sleep until an event wakes them. With the
    safety-net timeout made a minute long, every step that relied on it would stall a minute:
    instances from a sender with Nagle's algorithm on (no TCP_NODELAY, as most senders), the
    release, and an abort must all be acted on at once."""
    monkeypatch.setattr(polling, "ESTABLISHED_WAIT_S", 60.0)
    caplog.set_level("INFO")
    rx = receiver()
    files = write_series(tmp_path / "series", new_series(20, 64, 64))
    started = time.monotonic()
    out = subprocess.run(
        ["storescu", "-aec", "PIPELINE", "127.0.0.1", str(rx.port), *map(str, files)],
        env={k: v for k, v in os.environ.items() if k != "TCP_NODELAY"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30  # 20 instances and a release, no minute-long wait
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == 20

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CT_STORAGE, ExplicitVRLittleEndian)
    assoc = _associate(ae, rx.port)
    assert assoc.is_established
    [ds] = _datasets(1)
    assert assoc.send_c_store(ds).Status == 0
    aborted_at = time.monotonic()
    assoc.abort()
    wait_for(
        lambda: "association from ABORTER" in caplog.text and "1 instance(s) stored" in caplog.text,
        30,
        "the receiver to see the abort",
    )
    assert time.monotonic() - aborted_at < 30


def test_associations_above_the_cap_are_rejected_as_transient(
    receiver: Callable[..., Running],
) -> None:
    rx = receiver(max_associations=1)
    ae = AE()
    ae.add_requested_context(CT_STORAGE)
    first = _associate(ae, rx.port)
    try:
        assert first.is_established
        second = _associate(ae, rx.port)
        assert second.is_rejected
        rsp = second.acceptor.primitive
        assert rsp is not None and rsp.result == 0x02  # transient: the sender retries later
    finally:
        first.release()

    def established() -> Any:
        # As a sender would, retry: the receiver frees the slot when the first association's
        # thread has ended, a moment after the release was acknowledged.
        assoc = _associate(ae, rx.port)
        return assoc if assoc.is_established else None

    again = wait_for(established, 10, "a new association once the first was released")
    assert again.is_established
    again.release()


def test_path_traversal_and_missing_uids_get_a_failure_status_and_nothing_is_written(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver()
    evil, missing, two_values, letters, padded = _datasets(5)
    evil.StudyInstanceUID = "../../../escaped"
    del missing.SeriesInstanceUID
    two_values.SeriesInstanceUID = ["1.2.3", "4.5"]  # written as 1.2.3\4.5
    letters.SOPInstanceUID = "1.2.abc"
    padded.SeriesInstanceUID = padded.SeriesInstanceUID + " "  # trailing padding is allowed
    ae = AE()
    ae.add_requested_context(CT_STORAGE)
    assoc = _associate(ae, rx.port)
    try:
        assert assoc.send_c_store(evil).Status == 0xC220
        assert assoc.send_c_store(missing).Status == 0xC220
        assert assoc.send_c_store(two_values).Status == 0xC220
        assert assoc.send_c_store(letters).Status == 0xC220
        assert assoc.send_c_store(padded).Status == 0x0000
    finally:
        assoc.release()
    assert not list(tmp_path.rglob("escaped"))
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == 1
    [stored] = rx.job_files(task)
    assert stored.parent.name == padded.SeriesInstanceUID.strip()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (CT_STORAGE, "1.2.3.45", "1.2.840.10008.1.2.1"),  # even and odd lengths
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", new_uid(), "1.2.840.10008.1.2.4.50"),
    ],
)
def test_the_file_meta_is_written_as_pynetdicom_encodes_it(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from pipeline.ingest.scp import file_meta_header

    expected = encode_file_meta(
        create_file_meta(
            sop_class_uid=pydicom.uid.UID(sop_class),
            sop_instance_uid=pydicom.uid.UID(sop_instance),
            transfer_syntax=pydicom.uid.UID(syntax),
        )
    )
    assert file_meta_header(sop_class, sop_instance, syntax) == b"\x00" * 128 + b"DICM" + expected


def test_a_data_set_that_cannot_be_read_gets_a_failure_status_and_nothing_is_written(
    receiver: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rx = receiver()
    # pynetdicom then sends a file's data set as it is on disk, without reading it.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    [good] = _datasets(1)
    garbage = tmp_path / "garbage.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = good.SOPClassUID
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with garbage.open("wb") as f:  # valid file meta, then bytes that are no data set
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(64))
    # A sequence (0008,1115) of undefined length whose first item runs past the end: reading
    # the header fails, so "cannot understand" (0xC210), whatever the random bytes above do.
    truncated = tmp_path / "truncated.dcm"
    with truncated.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00")
    ae = AE()
    ae.add_requested_context(CT_STORAGE)
    assoc = _associate(ae, rx.port)
    try:
        assert assoc.send_c_store(garbage).Status in (0xC210, 0xC220)
        assert assoc.send_c_store(truncated).Status == 0xC210
        assert assoc.send_c_store(good).Status == 0x0000  # the association carries on
    finally:
        assoc.release()
    [task] = rx.wait_tasks(1)
    assert [p.stem for p in rx.job_files(task)] == [good.SOPInstanceUID]
    assert not list((rx.settings.spool_dir / ".incoming").glob("*"))


def test_below_the_disk_watermark_store_answers_out_of_resources(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver(min_free_disk_mb=10**9)  # a petabyte: never free here
    files = write_series(tmp_path / "s", new_series(2, 16, 16))
    report = send(files, rx.peer(), retries=0)
    assert not report.sent
    assert all("0xA700" in why for why in report.failed.values())
    assert not any(rx.settings.spool_dir.glob("*/*/*.dcm"))
    assert not list((rx.settings.spool_dir / ".incoming").glob("*"))


def test_compressed_syntaxes_are_accepted_and_stored_as_received(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver()
    test_files = Path(pydicom.__file__).parent / "data" / "test_files"
    names = [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGExtended.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "image_dfl.dcm",  # deflated
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ]
    study_uid = str(new_uid())
    sent: dict[str, tuple[str, bytes]] = {}
    files = []
    for name in names:
        ds = dcmread(test_files / name)
        # One study; fresh SOP UIDs (several test files share theirs). The pixel data stays
        # in its compressed form: pydicom writes it back untouched.
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
        path = tmp_path / name
        ds.save_as(path)
        files.append(path)
        sent[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), ds.PixelData)
    report = send(files, rx.peer())
    assert report.ok, report.failed
    [task] = rx.wait_tasks(1)
    stored = {p.stem: dcmread(p) for p in rx.job_files(task)}
    assert set(stored) == set(sent)
    for sop, (ts, pixels) in sent.items():
        assert stored[sop].file_meta.TransferSyntaxUID == ts
        assert stored[sop].PixelData == pixels  # no decompression, no re-encoding


def test_images_of_retired_sop_classes_are_taken(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    """A real ultrasound of the retired 1993 Ultrasound Image Storage class (pydicom-data's),
    as old machines still send it, sent by dcmtk's storescu proposing its class alone: stored,
    not refused at the association."""
    import data_store

    rx = receiver()
    source = Path(data_store.__file__).parent / "data" / "color-px.dcm"
    out = subprocess.run(
        ["storescu", "-R", "-aec", "PIPELINE", "127.0.0.1", str(rx.port), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "No presentation context" not in out.stderr, out.stderr
    [task] = rx.wait_tasks(1)
    [stored] = rx.job_files(task)
    assert stored.stem == dcmread(source, stop_before_pixels=True).SOPInstanceUID


def test_late_instance_starts_a_new_round_and_duplicates_count_once(
    receiver: Callable[..., Running],
) -> None:
    rx = receiver()
    first, second, late = _datasets(3)
    ae = AE()
    ae.add_requested_context(CT_STORAGE)
    assoc = _associate(ae, rx.port)
    for ds in (first, second, first):  # `first` re-sent
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == 2
    assoc = _associate(ae, rx.port)
    assert assoc.send_c_store(late).Status == 0x0000
    assoc.release()
    tasks = rx.wait_tasks(2)
    assert tasks[1]["study"]["study_uid"] == tasks[0]["study"]["study_uid"]
    assert tasks[1]["study"]["instances"] == 1 and tasks[1]["id"] != tasks[0]["id"]


def test_study_waits_while_redis_is_down_and_is_queued_once_when_back(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    rx = receiver(with_redis=False)
    files = write_series(tmp_path / "s", new_series(4, 16, 16))
    assert send(files, rx.peer()).ok  # receiving does not need Redis

    def pending_job() -> list[Path]:
        return [
            p
            for p in rx.settings.spool_dir.glob("*/job.json")
            if not (p.parent / ENQUEUED_MARKER).exists()
        ]

    wait_for(pending_job, 20, "the closed study to wait in the spool")
    proc = embedded_redis.start(rx.settings)
    try:
        [task] = rx.wait_tasks(1, timeout=20)
        assert task["study"]["instances"] == 4
        time.sleep(6)  # another requeue round: still one task
        assert len(rx.tasks()) == 1
    finally:
        proc.stop()


@needs_dcmtk
def test_receiver_killed_half_way_restarted_and_the_rest_sent_gives_one_complete_study(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    settings = make_settings(data)
    settings.ensure_dirs()
    redis_proc = embedded_redis.start(settings)
    port = free_port()
    env = _scp_env(tmp_path, settings, port, PROCESSES="2")
    spec = new_series(400, 128, 128)
    files = write_series(tmp_path / "series", spec)

    def start_receiver() -> subprocess.Popen[bytes]:
        proc = _scp_process(env, tmp_path / "scp.log")
        wait_for(
            lambda: _echo_ok(Peer("127.0.0.1", port, "PIPELINE")), 60, "the receiver to answer"
        )
        return proc

    rx = Running(settings, port)
    try:
        first = start_receiver()
        sender = subprocess.Popen(
            ["storescu", "-aec", "PIPELINE", "127.0.0.1", str(port), *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        study_dir = data / "spool" / spec.study_uid
        wait_for(lambda: len(list(study_dir.glob("*/*.dcm"))) >= 60, 60, "60 instances")
        os.killpg(first.pid, signal.SIGKILL)  # the receiver and its receiving processes
        first.wait()
        assert sender.wait(60) != 0  # the sender saw the failure
        acknowledged = list(study_dir.glob("*/*.dcm"))
        assert 60 <= len(acknowledged) < len(files)
        for path in acknowledged:  # every stored instance is whole
            assert len(dcmread(path).PixelData) == 128 * 128 * 2

        second = start_receiver()
        out = storescu(port, files)  # the sender retries the whole series
        assert out.returncode == 0, out.stderr
        [task] = rx.wait_tasks(1, timeout=30)
        assert task["study"]["instances"] == len(files)
        assert len(rx.job_files(task)) == len(files)
        time.sleep(1.5)
        assert len(rx.tasks()) == 1
        assert not any((data / "spool" / ".incoming").glob("*.part"))
        log_text = (tmp_path / "scp.log").read_text()
        assert TEST_PATIENT_ID not in log_text and TEST_PATIENT_NAME not in log_text
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for proc_name in ("first", "second"):
            proc = locals().get(proc_name)
            if isinstance(proc, subprocess.Popen) and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        redis_proc.stop()


def _scp_env(tmp_path: Path, settings: Settings, port: int, **receiver: str) -> dict[str, str]:
    """The environment of a `dicom-pipeline scp` on ``settings``' data and Redis, on loopback
    at ``port``, with no configuration file and these ``receiver`` settings."""
    (tmp_path / "none.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "PIPELINE_CONFIG": str(tmp_path / "none.yaml"),
        "PIPELINE_DATA_DIR": str(settings.data_dir),
        "PIPELINE_BROKER_URL": broker.broker_url(settings),
    }
    receiver = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MIN_FREE_DISK_MB": "0",
        "RELEASE_GRACE_S": "0.5",
        **receiver,
    }
    return env | {f"PIPELINE_RECEIVER__{k}": v for k, v in receiver.items()}


def _scp_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`dicom-pipeline scp` in a process group of its own, as `up` starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "scp"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _echo_ok(peer: Peer) -> bool:
    try:
        return echo(peer) == 0
    except ConnectionError:
        return False


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout
    )


def test_a_sigterm_to_the_receivers_process_group_stops_it_at_once_leaving_nothing(
    tmp_path: Path,
) -> None:
    """`up` and systemd stop the receiver with a SIGTERM to its whole process group. Its
    receiving processes used to die of it while waiting on a shared lock; the receiver then
    hung on that lock until it was killed, and left its named semaphores in /dev/shm. They
    share no lock now, and no semaphore."""
    port = free_port()
    (tmp_path / "none.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "PIPELINE_CONFIG": str(tmp_path / "none.yaml"),
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PIPELINE_RECEIVER__HOST": "127.0.0.1",
        "PIPELINE_RECEIVER__PORT": str(port),
        "PIPELINE_RECEIVER__PROCESSES": "3",
    }
    log = tmp_path / "scp.log"
    proc = _scp_process(env, log)
    try:
        # Said once its receiving processes are ready too.
        wait_for(lambda: "DICOM receiver ready" in log.read_text(), 60, "the receiver")
        group = {proc.pid, *descendants(proc.pid)}
        semaphores = {
            line.split()[-1]
            for pid in group
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/dev/shm/sem." in line
        }
        assert not semaphores  # nothing shared that a killed process could leave held
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in group), 10, "exit")
        assert "restarting" not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@needs_dcmtk
def test_receiving_processes_killed_while_busy_are_replaced_and_studies_complete_on_release(
    tmp_path: Path,
) -> None:
    """The OOM killer's SIGKILL can land on a receiving process at any moment, in the middle
    of handing an event to the receiver. Whatever it interrupted, the processes that carry on
    and the replacements must still report their studies, which then complete on release,
    not only when adopted from the spool after the quiet period."""
    data = tmp_path / "data"
    settings = make_settings(data)
    settings.ensure_dirs()
    redis_proc = embedded_redis.start(settings)
    port = free_port()
    env = _scp_env(tmp_path, settings, port, QUIET_PERIOD_S="120", PROCESSES="3")
    log = tmp_path / "scp.log"

    def receiving_processes() -> set[int]:
        found = set()
        for pid in descendants(proc.pid):
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(pid)
        return found

    def studies(tag: str, n: int) -> list[list[Path]]:
        return [write_series(tmp_path / f"{tag}{i}", new_series(150, 16, 16)) for i in range(n)]

    rx = Running(settings, port)
    proc = _scp_process(env, log)
    senders: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: "DICOM receiver ready" in log.read_text(), 60, "the receiver")
        for files in studies("busy", 6):
            senders.append(
                subprocess.Popen(
                    ["storescu", "-aec", "PIPELINE", "127.0.0.1", str(port), *map(str, files)],
                    env={**os.environ, "TCP_NODELAY": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_for(lambda: len(list((data / "spool").glob("*/*/*.dcm"))) >= 100, 60, "instances")
        killed: set[int] = set()
        deadline = time.monotonic() + 2.0
        # Every receiving process, and each replacement as soon as it is seen, for 2 s.
        while time.monotonic() < deadline:
            for pid in receiving_processes() - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.01)
        for sender in senders:
            sender.wait(120)
        assert len(killed) >= 2
        wait_for(lambda: len(receiving_processes() - killed) == 2, 60, "their replacements")
        wait_for(lambda: log.read_text().count("restarting it") >= 2, 10, "the log")

        # Fresh studies over as many associations as the kernel spreads over the processes.
        fresh = studies("fresh", 6)
        sent: list[int] = []
        outs = [
            threading.Thread(
                target=lambda files=files: sent.append(storescu(port, files).returncode),
                daemon=True,
            )
            for files in fresh
        ]
        for t in outs:
            t.start()
        for t in outs:
            t.join(120)
        assert sent == [0] * len(fresh)  # every instance acknowledged
        uids = {dcmread(files[0], stop_before_pixels=True).StudyInstanceUID for files in fresh}
        wait_for(
            lambda: uids <= {task["study"]["study_uid"] for task in rx.tasks()},
            30,
            "every fresh study queued",
        )
        assert proc.poll() is None
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        redis_proc.stop()


def test_send_retries_what_failed_until_the_receiver_is_up(
    receiver: Callable[..., Running], tmp_path: Path
) -> None:
    """Sent while nobody listens yet, each file is retried until it is stored. What is sent
    is a CD's whole copy downloaded as a zip: unpacked for the sending, its DICOMDIR and viewer
    beside the images no failure (exit 0), the zip left as it was."""
    files = write_series(tmp_path / "study", new_series(6, 16, 16))
    medium = FileSet()
    for path in files:
        medium.add(path)
    medium.write(tmp_path / "cd")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", tmp_path / "study" / "DICOMDIR")
    (tmp_path / "study" / "VIEWER.EXE").write_bytes(b"MZ" + bytes(64))
    with zipfile.ZipFile(tmp_path / "study.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted((tmp_path / "study").iterdir()):
            z.write(path, f"CD/{path.name}")
    packed = (tmp_path / "study.zip").read_bytes()
    port = free_port()
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "send",
            str(tmp_path / "study.zip"),
            "--port",
            str(port),
            "--retries",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)  # the first attempt finds nobody listening
    rx = receiver(port=port)
    out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err
    assert f"{len(files)} sent, 0 failed" in out
    assert "2 file(s) of a DICOM medium that are not its images are not sent" in out
    [task] = rx.wait_tasks(1)
    assert task["study"]["instances"] == len(files)
    assert (tmp_path / "study.zip").read_bytes() == packed


def test_send_refuses_a_zip_the_inbox_would_refuse(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "slip.zip", "w") as z:
        z.writestr("../../evil.dcm", b"x")
    out = _cli("send", str(tmp_path / "slip.zip"), "--port", str(free_port()))
    assert out.returncode == 2
    assert "slip.zip: a member would be unpacked outside its folder" in out.stderr
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_send_reports_each_failure_and_exits_non_zero(tmp_path: Path) -> None:
    """Nobody listens: each instance fails, as do files named that are not instances. A
    folder copied whole from a CD (a DICOMDIR beside the images) has its index and viewer
    files passed over, said once, not failures: the images are what is sent."""
    paths = write_series(tmp_path / "study", new_series(2, 16, 16))
    (tmp_path / "notes.txt").write_text("not DICOM")
    medium = FileSet()  # a CD's index, as a folder copied from one carries
    for path in paths:
        medium.add(path)
    medium.write(tmp_path / "cd")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", tmp_path / "study" / "DICOMDIR")
    (tmp_path / "study" / "README.TXT").write_text("run VIEWER.EXE")
    out = _cli(
        "send",
        str(tmp_path / "study"),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "cd" / "DICOMDIR"),
        "--port",
        str(free_port()),
        "--retries",
        "0",
    )
    assert out.returncode == 1
    assert "2 file(s) of a DICOM medium that are not its images are not sent" in out.stdout
    assert "0 sent, 4 failed" in out.stdout
    assert "notes.txt: not a DICOM file" in out.stderr
    assert "DICOMDIR: a DICOMDIR, the index of a DICOM medium, is not sent" in out.stderr
    assert out.stderr.count("failed: ") == 4
    assert "README.TXT" not in out.stderr


def mutual_tls_files(folder: Path) -> dict[str, Path]:
    """A CA ("ca"), the receiver's certificate and key for 127.0.0.1 ("server.pem", ".key"),
    a client's from the CA ("client.pem", ".key") and one from another CA ("rogue.pem",
    ".key")."""
    import trustme

    ca, rogue_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client, rogue = ca.issue_cert("modality.example"), rogue_ca.issue_cert("modality.example")
    paths = {}
    for name, blob in [
        ("ca", ca.cert_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
        ("client.pem", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
        ("rogue.pem", rogue.cert_chain_pems[0]),
        ("rogue.key", rogue.private_key_pem),
    ]:
        paths[name] = folder / name
        blob.write_to_path(str(paths[name]))
    return paths


def test_tls_with_mutual_certificates(receiver: Callable[..., Running], tmp_path: Path) -> None:
    paths = mutual_tls_files(tmp_path)
    rx = receiver(
        tls_certificate=paths["server.pem"],
        tls_private_key=paths["server.key"],
        tls_ca=paths["ca"],
    )
    base = ["--port", str(rx.port), "--tls-ca", str(paths["ca"])]
    ok = _cli(
        "echo", *base, "--tls-cert", str(paths["client.pem"]), "--tls-key", str(paths["client.key"])
    )
    assert ok.returncode == 0, ok.stderr
    assert _cli("echo", *base).returncode != 0  # no client certificate
    wrong = _cli(
        "echo", *base, "--tls-cert", str(paths["rogue.pem"]), "--tls-key", str(paths["rogue.key"])
    )
    assert wrong.returncode != 0  # a certificate from another CA
    plain = _cli("echo", "--port", str(rx.port))
    assert plain.returncode != 0  # TLS only
    files = write_series(tmp_path / "s", new_series(3, 16, 16))
    sent = _cli(
        "send",
        str(tmp_path / "s"),
        *base,
        "--tls-cert",
        str(paths["client.pem"]),
        "--tls-key",
        str(paths["client.key"]),
    )
    assert sent.returncode == 0 and f"{len(files)} sent, 0 failed" in sent.stdout
