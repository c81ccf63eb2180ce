"""Pulling studies from a real PACS (Orthanc, Debian's package): found by accession number, a
date range or a CSV, retrieved by C-GET at most ``max_parallel`` at once (counted in the
PACS's own log), processed, and the results sent back; an interrupted pull resumed; a PACS
that does not know our receiver says what to configure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.core.contract import discover_contracts
from pipeline.core.errors import InputError
from pipeline.core.jobs import Job, read_job
from pipeline.core.network_settings import Destination, Source
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.ingest.pull import peer, plan
from pipeline.ingest.pull.rerun import rerun_study
from pipeline.ingest.pull.run import find, run_pull
from pipeline.ops.status import pull_lines
from pipeline.outputs.send.dispatch import Delivery, deliver
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import free_port
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import (
    MODEL_REPOSITORY,
    make_settings,
    recording_producer,
    running_up,
    up_env,
    wait_for,
)
from .orthanc import DICOMWEB_PLUGIN, Orthanc, needs_orthanc, running_orthanc

pytestmark = needs_orthanc

STL_CLASS = "1.2.840.10008.5.1.4.1.1.104.3"  # Encapsulated STL Storage
# accession number, study date
STUDIES = (("ACC-JAN-1", "20260105"), ("ACC-JAN-2", "20260120"), ("ACC-FEB-1", "20260210"))


@dataclass
class Pacs:
    orthanc: Orthanc
    log: Path
    studies: dict[str, str]  # accession number -> Study Instance UID


def _load(orthanc: Orthanc, tmp_path: Path) -> dict[str, str]:
    """Three small lesion CTs stored into the PACS: accession number -> Study Instance UID."""
    studies = {}
    for i, (accession, date) in enumerate(STUDIES):
        hu, _, affine = lesion_phantom(TEST_SEED_BASE + 640 + i, lesions=1)
        folder = tmp_path / f"study-{i}"
        spec = write_volume_series(folder, hu[:, :, :24].astype(np.float32), affine)
        for path in sorted(folder.iterdir()):
            ds = dcmread(path)
            ds.AccessionNumber, ds.StudyDate = accession, date
            ds.save_as(path)
            orthanc.post("/instances", path.read_bytes())
        studies[accession] = spec.study_uid
    return studies


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """Orthanc holding three small lesion CTs, knowing us (PIPELINE) as a peer."""
    known = {"pipeline": ["PIPELINE", "127.0.0.1", 11112]}
    with running_orthanc(tmp_path / "orthanc", modalities=known) as orthanc:
        yield Pacs(orthanc, tmp_path / "orthanc" / "orthanc.log", _load(orthanc, tmp_path))


def _settings(tmp_path: Path, pacs: Pacs, web: bool = False, **source: Any) -> Settings:
    where = (
        {"url": f"{pacs.orthanc.url}/dicom-web"}
        if web
        else {"host": "127.0.0.1", "port": pacs.orthanc.dicom_port, "ae_title": "ORTHANC"}
    )
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        sources={"pacs": Source(**where, pause_s=0.0, **source)},
        destinations={
            "pacs": Destination(
                host="127.0.0.1", port=pacs.orthanc.dicom_port, ae_title=pacs.orthanc.ae_title
            )
        },
    )
    settings.ensure_dirs()
    return settings


def _pull(settings: Settings, criteria: peer.Criteria, jobs: list[Job]) -> plan.Pull:
    found = find(settings.sources["pacs"], criteria)
    studies = [
        plan.PulledStudy(
            study_uid=m.study_uid, expected=m.instances, sop_classes=list(m.sop_classes)
        )
        for m in found
    ]
    pull = plan.new_pull(settings.spool_dir, "pacs", studies, force=False)
    return run_pull(settings, pull, recording_producer(settings, jobs).close, lambda s: None)


def test_a_study_pulled_by_accession_is_processed_and_its_results_go_back(
    pacs: Pacs,
    tmp_path: Path,
    triton: TritonEndpoints,
    new_client: Callable[..., TritonClient],
) -> None:
    settings = _settings(tmp_path, pacs)
    jobs: list[Job] = []
    pull = _pull(settings, peer.Criteria(accession="ACC-JAN-2"), jobs)
    study_uid = pacs.studies["ACC-JAN-2"]
    [study] = pull.studies
    assert (study.study_uid, study.state, study.received) == (study_uid, "done", 24)
    [job] = jobs
    assert job.study is not None and job.study.instances == 24  # complete: no quiet period
    assert job.study.completed_by == "retrieved" and job.study.calling_aet == "ORTHANC"
    client = new_client(triton.grpc, settings.triton)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    run_study(read_job(settings.spool_dir / job.id), settings, models, client)
    summary = json.loads((settings.results_dir / study_uid / "study.json").read_text())
    assert summary["completed_by"] == "retrieved" and summary["calling_aet"] == "ORTHANC"
    assert [s["status"] for s in summary["series"]] == ["done"]
    # The results go back to the PACS, into the study they came from.
    results = settings.results_dir
    files = sorted(str(p.relative_to(results)) for p in results.rglob("*.dcm"))
    outcome = deliver(settings, Delivery(job_id=job.id, destination="pacs", files=files))
    assert sorted(outcome.sent) == files
    stored = {
        pacs.orthanc.json(f"/series/{s}")["MainDicomTags"]["SeriesInstanceUID"]
        for s in pacs.orthanc.json(f"/studies/{_orthanc_id(pacs, study_uid)}")["Series"]
    }
    made = {str(dcmread(results / f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
    assert made < stored and len(stored - made) == 1  # the results beside the source series
    # Run again from the archived inputs, no PACS involved: a new round supersedes the first.
    again_jobs: list[Job] = []
    rerun = rerun_study(settings, study_uid, recording_producer(settings, again_jobs).close)
    assert rerun.study is not None and rerun.study.instances == 24
    assert rerun.study.completed_by == "rerun"
    run_study(read_job(settings.spool_dir / rerun.id), settings, models, client)
    summary = json.loads((settings.results_dir / study_uid / "study.json").read_text())
    assert summary["rounds"] == [job.id, rerun.id] and summary["completed_by"] == "rerun"
    assert [s["status"] for s in summary["series"]] == ["done"]
    with pytest.raises(InputError, match="no results for study"):
        rerun_study(settings, "1.2.3.4", recording_producer(settings).close)
    # The pull's list says what happened; nothing is left staged.
    again = plan.load(settings.spool_dir, pull.id)
    assert again.counts() == {"pending": 0, "done": 1, "skipped": 0, "failed": 0}
    assert not (settings.spool_dir / "pulls" / pull.id).exists()


@pytest.mark.skipif(not DICOMWEB_PLUGIN.is_file(), reason="needs orthanc-dicomweb")
def test_a_dicomweb_source_is_found_by_qido_and_retrieved_by_wado(
    pacs: Pacs, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, pacs, web=True)
    [match] = find(settings.sources["pacs"], peer.Criteria(accession="ACC-FEB-1"))
    assert match.study_uid == pacs.studies["ACC-FEB-1"] and match.instances == 24
    assert match.date == "20260210"
    in_january = find(settings.sources["pacs"], peer.Criteria(study_date="20260101-20260131"))
    assert {m.study_uid for m in in_january} == {
        pacs.studies["ACC-JAN-1"],
        pacs.studies["ACC-JAN-2"],
    }
    jobs: list[Job] = []
    pull = _pull(settings, peer.Criteria(accession="ACC-FEB-1"), jobs)
    assert [(s.state, s.received) for s in pull.studies] == [("done", 24)]
    [job] = jobs
    assert job.study is not None and job.study.instances == 24
    assert job.study.completed_by == "retrieved"
    study_dir = settings.spool_dir / job.id / "study"
    sops = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study_dir.rglob("*.dcm")}
    assert len(sops) == 24  # each instance once, whole


def _orthanc_id(pacs: Pacs, study_uid: str) -> str:
    [found] = pacs.orthanc.post("/tools/lookup", study_uid.encode())
    return str(found["ID"])


def _most_at_once(log: Path) -> int:
    """The most C-GET associations Orthanc served at once, from its own log."""
    depth = most = 0
    for line in log.read_text().splitlines():
        if re.search(r"Association Received from AET PIPELINE", line):
            depth += 1
            most = max(most, depth)
        elif re.search(r"Association Release|Association Aborted|Finishing association", line):
            depth = max(0, depth - 1)
    return most


@pytest.mark.parametrize("at_once", [1, 2])
def test_a_backfill_by_date_range_honours_its_concurrency_limit(
    pacs: Pacs, tmp_path: Path, at_once: int
) -> None:
    settings = _settings(tmp_path, pacs, max_parallel=at_once)
    jobs: list[Job] = []
    pull = _pull(settings, peer.Criteria(study_date="20260101-20260131"), jobs)
    assert {s.study_uid for s in pull.studies} == {
        pacs.studies["ACC-JAN-1"],
        pacs.studies["ACC-JAN-2"],
    }
    assert [s.state for s in pull.studies] == ["done", "done"] and len(jobs) == 2
    assert 1 <= _most_at_once(pacs.log) <= at_once


def test_an_interrupted_pull_continues_where_it_stopped(pacs: Pacs, tmp_path: Path) -> None:
    settings = _settings(tmp_path, pacs, max_parallel=1)
    found = peer.find(settings.sources["pacs"], peer.Criteria(study_date="20260101-20261231"))
    studies = [plan.PulledStudy(study_uid=m.study_uid) for m in found]
    pull = plan.new_pull(settings.spool_dir, "pacs", studies, force=False)
    jobs: list[Job] = []

    def stop_after_one(study: plan.PulledStudy) -> None:
        raise KeyboardInterrupt  # Ctrl-C once the first study is handed over

    with pytest.raises(KeyboardInterrupt):
        run_pull(settings, pull, recording_producer(settings, jobs).close, stop_after_one)
    stopped = plan.load(settings.spool_dir, pull.id)
    assert stopped.counts()["done"] == 1 and stopped.counts()["pending"] == 2
    assert [p.id for p in plan.unfinished(settings.spool_dir)] == [pull.id]
    assert pull_lines(settings) == [f"pull {pull.id} from pacs: 1 of 3 studies"]  # `status`
    resumed = run_pull(settings, stopped, recording_producer(settings, jobs).close, lambda s: None)
    assert resumed.counts() == {"pending": 0, "done": 3, "skipped": 0, "failed": 0}
    assert sorted(j.study.study_uid for j in jobs if j.study) == sorted(pacs.studies.values())
    assert plan.unfinished(settings.spool_dir) == [] and pull_lines(settings) == []


def test_a_pacs_that_does_not_know_our_receiver_says_what_to_configure(
    pacs: Pacs, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, pacs, retrieve="move", move_destination="NOBODY", retries=0)
    jobs: list[Job] = []
    pull = _pull(settings, peer.Criteria(accession="ACC-FEB-1"), jobs)
    [study] = pull.studies
    assert study.state == "failed" and not jobs
    assert study.reason is not None and "not know NOBODY as a move destination" in study.reason
    assert "retrieve: get" in study.reason
    [item] = list(settings.failed_dir.iterdir())
    error = json.loads((item / "error.json").read_text())
    assert error["stage"] == "pull" and error["job"]["pull"] == pull.id


def _pull_command(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "pull", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_prints_matches_and_routing_before_retrieving(
    pacs: Pacs, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "sources:\n  pacs:\n"
        f"    host: 127.0.0.1\n    port: {pacs.orthanc.dicom_port}\n"
        f"    ae_title: {pacs.orthanc.ae_title}\n    pause_s: 0\n"
    )
    (tmp_path / "list.csv").write_text("AccessionNumber\nACC-JAN-1\nACC-NONE\n")
    env = {
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PATH": "/usr/bin:/bin",
    }
    dry = _pull_command(tmp_path, env, "pacs", "--csv", "list.csv", "--dry-run")
    assert dry.returncode == 1, dry.stderr  # an accession number matched nothing
    assert "no match on pacs: accession ACC-NONE" in dry.stderr
    assert pacs.studies["ACC-JAN-1"] in dry.stdout and "1 studies matched" in dry.stdout
    assert "rule ct-volume: ct_covid_classifier, ct_lesion_segmentation" in dry.stdout
    assert not (tmp_path / "data" / "spool" / "pulls").exists()  # nothing retrieved
    run = _pull_command(tmp_path, env, "pacs", "--accession", "ACC-JAN-1")
    assert run.returncode == 0, run.stderr
    assert re.search(r"\[1/1\] \S+ done: 24 instances job \S+", run.stdout), run.stdout
    assert not (tmp_path / "data" / "failed").exists() or not any(
        (tmp_path / "data" / "failed").iterdir()
    )  # nothing failed: a dry run records no unmatched criterion
    unmatched = _pull_command(tmp_path, env, "pacs", "--accession", "ACC-NONE")
    assert unmatched.returncode == 1 and "0 studies matched" in unmatched.stdout
    [item] = (tmp_path / "data" / "failed").iterdir()
    error = json.loads((item / "error.json").read_text())
    assert error["message"] == "no match on pacs: accession ACC-NONE"
    # No broker here: the study waits in the spool as a job, queued once Redis is there.
    [job_json] = (tmp_path / "data" / "spool").glob("*/job.json")
    assert json.loads(job_json.read_text())["study"]["completed_by"] == "retrieved"


@pytest.mark.e2e
def test_one_command_pulls_a_list_and_the_results_go_back_to_the_pacs(
    model_repository: Path, tmp_path: Path
) -> None:
    """With `up` running, `dicom-pipeline pull` of a CSV of accession numbers: one study by
    C-GET, one by C-MOVE to our receiver; both processed, their results sent to the PACS."""
    dicom_port = free_port()
    known = {"pipeline": ["PIPELINE", "127.0.0.1", dicom_port]}
    with running_orthanc(tmp_path / "orthanc", modalities=known) as orthanc:
        studies = _load(orthanc, tmp_path)
        peer_at = f"host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC"
        (tmp_path / "config.yaml").write_text(
            f"""
