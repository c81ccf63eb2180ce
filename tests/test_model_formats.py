"""Models in the formats they ship in: the demo models written as ONNX and TorchScript beside
their torch.export programs, each added with one command (`models add`), served by a real
Triton, checked (`models check`), and giving the same answers, alone and end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.contract import WeightsFormat, discover_contracts
from pipeline.core.jobs import read_job
from pipeline.core.routing import Match, Route
from pipeline.core.sections import TritonSettings
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.export import exported, from_program
from pipeline.demo.synthetic import lesion_phantom
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.model_check import check_model
from pipeline.inference.model_folder import add_model
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime import embedded_triton
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import make_settings, spool_study

MODELS = ("ct_covid_classifier", "ct_lesion_segmentation")
FORMATS = {"onnx": ".onnx", "ts": ".pt"}


@pytest.fixture(scope="module")
def formats(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TritonEndpoints]]:
    """A repository with the two CT models, each also as ONNX (<name>_onnx) and TorchScript
    (<name>_ts), added by `models add`; a Triton of its own serving all six."""
    root = tmp_path_factory.mktemp("formats")
    repo = root / "models"
    contracts = discover_contracts(model_repository)
    for name in MODELS:
        contract = contracts[name]
        source = model_repository / name
        add_model(repo, source / "1" / contract.weights, name, None, source / "contract.yaml")
        net = from_program(contract, source / "1" / contract.weights)
        for tag, suffix in FORMATS.items():
            weights = root / f"{name}{suffix}"
            fmt = WeightsFormat.ONNX if suffix == ".onnx" else WeightsFormat.TORCHSCRIPT
            weights.write_bytes(exported(net, contract, fmt))
            add_model(repo, weights, f"{name}_{tag}", name, None)
    settings = make_settings(root / "data", triton={"model_repository": repo})
    settings.ensure_dirs()
    proc, endpoints = embedded_triton.start(settings)
    yield repo, endpoints
    proc.stop()


def test_every_format_gives_the_same_answers(
    formats: tuple[Path, TritonEndpoints], new_client: Callable[..., TritonClient]
) -> None:
    repo, endpoints = formats
    contracts = discover_contracts(repo)
    assert contracts["ct_covid_classifier"].weights_format is WeightsFormat.TORCH_EXPORT
    assert contracts["ct_covid_classifier_onnx"].weights == "model.onnx"
    assert contracts["ct_covid_classifier_ts"].weights_format is WeightsFormat.TORCHSCRIPT
    client = new_client(endpoints.grpc, TritonSettings())
    for name in MODELS:
        base = contracts[name]
        x = np.random.default_rng(3).random((2, *base.input.shape), np.float32)
        x[1, 0, 8:24, 8:24, 8:24] = 0.8  # something lesion-like in the second input
        answers = {
            n: client.infer(contracts[n], x).probabilities
            for n in (name, f"{name}_onnx", f"{name}_ts")
        }
        for other in (f"{name}_onnx", f"{name}_ts"):
            # float16 outputs of the lesion model: within a half-precision step
            np.testing.assert_allclose(answers[other], answers[name], atol=2e-3)
        checked = check_model(client, contracts[f"{name}_onnx"])
        assert checked.finite and checked.shape == (2, *base.output.shape)


def test_a_study_gets_the_same_results_from_each_format(
    formats: tuple[Path, TritonEndpoints],
    tmp_path: Path,
    new_client: Callable[..., TritonClient],
) -> None:
    repo, endpoints = formats
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 660, lesions=2)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    names = [f"{m}{tag}" for m in MODELS for tag in ("", "_onnx", "_ts")]
    route = Route(name="all", match=Match(kind=("dicom",)), models=tuple(names))
    settings = make_settings(tmp_path / "data", triton={"model_repository": repo}, routes=[route])
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    client = new_client(endpoints.grpc, settings.triton)
    run_study(job, settings, Models(discover_contracts(repo)), client)
    docs = {
        p.parent.parent.name: json.loads(p.read_text())
        for p in settings.results_dir.rglob("result.json")
    }
    for name in MODELS:
        for other in (f"{name}_onnx", f"{name}_ts"):
            assert docs[other]["prediction"]["label"] == docs[name]["prediction"]["label"]
            for label, p in docs[name]["prediction"]["probabilities"].items():
                assert docs[other]["prediction"]["probabilities"][label] == pytest.approx(
                    p, abs=2e-3
                )
    lesions = [docs[n]["segmentation"]["lesions"] for n in names if "lesion" in n]
    assert len(lesions[0]) >= 1
    assert all(
        [round(x["volume_ml"], 1) for x in found] == [round(x["volume_ml"], 1) for x in lesions[0]]
        for found in lesions
    )


def test_the_commands_add_and_check_a_model(
    formats: tuple[Path, TritonEndpoints], tmp_path: Path
) -> None:
    repo, endpoints = formats
    env = dict(
        os.environ,
        PIPELINE_DATA_DIR=str(tmp_path / "data"),
        PIPELINE_TRITON__MODEL_REPOSITORY=str(repo),
        PIPELINE_TRITON__URL=endpoints.grpc,
    )

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "models", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    checked = command("check", "ct_covid_classifier_onnx")
    assert checked.returncode == 0, checked.stderr
    assert "output [2, 2] float32" in checked.stdout, checked.stdout  # a batch of two
    exported_onnx = tmp_path / "covid.onnx"
    written = command("export", "ct_covid_classifier", str(exported_onnx))
    assert written.returncode == 0 and exported_onnx.stat().st_size > 0, written.stderr
    added = command(
        "add", str(exported_onnx), "--name", "covid_v2", "--like", "ct_covid_classifier"
    )
    assert added.returncode == 0, added.stderr
    assert "covid_v2: onnx weights, input [1, 192, 192, 64]" in added.stdout
    assert (repo / "covid_v2" / "1" / "model.onnx").is_file()
    again = command(
        "add", str(exported_onnx), "--name", "covid_v2", "--like", "ct_covid_classifier"
    )
    assert again.returncode != 0 and "already" in again.stderr
    not_served = command("check", "covid_v2")  # added, but Triton loads it only when restarted
    assert not_served.returncode != 0 and "covid_v2" in not_served.stderr
