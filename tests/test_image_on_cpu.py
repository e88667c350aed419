"""The image builds and starts: flash-attn and DeepSpeed compile at torch 2.13's C++20 (docker/patch_cxx_std.py
run on the real pinned sdists, then a translation unit that includes <torch/extension.h> compiled at the
standard the patched setup.py passes), every compile happens in the stage whose CUDA is torch's, the images
declare the driver torch's CUDA needs, verl has its own pinned set and image, and pyproject's pins.

The sdist tests need the registry (pip download); they skip, loudly, only when it is unreachable."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from pathlib import Path

import pytest
from test_cluster_configs_on_cpu import (  # tests/ is on sys.path (pytest rootdir conftest)
    DOCKERFILE,
    dockerfile_stages,
    install_steps,
    runs,
)

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "docker" / "patch_cxx_std.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


deps = _load("saerl_docker_deps_image", ROOT / "docker" / "deps.py")
patcher = _load("saerl_docker_patch_cxx_std", PATCH)


# ---------------------------------------------------------------- the real sdists


def _sdist(tmp_dir: Path, package: str) -> Path:
    """Download and unpack the pinned sdist of `package`; its top-level source folder."""
    dest = tmp_dir / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-d", str(dest), deps.pin(package)]
    # flash-attn's metadata step imports torch (hence no build isolation) and must not look for nvcc.
    env = {**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if p.returncode != 0:
        if re.search(r"Could not fetch URL|NewConnectionError|Temporary failure in name resolution|"
                     r"Max retries exceeded|Network is unreachable", p.stderr):
            pytest.skip(f"REGISTRY UNREACHABLE: cannot download {deps.pin(package)}; the C++ standard patch was "
                        f"NOT tested ({p.stderr.strip().splitlines()[-1]})")
        pytest.fail(f"pip download {deps.pin(package)} failed:\n{p.stderr[-2000:]}")
    archive = next(dest.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_dir / "src", filter="data")
    return next((tmp_dir / "src").iterdir())


@pytest.fixture(scope="module")
def flash_attn_src(tmp_path_factory) -> Path:
    return _sdist(tmp_path_factory.mktemp("flash_attn"), "flash-attn")


@pytest.fixture(scope="module")
def deepspeed_src(tmp_path_factory) -> Path:
    return _sdist(tmp_path_factory.mktemp("deepspeed"), "deepspeed")


def run_patch(package: str, path: Path) -> subprocess.CompletedProcess:
    """The script exactly as the Dockerfile runs it."""
    return subprocess.run([sys.executable, str(PATCH), package, str(path)], capture_output=True, text=True,
                          check=False)


def compile_torch_tu(tmp_path: Path, std: str, stop_at_first_error: bool) -> subprocess.Popen:
    """g++ on a translation unit including <torch/extension.h> from this venv's torch, at `std`, with the
    C++20-extension warnings that g++ only warns about made errors (nvcc's front end stops at them)."""
    from torch.utils.cpp_extension import include_paths

    tu = tmp_path / f"probe_{std.replace('+', 'p')}.cpp"
    tu.write_text("#include <torch/extension.h>\nint probe() { return 0; }\n")
    cmd = ["g++", f"-std={std}", "-fsyntax-only", "-Werror=c++20-extensions", str(tu),
           f"-I{sysconfig.get_paths()['include']}", *(f"-I{p}" for p in include_paths())]
    if stop_at_first_error:
        cmd.insert(1, "-fmax-errors=1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_patched_flash_attn_setup_compiles_torch_2_13_headers(flash_attn_src, tmp_path):
    setup = flash_attn_src / "setup.py"
    before = patcher.standards(setup.read_text())
    assert before == {"c++17"}, before  # flash-attn 2.8.3 as pinned: the defect
    p = run_patch("flash-attn", setup)
    assert p.returncode == 0, p.stderr
    after = patcher.standards(setup.read_text())
    assert len(after) == 1, after
    (std,) = after
    # Both compiles side by side; the unpatched one stops at its first error.
    patched = compile_torch_tu(tmp_path, std, stop_at_first_error=False)
    unpatched = compile_torch_tu(tmp_path, next(iter(before)), stop_at_first_error=True)
    out_patched, _ = patched.communicate(timeout=600)
    out_unpatched, _ = unpatched.communicate(timeout=600)
    assert patched.returncode == 0, f"torch headers at the patched -std={std}:\n{out_patched[-3000:]}"
    assert unpatched.returncode != 0 and "c++20" in out_unpatched, out_unpatched[-2000:]


def test_patch_fails_loudly_when_the_upstream_flag_is_missing(tmp_path):
    other = tmp_path / "setup.py"
    other.write_text('nvcc_flags = ["-O3", "-std=c++20"]\n')
    p = run_patch("flash-attn", other)
    assert p.returncode == 1 and str(other) in p.stderr and "-std=c++17" in p.stderr, p.stderr
    p = run_patch("deepspeed", other)
    assert p.returncode == 1 and "need exactly 1" in p.stderr, p.stderr
    assert run_patch("no-such-package", other).returncode == 1


DS_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import op_builder.builder as b
from op_builder.quantizer import QuantizerBuilder
from op_builder.fused_adam import FusedAdamBuilder
b.installed_cuda_version = lambda name="": (13, 0)  # the builder stage's nvcc: torch's CUDA 13.0
for cls in (QuantizerBuilder, FusedAdamBuilder):
    op = cls()
    op.build_for_cpu = False
    print(cls.__name__, [a for a in op.nvcc_args() if a.startswith("-std=")])
"""


def deepspeed_nvcc_standards(src: Path) -> dict[str, list[str]]:
    """The -std flags DeepSpeed's real op builders (from `src`) pass to nvcc under CUDA 13.0."""
    p = subprocess.run([sys.executable, "-c", DS_PROBE, str(src)], capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.split(" ", 1)[0].endswith("Builder")]
    return {ln.split(" ", 1)[0]: ast.literal_eval(ln.split(" ", 1)[1]) for ln in lines}


def test_patched_deepspeed_builder_passes_cxx20_to_nvcc_on_cuda_13(deepspeed_src):
    assert deepspeed_nvcc_standards(deepspeed_src)["QuantizerBuilder"] == ["-std=c++17"]  # 0.19.6 as pinned
    p = run_patch("deepspeed", deepspeed_src / "op_builder" / "builder.py")
    assert p.returncode == 0, p.stderr
    got = deepspeed_nvcc_standards(deepspeed_src)
    # Ops on the shared nvcc_args get C++20; FusedAdam passes none, so torch's builder adds -std=c++20.
    assert got == {"QuantizerBuilder": ["-std=c++20"], "FusedAdamBuilder": []}, got


# ---------------------------------------------------------------- the Dockerfile


def stage(name: str) -> dict:
    found = [s for s in dockerfile_stages() if s["name"] == name]
    assert found, f"docker/Dockerfile has no stage named {name!r}"
    return found[0]


def test_everything_compiled_is_compiled_in_the_builder_with_torchs_cuda_and_cxx20():
    stages = dockerfile_stages()
    builder = stages[0]
    code = "\n".join(runs(builder))
    # The toolkit installed is torch's own CUDA (read from the installed wheel, which the registry ships as
    # DOCUMENTED_TORCH_CUDA: deps-check fails otherwise), and both compiles point CUDA_HOME at it.
    assert 'cuda-toolkit-${cuda/./-}' in code and "torch.version.cuda" in code
    compiles = [r for r in runs(builder) if re.search(r"\bpip wheel\b", r)]
    assert len(compiles) == 2, compiles
    for package, cmd in zip(("flash-attn", "deepspeed"), compiles):
        assert f"pin {package}" in cmd and 'CUDA_HOME="/usr/local/cuda-${cuda}"' in cmd, cmd
        # patched before it is built
        assert cmd.index(f"patch_cxx_std.py {package}") < cmd.index("pip wheel"), cmd
    assert "DS_BUILD_FUSED_ADAM=1" in compiles[1] and "DS_BUILD_CPU_ADAM=1" in compiles[1]
    # The base image's nvcc is another CUDA major than torch's: no image stage may compile anything.
    base_cuda = re.search(r"-cu(\d\d)(\d)$", builder["base"])
    assert base_cuda and base_cuda.group(1) != deps.DOCUMENTED_TORCH_CUDA.split(".")[0]
    for s in stages[1:]:
        assert not any(re.search(r"\bpip wheel\b|--no-binary|--no-build-isolation", r) for r in runs(s)), s["name"]


def test_openrlhf_image_installs_prebuilt_deepspeed_before_the_gpu_set():
    final = dockerfile_stages()[-1]
    steps = install_steps(runs(final))
    wheel = next(i for i, (k, c) in enumerate(steps) if k == "flash-attn-wheel")
    assert "deepspeed-*.whl" in steps[wheel][1]
    gpu = next(i for i, (k, _) in enumerate(steps) if k == "gpu")
    assert wheel < gpu and "--set gpu" in " ".join(runs(final))
    assert any("installed_ops" in r and "fused_adam" in r and "cpu_adam" in r for r in runs(final))


def test_images_declare_the_driver_torchs_cuda_needs():
    from saerl_ray.core.device import min_driver

    need_cuda, need_driver = deps.DOCUMENTED_TORCH_CUDA, min_driver(deps.DOCUMENTED_TORCH_CUDA)
    for s in dockerfile_stages()[1:]:
        env = " ".join(a for k, a in s["instructions"] if k == "ENV")
        m = re.search(r'NVIDIA_REQUIRE_CUDA="([^"]+)"', env)
        assert m, f"stage {s['name']} does not declare NVIDIA_REQUIRE_CUDA"
        # One constraint whose parts are ANDed (commas): a space would make the parts alternatives.
        assert " " not in m.group(1) and set(m.group(1).split(",")) == {f"cuda>={need_cuda}", f"driver>={need_driver}"}


def test_verl_image_target_installs_the_verl_set_and_the_project_without_deps():
    verl = stage("verl")
    code = runs(verl)
    steps = install_steps(code)
    assert [k for k, _ in steps][:2] == ["torch", "flash-attn-wheel"], steps
    assert any("deps.py requirements --set verl" in r for r in code)
    assert any(re.search(r"pip install .*--no-deps -e \.", r) for r in code), code
    assert any("import" in r and "verl" in r and "hydra" in r for r in code)
    assert not any(re.search(r"openrlhf|deepspeed", r) for r in code)
    text = DOCKERFILE.read_text()
    assert f"--target verl -t {deps.image('verl')} ." in text
    assert f"-f docker/Dockerfile -t {deps.image('gpu')} ." in text


# ---------------------------------------------------------------- the dependency sets and pins


def test_image_tags_are_the_ones_the_cluster_configs_name():
    assert deps.image("gpu") == "ghcr.io/your-org/saerl-ray:0.1.0-ray2.55.0-cu130"
    assert deps.image("verl") == "ghcr.io/your-org/saerl-ray-verl:0.1.0-ray2.55.0-cu130"


def test_verl_set_is_the_core_with_verls_transformers_and_no_openrlhf():
    verl = deps.set_requirements("verl")
    pins = deps.exact_pins(verl)
    assert pins["verl"] == "0.9.1" and pins["transformers"] == "5.10.4" and "hydra-core" in pins
    assert pins["torch"] == deps.exact_pins(PYPROJECT["project"]["dependencies"])["torch"]
    assert {"vllm", "flash-attn"} <= set(pins) and not {"openrlhf", "deepspeed"} & set(pins)
    assert [deps._name(r) for r in verl].count("transformers") == 1
    assert deps.exact_pins(deps.set_requirements("gpu"))["transformers"] == "5.15.0"
    # Only the verl extra may replace a core requirement: any other overlap would silently loosen a pin.
    core = {deps._name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    overlaps = {e: {deps._name(r) for r in rs} & core for e, rs in extras.items()}
    assert {e: o for e, o in overlaps.items() if o} == {"verl": {"transformers"}}


def test_every_env_is_built_from_pyproject_extras():
    make = (ROOT / "Makefile").read_text()
    recipes = {t: make.split(f"$({t}):")[1].split("\n\n")[0] for t in ("OSTAMP", "VSTAMP")}
    for target, recipe in recipes.items():
        # No package version is typed in a recipe: each comes from pyproject through docker/deps.py.
        typed = re.findall(r"[A-Za-z0-9_\]-]\s*(?:==|>=|<=|~=)\s*\d", recipe)
        assert not typed, f"{target} types versions: {typed}"
    assert "--only openrlhf-cpu" in recipes["OSTAMP"] and "--only verl" in recipes["VSTAMP"]


def test_pyproject_license_python_and_pins():
    proj = PYPROJECT["project"]
    assert proj["license"] == "Apache-2.0"
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in PYPROJECT["build-system"]["requires"])
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(proj["requires-python"])
    assert "3.11.7" in spec and "3.12.3" in spec and "3.13.0" not in spec
    # Every runtime dependency pinned (==) or bounded above (<): an open one drifts from what CI tested.
    open_ended = [r for r in proj["dependencies"] if "==" not in r and "<" not in r]
    assert open_ended == [], open_ended
    assert deps.pin("trl") == "trl==1.16.0"
