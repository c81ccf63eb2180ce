"""Each model.py executed by the real tritonserver (python backend, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from pydicom.fileset import FileSet

from pipeline.convert import images as convert
from pipeline.core.contract import InputKind, discover_contracts
from pipeline.core.errors import InputError, ModelNotFoundError
from pipeline.core.sections import TritonSettings
from pipeline.demo.dicom_series import new_series, write_series, write_volume_series
from pipeline.demo.synthetic import (
    MEDNIST_LABELS,
    lesion_phantom,
    write_ct_nifti,
    write_mednist_png,
)
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.decide import decide
from pipeline.inference.segment import label_lesions, segment
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.serving.loaders import load_net

from .conftest import MODEL_REPOSITORY

CONTRACTS = discover_contracts(MODEL_REPOSITORY)


def _input(path: Path, model: str) -> np.ndarray:
    c = CONTRACTS[model]
    return convert.to_model_input(convert.load(path), c, convert.preprocessor(c))[np.newaxis]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_held_out_synthetic_inputs_get_the_right_labels(
    triton: TritonEndpoints, tmp_path: Path, protocol: str, new_client: Callable[..., TritonClient]
) -> None:
    client = new_client(getattr(triton, protocol), TritonSettings())
    mednist = CONTRACTS["mednist_classifier"]
    for k, label in enumerate(MEDNIST_LABELS):
        x = _input(
            write_mednist_png(tmp_path / f"{k}.png", label, TEST_SEED_BASE + k), mednist.name
        )
        out = client.infer(mednist, x)
        assert decide(mednist, out.probabilities[0]).label == label
        assert out.probabilities[0].sum() == pytest.approx(1.0, abs=1e-4)
        assert out.model_version == "1"
    covid = CONTRACTS["ct_covid_classifier"]
    for k, positive in enumerate([True, False, True, False]):
        path = write_ct_nifti(tmp_path / f"{k}.nii.gz", positive, TEST_SEED_BASE + 100 + k)
        out = client.infer(covid, _input(path, covid.name))
        assert decide(covid, out.probabilities[0]).label == covid.labels[int(positive)]


@pytest.fixture
def plain_client(triton: TritonEndpoints) -> Iterator[grpcclient.InferenceServerClient]:
    """tritonclient's own gRPC client, closed after the test."""
    with grpcclient.InferenceServerClient(triton.grpc.removeprefix("grpc://")) as client:
        yield client


def test_one_bad_request_in_a_dynamic_batch_fails_alone(
    plain_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    contract = CONTRACTS["mednist_classifier"]
    good = _input(
        write_mednist_png(tmp_path / "h.png", "HeadCT", TEST_SEED_BASE + 50), contract.name
    )
    bad = good.copy()
    bad[0, 0, 10, 10] = np.nan
    client = plain_client
    before = _batch_sizes(client)
    n, bad_index = 24, 12
    results: dict[int, Any] = {}
    done = threading.Semaphore(0)

    def callback(i: int, result: Any, error: Any) -> None:
        results[i] = error if error is not None else result.as_numpy("PROBABILITIES")
        done.release()

    for i in range(n):  # a burst: requests queue behind the running batch and batch together
        inp = grpcclient.InferInput("INPUT__0", list(good.shape), "FP32")
        inp.set_data_from_numpy(bad if i == bad_index else good)
        client.async_infer(contract.name, [inp], callback=partial(callback, i))
    for _ in range(n):
        assert done.acquire(timeout=60)
    assert "NaN" in str(results[bad_index])
    for i in range(n):
        if i != bad_index:
            assert isinstance(results[i], np.ndarray), results[i]
            assert decide(contract, results[i][0]).label == "HeadCT"
    # Triton records an execution's statistics after it has sent the responses: poll briefly.
    deadline = time.monotonic() + 10
    while True:
        after = _batch_sizes(client)
        grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
        if sum(size * count for size, count in grown.items()) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(size * count for size, count in grown.items()) == n
    assert max(size for size, count in grown.items() if count) > 1, grown


def _batch_sizes(client: grpcclient.InferenceServerClient) -> dict[int, int]:
    stats = client.get_inference_statistics("mednist_classifier", as_json=True)
    batches = stats["model_stats"][0].get("batch_stats", [])
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in batches}


