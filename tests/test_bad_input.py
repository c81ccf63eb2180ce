"""Bad input never crashes a service and never vanishes: 214 generated bad inputs dropped into
the inbox of a running `dicom-pipeline up`, good ones interleaved. Every bad one ends in
data/failed/ with a clear error and the input kept; every good one gets its result; the
services keep running; no log line carries the test patient's name or ID."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread

from pipeline.core.instances import INBOX_FILES
from pipeline.demo.dicom_series import (
    TEST_PATIENT_ID,
    TEST_PATIENT_NAME,
    new_series,
    write_series,
)
from pipeline.demo.synthetic import MEDNIST_LABELS, write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.runtime.process import descendants, free_port

from .bad_inputs import all_cases
from .conftest import alive, running_up, up_env, wait_for
from .test_unrouted import NO_MODEL_FOR, unrouted_today

pytestmark = pytest.mark.e2e

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# Odd names are not errors: with good content they get results like any other file.
ODD_GOOD_NAMES = [
    "space in name.png",
    "-leading-dash.png",
    "unicodé-名前.png",
    "emoji-\U0001f9e0.png",
]


def _docs(root: Path, pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in root.glob(pattern)]


def test_bad_inputs_fail_clearly_and_good_ones_interleaved_get_results(
    model_repository: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = up_env(tmp_path, model_repository, free_port())
    with running_up(tmp_path, env) as up:
        children = descendants(up.pid)
        inbox, staging = data / "inbox", tmp_path / "staging"
        staging.mkdir()
        bad: list[str] = []
        good: dict[str, str] = {}
        for i, (name, content) in enumerate(all_cases()):
            (staging / name).write_bytes(content)
            os.replace(staging / name, inbox / name)  # appears whole, as a copy tool would
            bad.append(name)
            if i % 20 == 0:  # a good file every 20 bad ones
                label = MEDNIST_LABELS[(i // 20) % len(MEDNIST_LABELS)]
                good_name = f"good-{i:03d}.png"
                write_mednist_png(staging / good_name, label, TEST_SEED_BASE + 800 + i)
                os.replace(staging / good_name, inbox / good_name)
                good[good_name] = label
        # Good DICOM: a single image (a study of its own, classified as an image), and a CT
        # series in a CD-like folder with suffix-less names (one study, one volume).
        single = new_series(slices=1)
        uid = single.study_uid
        (one,) = write_series(staging / "one", single)
        os.replace(one, inbox / "good-single-image.dcm")
        ct = new_series(slices=20)
        cd = staging / "cd" / "DICOM"
        cd.mkdir(parents=True)
        for k, path in enumerate(write_series(staging / "ct", ct), start=1):
            os.replace(path, cd / f"IM{k:05d}")
        os.replace(staging / "cd", inbox / "cd")
        # Real-world single images from pydicom's test files: three MONOCHROME1 radiographs
        # (one study, three series) and a PALETTE COLOR ultrasound, neither saying where it
        # lies in the patient; an ultrasound with ACR-NEMA dates and times (1997.04.24,
        # 14:04:38); a de-identified CT slice that does not say how. Each is classified.
        real = {
            "cr/1": "dicomdirtests/77654033/CR1/6154",
            "cr/2": "dicomdirtests/77654033/CR2/6247",
            "cr/3": "dicomdirtests/77654033/CR3/6278",
            "us-palette.dcm": "examples_palette.dcm",
            "us-acr-nema-dates.dcm": "ExplVR_BigEnd.dcm",
            "ct-deidentified.dcm": "693_J2KI.dcm",
        }
        (staging / "cr").mkdir()
        for name, source in real.items():
            shutil.copy(PYDICOM_FILES / source, staging / name)
        os.replace(staging / "cr", inbox / "cr")
        for name in real:
            if "/" not in name:
                os.replace(staging / name, inbox / name)
        # Real objects no rule takes (a cine, a report, an RT plan, a SEG, an ECG): recorded
        # as unrouted, not failed.
        no_model = {str(dcmread(PYDICOM_FILES / n).StudyInstanceUID): n for n in NO_MODEL_FOR}
        for name in NO_MODEL_FOR:
            shutil.copy(PYDICOM_FILES / name, staging / f"forwarded-{name}")
            os.replace(staging / f"forwarded-{name}", inbox / f"forwarded-{name}")
        real_studies = {str(dcmread(PYDICOM_FILES / f).StudyInstanceUID) for f in real.values()}
        # A zip of a picture, as downloaded: unpacked, and the picture classified.
        write_mednist_png(staging / "scan.png", "CXR", TEST_SEED_BASE + 960)
        with zipfile.ZipFile(staging / "download.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.write(staging / "scan.png", "scan.png")
        os.replace(staging / "download.zip", inbox / "download.zip")
        good["download/scan.png"] = "CXR"
        for k, name in enumerate(ODD_GOOD_NAMES):
            write_mednist_png(staging / name, "Hand", TEST_SEED_BASE + 900 + k)
            os.replace(staging / name, inbox / name)
            good[name] = "Hand"
        # Symbolic links pointing outside the inbox: to a file, to a folder, to nothing.
        (tmp_path / "secret.dcm").write_bytes(b"outside the inbox")
        for name, target in {
            "link-to-file.dcm": tmp_path / "secret.dcm",
            "link-to-folder.png": tmp_path,
            "link-dangling.nii": tmp_path / "nowhere.nii",
        }.items():
            (inbox / name).symlink_to(target)
            bad.append(name)
        assert len(bad) >= 200

        def failed() -> dict[str, dict[str, Any]]:
            """Errors by inbox name; a DICOM file's is its study's, with where it is kept."""
            out = {}
            for path in (data / "failed").glob("*/error.json"):
                doc = json.loads(path.read_text())
                job = doc.get("job") or {}
                gathered = path.parent / "study" / INBOX_FILES
                if not gathered.exists():
                    out[str(job.get("original_name") or doc.get("original_name"))] = doc
                    continue
                for line in gathered.read_text().splitlines():
                    item = json.loads(line)
                    kept = path.parent / "study" / item["series"] / f"{item['sop']}.dcm"
                    out[item["file"]] = doc | {"kept": kept}
            return out

        def results() -> dict[str, dict[str, Any]]:
            return {d["input"]["name"]: d for d in _docs(data / "results", "*/*/result.json")}

        wait_for(
            lambda: (
                len(failed()) >= len(bad)
                and len(results()) >= len(good)
                and all(
                    (data / "results" / u / "study.json").exists()
                    for u in (uid, ct.study_uid, *real_studies)
                )
                and set(no_model) <= {e.study for e in unrouted_today(data / "unrouted")}
            ),
            600,
            f"{len(bad)} failures and {len(good)} results",
        )
        errors = failed()
        assert set(errors) == set(bad), set(bad) ^ set(errors)
        for entry in unrouted_today(data / "unrouted"):
            assert entry.policy == "ignore" and entry.items, entry
        # Every one refused where it was read (a DICOM file's study: where its series was),
        # with its reason.
        stages = ("load", "intake", "series")
        unclear = {n: e for n, e in errors.items() if e["stage"] not in stages}
        assert not unclear, unclear
        for name, error in errors.items():
            assert error["type"] in (
                "InputError",
                "NotAnImageError",
                "NoModelError",
                "ArchiveError",
            ), (
                name,
                error,
            )
            assert len(error["message"]) > 10, (name, error)
            assert "TypeError" not in error["message"], (name, error)  # said in words
            folder = data / "failed" / str((error.get("job") or {}).get("id") or "")
            if "kept" in error:  # gathered into a study: kept with it, under its UID
                assert error["kept"].is_file(), name
                if "instance" in error["message"]:  # named by UID, and by the user's name
                    assert f"(file {name})" in error["message"], (name, error)
            elif error["stage"] == "intake":  # a link (its target untouched), or a 2nd copy
                kept = [p for p in (data / "failed").iterdir() if (p / Path(name).name).is_file()]
                links = [p for p in (data / "failed").iterdir() if (p / name).is_symlink()]
                assert kept or links, name
            else:
                assert (folder / Path(name).name).is_file(), name  # the input is kept
        assert (tmp_path / "secret.dcm").read_bytes() == b"outside the inbox"
        got = results()
        assert {n: d["prediction"]["label"] for n, d in got.items()} == good
        single_dir = data / "results" / uid / "mednist_classifier" / single.series_uid
        single_doc = json.loads((single_dir / "result.json").read_text())
        assert single_doc["input"]["route"] == "2d-image", single_doc
        assert single_doc["input"]["shape"] == [1, 64, 64], single_doc
        real_series = 0
        for real_uid in real_studies:
            doc = json.loads((data / "results" / real_uid / "study.json").read_text())
            outcomes = [(o["status"], o["route"], o["slices"]) for o in doc["series"]]
            assert outcomes == [("done", "2d-image", 1)] * len(outcomes), doc
            real_series += len(outcomes)
        assert real_series == len(real)
        study = json.loads((data / "results" / ct.study_uid / "study.json").read_text())
        assert [(s["status"], s["route"], s["slices"]) for s in study["series"]] == [
            ("done", "ct-volume", 20)
        ]

        # Every service is still up, and a file dropped now is processed.
        assert up.poll() is None and all(alive(pid) for pid in children)
        write_mednist_png(staging / "after.png", "CXR", TEST_SEED_BASE + 950)
        os.replace(staging / "after.png", inbox / "after.png")
        wait_for(lambda: "after.png" in results(), 60, "the file dropped after the corpus")

        # The corpus' DICOM files carry the test patient; no log line may.
        logs = [tmp_path / "up.log", *(data / "run" / "logs").glob("*.log")]
        for path in logs:
            text = path.read_text(errors="replace")
            for needle in (TEST_PATIENT_NAME, TEST_PATIENT_ID, "DOE^JANE"):
                assert needle not in text, f"{needle} in {path.name}"
