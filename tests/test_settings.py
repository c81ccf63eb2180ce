from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.cpus import usable_cores
from pipeline.core.errors import ConfigError
from pipeline.core.sections import MAX_TORCH_THREADS
from pipeline.core.settings import load_settings, mask_url


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(text)
    monkeypatch.setenv("PIPELINE_CONFIG", str(cfg))


def test_yaml_file_is_read_and_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, "data_dir: /srv/pipeline\ninbox:\n  settle_seconds: 7\n")
    monkeypatch.setenv("PIPELINE_INBOX__SETTLE_SECONDS", "3.5")
    s = load_settings()
    assert s.data_dir == Path("/srv/pipeline")
    assert s.inbox.settle_seconds == 3.5
    assert s.results_dir == Path("/srv/pipeline/results")


def test_unknown_key_is_an_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, "triton:\n  urll: grpc://x:8001\n")
    with pytest.raises(ConfigError, match=r"triton\.urll': unknown key"):
        load_settings()


def test_bad_value_is_an_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, "worker:\n  concurrency: 0\n")
    with pytest.raises(ConfigError, match=r"worker\.concurrency"):
        load_settings()
    monkeypatch.setenv("PIPELINE_TRITON__URL", "ftp://triton:8001")
    _config(tmp_path, monkeypatch, "")
    with pytest.raises(ConfigError, match=r"triton\.url.*grpc://"):
        load_settings()


def test_a_prefault_at_or_above_the_memory_bound_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pool process would be over its bound after each task, and be replaced (and its
    replacement prefault again) for every study."""
    _config(tmp_path, monkeypatch, "worker:\n  max_memory_per_process_mb: 1024\n")
    with pytest.raises(ConfigError, match=r"prefault_mb \(1024\) must be below"):
        load_settings()
    monkeypatch.setenv("PIPELINE_WORKER__PREFAULT_MB", "512")
    assert load_settings().worker.prefault_mb == 512
    monkeypatch.setenv("PIPELINE_WORKER__KEEP_FREED_MEMORY", "false")  # then nothing is kept
    monkeypatch.setenv("PIPELINE_WORKER__PREFAULT_MB", "1024")
    assert load_settings().worker.max_memory_per_process_mb == 1024


def test_worker_cores_go_to_pool_processes_first_then_to_their_torch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = usable_cores()
    _config(tmp_path, monkeypatch, "worker:\n  concurrency: 1\n")
    assert load_settings().worker.threads_per_process(False) == min(cores, MAX_TORCH_THREADS)
    # A Triton computing on the same cores keeps them: one thread per pool process.
    assert load_settings().worker.threads_per_process(triton_on_these_cores=True) == 1
    # More pool processes than cores: one thread each, never none.
    _config(tmp_path, monkeypatch, f"worker:\n  concurrency: {cores + 1}\n")
    assert load_settings().worker.threads_per_process(triton_on_these_cores=False) == 1
    monkeypatch.setenv("PIPELINE_WORKER__TORCH_THREADS", "3")
    assert load_settings().worker.threads_per_process(triton_on_these_cores=True) == 3
    monkeypatch.setenv("PIPELINE_WORKER__TORCH_THREADS", "0")
    with pytest.raises(ConfigError, match=r"worker\.torch_threads"):
        load_settings()


def test_missing_config_file_named_by_environment_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def test_broker_password_is_masked_in_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(tmp_path, monkeypatch, "broker_url: rediss://:s3cret@redis.example:6380/2\n")
    shown = load_settings().masked()
    assert shown["broker_url"] == "rediss://:***@redis.example:6380/2"
    assert "s3cret" not in str(shown)
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_broker_url_must_be_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(tmp_path, monkeypatch, "broker_url: amqp://guest@localhost//\n")
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings()


def test_schema_command_prints_both_result_documents() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    schemas = json.loads(out.stdout)
    assert {"prediction", "segmentation", "preview"} <= set(schemas["result.json"]["properties"])
    assert "series" in schemas["study.json"]["required"]


def test_a_cpu_limit_caps_the_cores_the_worker_counts() -> None:
    """A container's CPU limit (a cgroup CPU quota), not the host's cores, is what the
    worker shares among its pool processes' torch threads."""
    assert usable_cores() == len(os.sched_getaffinity(0))  # no limit on the tests
    group = Path("/sys/fs/cgroup/cpu") / f"dicom-pipeline-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError:
        pytest.skip("no writable cgroup v1 cpu controller on this machine")
    try:
        (group / "cpu.cfs_quota_us").write_text("50000")  # half a CPU, rounded up to one
        code = (
            f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()));"
            "from pipeline.core.cpus import usable_cores; print(usable_cores())"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1"
    finally:
        group.rmdir()  # its only process has exited
