import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from saerl_ray.testing import S3Server

# The S3 endpoint is fixed before any Ray cluster starts, so every Ray worker inherits it.
S3 = S3Server()
os.environ.update(S3.env())

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"real data expected at {SHARED_DATA} (shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from saerl_ray.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (local_mode is gone)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from saerl_ray.models import packaged_dir

    d = packaged_dir("smollm2")
    if not (d / "config.json").exists():
        pytest.skip("SmolLM2 not cached: run `saerl-ray models pull smollm2` (make test-slow does)")
    return d


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on a free localhost port, for the whole session."""
    S3.start()
    S3.create_bucket("saerl-test")
    yield S3
    S3.stop()


@pytest.fixture
def s3_run_dir(s3_server, request) -> str:
    """A fresh `s3://saerl-test/<test>-<n>` prefix on the session's S3 server."""
    import uuid

    return f"s3://saerl-test/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:6]}"
