"""Big studies: a CT of N slices (512x512 by default) through the worker's own study job
against the embedded Triton, with each step's time and the peak proportional memory (PSS:
shared pages counted once) of this process and of Triton (its server and model processes),
above their idle footprint and in multiples of the study's float32 volume.

    python -m pipeline.bench.big_study [--slices 150 600 1200] [--size 512] [--json out.json]
                                       [--runs-on worker|triton]

The CT is a chest phantom with three nodules, whatever its length (:func:`lesion_ct`). It is
stored in a spool as the receiver stores it and run by
:func:`pipeline.studies.study_job.run_study`, both CT models as the default route has them.
Steps, as the job announces them (``pipeline.stage`` lines and the segmentation's debug lines):
load (series to volume), preprocess, window (patches through Triton and their blending),
inverse (labels back on the source voxels), lesions (connected components), outputs (the SEG,
SR and mask, built beside the classifier's inference, and the writing). Time linear in N
shows as constant seconds per slice, memory bounded by the volume as a constant multiple.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from pipeline.convert.series import numpy_huge_pages
from pipeline.core.contract import discover_contracts
from pipeline.core.instances import InstanceUIDs, store_instance
from pipeline.core.jobs import Reason, now, read_job
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import LESION_SPACING
from pipeline.inference.triton_client import TritonClient
from pipeline.ingest.completion import Completed, close_study
from pipeline.runtime import embedded_triton
from pipeline.runtime.process import descendants
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

SAMPLE_S = 0.02
_STEP = re.compile(r"(?:stage|step)=(\w+)")
# The stage line that ends loading, and the step that follows it.
_AFTER_STAGE = {"loaded": "preprocess"}


def pss_mb(pid: int) -> float:
    """A process's proportional set size in MB; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(found[1]) / 1024.0 if found else 0.0


class Sampler(logging.Handler):
    """Samples the PSS of this process and Triton's every SAMPLE_S (or ten times as long as a
    sample takes); each sample goes to the step the job last announced."""

    def __init__(self, triton_pid: int) -> None:
        super().__init__(logging.DEBUG)
        self.triton_pid = triton_pid
        self.step = "idle"
        self.peaks: dict[str, dict[str, float]] = {}
        self.started: dict[str, float] = {}
        self._stop = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        found = _STEP.search(record.getMessage())
        if found is None:
            return
        # The study's stage lines mark the end of loading; the segmentation's and the
        # outputs' debug lines name their steps. Each step once, in order.
        step = _AFTER_STAGE.get(found[1]) if record.name == "pipeline.stage" else found[1]
        if step is not None and step not in self.started:
            self._record(self.step)  # a short step gets a sample of its own at its end
            self.step = step
            self.started[step] = time.perf_counter()

    def sample(self) -> dict[str, float]:
        triton = [self.triton_pid, *descendants(self.triton_pid)]
        return {"worker": pss_mb(os.getpid()), "triton": sum(pss_mb(p) for p in triton)}

    def _record(self, step: str) -> None:
        now_mb = self.sample()
        peak = self.peaks.setdefault(step, dict.fromkeys(now_mb, 0.0))
        for who, mb in now_mb.items():
            peak[who] = max(peak[who], mb)

    def _run(self) -> None:
        wait = SAMPLE_S
        while not self._stop.wait(wait):
            t0 = time.perf_counter()
            self._record(self.step)
            # Reading smaps_rollup walks a process's page tables under its memory map's lock:
            # at a few GB, milliseconds each time, which the job's page faults wait for. The
            # sampler keeps to a tenth of that: sampling every 20 ms took 45% of the time of
            # a 150-slice study of 512x512.
            wait = max(SAMPLE_S, 10 * (time.perf_counter() - t0))

    @contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._run, name="pss", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()


