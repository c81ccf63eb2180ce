"""deploy/ checked without Docker or a cluster: the Compose file against the Compose
specification, the Kubernetes manifests against the Kubernetes API schemas (strict: unknown
fields are errors), and both against the pipeline itself (commands that exist, settings that
validate, files the Dockerfiles copy)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose
from typer.main import get_command

from pipeline.cli.main import app
from pipeline.core.contract import discover_contracts
from pipeline.core.settings import Settings

from .conftest import MODEL_REPOSITORY

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
COMMANDS = set(get_command(app).commands)  # type: ignore[attr-defined]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def validated_compose(doc: dict[str, Any]) -> Any:
    # YAML merge keys (<<) are resolved by the YAML reader first, as Docker Compose does.
    return PyCompose.from_json(json.dumps(doc)).to_spec()


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_compose_file_follows_the_compose_spec() -> None:
    doc = compose()
    spec = validated_compose(doc)
    services = doc["services"]
    assert set(services) == {"redis", "triton", "receiver", "watcher", "worker", "web", "flower"}
    assert spec.services is not None
    # Redis persists its queue; Triton reserves a GPU; workers scale; Flower is optional.
    assert "--appendonly" in services["redis"]["command"]
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["flower"]["profiles"] == ["flower"]
    for name in ("receiver", "watcher", "worker", "web"):
        service = services[name]
        assert service["command"][0] in COMMANDS, name
        assert "data:/data" in service["volumes"], name  # the shared storage
        env = {k: v for k, v in service["environment"].items() if k.startswith("PIPELINE_")}
        _settings_from_env(env)  # every variable names a real setting with a valid value


def test_compose_checker_rejects_a_broken_file() -> None:
    """The check above can fail: a misspelt key and a wrong type are refused."""
    doc = compose()
    doc["services"]["worker"]["replica"] = 3
    with pytest.raises(ValueError, match="replica"):
        validated_compose(doc)
    doc = compose()
    doc["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = "x"
    with pytest.raises(ValueError):
        validated_compose(doc)


@pytest.mark.parametrize(
    ("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_kubernetes_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if doc["kind"] == "Deployment" and doc["metadata"]["name"] != "triton":
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] in COMMANDS
        _settings_from_env({e["name"]: e["value"] for e in container.get("env", [])})


def test_kubernetes_layout() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
    # The receiver behind a stable Service address; Triton with a GPU; workers scaled on the
    # queue depth the workers export; one shared ReadWriteMany volume for data.
    assert docs[("Service", "receiver")]["spec"]["ports"][0]["port"] == 11112
    triton = docs[("Deployment", "triton")]["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    hpa = docs[("HorizontalPodAutoscaler", "worker")]["spec"]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "dicom_pipeline_queue_depth"
    assert docs[("PersistentVolumeClaim", "pipeline-data")]["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    config = yaml.safe_load(docs[("ConfigMap", "pipeline-config")]["data"]["pipeline.yaml"])
    Settings.model_validate(config)


def test_kubernetes_checker_rejects_a_broken_manifest() -> None:
    doc = next(d for _, d in manifests() if d["kind"] == "Deployment")
    doc["spec"]["replicass"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "triton/Dockerfile"])
def test_dockerfiles_copy_what_exists(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    sources = [
        src
        for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
        for src in line.split()[:-1]
        if not src.startswith("--")
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile} copies {src}, which is not in the repository"


def _settings_from_env(env: dict[str, str]) -> None:
    """Build Settings from these variables alone (no config file)."""
    nested: dict[str, Any] = {}
    for key, value in env.items():
        parts = key.removeprefix("PIPELINE_").lower().split("__")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    Settings.model_validate(nested)


def test_weights_built_here_never_show_as_changes_to_the_checkout() -> None:
    """`make up` trains demo weights and records them beside the weights; an operator puts real
    weights there. Neither may be tracked or show as a change, or the next `git pull` (the
    upgrade) stops at "your local changes would be overwritten"."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    written = [
        path
        for contract in discover_contracts(MODEL_REPOSITORY).values()
        for weights in [MODEL_REPOSITORY / contract.name / "1" / contract.weights]
        for path in (weights, weights.with_suffix(".json"))  # as models build-demo writes them
    ]
    ignored = subprocess.run(
        ["git", "check-ignore", "--stdin"],  # tracked files are never reported as ignored
        input="\n".join(str(p.relative_to(ROOT)) for p in written),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert sorted(ignored) == sorted(str(p.relative_to(ROOT)) for p in written)


def test_the_triton_image_has_the_workers_torch() -> None:
    """Weights written by `models export` or `build-demo` (the worker's torch) load in the
    Triton image's python backend: one torch version for both."""
    pinned = re.findall(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    image = re.findall(r'"torch==([\d.]+)"', (DEPLOY / "triton" / "Dockerfile").read_text())
    assert len(pinned) == 1 and image == pinned
