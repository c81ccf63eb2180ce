"""What every viewer shows of a result (route outputs sc, gsps, pdf), checked against the lesion
phantom's truth with real renderers: the key images' outlines where the lesions are, dcmtk's
dcmp2pgm applying the presentation state to its source slices, pdftotext reading the report,
and Orthanc (Debian's package) receiving it all by C-STORE and previewing the key image."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.pixels.processing import apply_modality_lut
from scipy import ndimage

from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import read_job
from pipeline.core.network_settings import Destination
from pipeline.core.results import InputInfo, ModelInfo, Prediction, Result, Timings, WorkerInfo
from pipeline.core.routing import DEFAULT_ROUTES
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.dicom import DicomOutputs, make_dicom
from pipeline.outputs.keyimages import OUTLINE
from pipeline.outputs.send.dispatch import Delivery, deliver
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import MODEL_REPOSITORY, make_settings, spool_study
from .orthanc import needs_orthanc, running_orthanc

ALL = ("json", "sr", "seg", "sc", "gsps", "kos", "pdf")
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PR_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dciodvfy", "dcmp2pgm", "pdftotext")),
    reason="needs dicom3tools, dcmtk and poppler-utils (README: prerequisites)",
)


@dataclass
class Processed:
    settings: Settings
    ct: Path  # the source series' files, slice k in the k+1'th file by name
    truth: np.ndarray  # (column, row, plane), as the volume
    lesions: Path  # the segmentation model's result folder
    classifier: Path


@pytest.fixture
def processed(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> Processed:
    """A two-lesion CT phantom processed with every output, each validated by dciodvfy."""
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 612, lesions=2)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    routes = [
        r.model_copy(update={"outputs": ALL}) if r.name == "ct-volume" else r
        for r in DEFAULT_ROUTES
    ]
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": "dciodvfy"},
        routes=routes,
    )
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    run_study(
        job,
        settings,
        Models(discover_contracts(MODEL_REPOSITORY)),
        new_client(triton.grpc, settings.triton),
    )
    source = dcmread(next((tmp_path / "ct").iterdir()), stop_before_pixels=True)
    study = settings.results_dir / source.StudyInstanceUID
    return Processed(
        settings,
        tmp_path / "ct",
        truth,
        study / "ct_lesion_segmentation" / source.SeriesInstanceUID,
        study / "ct_covid_classifier" / source.SeriesInstanceUID,
    )


def _source_files(ct: Path) -> list[Path]:
    return sorted(ct.iterdir())


def _plane_of(ct: Path, sop_uid: str) -> int:
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in _source_files(ct)]
    return uids.index(sop_uid)


def _truth_on(truth: np.ndarray, plane: int) -> np.ndarray:
    """The lesions' truth on a source slice, (rows, columns) as the slice is shown."""
    return np.ascontiguousarray(truth[:, :, plane].T > 0)


@needs
def test_key_images_outline_each_lesion_where_it_is(processed: Processed) -> None:
    result = json.loads((processed.lesions / "result.json").read_text())
    assert result["dicom_issues"] == []
    assert {"sc-1.dcm", "sc-2.dcm", "pr.dcm", "report.dcm", "kos.dcm"} <= set(result["dicom"])
    found = len(result["segmentation"]["lesions"])
    keys = [n for n in result["dicom"] if n.startswith("sc-")]
    assert len(keys) == min(found, 5) and found >= 2  # one per lesion, at most key_images
    source = dcmread(_source_files(processed.ct)[0], stop_before_pixels=True)
    lesions = _lesions(processed.truth)
    shown: dict[int, str] = {}  # each of the phantom's lesions: the key image outlining it
    for number, name in enumerate(keys, start=1):
        sc = dcmread(processed.lesions / name)
        assert sc.SOPClassUID == SC_CLASS and sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.SeriesNumber == 9903 and sc.InstanceNumber == number
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)  # the source's own size
        assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
        plane = _plane_of(processed.ct, str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID))
        red = np.all(sc.pixel_array == OUTLINE, axis=-1)
        for i, lesion in enumerate(lesions):
            if _outlined(red, _truth_on(lesion, plane)):
                shown.setdefault(i, name)
    assert sorted(shown) == list(range(len(lesions))), f"outlined: {shown}"
    # The banner says what made it, and that demo weights are not for diagnostic use: amber
    # text on black across the top rows.
    top = dcmread(processed.lesions / "sc-1.dcm").pixel_array[:30].astype(int)
    r, g, b = top[..., 0], top[..., 1], top[..., 2]
    assert ((r > 160) & (g > 0.5 * r) & (g < 0.85 * r) & (b < 40)).sum() > 20  # amber

    # The result's preview (and the status page's) is its first key image.
    preview = np.asarray(Image.open(processed.lesions / result["preview"]).convert("RGB"))
    assert np.array_equal(preview, dcmread(processed.lesions / "sc-1.dcm").pixel_array)