def _spooled_study(settings: Settings, folder: Path) -> str:
    """The series stored as the receiver stores it and handed over as a job; its id."""
    study_uid = ""
    for path in sorted(folder.iterdir()):
        ds = dcmread(path, stop_before_pixels=True)
        study_uid = str(ds.StudyInstanceUID)
        uids = InstanceUIDs(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        store_instance(settings.spool_dir, uids, [path.read_bytes()], 0)
    job = close_study(settings.spool_dir, Completed(study_uid, Reason.RELEASED, now(), "CT", "P"))
    assert job is not None
    return job.id


def lesion_ct(folder: Path, slices: int, size: int, lesions: int = 3, seed: int = 5) -> None:
    """A chest-CT-like series as the demo lesion model was trained on (lungs at -850 HU in a
    40 HU body, solid nodules, 15 HU noise, 1 x 1 x 1.5 mm voxels), ``lesions`` nodules of
    4 to 9 mm whatever its length, written slice by slice from an int16 volume."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[0:size, 0:size].astype(np.float32)
    body = ((x - size / 2) / (0.44 * size)) ** 2 + ((y - size / 2) / (0.38 * size)) ** 2 <= 1
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lungs |= ((x - size / 2 - side * 0.2 * size) / (0.15 * size)) ** 2 + (
            (y - size / 2) / (0.26 * size)
        ) ** 2 <= 1
    plane = np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.int16)
    hu = np.repeat(plane[:, :, np.newaxis], slices, axis=2)
    inside = np.argwhere(lungs)
    for _ in range(lesions):
        px, py = inside[rng.integers(len(inside))]
        pz, r = rng.integers(10, max(11, slices - 10)), rng.uniform(4.0, 9.0)
        lo, hi = max(0, int(pz - r / 1.5) - 1), min(slices, int(pz + r / 1.5) + 2)
        z = np.arange(lo, hi, dtype=np.float32)[None, None, :]
        ball = (x[..., None] - px) ** 2 + (y[..., None] - py) ** 2 + ((z - pz) * 1.5) ** 2 <= r * r
        hu[:, :, lo:hi][ball & lungs[..., None]] = int(rng.uniform(10, 60))
    for k in range(slices):  # noise a plane at a time: no float copy of the volume
        hu[:, :, k] += rng.normal(0.0, 15.0, (size, size)).round().astype(np.int16)
    write_volume_series(folder, hu, np.diag([*LESION_SPACING, 1.0]))


def one_study(
    slices: int,
    size: int,
    settings: Settings,
    client: TritonClient,
    triton_pid: int,
    runs_on: str | None = None,
) -> dict[str, Any]:
    """One study of ``slices`` slices: seconds and peak PSS above idle, per step."""
    with tempfile.TemporaryDirectory(prefix="big-study-") as tmp:
        lesion_ct(Path(tmp), slices, size)
        job_id = _spooled_study(settings, Path(tmp))
    gc.collect()
    sampler = Sampler(triton_pid)
    idle = sampler.sample()
    loggers = [
        logging.getLogger(name)
        for name in ("pipeline.stage", "pipeline.inference.segment", "pipeline.studies.model_run")
    ]
    contracts = discover_contracts(settings.triton.model_repository)
    if runs_on:  # the worker's choice alone: the server takes patches and volumes alike
        for name, c in contracts.items():
            window = c.sliding_window.model_copy(update={"runs_on": runs_on})
            contracts[name] = c.model_copy(update={"sliding_window": window})
    models = Models(contracts)
    for logger in loggers:
        logger.addHandler(sampler)
        logger.setLevel(logging.DEBUG)
    try:
        with sampler.running():
            sampler.step, started = "load", time.perf_counter()
            sampler.started["load"] = started
            written = run_study(read_job(settings.spool_dir / job_id), settings, models, client)
            sampler.step = "done"
            total = time.perf_counter() - started
    finally:
        for logger in loggers:
            logger.removeHandler(sampler)
    volume_mb = slices * size * size * 4 / 2**20
    figures = _figures(sampler, idle, total, started, volume_mb, slices)
    # What the outputs' size depends on: a SEG segment and an SR group per lesion.
    figures["lesions"] = sum(
        len((json.loads(p.read_text()).get("segmentation") or {}).get("lesions", []))
        for p in written
        if p.name == "result.json"
    )
    return figures


def _figures(
    sampler: Sampler,
    idle: dict[str, float],
    total: float,
    started: float,
    volume_mb: float,
    slices: int,
) -> dict[str, Any]:
    order = sorted(sampler.started, key=sampler.started.__getitem__)
    ends = [sampler.started[s] for s in order[1:]] + [started + total]
    steps = {}
    for step, end in zip(order, ends, strict=True):
        peak = sampler.peaks.get(step, idle)
        above = sum(max(0.0, peak[w] - idle[w]) for w in idle)
        steps[step] = {
            "seconds": round(end - sampler.started[step], 2),
            "peak_above_idle_mb": round(above, 1),
            "x_volume": round(above / volume_mb, 2),
        }
    peak_above = max((s["peak_above_idle_mb"] for s in steps.values()), default=0.0)
    return {
        "slices": slices,
        "volume_mb": round(volume_mb, 1),
        "idle_mb": {w: round(v, 1) for w, v in idle.items()},
        "seconds": round(total, 2),
        "seconds_per_100_slices": round(100 * total / slices, 2),
        "peak_above_idle_mb": peak_above,
        "peak_x_volume": round(peak_above / volume_mb, 2),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[150, 600, 1200])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--runs-on",
        choices=["worker", "triton"],
        help="Where the segmentation's sliding window runs, whatever its contract says.",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="big-study-data-") as data:
        # Time and memory are measured here, not the request timeout: a whole big volume in
        # one request (sliding_window.runs_on: triton) takes minutes on a CPU.
        settings = Settings.model_validate(
            {
                "data_dir": data,
                "worker": {"archive_inputs": False},
                "triton": {"request_timeout_s": 3600.0},
            }
        )
        settings.ensure_dirs()
        # As a pool process runs (pipeline.tasks.worker); its freed memory is given back,
        # though, so that each study's peak above idle is its own.
        numpy_huge_pages(settings.worker.numpy_huge_pages)
        proc, endpoints = embedded_triton.start(settings)
        try:
            assert proc.pid is not None
            with TritonClient(endpoints.grpc, settings.triton) as client:
                # First uses (imports, highdicom's tables, Triton's first requests) paid here.
                one_study(16, 64, settings, client, proc.pid)
                runs = []
                for n in args.slices:
                    runs.append(one_study(n, args.size, settings, client, proc.pid, args.runs_on))
                    _report(runs[-1], runs[0])
        finally:
            proc.stop()
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def _report(run: dict[str, Any], base: dict[str, Any]) -> None:
    """``run``'s figures printed, its time against linear growth from ``base``'s."""
    run["x_linear_time"] = round(
        run["seconds"] / (base["seconds"] * run["slices"] / base["slices"]), 2
    )
    print(
        f"{run['slices']:5d} slices: {run['seconds']:7.1f} s "
        f"({run['x_linear_time']}x linear), peak {run['peak_above_idle_mb']:.0f} MB above "
        f"idle = {run['peak_x_volume']}x the {run['volume_mb']:.0f} MB volume; "
        f"{run['lesions']} lesion(s) found",
        flush=True,
    )
    for step, fig in run["steps"].items():
        print(
            f"        {step:11s} {fig['seconds']:7.2f} s  "
            f"{fig['peak_above_idle_mb']:8.0f} MB ({fig['x_volume']}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
