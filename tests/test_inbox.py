from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from pipeline.core.instances import INBOX_FILES, file_identity, place_file
from pipeline.core.jobs import Job
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import write_mednist_png
from pipeline.ingest import unpack
from pipeline.ingest.inbox import InboxWatcher, ignored
from pipeline.ingest.receiver import Receiver
from pipeline.ingest.settling import HeldFiles, Patience, SettlingStudies, StabilityTracker

from .conftest import make_settings, recording_producer

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_file_is_taken_only_after_settle_time_without_changes(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=2.0, clock=clock)
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"x" * 10)
    tracker.touch(f)
    clock.t = 1.0
    assert tracker.stable() == []
    # Still growing: the quiet period starts again.
    with f.open("ab") as out:
        out.write(b"y" * 10)
    clock.t = 2.5
    assert tracker.stable() == []
    clock.t = 4.0
    assert tracker.stable() == []
    clock.t = 4.6
    assert tracker.stable() == [f]
    assert tracker.stable() == []  # handed out once


def test_an_event_restarts_the_quiet_period(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=2.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    clock.t = 1.9
    tracker.touch(f)  # e.g. a write that kept the size (rewrite in place)
    clock.t = 3.0
    assert tracker.stable() == []
    clock.t = 4.0
    assert tracker.stable() == [f]


def test_mtime_change_with_same_size_is_a_change(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=1.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    clock.t = 1.5
    assert tracker.stable() == []
    clock.t = 2.6
    assert tracker.stable() == [f]


def test_vanished_file_is_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    tracker = StabilityTracker(settle_seconds=0.0, clock=clock)
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    tracker.touch(f)
    f.unlink()
    assert tracker.stable() == []
    assert len(tracker) == 0


def test_partial_and_hidden_names_are_ignored(tmp_path: Path) -> None:
    patterns = ("*.part", ".*", "*.tmp")
    assert ignored(tmp_path / "scan.png.part", tmp_path, patterns)
    assert ignored(tmp_path / ".scan.png", tmp_path, patterns)
    assert ignored(tmp_path / ".hidden" / "scan.png", tmp_path, patterns)
    assert not ignored(tmp_path / "sub" / "scan.png", tmp_path, patterns)


def test_a_study_settles_after_its_quiet_time_unless_its_folder_is_still_being_written() -> None:
    clock = Clock()
    studies = SettlingStudies(Patience(3.0, 60.0, 100.0), clock)
    studies.taken("1.2.3", "cd")
    clock.t = 2.0
    studies.taken("1.2.3", "cd")  # a second file restarts the quiet time
    clock.t = 4.9
    assert studies.due(set()) == []
    clock.t = 5.1
    # A file in the same dropped folder is still being copied: not yet.
    assert studies.due({"cd"}) == []
    # Files pending elsewhere in the inbox do not hold it.
    ((uid, _),) = studies.due({"other.png"})
    assert uid == "1.2.3" and "1.2.3" not in studies
    assert studies.due(set()) == []  # handed out once


def test_a_standing_folder_with_steady_traffic_holds_a_study_back_a_minute_at_most() -> None:
    """Files keep being written into the folder a study came in (other studies, exported
    one after another): its quiet time alone cannot close it; a minute after its last file
    does (``receiver.quiet_period_s``), not the hour of the maximum wait."""
    clock = Clock()
    studies = SettlingStudies(Patience(3.0, 60.0, 3600.0), clock)
    studies.taken("1.2.3", "ct")
    clock.t = 59.0
    assert studies.due({"ct"}) == []
    clock.t = 60.0
    assert [uid for uid, _ in studies.due({"ct"})] == ["1.2.3"]


def test_a_study_is_closed_at_the_maximum_wait_even_while_files_keep_coming() -> None:
    clock = Clock()
    studies = SettlingStudies(Patience(3.0, 60.0, 10.0), clock)
    for t in range(11):
        clock.t = float(t)
        studies.taken("1.2.3", "cd")
        due = [uid for uid, _ in studies.due({"cd"})]
        assert due == ([] if t < 10 else ["1.2.3"])


def test_an_adopted_study_settles_from_its_adoption() -> None:
    clock = Clock()
    studies = SettlingStudies(Patience(3.0, 60.0, 100.0), clock)
    clock.t = 50.0
    studies.adopt("1.2.3")
    clock.t = 52.0
    assert studies.due(set()) == []
    clock.t = 53.0
    assert [uid for uid, _ in studies.due(set())] == ["1.2.3"]


def test_a_dropped_folders_other_files_wait_until_the_folder_has_settled(tmp_path: Path) -> None:
    clock = Clock()
    held = HeldFiles(Patience(3.0, 60.0, 100.0), clock)
    held.hold("cd", tmp_path / "cd" / "DICOMDIR")
    clock.t = 2.0
    held.hold("cd", tmp_path / "cd" / "README.TXT")
    held.hold("other", tmp_path / "other" / "notes.txt")
    clock.t = 5.1
    assert held.due({"cd", "other"}) == []  # both still being written
    ((entry, paths),) = held.due({"other"})
    assert entry == "cd" and paths == [tmp_path / "cd" / "DICOMDIR", tmp_path / "cd" / "README.TXT"]
    assert len(held) == 1
    clock.t = 102.0
    assert [e for e, _ in held.due({"other"})] == ["other"]  # at the latest after max_wait_s


def _watch(
    settings: Settings,
    done: Callable[[list[Job]], bool],
    drop: Callable[[], object] = lambda: None,
    timeout: float = 30,
) -> list[Job]:
    """Run the watcher on its own thread, ``drop`` files while it runs, until ``done(jobs)``
    and a second more (nothing more may come); the jobs it queued."""
    jobs: list[Job] = []
    stop = threading.Event()
    watcher = InboxWatcher(settings, recording_producer(settings, jobs))
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        drop()
        deadline = time.monotonic() + timeout
        while not done(jobs):
            assert time.monotonic() < deadline, (jobs, list(settings.failed_dir.iterdir()))
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    return jobs


def test_a_dicom_medium_is_its_dicom_files_and_the_rest_is_set_aside_as_one_item(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A patient CD copied in whole: its series is one study job; its DICOMDIR, README and
    viewer (a program, its icons as PNG) are one failed item, kept under their paths, not a
    failed job each nor icons classified as hands and chests. A broken DICOM file on it still
    fails by itself, with its own reason. In a folder without a DICOMDIR a PNG is a job and
    what the pipeline cannot read is set aside together."""
    caplog.set_level(logging.INFO, logger="pipeline.ingest.inbox")
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    staging = tmp_path / "staging"
    ct = new_series(slices=5, rows=16, cols=16)
    medium = staging / "DOE_JANE_CD"
    (medium / "DICOM").mkdir(parents=True)
    for k, path in enumerate(write_series(staging / "ct", ct), start=1):
        os.replace(path, medium / "DICOM" / f"IM{k:05d}")
    (medium / "DICOM" / "IM99999").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    (medium / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (medium / "README.TXT").write_text("Insert the CD and run VIEWER.EXE\n")
    # An index kept under another name, known by its SOP class (pydicom's has 3 studies).
    shutil.copy(str(get_testdata_file("DICOMDIR")), medium / "DICOMDIR.OLD")
    (medium / "VIEWER" / "icons").mkdir(parents=True)
    (medium / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ" + b"\0" * 100)
    write_mednist_png(medium / "VIEWER" / "icons" / "logo.png", "Hand", 2)
    folder = staging / "exports"
    folder.mkdir()
    write_mednist_png(folder / "chest.png", "CXR", 3)
    (folder / "report.docx").write_bytes(b"PK\3\4")
    (folder / "notes.txt").write_text("see report\n")

    def drop() -> None:
        for item in (medium, folder):
            os.replace(item, settings.inbox_dir / item.name)

    jobs = _watch(
        settings,
        lambda jobs: len(jobs) >= 3 and len(list(settings.failed_dir.iterdir())) >= 2,
        drop,
    )

    assert not [p for p in settings.inbox_dir.rglob("*") if not p.is_dir()]  # all taken
    assert (settings.inbox_dir / "DOE_JANE_CD").is_dir()  # dropped folders stay, unlike unpacked
    by_name = {job.original_name: job for job in jobs}
    assert set(by_name) == {ct.study_uid, "DOE_JANE_CD/DICOM/IM99999", "exports/chest.png"}
    study = by_name[ct.study_uid].study
    assert study is not None and study.series == {ct.series_uid: 5}
    items = {}
    for item in settings.failed_dir.iterdir():
        items[json.loads((item / "error.json").read_text())["original_name"]] = item
    assert set(items) == {"DOE_JANE_CD", "exports"}
    aside = json.loads((items["DOE_JANE_CD"] / "error.json").read_text())
    assert aside["stage"] == "intake" and "is a DICOM medium" in aside["message"]
    expected = [
        "DICOMDIR",
        "DICOMDIR.OLD",
        "README.TXT",
        "VIEWER/VIEWER.EXE",
        "VIEWER/icons/logo.png",
    ]
    assert aside["files"] == [f"DOE_JANE_CD/{name}" for name in expected]
    for name in aside["files"]:  # kept, under their paths in the inbox
        assert (items["DOE_JANE_CD"] / name).is_file(), name
    other = json.loads((items["exports"] / "error.json").read_text())
    assert other["files"] == ["exports/notes.txt", "exports/report.docx"]
    assert "of no type the pipeline reads" in other["message"]
    assert (items["exports"] / "exports" / "report.docx").read_bytes() == b"PK\3\4"
    # Logged by count: the folder's name carries the patient's.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "pipeline.ingest.inbox")
    assert "DOE" not in ours and "set aside 5 file(s)" in ours


def test_dicom_files_dropped_into_the_inbox_become_one_job_per_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CT series copied from a CD (files without a suffix, in a folder) is one study job, as
    if a PACS had sent it; a single DICOM image is a study of its own; other files stay jobs
    of their own. A second copy of an instance, byte for byte, is taken once (the folder
    dropped twice loses nothing); one with other content is refused with the reason, and kept."""
    caplog.set_level(logging.INFO, logger="pipeline.ingest.inbox")
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    staging = tmp_path / "staging"
    ct = new_series(slices=20, rows=32, cols=32)
    cd = staging / "cd" / "DICOM"
    cd.mkdir(parents=True)
    for k, path in enumerate(write_series(staging / "ct", ct), start=1):
        os.replace(path, cd / f"IM{k:05d}")
    shutil.copy(cd / "IM00001", cd / "IM00001 copy")
    edited = dcmread(cd / "IM00002")
    edited.SeriesDescription = "EDITED"  # same UIDs, other content
    edited.save_as(cd / "IM00002 edited")
    single = new_series(slices=1)
    (xray,) = write_series(staging / "xray", single)
    write_mednist_png(staging / "hand.png", "Hand", 1)

    def drop() -> None:
        for item in (staging / "cd", xray, staging / "hand.png"):
            os.replace(item, settings.inbox_dir / item.name)

    jobs = _watch(
        settings, lambda jobs: len(jobs) >= 3 and any(settings.failed_dir.iterdir()), drop
    )

    assert not [p for p in settings.inbox_dir.rglob("*") if not p.is_dir()]  # all taken
    by_name = {job.original_name: job for job in jobs}
    assert set(by_name) == {ct.study_uid, single.study_uid, "hand.png"}, jobs
    study = by_name[ct.study_uid].study
    assert study is not None and study.completed_by == "inbox-settled"
    assert study.series == {ct.series_uid: 20} and study.calling_aet is None
    folder = settings.spool_dir / by_name[ct.study_uid].id / "study"
    assert len(list((folder / ct.series_uid).glob("*.dcm"))) == 20
    # Which file each instance came from, for errors that name instances by UID.
    names = [json.loads(line)["file"] for line in (folder / INBOX_FILES).read_text().splitlines()]
    # Of the two files of instance 2, whichever was taken first is gathered.
    twins = {"cd/DICOM/IM00002", "cd/DICOM/IM00002 edited"}
    (kept,) = twins & set(names)
    assert sorted(set(names) - twins) == [f"cd/DICOM/IM{k:05d}" for k in [1, *range(3, 21)]]
    xray_study = by_name[single.study_uid].study
    assert xray_study is not None and xray_study.series == {single.series_uid: 1}
    assert by_name["hand.png"].study is None and by_name["hand.png"].source == "inbox"

    (refused,) = settings.failed_dir.iterdir()
    error = json.loads((refused / "error.json").read_text())
    (other,) = twins - {kept}
    assert error["stage"] == "intake" and error["original_name"] == other
    assert "already among the files gathered for study" in error["message"]
    assert "with other content" in error["message"]
    assert (refused / Path(other).name).is_file()
    copies = f"study {ct.study_uid}: 1 instance(s) came twice, byte for byte the same"
    assert any(copies in r.getMessage() for r in caplog.records)
    # Said once per study, by UID (the folder's name may carry a patient's).
    gathering = [r.getMessage() for r in caplog.records if "gathering" in r.getMessage()]
    assert sorted(gathering) == sorted(
        f"inbox: gathering the DICOM files of study {uid}"
        for uid in (ct.study_uid, single.study_uid)
    )


def test_the_same_instance_in_other_transfer_syntaxes_is_taken_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS's export done twice, the second time compressed: a vendor's MR image (pydicom's
    test files) uncompressed, RLE, JPEG 2000 and JPEG-LS lossless, one SOP instance. Same
    elements, same pixels once decoded: one instance of one study, no failed item; the log
    says the copies came in another encoding."""
    caplog.set_level(logging.INFO, logger="pipeline.ingest.inbox")
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
    names.append("MR_small_jpeg_ls_lossless.dcm")
    staging = tmp_path / "export"
    staging.mkdir()
    for name in names:
        shutil.copy(PYDICOM_FILES / name, staging / name)
    study_uid = str(dcmread(staging / names[0]).StudyInstanceUID)

    def drop() -> None:
        os.replace(staging, settings.inbox_dir / "export")

    (job,) = _watch(settings, lambda jobs: bool(jobs), drop)

    assert job.study is not None and job.study.study_uid == study_uid
    assert job.study.instances == 1
    assert not list(settings.failed_dir.iterdir())
    assert not [p for p in settings.inbox_dir.rglob("*") if p.is_file()]
    said = [r.getMessage() for r in caplog.records]
    recoded = "3 instance(s) came twice, the same instance in another encoding (transfer syntax)"
    assert any(f"inbox: study {study_uid}: {recoded}" in line for line in said), said


def test_a_study_left_gathering_by_an_earlier_run_is_finished_by_the_watcher(
    tmp_path: Path,
) -> None:
    """After a restart the watcher completes the inbox studies left in the spool; the
    receiver leaves them alone (it would cut them after its quiet period, blind to files
    still being copied into the inbox)."""
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    spec = new_series(slices=3, rows=16, cols=16)
    for path in write_series(tmp_path / "src", spec):
        uids = file_identity(path)
        assert uids is not None
        assert place_file(settings.spool_dir, uids, path, json.dumps({"file": path.name}))

    receiver = Receiver(settings, recording_producer(settings))
    receiver._adopt()
    assert spec.study_uid not in receiver.tracker

    (job,) = _watch(settings, lambda jobs: bool(jobs), timeout=10)
    assert job.study is not None and job.study.series == {spec.series_uid: 3}
    assert job.study.completed_by == "inbox-settled"


def _zip(
    path: Path, members: dict[str, bytes] | list[tuple[str, bytes]], **infos: zipfile.ZipInfo
) -> Path:
    pairs = list(members.items()) if isinstance(members, dict) else members
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted, for a test
        for name, data in pairs:
            z.writestr(infos.get(name, name), data)
    return path


def test_a_zip_dropped_into_the_inbox_is_unpacked_and_taken_as_a_dropped_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A patient CD's copy downloaded as a zip (with macOS metadata in it) is its study, its
    DICOMDIR and README set aside; a zip of a picture is the picture's job; a damaged zip, one
    that would write outside its folder and a zip bomb are refused whole, kept in failed/ with
    the reason, nothing of them unpacked."""
    caplog.set_level(logging.INFO, logger="pipeline.ingest.inbox")
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    staging = tmp_path / "staging"
    staging.mkdir()
    ct = new_series(slices=4, rows=16, cols=16)
    cd: dict[str, bytes] = {}
    fileset = FileSet()
    for k, path in enumerate(write_series(staging / "ct", ct), start=1):
        cd[f"DICOM/IM{k:05d}"] = path.read_bytes()
        fileset.add(path)
        cd[f"__MACOSX/DICOM/._IM{k:05d}"] = b"\0\5\26\7 AppleDouble"
    fileset.write(staging / "fileset")
    cd["DICOMDIR"] = (staging / "fileset" / "DICOMDIR").read_bytes()
    cd["README.TXT"] = b"run VIEWER.EXE\n"
    cd[".DS_Store"] = b"\0\0\0\1Bud1"
    write_mednist_png(staging / "hand.png", "Hand", 4)
    slip = zipfile.ZipInfo("../../outside.png")
    zips = {
        "DOE_JANE_CD.zip": _zip(staging / "DOE_JANE_CD.zip", cd),
        "photo.zip": _zip(staging / "photo.zip", {"hand.png": (staging / "hand.png").read_bytes()}),
        "slip.zip": _zip(staging / "slip.zip", {"x": b"png"}, x=slip),
        "bomb.zip": _zip(staging / "bomb.zip", {"big.dcm": bytes(150 * 2**20)}),
    }
    damaged = (staging / "photo.zip").read_bytes()
    (staging / "damaged.zip").write_bytes(damaged[: len(damaged) // 2])
    zips["damaged.zip"] = staging / "damaged.zip"

    def drop() -> None:
        for name, path in zips.items():
            os.replace(path, settings.inbox_dir / name)

    jobs = _watch(
        settings,
        lambda jobs: len(jobs) >= 2 and len(list(settings.failed_dir.iterdir())) >= 4,
        drop,
    )
    # The archives, their content, and the folders unpacking made: all gone from the inbox.
    assert not list(settings.inbox_dir.iterdir()), list(settings.inbox_dir.rglob("*"))
    by_name = {job.original_name: job for job in jobs}
    assert set(by_name) == {ct.study_uid, "photo/hand.png"}, jobs
    study = by_name[ct.study_uid].study
    assert study is not None and study.series == {ct.series_uid: 4}
    failed = {}
    for item in settings.failed_dir.iterdir():
        failed[json.loads((item / "error.json").read_text())["original_name"]] = item
    assert set(failed) == {"DOE_JANE_CD", "slip.zip", "bomb.zip", "damaged.zip"}
    aside = json.loads((failed["DOE_JANE_CD"] / "error.json").read_text())
    assert aside["files"] == ["DOE_JANE_CD/DICOMDIR", "DOE_JANE_CD/README.TXT"]
    for name, words in {
        "slip.zip": "outside its folder",
        "bomb.zip": "zip bomb",
        "damaged.zip": "not a readable zip archive",
    }.items():
        error = json.loads((failed[name] / "error.json").read_text())
        assert error["stage"] == "intake" and words in error["message"], error
        assert (failed[name] / name).is_file()  # the archive itself, kept as dropped
    slip_error = json.loads((failed["slip.zip"] / "error.json").read_text())
    assert slip_error["member"] == "../../outside.png"
    assert not (tmp_path / "outside.png").exists()
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "pipeline.ingest.inbox")
    assert "unpacked an archive into a folder of 6 file(s) (5 macOS metadata" in ours, ours
    assert "DOE" not in ours and "outside.png" not in ours


def test_a_folder_unpacked_before_the_watcher_stopped_is_removed_once_taken(
    tmp_path: Path,
) -> None:
    """A watcher stopped after unpacking a zip but before taking its files: the next one takes
    the study and removes the folder, as the first would have; its marker is never a job, even
    where ``inbox.ignore_patterns`` leaves dot-files in. A folder someone dropped stays."""
    settings = make_settings(
        tmp_path / "data",
        inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3, "ignore_patterns": ["*.part"]},
    )
    settings.ensure_dirs()
    ct = new_series(slices=3, rows=16, cols=16)
    members = {f"DICOM/IM{k}": p.read_bytes() for k, p in enumerate(write_series(tmp_path, ct))}
    dropped = _zip(settings.inbox_dir / "study.zip", members)
    with unpack.open_archive(dropped) as archive:  # as the stopped watcher had done
        unpack.unpack(dropped, archive, unpack.plan(archive, 2**30))
    (settings.inbox_dir / "export").mkdir()
    write_mednist_png(settings.inbox_dir / "export" / "hand.png", "Hand", 1)

    jobs = _watch(settings, lambda jobs: len(jobs) >= 2)
    assert {job.original_name for job in jobs} == {ct.study_uid, "export/hand.png"}
    assert not list(settings.failed_dir.iterdir())
    assert [p.name for p in settings.inbox_dir.iterdir()] == ["export"]


@pytest.mark.parametrize(
    ("members", "infos", "words"),
    [
        ([("a.png", b"x"), ("a.png", b"y")], {}, "same name"),
        ({"a": b"x", "a/b.png": b"y"}, {}, "both a file and a folder"),
        ({"__MACOSX/._a.png": b"m", ".DS_Store": b"m"}, {}, "no files but macOS metadata"),
        ({"inner.zip": b"PK"}, {}, "archive itself"),
        ({"/etc/x.png": b"x"}, {}, "outside its folder"),
        ({"link": b"/etc/passwd"}, {"link": 0o120777 << 16}, "symbolic link"),
        ({"s.dcm": b"x"}, {"s.dcm": -1}, "password-protected"),
        ({"big.dcm": bytes(3 * 2**20)}, {}, r"more than inbox.max_unpacked_mb \(2 MB\)"),
    ],
)
def test_an_archive_is_refused_whole_for_what_could_harm_or_mislead(
    tmp_path: Path,
    members: dict[str, bytes] | list[tuple[str, bytes]],
    infos: dict[str, int],
    words: str,
) -> None:
    zinfos = {}
    for name, attr in infos.items():
        zinfos[name] = zipfile.ZipInfo(name)
        zinfos[name].external_attr = max(attr, 0)
    path = _zip(tmp_path / "a.zip", members, **zinfos)
    if -1 in infos.values():  # zipfile writes no encrypted member: flag the one there is
        data = bytearray(path.read_bytes())
        for signature, at in ((b"PK\3\4", 6), (b"PK\1\2", 8)):
            data[data.index(signature) + at] |= 0x1
        path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive, pytest.raises(unpack.ArchiveError, match=words):
        unpack.plan(archive, max_bytes=2 * 2**20)


def test_an_archive_with_a_damaged_member_leaves_nothing_unpacked(tmp_path: Path) -> None:
    members = {"a.png": b"a" * 5000, "b.png": bytes(range(256)) * 40}
    path = _zip(tmp_path / "a.zip", members)
    data = bytearray(path.read_bytes())
    second = data.index(b"PK\3\4", 4)  # b.png's local header, then its packed bytes
    data[second + 30 + len("b.png") + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        todo = unpack.plan(archive, max_bytes=2**30)
        with pytest.raises(unpack.ArchiveError, match="cannot be unpacked") as caught:
            unpack.unpack(path, archive, todo)
    assert caught.value.member is not None and caught.value.member.startswith("b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]  # kept; nothing beside it


def test_an_archive_whose_member_name_cannot_be_a_file_name_leaves_nothing(
    tmp_path: Path,
) -> None:
    path = _zip(tmp_path / "a.zip", {"ok.png": b"x", "n" * 300 + ".png": b"y"})
    with zipfile.ZipFile(path) as archive:
        todo = unpack.plan(archive, max_bytes=2**30)
        with pytest.raises(unpack.ArchiveError, match="cannot be a file's name here"):
            unpack.unpack(path, archive, todo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def _slow_zip(path: Path, members: int = 6000) -> Path:
    """An archive that takes seconds to unpack: every member is written and synced apart
    (random bytes, of no type the pipeline reads: set aside once unpacked)."""
    blob = os.urandom(16 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n in range(members):
            z.writestr(f"export/part{n:05d}.bin", blob)
    return path


def test_files_dropped_beside_an_archive_are_taken_while_it_is_unpacked(tmp_path: Path) -> None:
    """A large zip is unpacked on a thread of its own: a PNG dropped while it is being unpacked
    is a job at once, not after the archive; the archive's files are then taken as usual."""
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    archive = _slow_zip(tmp_path / "big.zip")
    write_mednist_png(tmp_path / "hand.png", "Hand", 5)
    work = unpack.work_folder(settings.inbox_dir / "big.zip")
    unpacking_when_queued: dict[str, bool] = {}

    def drop() -> None:
        os.replace(archive, settings.inbox_dir / "big.zip")
        deadline = time.monotonic() + 30
        while not work.exists():
            assert time.monotonic() < deadline, "unpacking never started"
            time.sleep(0.01)
        os.replace(tmp_path / "hand.png", settings.inbox_dir / "hand.png")

    def done(jobs: list[Job]) -> bool:
        for job in jobs:
            unpacking_when_queued.setdefault(job.original_name, work.exists())
        return bool(jobs) and len(list(settings.failed_dir.iterdir())) == 1

    jobs = _watch(settings, done, drop, timeout=120)
    assert {job.original_name for job in jobs} == {"hand.png"}  # offered again while unmarked
    assert unpacking_when_queued == {"hand.png": True}  # the archive was still being unpacked
    (aside,) = settings.failed_dir.iterdir()
    error = json.loads((aside / "error.json").read_text())
    assert len(error["files"]) == 6000 and error["original_name"] == "big"
    assert not list(settings.inbox_dir.iterdir())  # archive and unpacked folder gone


def test_a_watcher_stopped_while_unpacking_leaves_the_archive_for_its_next_start(
    tmp_path: Path,
) -> None:
    """Stopping the watcher cancels the unpacking between chunks: nothing half-unpacked is
    left, the archive stays in the inbox, and the next start unpacks it whole."""
    settings = make_settings(tmp_path / "data", inbox={"settle_seconds": 0.1, "study_quiet_s": 0.3})
    settings.ensure_dirs()
    dropped = _slow_zip(tmp_path / "big.zip", members=12000)
    os.replace(dropped, settings.inbox_dir / "big.zip")
    work = unpack.work_folder(settings.inbox_dir / "big.zip")
    stop = threading.Event()
    watcher = InboxWatcher(settings, recording_producer(settings))
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 30
    while not any(work.glob("export/*")):
        assert time.monotonic() < deadline, "unpacking never started"
        time.sleep(0.01)
    stop.set()
    thread.join()
    # Neither unpacked to its end (``big/``) nor half (the hidden work folder).
    assert sorted(p.name for p in settings.inbox_dir.iterdir()) == ["big.zip"]

    _watch(settings, lambda _jobs: len(list(settings.failed_dir.iterdir())) == 1, timeout=180)
    (aside,) = settings.failed_dir.iterdir()
    assert len(json.loads((aside / "error.json").read_text())["files"]) == 12000
    assert not list(settings.inbox_dir.iterdir())