@needs
def test_a_classifiers_answer_is_on_its_key_image_presentation_state_and_report(
    processed: Processed, tmp_path: Path
) -> None:
    doc = json.loads((processed.classifier / "result.json").read_text())
    label = doc["prediction"]["label"]
    assert doc["dicom_issues"] == [] and "sc-2.dcm" not in doc["dicom"]
    files = _source_files(processed.ct)
    middle = files[len(files) // 2]
    sc = dcmread(processed.classifier / "sc-1.dcm")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == dcmread(middle).SOPInstanceUID
    run = subprocess.run(
        ["dcmp2pgm", "-v", "-p", str(processed.classifier / "pr.dcm"), str(middle), "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
    )
    p = doc["prediction"]["probabilities"][label]
    assert f'"AI: {label} (p={p:.3f})"' in run.stdout + run.stderr
    text = subprocess.run(
        ["pdftotext", "-layout", str(processed.classifier / "report.pdf"), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name, value in doc["prediction"]["probabilities"].items():
        assert re.search(rf"p\({re.escape(name)}\)\s+{value:.3f}", text)


def test_an_input_without_dicom_identity_gets_its_report_alone(tmp_path: Path) -> None:
    """A PNG or NIfTI has no study to file objects in: the PDF report is made, no DICOM."""
    contract = discover_contracts(MODEL_REPOSITORY)["mednist_classifier"]
    at = datetime.now(UTC)
    result = Result(
        job_id="j",
        input=InputInfo(source="inbox", name="hand.png", kind="image", sha256="0", shape=[1, 8, 8]),
        model=ModelInfo(name=contract.name, version="1"),
        prediction=Prediction(label="Hand", probabilities={"Hand": 0.9, "CXR": 0.1}),
        timings=Timings(
            received=at, queued=at, started=at, finished=at, preprocess_ms=1, inference_ms=1
        ),
        worker=WorkerInfo(host="h", pid=1),
    )
    out = DicomOutputs(
        kinds=ALL,
        sources=None,
        key="j",
        manufacturer="m",
        institution=None,
        iod_check="strict-read",
        reject_dir=tmp_path,
        model_repository=MODEL_REPOSITORY,
    )
    made = make_dicom(result, contract, None, out, np.zeros((1, 8, 8), np.float32))
    assert list(made.other) == ["report.pdf"] and "sr.dcm" in made.files
    assert not any(name.startswith(("sc-", "pr", "report", "kos")) for name in made.files)
    if shutil.which("pdftotext"):
        text = subprocess.run(
            ["pdftotext", "-", "-"], input=made.other["report.pdf"], capture_output=True
        ).stdout.decode()
        assert "hand.png" in text and "Hand" in text


def _lesions(truth: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(truth > 0, structure=np.ones((3, 3, 3), bool))
    return [labels == i for i in range(1, count + 1)]


def _outlined(red: np.ndarray, truth: np.ndarray) -> bool:
    """Whether red pixels follow the lesion's edge on this slice (within two pixels of it,
    either side) all round it: its centre is inside the outline drawn there."""
    if truth.sum() < 10:
        return False
    edge = truth & ~ndimage.binary_erosion(truth)
    drawn = red & ndimage.binary_dilation(edge, iterations=2)
    if drawn.sum() < 0.5 * edge.sum():
        return False
    rows, cols = np.nonzero(drawn)
    centre = ndimage.center_of_mass(truth)
    return bool(rows.min() < centre[0] < rows.max() and cols.min() < centre[1] < cols.max())


def _dcmp2pgm(pr: Path, image: Path, out: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """The slice rendered through the presentation state by dcmtk, and the polylines dcmtk
    reads in it for that slice."""
    run = subprocess.run(
        ["dcmp2pgm", "-v", "-p", str(pr), str(image), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [
        np.array([[float(v) for v in p.split("\\")] for p in m.group(1).split(", ") if p])
        for m in re.finditer(r"coordinates: ([^\n]*?),?\s*$", run.stdout + run.stderr, re.M)
    ]
    return np.asarray(Image.open(out)), lines


@needs
def test_the_presentation_state_draws_each_outline_on_the_source_slice(
    processed: Processed, tmp_path: Path
) -> None:
    pr = dcmread(processed.lesions / "pr.dcm")
    assert pr.SOPClassUID == PR_CLASS and pr.SeriesNumber == 9904
    voi = pr.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-250.0, 1500.0)  # the model's
    annotated = {
        str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for a in pr.GraphicAnnotationSequence
    }
    files = _source_files(processed.ct)
    drawn = 0
    for k, path in enumerate(files):
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if uid not in annotated and k % 5:
            continue  # every annotated slice, and every fifth of the others
        pixels, polylines = _dcmp2pgm(processed.lesions / "pr.dcm", path, tmp_path / "out.pgm")
        truth = _truth_on(processed.truth, k)
        if uid not in annotated:
            assert polylines == []  # nothing on a slice the lesions do not cross
            continue
        outlined = Image.new("1", (pixels.shape[1], pixels.shape[0]))
        for points in polylines:
            ImageDraw.Draw(outlined).polygon([tuple(p) for p in points], fill=1)
        inside = np.asarray(outlined, bool)
        if truth.sum() >= 20:  # a lesion's edge slice is a few pixels: the model may miss it
            overlap = (inside & truth).sum() / (inside | truth).sum()
            assert overlap > 0.5, f"slice {k}: the outline covers {overlap:.2f} of the lesion"
            drawn += 1
        # The window applied by dcmtk: the body (40 HU) at (40 + 1000) / 1500 of white.
        ds = dcmread(path)
        body = apply_modality_lut(ds.pixel_array, ds)
        assert abs(np.median(pixels[np.abs(body - 40) < 30]) - 255 * 1040 / 1500) <= 3
    assert drawn >= 2


@needs
def test_the_report_reads_as_the_result(processed: Processed) -> None:
    result = json.loads((processed.lesions / "result.json").read_text())
    assert result["report"] == "report.pdf"
    pdf = (processed.lesions / "report.pdf").read_bytes()
    text = subprocess.run(
        ["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True
    ).stdout.decode()
    assert "ct_lesion_segmentation" in text and "NOT FOR DIAGNOSTIC USE" in text
    note = json.loads((MODEL_REPOSITORY / "ct_lesion_segmentation/1/model.json").read_text())
    assert note["sha256"] in text.replace(" ", "").replace("\n", "")
    assert result["input"]["study_uid"] in text
    for i, lesion in enumerate(result["segmentation"]["lesions"], start=1):
        assert re.search(rf"Lesion {i}\s+{lesion['volume_ml']:.2f} ml", text)
    doc = dcmread(processed.lesions / "report.dcm")
    assert doc.SOPClassUID == PDF_CLASS and doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert doc.EncapsulatedDocument[: doc.EncapsulatedDocumentLength] == pdf
    assert doc.SeriesNumber == 9905
    # The KOS flags the key images, the presentation state and the report with the SR and SEG.
    kos = dcmread(processed.lesions / "kos.dcm")
    selected = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    made = [n for n in result["dicom"] if n != "kos.dcm"]
    assert {str(dcmread(processed.lesions / n).SOPInstanceUID) for n in made} <= selected


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@needs
@needs_orthanc
def test_a_pacs_receives_every_object_and_previews_the_key_image(
    processed: Processed, tmp_path: Path
) -> None:
    """Orthanc gets the study's results by the pipeline's own C-STORE, files them in the
    source study, and its preview of a key image shows the outline drawn by the pipeline."""
    results = processed.settings.results_dir
    files = sorted(str(p.relative_to(results)) for p in results.rglob("*.dcm"))
    with running_orthanc(tmp_path / "orthanc") as pacs:
        settings = processed.settings.model_copy(
            update={
                "destinations": {
                    "pacs": Destination(
                        host="127.0.0.1", port=pacs.dicom_port, ae_title=pacs.ae_title
                    )
                }
            }
        )
        outcome = deliver(settings, Delivery(job_id="j", destination="pacs", files=files))
        assert sorted(outcome.sent) == files and not outcome.pending and not outcome.refused
        stored = {
            pacs.json(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
            for i in pacs.json("/instances")
        }
        assert set(stored) == {str(dcmread(results / f).SOPInstanceUID) for f in files}
        studies = pacs.json("/studies")
        assert len(studies) == 1  # all filed in the source study
        modalities = {
            pacs.json(f"/series/{s}")["MainDicomTags"].get("Modality")
            for s in pacs.json(f"/studies/{studies[0]}")["Series"]
        }
        assert {"SR", "SEG", "OT", "PR", "KO", "DOC"} <= modalities
        sc = dcmread(processed.lesions / "sc-1.dcm")
        preview = _png_pixels(pacs.get(f"/instances/{stored[str(sc.SOPInstanceUID)]}/preview"))
    assert preview.shape == sc.pixel_array.shape
    red = np.all(preview == OUTLINE, axis=-1)
    assert red.any() and np.array_equal(red, np.all(sc.pixel_array == OUTLINE, axis=-1))