sources:
  pacs: {{{peer_at}, pause_s: 0}}
  pacs-move: {{{peer_at}, retrieve: move, pause_s: 0}}
destinations:
  pacs: {{{peer_at}}}
routes:
  - name: ct-volume
    match: {{kind: [dicom], modality: [CT], min_slices: 16}}
    models: [ct_covid_classifier, ct_lesion_segmentation]
    send_to: [pacs]
"""
        )
        (tmp_path / "list.csv").write_text("AccessionNumber\nACC-JAN-1\n")
        env = up_env(tmp_path, model_repository, dicom_port)
        with running_up(tmp_path, env):
            for source, args in (
                ("pacs", ["--csv", "list.csv"]),
                ("pacs-move", ["--accession", "ACC-FEB-1"]),
            ):
                run = _pull_command(tmp_path, env, source, *args)
                assert run.returncode == 0, run.stdout + run.stderr
                assert "1 retrieved, 0 skipped, 0 failed" in run.stdout, run.stdout
            results = tmp_path / "data" / "results"
            for accession in ("ACC-JAN-1", "ACC-FEB-1"):  # by C-GET, by C-MOVE
                summary = results / studies[accession] / "study.json"
                wait_for(summary.exists, 240, f"the results of {accession}")
                doc = json.loads(summary.read_text())
                assert [s["status"] for s in doc["series"]] == ["done"]
                assert doc["calling_aet"] == "ORTHANC" and doc["completed_by"] == "retrieved"
                made = {
                    str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in (results / studies[accession]).rglob("*.dcm")
                }

                def at_pacs(uid: str = studies[accession], made: set[str] = made) -> bool:
                    found = orthanc.post("/tools/lookup", uid.encode())
                    ids = orthanc.json(f"/studies/{found[0]['ID']}/instances") if found else []
                    return made <= {i["MainDicomTags"]["SOPInstanceUID"] for i in ids}

                wait_for(at_pacs, 120, f"the results of {accession} at the PACS")


@pytest.mark.skipif(not shutil.which("dcmqrscp"), reason="needs dcmtk's dcmqrscp")
def test_dcmtks_archive_is_a_second_dimse_peer(tmp_path: Path) -> None:
    """dcmqrscp (dcmtk's query/retrieve archive, which counts no instances at C-FIND):
    found by accession number, retrieved by C-GET, handed over whole."""
    port = free_port()
    (tmp_path / "db").mkdir()
    (tmp_path / "qr.cfg").write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {tmp_path / 'db'} RW (200, 1024mb) ANY\nAETable END\n"
    )
    archive = subprocess.Popen(
        ["dcmqrscp", "-c", str(tmp_path / "qr.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        hu, _, affine = lesion_phantom(TEST_SEED_BASE + 650, lesions=1)
        spec = write_volume_series(tmp_path / "ct", hu[:, :, :20].astype(np.float32), affine)
        files = [str(p) for p in sorted((tmp_path / "ct").iterdir())]
        wait_for(
            lambda: (
                subprocess.run(
                    ["storescu", "-aec", "QRSCP", "127.0.0.1", str(port), *files],
                    capture_output=True,
                ).returncode
                == 0
            ),
            30,
            "dcmqrscp to take the study",
        )
        settings = make_settings(
            tmp_path / "data",
            sources={"qr": Source(host="127.0.0.1", port=port, ae_title="QRSCP", pause_s=0)},
        )
        settings.ensure_dirs()
        [match] = find(settings.sources["qr"], peer.Criteria(accession="ACC0001"))
        assert match.study_uid == spec.study_uid
        pull = plan.new_pull(
            settings.spool_dir, "qr", [plan.PulledStudy(study_uid=match.study_uid)], False
        )
        jobs: list[Job] = []
        run_pull(settings, pull, recording_producer(settings, jobs).close, lambda s: None)
        assert [(s.state, s.received) for s in pull.studies] == [("done", 20)]
        assert [j.study.instances for j in jobs if j.study] == [20]
    finally:
        archive.terminate()
        archive.wait(10)


def _stl_in(study: Path, pacs: Pacs) -> None:
    """An Encapsulated STL (a 3D print of the anatomy), added to the study on the PACS: a
    storage class outside pynetdicom's 120 most common."""
    source = dcmread(next(study.iterdir()), stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = STL_CLASS, generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyID"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.AccessionNumber = "ACC-FEB-1"
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), "M3D", 99
    ds.InstanceNumber, ds.MIMETypeOfEncapsulatedDocument = 1, "model/stl"
    ds.EncapsulatedDocument = b"solid part\nendsolid part\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = study.parent / "stl.dcm"
    ds.save_as(path, enforce_file_format=True)
    pacs.orthanc.post("/instances", path.read_bytes())


def test_the_retrieve_proposes_the_studys_own_storage_classes(pacs: Pacs, tmp_path: Path) -> None:
    _stl_in(tmp_path / "study-2", pacs)  # ACC-FEB-1's folder
    settings = _settings(tmp_path, pacs, retries=1)
    [match] = find(settings.sources["pacs"], peer.Criteria(accession="ACC-FEB-1"))
    assert STL_CLASS in match.sop_classes and match.instances == 25
    # The PACS said the study's classes: the C-GET proposes them, and all 25 come.
    jobs: list[Job] = []
    whole = _pull(settings, peer.Criteria(accession="ACC-FEB-1"), jobs)
    assert [(s.state, s.received) for s in whole.studies] == [("done", 25)]
    # Had it not said them, pynetdicom's 120 most common classes would be proposed, without
    # the STL: Orthanc then refuses the whole retrieve (0xC000). Asked once more, the study
    # becomes a failed item that says why.
    item = plan.PulledStudy(study_uid=match.study_uid, expected=25)
    pull = plan.new_pull(settings.spool_dir, "pacs", [item], force=True)
    run_pull(settings, pull, recording_producer(settings, jobs).close, lambda s: None)
    [study] = pull.studies
    assert study.state == "failed" and len(jobs) == 1, study
    assert study.reason is not None and "0xC000" in study.reason
    assert "did not say the study's storage classes" in study.reason
    [failed] = [p for p in settings.failed_dir.iterdir() if pull.id in p.name]
    assert json.loads((failed / "error.json").read_text())["job"]["pull"] == pull.id
    assert pull_lines(settings) == []  # failed, not pending: `pull --resume` asks again
