"""Speed-only weights never silently replace trained ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import MODEL_REPOSITORY


def _repository_without_weights(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    weights = shutil.ignore_patterns("*.pt", "*.pt2", "*.onnx", "model.json")
    shutil.copytree(MODEL_REPOSITORY, repo, ignore=weights)
    return repo


def _speed_weights(repo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline.bench.speed_weights"]
    return subprocess.run(
        [*command, "--model-repository", str(repo), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_trained_weights_are_kept_unless_forced_and_speed_weights_are_replaced(
    tmp_path: Path,
) -> None:
    repo = _repository_without_weights(tmp_path)
    trained = repo / "ct_covid_classifier" / "1" / "model.pt2"
    trained.write_bytes(b"trained weights")
    trained.with_suffix(".json").write_text(json.dumps({"kind": "real weights"}))

    refused = _speed_weights(repo)
    assert refused.returncode != 0 and str(trained) in refused.stderr
    assert trained.read_bytes() == b"trained weights"
    assert not (repo / "mednist_classifier" / "1" / "model.pt2").exists()  # nothing written

    forced = _speed_weights(repo, "--force")
    assert forced.returncode == 0, forced.stderr
    untrained = {
        name: json.loads((repo / name / "1" / "model.json").read_text())["kind"]
        for name in ("mednist_classifier", "ct_covid_classifier", "ct_lesion_segmentation")
    }
    assert set(untrained.values()) == {"untrained, for speed measurements only"}
    assert trained.read_bytes() != b"trained weights"
    # Speed weights replace speed weights: a lent machine may run it twice.
    assert _speed_weights(repo).returncode == 0