def test_wrong_shape_and_unknown_model_are_permanent_errors(
    triton: TritonEndpoints, new_client: Callable[..., TritonClient]
) -> None:
    client = new_client(triton.grpc, TritonSettings())
    contract = CONTRACTS["mednist_classifier"]
    with pytest.raises(InputError):
        client.infer(contract, np.zeros((1, 1, 32, 32), np.float32))
    ghost = contract.model_copy(update={"name": "no_such_model"})
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        client.infer(ghost, np.zeros((1, 1, 64, 64), np.float32))


def test_the_lesion_model_answers_its_foreground_probability_in_float16(
    triton: TritonEndpoints,
    plain_client: grpcclient.InferenceServerClient,
    new_client: Callable[..., TritonClient],
) -> None:
    """The served answer is the model's own softmax for the lesion label, in float16 (the
    background's channel left out): what the sliding window blends."""
    contract = CONTRACTS["ct_lesion_segmentation"]
    assert contract.omits_background and contract.output.shape == (1, 48, 48, 48)
    patches = np.random.default_rng(7).random((3, *contract.input.shape), np.float32)
    patches[1, 0, 10:30, 10:30, 10:30] = 0.8  # something nodule-like in one patch
    inp = grpcclient.InferInput("INPUT__0", list(patches.shape), "FP32")
    inp.set_data_from_numpy(patches)
    served = plain_client.infer(contract.name, [inp]).as_numpy("PROBABILITIES")
    assert served is not None and served.dtype == np.float16
    assert served.shape == (3, 1, 48, 48, 48)
    weights = MODEL_REPOSITORY / contract.name / "1" / contract.weights
    net = load_net(contract, weights, torch.device("cpu"))
    with torch.inference_mode():
        direct = torch.softmax(net(torch.from_numpy(patches)), dim=1)[:, 1:].numpy()
    np.testing.assert_allclose(served.astype(np.float32), direct, atol=1e-3)
    # The pipeline's client hands out float32 of its own with exactly the served values.
    ours = new_client(triton.grpc, TritonSettings()).infer(contract, patches).probabilities
    assert ours.dtype == np.float32 and ours.flags.writeable
    np.testing.assert_array_equal(ours, served.astype(np.float32))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_whole_volume_is_segmented_by_triton_as_by_the_worker(
    triton: TritonEndpoints, protocol: str, new_client: Callable[..., TritonClient]
) -> None:
    """``sliding_window.runs_on: triton``: the worker sends the volume in one request and the
    server cuts, runs and blends. The same lesions, mask and patch count as the worker's own
    sliding window over the same server; probabilities differ by float16 rounding at most."""
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 720, lesions=2)
    image = convert.LoadedImage(InputKind.NIFTI, MetaTensor(hu[np.newaxis], affine=affine))
    worker_side = CONTRACTS["ct_lesion_segmentation"]
    worker_side = worker_side.model_copy(
        update={
            "sliding_window": worker_side.sliding_window.model_copy(update={"runs_on": "worker"})
        }
    )
    server_side = worker_side.model_copy(
        update={
            "sliding_window": worker_side.sliding_window.model_copy(update={"runs_on": "triton"})
        }
    )
    client = new_client(getattr(triton, protocol), TritonSettings())
    name = server_side.name
    start = _requests(triton, name)
    by_worker = segment(image, worker_side, client)
    batches = -(-by_worker.patches // worker_side.sliding_window.batch_size)
    assert _requests(triton, name, start + batches) == start + batches
    by_triton = segment(image, server_side, client)
    assert _requests(triton, name, start + batches + 1) == start + batches + 1  # the volume
    assert by_triton.patches == by_worker.patches > 8
    assert len(by_triton.lesions) == len(by_worker.lesions) == 2
    assert by_triton.mask.shape == truth.shape
    differ = int((by_triton.mask != by_worker.mask).sum())
    assert differ <= 0.001 * truth.sum(), differ  # voxels within float16 rounding of 0.5
    true_ml = float(truth.sum()) * float(np.prod(np.diag(affine)[:3])) / 1000.0
    assert abs(by_triton.total_volume_ml - true_ml) <= 0.1 * true_ml
    assert by_triton.max_probability == pytest.approx(by_worker.max_probability, abs=1e-3)


def test_the_streamed_window_finds_what_the_whole_volume_window_finds(
    triton: TritonEndpoints, new_client: Callable[..., TritonClient]
) -> None:
    """The worker's window, streamed in slabs and labelled as they come, against MONAI's
    whole-volume window with the float32 inverse over the same server: the same mask to the
    voxel, the same lesions."""
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 733, lesions=3)
    image = convert.LoadedImage(InputKind.NIFTI, MetaTensor(hu[np.newaxis], affine=affine))
    contract = CONTRACTS["ct_lesion_segmentation"]
    window = contract.sliding_window.model_copy(update={"runs_on": "worker"})
    contract = contract.model_copy(update={"sliding_window": window})
    client = new_client(triton.grpc, TritonSettings())
    streamed = segment(image, contract, client)

    pre, compose, _ = convert.Preprocessing(image, [contract]).spatial(contract)
    roi = contract.input.shape[1:]
    volume = torch.as_tensor(np.asarray(pre))[None]
    # Padded at the far end as the window pads a volume thinner than a patch.
    padded = torch.nn.functional.pad(volume, [0, max(0, roi[2] - volume.shape[4])])

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(client.infer(contract, batch.numpy().copy()).probabilities)

    with torch.inference_mode():
        probs = sliding_window_inference(
            padded, roi, window.batch_size, predictor, window.overlap, window.mode, cval=0.0
        )[..., : volume.shape[4]]
    labels = MetaTensor(
        (probs[:, 0] > 0.5).float(), meta=pre.meta, applied_operations=pre.applied_operations
    )
    mask = np.rint(np.asarray(compose.inverse(labels))[0]).astype(np.uint8)
    lesion_map, lesions = label_lesions(mask, affine, contract.min_lesion_ml)
    mask[lesion_map == 0] = 0
    assert len(lesions) >= 2
    assert streamed.lesions == lesions
    np.testing.assert_array_equal(streamed.mask, mask)
    np.testing.assert_array_equal(streamed.lesion_map, lesion_map)
    assert streamed.max_probability == pytest.approx(float(probs.max()), abs=0)


