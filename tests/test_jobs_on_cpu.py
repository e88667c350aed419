"""Ray Job submission end to end: a real head node (own process group, own --temp-dir, dashboard on
loopback), `jobs/pipeline.py` submitted through the Job API on real MATH-500 rows + a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from saerl_ray.pipeline import PIPELINE

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(client, **kwargs) -> str:
    """The head answers before its dashboard agent is up; the Job API then says so with a 500."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def kill_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only what we started: our `ray start` process group, then any process under our temp dir."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix sockets live under the temp dir and have a ~100-char limit.
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rjob")
    dash, gcs = free_port(), free_port()
    # A busy 2-core box can take longer than Ray's 30 s for the dashboard's modules to start.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--temp-dir", temp_dir, "--disable-usage-stats",
         # The session's other local cluster holds the default agent ports (52365, ...): a second
         # agent on them never starts and the Job API answers "No available agent" forever.
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--ray-client-server-port", str(free_port())],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    from ray.job_submission import JobSubmissionClient

    address = f"http://127.0.0.1:{dash}"
    client = None
    deadline = time.time() + 90
    while client is None:
        try:
            client = JobSubmissionClient(address)
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                kill_cluster(proc, temp_dir)
                pytest.fail(f"ray head did not come up (rc={proc.poll()}, logs in {temp_dir})")
            time.sleep(1)
    yield client, dash
    kill_cluster(proc, temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for(client, job_id: str, timeout: float = 240):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    return client.get_job_status(job_id)


def tiny_config(tmp_path: Path, model_dir: Path, shared_data: Path) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir)},
        "ingest": {"inputs": [{"path": str(shared_data / "math500.jsonl"), "preset": "math", "limit": 60}]},
        "sae": {"layer": 1, "expansion": 4, "k": 8, "training_tokens": 20_000},
        "features": {"block_rows": 32, "top_k": 32},
        "signals": {"cluster": {"k": 3}, "difficulty": {"n_labelled": None}, "quality": {"n_train": 40}},
        "plan": {"batch_size": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_job_succeeds_and_writes_stage_outputs(ray_head, tmp_path, tiny_model_dir, shared_data):
    client, _ = ray_head
    stages = list(PIPELINE)
    config = tiny_config(tmp_path, tiny_model_dir, shared_data)
    entry = f"{sys.executable} {REPO / 'jobs/pipeline.py'} --config {config} --stages {','.join(stages)}"
    job_id = submit(
        client,
        entrypoint=entry,
        runtime_env={"env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "HF_HUB_OFFLINE": "1", "CI": "1"}},
    )
    status = wait_for(client, job_id)
    logs = client.get_job_logs(job_id)
    assert str(status) == "SUCCEEDED", logs[-3000:]
    # Worker logs can interleave after the driver's line: take the driver's JSON summary.
    result = json.loads(next(l for l in reversed(logs.splitlines()) if l.startswith('{"run_dir"')))
    assert list(result["stages"]) == stages
    run = tmp_path / "run"
    for name in stages:
        assert (run / name / "_DONE.json").exists(), name
    ingest = json.loads((run / "ingest/summary.json").read_text())
    assert ingest["accepted"] + ingest["rejected"] == ingest["rows"] == 60
    assert "Curriculum" in (run / "report/report.html").read_text()


def test_pipeline_job_rejects_unknown_stage_with_clear_error(ray_head, tmp_path):
    client, _ = ray_head
    job_id = submit(client, entrypoint=f"{sys.executable} {REPO / 'jobs/pipeline.py'} --stages ingest,bogus")
    status = wait_for(client, job_id, timeout=60)
    assert str(status) == "FAILED"
    assert "unknown stage(s) ['bogus']" in client.get_job_logs(job_id)
