import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
from testkit import S3Server

# The S3 endpoint is fixed before any Ray cluster starts, so every Ray worker inherits it.
S3 = S3Server()
os.environ.update(S3.env())

# Where the tests find real data, first that has a file: SAERL_DATA, this workplace's full read-only copy
# (../shared/data: every benchmark), the repo's data/ (GSM8K train/test and MATH-500, gzipped).
DATA_SOURCES = [Path(p) for p in [os.environ.get("SAERL_DATA", "")] if p] + [
    Path(__file__).resolve().parents[2] / "shared" / "data", Path(__file__).resolve().parents[1] / "data"]


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """One folder of plain .jsonl data files (the tests read them as text), gathered from DATA_SOURCES."""
    import gzip

    out = tmp_path_factory.mktemp("data")
    for src in DATA_SOURCES:
        for f in sorted(src.glob("*.jsonl")) + sorted(src.glob("*.jsonl.gz")) if src.is_dir() else []:
            dst = out / f.name.removesuffix(".gz")
            if not dst.exists():
                dst.write_bytes(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes())
    if not (out / "math500.jsonl").exists():
        pytest.fail(f"no real data: none of {[str(s) for s in DATA_SOURCES]} holds math500.jsonl(.gz)")
    return out


@pytest.fixture(scope="session")
def require_data(shared_data):
    """`require_data("aime24.jsonl", ...)`: skip a test whose benchmark files are not here. Only GSM8K and
    MATH-500 ship with the repo (data/README.md); the other benchmarks come from SAERL_DATA (CI has them)."""
    def need(*names: str) -> Path:
        missing = [n for n in names if not (shared_data / n).exists()]
        if missing:
            pytest.skip(f"{missing} not in {[str(s) for s in DATA_SOURCES]}: set SAERL_DATA to a folder that has them")
        return shared_data
    return need


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from testkit import save_tiny_model

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
    from saerl_ray.core.models import packaged_dir

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


def tiny_run_config(run_dir, model_dir, shared_data, **extra):
    """The small end-to-end run config (tiny random model, 180 real prompts) the pipeline tests use."""
    from saerl_ray.core.config import load_config

    overrides = {
        "run_dir": str(run_dir),
        "model.name": str(model_dir),
        "ingest.inputs": [
            {"path": str(shared_data / "math500.jsonl"), "preset": "math", "limit": 100},
            {"path": str(shared_data / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": 80},
        ],
        "sae.layer": 1,
        "sae.expansion": 4,
        "sae.k": 8,
        "sae.training_tokens": 20_000,
        "features.block_rows": 64,
        "features.top_k": 32,
        "signals.cluster.k": 4,
        "signals.difficulty.n_labelled": None,
        "signals.quality.n_train": 60,
        "plan.batch_size": 8,
        # validate: no extra SAE seeds, small benchmark subsets (tests/test_validate_on_cpu.py covers both)
        "validation.data_dir": str(shared_data),
        "validation.sae_seeds": 1,
        "validation.quality_seeds": 2,
        "validation.ood_max_prompts": 20,
        **extra,
    }
    return load_config(None, overrides)


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir, shared_data):
    """`tiny_config(run_dir, **overrides)`: the pipeline tests' run config for that run dir."""
    return lambda run_dir, **extra: tiny_run_config(run_dir, tiny_model_dir, shared_data, **extra)


@pytest.fixture(scope="session")
def pipeline_run_dir(tmp_path_factory, tiny_config, ray_cluster) -> Path:
    """One end-to-end pipeline run (ingest -> report) for the session: the pipeline test checks it
    (and then reruns its plan with another mixing ratio), the browser test renders its report."""
    import shutil

    from saerl_ray.pipeline import run_pipeline

    # SAERL_ARTIFACTS (set by .ci/run): the run dir, with the report and its browser screenshot, is
    # kept there for CI to collect; pytest trims its own temp dirs to the last three sessions.
    keep = os.environ.get("SAERL_ARTIFACTS")
    run = Path(keep).resolve() / "pipeline-run" if keep else tmp_path_factory.mktemp("pipeline") / "run"
    if keep:
        shutil.rmtree(run, ignore_errors=True)
    run_pipeline(tiny_config(run))
    return run


# --- verl (optional env, `make test-verl`) ---
# Tests marked `verl` need verl 0.9.1 (.venv-verl). Elsewhere they are skipped, except where
# SAERL_REQUIRE_VERL=1 (`make test-verl`, CI): there a test that cannot run fails instead.
def pytest_configure(config):
    config.addinivalue_line("markers", "verl: needs the optional verl 0.9.1 CPU environment (make test-verl)")


def _verl_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("verl") is None


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SAERL_REQUIRE_VERL") == "1" or not _verl_missing():
        return
    skip = pytest.mark.skip(reason="verl not installed: run `make test-verl` (optional .venv-verl)")
    for item in items:
        if item.get_closest_marker("verl"):
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if item.get_closest_marker("verl") and os.environ.get("SAERL_REQUIRE_VERL") == "1" and _verl_missing():
        pytest.fail("verl is not importable but SAERL_REQUIRE_VERL=1: build .venv-verl with `make test-verl`")