def test_a_volume_the_model_cannot_take_is_a_permanent_error(
    triton: TritonEndpoints, new_client: Callable[..., TritonClient]
) -> None:
    contract = CONTRACTS["ct_lesion_segmentation"]
    client = new_client(triton.grpc, TritonSettings())
    with pytest.raises(InputError, match="shape"):  # two channels for a 1-channel model
        client.infer(contract, np.zeros((1, 2, 60, 60, 60), np.float32))
    bad = np.zeros((1, 1, 60, 50, 40), np.float32)
    bad[0, 0, 30, 25, 20] = np.nan
    with pytest.raises(InputError, match="NaN"):
        client.infer(contract, bad)
    # The server still answers a good volume after them.
    ok = client.infer(contract, np.zeros((1, 1, 60, 50, 40), np.float32))
    assert ok.probabilities.shape == (1, 1, 60, 50, 40)


def _requests(triton: TritonEndpoints, model: str, expected: int = 0) -> int:
    """The model's count of answered requests, once it reaches ``expected`` (Triton counts a
    request a moment after its response: read at once, the last one was sometimes missing)
    or after 10 s."""
    client = grpcclient.InferenceServerClient(triton.grpc.split("//", 1)[1])
    deadline = time.monotonic() + 10.0
    try:
        while True:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            count = int(stats["inference_stats"]["success"].get("count", 0))
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.05)
    finally:
        client.close()


