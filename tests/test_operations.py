"""Watching the pipeline work, as an operator does: Prometheus endpoints, JSON stage logs,
`dicom-pipeline status`, and the status page in a real headless browser (Debian's chromium).

One `up` with every endpoint on a free port: a CT study by C-STORE, a PNG and a broken file
into the inbox; then what each view says is checked against the results on disk.
"""

from __future__ import annotations

import http.client
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.contract import load_contract
from pipeline.demo.dicom_series import TEST_PATIENT_ID, TEST_PATIENT_NAME, write_volume_series
from pipeline.demo.synthetic import lesion_phantom, write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.runtime.process import free_port

from .conftest import MODEL_REPOSITORY, metric, running_up, status_json, up_env, wait_for

pytestmark = pytest.mark.e2e


def browser() -> Any:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromedriver missing (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    return webdriver.Chrome(service=Service(driver_path), options=options)


def page_text(driver: Any) -> str:
    """The page's text, or "" while it reloads itself: the body just found may be gone by the
    time its text is asked for (a stale element)."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return str(driver.find_element("tag name", "body").text)
    except StaleElementReferenceException:
        return ""


def test_metrics_logs_status_and_page(model_repository: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ports = {name: free_port() for name in ("receiver", "watcher", "worker", "web")}
    env = up_env(tmp_path, model_repository, free_port()) | {
        "PIPELINE_METRICS__RECEIVER_PORT": str(ports["receiver"]),
        "PIPELINE_METRICS__WATCHER_PORT": str(ports["watcher"]),
        "PIPELINE_METRICS__WORKER_PORT": str(ports["worker"]),
        "PIPELINE_WEB__ENABLED": "true",
        "PIPELINE_WEB__PORT": str(ports["web"]),
        "PIPELINE_WEB__REFRESH_S": "2",
        "PIPELINE_LOG_FORMAT": "json",
    }
    url = {k: f"http://127.0.0.1:{p}/metrics" for k, p in ports.items() if k != "web"}
    page = f"http://127.0.0.1:{ports['web']}/"
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 720, lesions=2)
    spec = write_volume_series(tmp_path / "study", hu.astype("float32"), affine)
    instances = len(list((tmp_path / "study").iterdir()))
    with running_up(tmp_path, env):
        assert page in (tmp_path / "up.log").read_text()  # `up` says where the page is
        inbox = data / "inbox"
        write_mednist_png(inbox / "hand.png", "Hand", TEST_SEED_BASE + 730)
        (inbox / "broken.png").write_text("not an image")
        port = env["PIPELINE_RECEIVER__PORT"]
        sent = subprocess.run(
            [sys.executable, "-m", "pipeline", "send", str(tmp_path / "study"), "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        study_dir = data / "results" / spec.study_uid
        results = data / "results"
        wait_for(
            lambda: (
                (study_dir / "study.json").exists()
                and len(list(results.glob("*/mednist_classifier/result.json"))) == 1
                and len(list((data / "failed").glob("*/error.json"))) == 1
            ),
            240,
            "the study's, the PNG's and the broken file's outcome",
        )
        docs = [json.loads(p.read_text()) for p in results.rglob("result.json")]
        assert len(docs) == 3  # two models on the study, one on the PNG

        # -- metrics: each component's endpoint counts what it did ------------------------
        assert metric(url["receiver"], "dicom_pipeline_instances_received_total") == instances
        # `up`'s readiness C-ECHO and the sender's association.
        accepted = metric(url["receiver"], "dicom_pipeline_associations_total", outcome="accepted")
        assert accepted == 2
        assert metric(url["receiver"], "dicom_pipeline_jobs_queued_total", source="dicom") == 1
        assert metric(url["watcher"], "dicom_pipeline_jobs_queued_total", source="inbox") == 2
        worker = url["worker"]
        wait_for(
            lambda: metric(worker, "dicom_pipeline_jobs_completed_total") == 2,
            30,
            "the worker's completed count",
        )
        assert metric(worker, "dicom_pipeline_jobs_failed_total", stage="load") == 1
        assert metric(worker, "dicom_pipeline_stage_seconds_count", stage="inferred") == 3
        assert metric(worker, "dicom_pipeline_stage_seconds_count", stage="loaded") == 1
        patches = next(d for d in docs if d["segmentation"])["segmentation"]["patches"]
        calls = metric(worker, "dicom_pipeline_triton_request_seconds_count")
        window = load_contract(MODEL_REPOSITORY / "ct_lesion_segmentation").sliding_window
        # Two classifiers, and the volume in one request or its patches in batches.
        per_volume = 1 if window.runs_on == "triton" else math.ceil(patches / window.batch_size)
        assert calls == 2 + per_volume
        assert metric(worker, "dicom_pipeline_queue_depth", queue="pipeline") == 0

        # -- logs: one JSON line per stage with the study UID and the duration -------------
        lines = [
            json.loads(line)
            for name in ("worker.log", "receiver.log")
            for line in (data / "run" / "logs" / name).read_text().splitlines()
            if line.startswith("{")
        ]
        stages = [x for x in lines if x.get("logger") == "pipeline.stage"]
        inferred = [x for x in stages if x["stage"] == "inferred" and x["study"] == spec.study_uid]
        assert {x["model"] for x in inferred} == {"ct_covid_classifier", "ct_lesion_segmentation"}
        assert all(x["seconds"] > 0 and x["series"] == spec.series_uid for x in inferred)
        received = [x for x in stages if x["stage"] == "received"]
        assert received and received[0]["study"] == spec.study_uid
        assert received[0]["instances"] == instances
        assert {"started", "loaded", "inferred", "done", "failed"} <= {x["stage"] for x in stages}
        logs = "".join(p.read_text() for p in (data / "run" / "logs").glob("*.log"))
        logs += (tmp_path / "up.log").read_text()
        assert TEST_PATIENT_NAME not in logs and TEST_PATIENT_ID not in logs

        # -- dicom-pipeline status ---------------------------------------------------------
        snap = status_json(env, tmp_path)
        assert snap["broker"] == "ok" and snap["queues"]["pipeline"] == 0
        assert snap["in_flight"] == []
        rows = {(r["what"], r["model"]): r for r in snap["results"]}
        for doc in docs:
            what = doc["input"]["study_uid"] or doc["input"]["name"]
            row = rows[(what, doc["model"]["name"])]
            label = doc["prediction"]["label"]
            assert row["label"] == label
            assert row["probability"] == pytest.approx(doc["prediction"]["probabilities"][label])
            if doc["input"]["source"] == "dicom":  # the default outputs, listed with the result
                objects = row["objects"]
                assert {"sr", "kos"} <= set(objects), row
                assert any(o.startswith("sc") for o in objects), row
        assert [(f["stage"], f["what"]) for f in snap["failed"]] == [("load", "broken.png")]
        # Every volume's memory reservation was given back when its job ended.
        assert snap["memory"]["volumes"] == 0 and snap["memory"]["in_flight_mb"] == 0
        assert snap["memory"]["budget_mb"] > 0
        assert not list((data / "memory").glob("*/*.mb"))
        table = subprocess.run(
            [sys.executable, "-m", "pipeline", "status"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0 and "hand.png" in table.stdout, table.stdout
        assert "MB budget for studies" in table.stdout, table.stdout

        # -- the status page in a real browser ---------------------------------------------
        driver = browser()
        try:
            driver.get(page)
            text = driver.find_element("tag name", "body").text
            assert spec.study_uid in text and "hand.png" in text
            labels = [e.text for e in driver.find_elements("css selector", "td.label")]
            probabilities = [e.text for e in driver.find_elements("css selector", "td.probability")]
            expected = [
                (d["prediction"]["label"], f"{d['prediction']['probabilities'][label]:.3f}")
                for d in docs
                for label in [d["prediction"]["label"]]
            ]
            assert sorted(zip(labels, probabilities, strict=True)) == sorted(expected)
            previews = driver.find_elements("css selector", "img.preview")
            assert len(previews) == 3
            for img in previews:  # each preview PNG loaded and decoded by the browser
                assert driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", img
                )
            assert "not a readable PNG/JPEG" in text and "broken.png" in text
            assert "budget for studies" in driver.find_element("id", "memory").text
            shot = tmp_path / "status-page.png"
            assert driver.save_screenshot(str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            # It refreshes itself: a new result appears without the test reloading it.
            write_mednist_png(inbox / "late.png", "Hand", TEST_SEED_BASE + 731)
            deadline = time.monotonic() + 90
            while "late.png" not in page_text(driver):
                assert time.monotonic() < deadline, "the page never showed late.png"
                time.sleep(0.5)
        finally:
            driver.quit()
        # Nothing but results' previews is served (raw paths: a browser would normalise them).
        for probe in (
            "/preview/../../config.yaml",
            "/preview/%2e%2e/%2e%2e/config.yaml",
            f"/preview/{spec.study_uid}/study.json",
        ):
            conn = http.client.HTTPConnection("127.0.0.1", ports["web"], timeout=10)
            conn.request("GET", probe)
            assert conn.getresponse().status == 404, probe
            conn.close()

    # With everything stopped, status still reads the folders and says Redis is unreachable.
    after = status_json(env, tmp_path)
    assert after["broker"].startswith("unreachable") and len(after["results"]) == 4
