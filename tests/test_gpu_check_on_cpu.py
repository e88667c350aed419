"""benchmarks/gpu_check.sh as the bare GPU host will run it, in its CPU mode (issue 23 part 4).

The host has Python 3.12 with torch, transformers, accelerate, safetensors, pyarrow, pandas, scikit-learn,
scipy and numpy (and what they pull in) and nothing else; the bundle that `prepare` builds brings the rest.
Here a fresh venv of this machine's Python plays that host: no site-packages of its own, only a folder
linking exactly those packages (and their dependency closure) out of the project's .venv. So an import the
bundle forgot fails here as it would there. The bundle is also built for CPython 3.12 (the host's) to check
its size and tags; the CPU run uses one built for this Python, because compiled wheels are per-version.
`prepare` needs the package registry: without it these tests skip, loudly.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
HOST_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "pyarrow", "pandas", "scikit-learn",
                 "scipy", "numpy")
LIMIT = 60 * 2**20


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots) -> set[str]:
    """The installed distributions `roots` need (their unconditional requirements, recursively)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def link_packages(names: set[str], site: Path) -> None:
    """Symlink each distribution's top-level files and its .dist-info into `site`."""
    site.mkdir(parents=True)
    for name in names:
        dist = md.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


@pytest.fixture(scope="module")
def bare_host_python(tmp_path_factory) -> Path:
    """A Python that sees only the GPU host's packages (the folder is named site-packages like a real one:
    dill, under TRL's datasets, pickles modules from anywhere else by value)."""
    root = tmp_path_factory.mktemp("bare_host")
    link_packages(closure(HOST_PACKAGES), root / "host" / "site-packages")
    venv.create(root / "venv", with_pip=False)
    py = root / "venv" / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "gpu_host.pth").write_text(str(root / "host" / "site-packages") + "\n")
    return py


def registry_reachable(tmp: Path) -> bool:
    """One tiny wheel of the bundle (better-abc, 3 KB) downloads: the registry answers."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "-d", str(tmp), "better-abc==0.0.3"], check=False, capture_output=True, text=True)
    return done.returncode == 0


def prepare(bundle: Path, python_version: str, tmp: Path) -> dict:
    env = {**os.environ, "GPU_CHECK_BUNDLE": str(bundle), "PREP_PY": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "prepare", "--python-version", python_version],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        if not registry_reachable(tmp):
            pytest.skip(f"SKIPPED LOUDLY: the package registry is unreachable, so `gpu_check.sh prepare` cannot "
                        f"build the GPU bundle ({done.stderr.strip().splitlines()[-1:]})")
        pytest.fail(f"prepare for {python_version} failed:\n{done.stderr[-3000:]}")
    return json.loads((bundle / "manifest.json").read_text())


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bundle312")
    prepare(tmp / "gpu_bundle", "3.12", tmp)
    return tmp / "gpu_bundle"


def test_the_host_bundle_fits_and_is_built_for_the_hosts_python(host_bundle):
    manifest = json.loads((host_bundle / "manifest.json").read_text())
    assert manifest["python_version"] == "3.12"
    assert tree_bytes(host_bundle) <= LIMIT, f"{tree_bytes(host_bundle) / 2**20:.1f} MiB"
    # Every compiled wheel is for CPython 3.12 (or the stable ABI); none for this machine's Python.
    for wheel in manifest["wheels"]:
        python_tag, abi_tag = wheel.removesuffix(".whl").split("-")[-3:-1]
        assert python_tag in ("py3", "py312", "cp312") or abi_tag == "abi3", wheel
    names = {norm(w.split("-")[0]) for w in manifest["wheels"]}
    assert {"sae-lens", "trl", "math-verify", "pydantic-core"} <= names
    assert not names & {"ray", "torch", "transformers", "numpy"}, "the bundle brings only what the host lacks"
    assert {"tokenizer.json.gz", "config.json.gz"} <= {p.name for p in (host_bundle / "model").iterdir()}
    assert not list((host_bundle / "model").glob("*.safetensors*")), "weights do not fit: the host builds random ones"
    assert {p.name for p in (host_bundle / "data").iterdir()} == {"gsm8k_train.jsonl.gz", "math500.jsonl.gz"}


def assert_bare(python: Path) -> None:
    """The stand-in host really lacks what the bundle must bring (else the run below proves nothing)."""
    code = ("import torch, transformers, pandas, sklearn\n"
            "for m in ('ray', 'sae_lens', 'trl', 'math_verify', 'wandb'):\n"
            "    try:\n        __import__(m)\n    except ImportError:\n        continue\n"
            "    raise SystemExit(m + ' imports without the bundle')")
    done = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]


def test_cpu_mode_runs_the_check_on_the_bare_host(bare_host_python, tmp_path):
    assert_bare(bare_host_python)
    py_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    bundle = tmp_path / "gpu_bundle"
    prepare(bundle, py_version, tmp_path)
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAERL_DATA", "SAERL_CACHE")}
    env |= {"PY": str(bare_host_python), "GPU_CHECK_BUNDLE": str(bundle), "WORK": str(tmp_path / "work"),
            "OUT": str(out_dir), "GPU_CHECK_SITE": str(tmp_path / "unpacked" / "site-packages")}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu"], check=False, capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert json.loads((out_dir / "gpu_check.json").read_text()) == result
    assert "[gpu_check" in done.stderr  # progress lines
    assert result["mode"] == "cpu" and result["data_dir"] == str(bundle / "data")
    assert "random" in result["model"]
    ray_path = result["ray_data_actor_path"]
    assert ray_path.startswith("skipped: ") and "No module named 'ray'" in ray_path
    assert result["prompts"] == result["features_prompts"] == 16
    for key in ("sae_train_tokens_per_s", "features_stage_tokens_per_s", "features_encode_tokens_per_s",
                "matmul_bf16_tflops", "fraction_of_measured_bf16"):
        assert result[key] > 0, key
    assert result["features_blocks"] == 2 and result["features_warm_tokens_per_s"] > 0
    assert result["cpu_compared_prompts"] == 16
    assert set(result["code_cosine_by_code"]) == {"pooled", "last", "mean", "halves"}
    # Both sides ran on this CPU with the same dtypes: the stored codes are the CPU path's.
    assert result["code_cosine_min"] > 0.999
    assert result["grpo_step"] == "ok: 1 step" and result["grpo_param_dtype"] == "bfloat16"
    assert not [k for k in result if k.endswith("_error")]
    assert result["bundle_requirement_conflicts"] == []
    # What the device tool carries stays within its limit after a run (the unpacked copy lies elsewhere).
    assert tree_bytes(bundle) <= LIMIT and not (bundle / "site-packages").exists()


def test_gpu_mode_without_a_gpu_is_one_clear_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check" / "run.py")],
                          check=False, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--cpu" in lines[0], done.stderr


def test_install_refuses_a_bundle_for_another_python(tmp_path):
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    (tmp_path / "manifest.json").write_text(json.dumps({"python_version": other, "wheels": []}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check" / "install.py"), str(tmp_path),
                           str(tmp_path / "site-packages")],
                          check=False, capture_output=True, text=True)
    assert done.returncode != 0
    assert f"prepared for Python {other}" in done.stderr and "--python-version" in done.stderr