def test_infer_command_answers_every_model_of_a_ct_route(
    triton: TritonEndpoints, tmp_path: Path
) -> None:
    """`dicom-pipeline infer` on a CT volume: the classifier's answer, and the segmentation's
    lesions found by the worker's sliding window (it once sent the whole volume and failed)."""
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 710, lesions=2)
    path = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), path)
    env = {
        **os.environ,
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PIPELINE_TRITON__URL": triton.grpc,
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "infer", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {x["model"]: x for x in map(json.loads, done.stdout.splitlines())}
    assert set(lines) == {"ct_covid_classifier", "ct_lesion_segmentation"}
    assert all("error" not in x for x in lines.values())
    seg = lines["ct_lesion_segmentation"]
    assert seg["label"] == CONTRACTS["ct_lesion_segmentation"].labels[1] and seg["lesions"] >= 1
    true_ml = float(truth.sum()) * float(np.prod(np.diag(affine)[:3])) / 1000.0
    assert abs(seg["total_volume_ml"] - true_ml) <= 0.1 * true_ml


def test_infer_command_gathers_dicom_files_into_series(
    triton: TritonEndpoints, tmp_path: Path
) -> None:
    """`dicom-pipeline infer` on a folder copied from a CD (suffix-less names, a DICOMDIR) and a
    single DICOM image: the CT series is one volume for both CT models, the image is
    classified as an image, the DICOMDIR and the viewer's icon are reported skipped; not one
    answer per slice."""
    hu, truth, affine = lesion_phantom(TEST_SEED_BASE + 711, lesions=2)
    spec = write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    cd = tmp_path / "cd" / "DICOM"
    cd.mkdir(parents=True)
    medium = FileSet()
    for k, path in enumerate(sorted((tmp_path / "ct").iterdir()), start=1):
        medium.add(path)
        shutil.copy(path, cd / f"IM{k:05d}")
    medium.write(tmp_path / "fileset")
    shutil.copy(tmp_path / "fileset" / "DICOMDIR", tmp_path / "cd" / "DICOMDIR")
    (tmp_path / "cd" / "VIEWER").mkdir()  # a viewer's icon: no image of the patient's
    write_mednist_png(tmp_path / "cd" / "VIEWER" / "logo.png", "Hand", TEST_SEED_BASE + 712)
    single = new_series(slices=1)
    (image,) = write_series(tmp_path / "single", single)
    env = {
        **os.environ,
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PIPELINE_TRITON__URL": triton.grpc,
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "infer", str(tmp_path / "cd"), str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    answers = {(x.get("series"), x.get("model")): x for x in lines if "model" in x}
    assert set(answers) == {
        (spec.series_uid, "ct_covid_classifier"),
        (spec.series_uid, "ct_lesion_segmentation"),
        (single.series_uid, "mednist_classifier"),
    }, lines
    seg = answers[(spec.series_uid, "ct_lesion_segmentation")]
    assert seg["planes"] == hu.shape[2] and seg["route"] == "ct-volume"
    true_ml = float(truth.sum()) * float(np.prod(np.diag(affine)[:3])) / 1000.0
    assert abs(seg["total_volume_ml"] - true_ml) <= 0.1 * true_ml
    assert answers[(single.series_uid, "mednist_classifier")]["route"] == "2d-image"
    skipped = {Path(x["file"]).name: x["skipped"] for x in lines if "skipped" in x}
    assert set(skipped) == {"DICOMDIR", "logo.png"}, lines
    assert "index" in skipped["DICOMDIR"] and "on a DICOM medium" in skipped["logo.png"]


def test_a_local_triton_on_the_cpu_keeps_the_cores_a_remote_one_leaves_them(
    triton: TritonEndpoints,
) -> None:
    """The worker gives its pool processes more torch threads only where Triton does not
    compute on the same cores (no GPU here: the embedded Triton's instances are on the CPU)."""
    with TritonClient(triton.grpc, TritonSettings()) as local:
        assert local.computes_on_this_cpu()
    with TritonClient(triton.http, TritonSettings()) as local_http:
        assert local_http.computes_on_this_cpu()
    # Another machine's Triton is not asked: its cores are not ours.
    with TritonClient("grpc://triton.invalid:8001", TritonSettings()) as remote:
        assert not remote.computes_on_this_cpu()
