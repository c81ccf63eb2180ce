"""Models in the formats they ship in: the demo models written as ONNX and TorchScript beside
their torch.export programs, each added with one command (`models add`), on the python backend
or a native one (ONNX Runtime, LibTorch: served here by the python backend standing in, with
the network's logits as the native backend answers them), served by a real Triton, checked
(`models check`), and giving the same answers, alone and end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from pipeline.core.contract import Backend, ModelContract, WeightsFormat, discover_contracts
from pipeline.core.errors import InputError
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
from pipeline.runtime.served_models import served_repository
from pipeline.studies.models import Models
from pipeline.studies.study_job import run_study

from .conftest import make_settings, spool_study

MODELS = ("ct_covid_classifier", "ct_lesion_segmentation")
# Each demo model again: tag -> (weights suffix, backend; None: the format's default)
VARIANTS = {
    "onnx": (".onnx", None),  # ONNX Runtime, the default for .onnx
    "ts": (".pt", None),  # TorchScript on the python backend
    "libtorch": (".pt", Backend.PYTORCH),
}


@pytest.fixture(scope="module")
def formats(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TritonEndpoints]]:
    """A repository with the two CT models, each also as ONNX on ONNX Runtime (<name>_onnx),
    TorchScript on the python backend (<name>_ts) and on LibTorch (<name>_libtorch), added by
    `models add`; a Triton of its own serving all eight."""
    root = tmp_path_factory.mktemp("formats")
    repo = root / "models"
    contracts = discover_contracts(model_repository)
    for name in MODELS:
        contract = contracts[name]
        source = model_repository / name
        add_model(repo, source / "1" / contract.weights, name, None, source / "contract.yaml")
        net = from_program(contract, source / "1" / contract.weights)
        for tag, (suffix, backend) in VARIANTS.items():
            weights = root / f"{name}{suffix}"
            fmt = WeightsFormat.ONNX if suffix == ".onnx" else WeightsFormat.TORCHSCRIPT
            if not weights.exists():
                weights.write_bytes(exported(net, contract, fmt))
            add_model(repo, weights, f"{name}_{tag}", name, None, backend)
    settings = make_settings(root / "data", triton={"model_repository": repo})
    settings.ensure_dirs()
    proc, endpoints = embedded_triton.start(settings)
    yield repo, endpoints
    proc.stop()


def test_native_models_get_configs_for_their_backends(
    formats: tuple[Path, TritonEndpoints],
) -> None:
    repo, _ = formats
    contracts = discover_contracts(repo)
    onnx, libtorch = (
        contracts["ct_lesion_segmentation_onnx"],
        contracts["ct_covid_classifier_libtorch"],
    )
    assert onnx.backend is Backend.ONNXRUNTIME and libtorch.backend is Backend.PYTORCH
    # the ONNX graph's own tensor names; the network's logits, both labels, float32
    assert (onnx.input.name, onnx.output.name) == ("INPUT__0", "LOGITS")
    assert onnx.output.shape == (2, 48, 48, 48) and onnx.output.dtype == "float32"
    assert onnx.sliding_window.runs_on == "worker"
    assert libtorch.output.name == "LOGITS__0"  # LibTorch's <name>__<index>
    expected = {
        "ct_lesion_segmentation_onnx": ("onnxruntime", "model.onnx", [1, 48, 48, 48]),
        "ct_covid_classifier_libtorch": ("pytorch", "model.pt", [1, 192, 192, 64]),
        "ct_covid_classifier": ("python", "", [1, 192, 192, 64]),
    }
    for name, (backend, filename, dims) in expected.items():
        config = text_format.Parse(
            (repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert (config.backend, config.default_model_filename) == (backend, filename)
        assert list(config.input[0].dims) == dims and config.max_batch_size >= 8
        assert config.output[0].name == contracts[name].output.name


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
        others = [f"{name}_{tag}" for tag in VARIANTS]
        answers = {n: client.infer(contracts[n], x).probabilities for n in (name, *others)}
        for other in others:
            got = answers[other]
            if contracts[other].serves_logits and base.omits_background:
                # the logits of every label, the background's too, where the python backend
                # answers the lesion's probability alone
                assert got.shape[1] == len(base.labels)
                np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
                got = got[:, 1:]
            # float16 outputs of the lesion model: within a half-precision step
            np.testing.assert_allclose(got, answers[name], atol=2e-3)
        checked = check_model(client, contracts[f"{name}_onnx"])
        # probabilities of every label (on every voxel of the patch), for a batch of two
        voxels = base.input.shape[1:] if base.task == "segmentation" else ()
        assert checked.finite and checked.shape == (2, len(base.labels), *voxels)


def test_a_study_gets_the_same_results_from_each_format(
    formats: tuple[Path, TritonEndpoints],
    tmp_path: Path,
    new_client: Callable[..., TritonClient],
) -> None:
    repo, endpoints = formats
    hu, _, affine = lesion_phantom(TEST_SEED_BASE + 660, lesions=2)
    write_volume_series(tmp_path / "ct", hu.astype(np.float32), affine)
    names = [f"{m}{tag}" for m in MODELS for tag in ("", *(f"_{t}" for t in VARIANTS))]
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
        for other in (f"{name}_{tag}" for tag in VARIANTS):
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
    assert "covid_v2: onnx weights on the onnxruntime backend" in added.stdout, added.stdout
    assert "input INPUT__0 [1, 192, 192, 64], output LOGITS [1]" in added.stdout  # sigmoid
    assert (repo / "covid_v2" / "1" / "model.onnx").is_file()
    again = command(
        "add", str(exported_onnx), "--name", "covid_v2", "--like", "ct_covid_classifier"
    )
    assert again.returncode != 0 and "already" in again.stderr
    not_served = command("check", "covid_v2")  # added, but Triton loads it only when restarted
    assert not_served.returncode != 0 and "covid_v2" in not_served.stderr


def test_a_tensorrt_plan_is_left_out_where_triton_cannot_serve_it(
    model_repository: Path, tmp_path: Path
) -> None:
    """A TensorRT engine is built for one GPU; this machine has neither a GPU nor the
    backend, so the file stands for one (the decision never reads it)."""
    repo = tmp_path / "models"
    source = model_repository / "ct_covid_classifier"
    add_model(repo, source / "1" / "model.pt2", "covid", None, source / "contract.yaml")
    plan = tmp_path / "covid.plan"
    plan.write_bytes(b"an engine for another machine's GPU")
    added = add_model(repo, plan, "covid_trt", "covid", None)
    assert added.backend is Backend.TENSORRT and added.output.shape == (1,)  # a sigmoid logit
    assert 'backend: "tensorrt"' in (repo / "covid_trt" / "config.pbtxt").read_text()
    backends = embedded_triton.prepare_backends(tmp_path / "run")
    served = served_repository(repo, backends, tmp_path / "run" / "served")
    assert served.repository == tmp_path / "run" / "served"
    assert "tensorrt backend only" in served.left_out["covid_trt"]
    assert sorted(p.name for p in served.repository.iterdir()) == ["covid"]
    # a repository of python-backend models is served as it is
    (repo / "covid_trt" / "config.pbtxt").unlink()
    (repo / "covid_trt" / "contract.yaml").unlink()
    assert served_repository(repo, backends, tmp_path / "again").repository == repo


def test_what_cannot_be_served_is_refused_with_the_reason(
    model_repository: Path, tmp_path: Path
) -> None:
    source = model_repository / "ct_covid_classifier"
    onnx = tmp_path / "covid.onnx"
    net = from_program(
        discover_contracts(model_repository)["ct_covid_classifier"], source / "1" / "model.pt2"
    )
    onnx.write_bytes(
        exported(
            net, discover_contracts(model_repository)["ct_covid_classifier"], WeightsFormat.ONNX
        )
    )
    with pytest.raises(InputError, match=r"takes inputs of shape \[.*192, 192, 64\]"):
        add_model(
            model_repository.parent / "none", onnx, "x", None, _contract(tmp_path, [1, 96, 96, 32])
        )
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not an ONNX model"):
        add_model(tmp_path / "models", garbage, "x", None, _contract(tmp_path, [1, 192, 192, 64]))
    data = yaml.safe_load(
        (model_repository / "ct_lesion_segmentation" / "contract.yaml").read_text()
    )
    native = {
        **data,
        "backend": "onnxruntime",
        "weights": "model.onnx",
        "output": {"name": "LOGITS", "shape": [2, 48, 48, 48]},
        "sliding_window": {"runs_on": "triton"},
    }
    with pytest.raises(ValueError, match="the sliding window runs on the worker"):
        ModelContract.model_validate(native)
    with pytest.raises(ValueError, match=r"output.shape \(2, 48, 48, 48\) \(its logits\)"):
        ModelContract.model_validate({**native, "sliding_window": {}, "output": data["output"]})


def _contract(folder: Path, shape: list[int]) -> Path:
    path = folder / f"contract-{shape[1]}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "spatial_dims": 3,
                "accepts": ["dicom"],
                "input": {"name": "x", "shape": shape},
                "output": {"name": "y", "shape": [2]},
                "activation": "softmax",
                "labels": ["normal", "covid"],
            }
        )
    )
    return path
