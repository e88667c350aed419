"""pyproject.toml is the project's one dependency list; the image, the Makefile and the tests read it here.

    python docker/deps.py pin torch                      # torch==2.13.0, exactly as pyproject pins it
    python docker/deps.py requirements --extra gpu       # core + gpu requirements, one per line
    python docker/deps.py requirements --set verl        # the verl image's set (see SETS)
    python docker/deps.py requirements --only openrlhf-cpu   # one extra alone (the CPU test envs)
    python docker/deps.py image verl                     # the verl image's tag
    python docker/deps.py check                          # does each image's set resolve on the registry?

Sets: an extra that names a package the core also names replaces the core's requirement (only the verl
extra does: verl 0.9.1 caps transformers below OpenRLHF's pin), so the verl set cannot be installed as
`saerl-ray[verl]`; its image installs this list, then the project with --no-deps.

`check` is what `make test` runs (`make deps-check`): a `pip install --dry-run --report` of each set in
SETS (this project with its `gpu` extra; the verl set as a requirement list) against the registry
(PIP_INDEX_URL, else pip's configured index-url, else PyPI).
The rest of the machine's pip config, its local wheel folders and constraint files are ignored, so a CPU
torch wheel on disk cannot stand in for the CUDA one. pip resolves everything from real metadata except
flash-attn: it ships only as an sdist whose metadata step imports torch, so pip cannot even read its
requirements under build isolation on a machine without torch (the very defect of installing it before
torch). The check confirms the pinned sdist is on the index and stands in a metadata-only wheel that
declares what flash-attn 2.8.3's setup.py declares (torch, einops). It fails when the pins cannot be met
together, when a pin resolves to another version, or when torch's CUDA differs from the one the image,
the AMI and docs/decisions.md were chosen for. It is skipped (exit 0, with a loud line) only when the
registry cannot be reached at all; SAERL_REQUIRE_REGISTRY=1 makes that a failure too. Standard library
only, so it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DEFAULT_INDEX = "https://pypi.org/simple"

# flash-attn 2.8.3's sdist (setup.py install_requires and PKG-INFO, read 2026-12-01): what the stand-in
# wheel declares, so the resolver still has to fit flash-attn's own requirements with everything else.
FLASH_ATTN_REQUIRES = ["torch", "einops"]
# The CUDA that torch's pinned wheel brings from the registry. The image builds flash-attn with this
# toolkit and the AWS AMI / GCP image carry a driver for it (>= 580 for 13.0; docs/decisions.md): a
# change here means revisiting those choices, so the check fails until this line is updated with them.
DOCUMENTED_TORCH_CUDA = "13.0"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {req!r}")
    return _norm(m.group(1))


def project(path: Path = PYPROJECT) -> dict:
    return tomllib.loads(path.read_text())["project"]


# The image sets: name -> (extras added to the core, package names dropped). "gpu" is the OpenRLHF image
# (docker/Dockerfile's last stage), "verl" the verl image (its `verl` target): verl trains with FSDP and
# vLLM, so it takes vllm and flash-attn from the gpu extra but not openrlhf or deepspeed.
SETS = {
    "gpu": (("gpu",), ()),
    "verl": (("verl", "gpu"), ("openrlhf", "deepspeed")),
}


# Image repository per set: the tag is <repository>:<project version>-ray<ray pin>-cu<torch's CUDA>, so it
# changes with any of the three (the cluster configs and jobs/submit_train_*.sh name these tags).
IMAGE_REPOSITORIES = {"gpu": "ghcr.io/your-org/saerl-ray", "verl": "ghcr.io/your-org/saerl-ray-verl"}


def image(name: str, path: Path = PYPROJECT) -> str:
    """The image tag of one set, e.g. 'ghcr.io/your-org/saerl-ray-verl:0.1.0-ray2.55.0-cu130'."""
    if name not in IMAGE_REPOSITORIES:
        raise KeyError(f"no image for set {name!r}; known: {sorted(IMAGE_REPOSITORIES)}")
    ray = exact_pins([pin("ray", path)])["ray"]
    cuda = DOCUMENTED_TORCH_CUDA.replace(".", "")
    return f"{IMAGE_REPOSITORIES[name]}:{project(path)['version']}-ray{ray}-cu{cuda}"


def extra(name: str, path: Path = PYPROJECT) -> list[str]:
    """One extra's requirements, as pyproject lists them."""
    extras = project(path).get("optional-dependencies", {})
    if name not in extras:
        raise KeyError(f"pyproject.toml has no extra {name!r}; it has {sorted(extras)}")
    return list(extras[name])


def requirements(extras: list[str] = (), exclude: list[str] = (), path: Path = PYPROJECT) -> list[str]:
    """The core dependencies plus the named extras, in pyproject's order, minus `exclude` (names). An
    extra's requirement for a package the core already names takes the core's place (the verl set's
    transformers); a package named by two extras keeps the first."""
    reqs = list(project(path)["dependencies"])
    core = {_name(r): i for i, r in enumerate(reqs)}
    seen = set(core)
    for e in extras:
        for r in extra(e, path):
            n = _name(r)
            if n in core:
                reqs[core.pop(n)] = r
            elif n not in seen:
                reqs.append(r)
            seen.add(n)
    drop = {_norm(x) for x in exclude}
    return [r for r in reqs if _name(r) not in drop]


def set_requirements(name: str, path: Path = PYPROJECT) -> list[str]:
    """The requirements of one image set in SETS."""
    if name not in SETS:
        raise KeyError(f"no dependency set {name!r}; known: {sorted(SETS)}")
    extras, exclude = SETS[name]
    return requirements(list(extras), list(exclude), path)


def pin(name: str, path: Path = PYPROJECT) -> str:
    """The requirement string for `name` from the dependencies or any extra, e.g. 'torch==2.13.0'."""
    p = project(path)
    every = list(p["dependencies"]) + [r for rs in p.get("optional-dependencies", {}).values() for r in rs]
    found = [r for r in every if _name(r) == _norm(name)]
    if not found:
        raise KeyError(f"{name} is not a dependency in {path}")
    return found[0]


def exact_pins(reqs: list[str]) -> dict[str, str]:
    """{name: version} of the `name[extras]==version` requirements."""
    out = {}
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*$", r)
        if m:
            out[_norm(m.group(1))] = m.group(3)
    return out


def _stub_wheel(dest: Path, name: str, version: str, requires: list[str]) -> Path:
    """A metadata-only wheel: enough for the resolver, nothing to import."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: saerl-ray deps.py\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(t)},{len(t.encode())}\n" for p, t in files.items())
    record += f"{dist}.dist-info/RECORD,,\n"
    whl = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
        z.writestr(f"{dist}.dist-info/RECORD", record)
    return whl


class Unreachable(Exception):
    """The registry did not answer at all (DNS, refused, timeout): not a verdict on the pins."""


def index_files(index: str, name: str, timeout: float = 20.0) -> list[str]:
    """File names the index lists for one project (PEP 691 JSON, or PEP 503 HTML)."""
    url = f"{index.rstrip('/')}/{_norm(name)}/"
    req = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, ctype = r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        if e.code in (502, 503, 504):  # a proxy or gateway answering for a registry it cannot reach
            raise Unreachable(f"{url}: HTTP {e.code}") from e
        raise
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise Unreachable(f"{url}: {getattr(e, 'reason', e)}") from e
    if "json" in ctype:
        return [f["filename"] for f in json.loads(body)["files"]]
    return re.findall(r">\s*([^<>\s]+)\s*</a>", body)


def torch_cuda(requires_dist: list[str]) -> str | None:
    """The CUDA major.minor a torch wheel's metadata pulls in (cuda-toolkit==13.0.3 -> '13.0'; the
    nvidia-*-cu12 style of older wheels -> '12'); None for a CPU wheel."""
    for r in requires_dist:
        m = re.match(r"cuda-toolkit(\[[^\]]*\])?\s*==\s*(\d+)\.(\d+)", r.replace("_", "-"))
        if m:
            return f"{m.group(2)}.{m.group(3)}"
    for r in requires_dist:
        m = re.match(r"nvidia-[a-z0-9-]+-cu(\d+)\b", r)
        if m:
            return m.group(1)
    return None


def resolve(reqs: list[str], index: str, find_links: list[Path], timeout: float = 60.0) -> tuple[int, dict, str]:
    """pip's dry-run resolution of `reqs` in a clean configuration: (returncode, report, stderr)."""
    with tempfile.TemporaryDirectory(prefix="saerl_deps_") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
               "--quiet", "--disable-pip-version-check", "--report", str(report), "--index-url", index,
               "--timeout", str(timeout),
               # Range requests read each wheel's METADATA only; without them pip downloads every wheel
               # (torch, vLLM and the CUDA libraries are ~5 GB) on registries without PEP 658 metadata.
               "--use-feature=fast-deps"]
        if os.environ.get("PIP_CERT"):
            cmd += ["--cert", os.environ["PIP_CERT"]]
        for d in find_links:
            cmd += ["--find-links", str(d)]
        p = subprocess.run(cmd + reqs, capture_output=True, text=True, check=False)
        return p.returncode, (json.loads(report.read_text()) if report.exists() else {}), p.stderr


def configured_index() -> str:
    """The registry pip would use here: PIP_INDEX_URL, pip's configured index-url, else PyPI. (The check
    itself runs pip --isolated, so local wheel folders, extra indexes and constraints do not leak in.)"""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    for key in ("global.index-url", "install.index-url"):
        p = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True,
                           check=False)
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.strip()
    return DEFAULT_INDEX


def _resolve_target(name: str) -> list[str]:
    """What pip resolves for one set: the project with its extra where pip can install it that way (so
    the check also builds this project's metadata), else the set's requirement list."""
    extras, exclude = SETS[name]
    core = {_name(r) for r in project()["dependencies"]}
    replaces_core = any(_name(r) in core for e in extras for r in extra(e))
    if not exclude and not replaces_core:
        return [f"{ROOT}[{','.join(extras)}]"]
    return set_requirements(name)


def check_set(name: str, index: str, links: list[Path]) -> tuple[bool, str]:
    """Resolve one image set on the registry: (ok, one report line)."""
    reqs = set_requirements(name)
    rc, report, err = resolve(_resolve_target(name), index, links)
    if rc != 0:
        tail = "\n".join(err.strip().splitlines()[-25:])
        return False, f"deps-check: FAILED: the {name} set does not resolve on {index}:\n{tail}"
    got = {_norm(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    wrong = {n: (v, got.get(n, {}).get("version")) for n, v in exact_pins(reqs).items()
             if got.get(n, {}).get("version", "").split("+")[0] != v}
    if wrong:
        return False, f"deps-check: FAILED: the {name} set's pins resolved to other versions (pin, resolved): {wrong}"
    cuda = torch_cuda(got["torch"].get("requires_dist", []))
    if cuda != DOCUMENTED_TORCH_CUDA:
        return False, (f"deps-check: FAILED: torch {got['torch']['version']} from {index} brings CUDA {cuda}, not "
                       f"{DOCUMENTED_TORCH_CUDA}: revisit the image's CUDA toolkit, NVIDIA_REQUIRE_CUDA, the AMI / "
                       "GCP image driver (docs/decisions.md), then DOCUMENTED_TORCH_CUDA in docker/deps.py")
    key = ["torch", "vllm", "openrlhf", "verl", "deepspeed", "flash-attn", "ray", "transformers"]
    versions = ", ".join(f"{k} {got[k]['version']}" for k in key if k in got)
    return True, (f"deps-check: OK: the {name} set resolves on {index}: {len(got)} packages ({versions}; "
                  f"torch brings CUDA {cuda})")


def check(index: str | None = None, sets: list[str] | None = None) -> int:
    index = index or configured_index()
    sets = list(sets or SETS)
    t0 = time.perf_counter()
    fa = next((v for s in sets for n, v in exact_pins(set_requirements(s)).items() if n == "flash-attn"), None)
    try:
        if not index_files(index, "openrlhf"):
            print(f"deps-check: FAILED: openrlhf is not on {index}")
            return 1
        fa_files = index_files(index, "flash-attn") if fa else []
    except Unreachable as e:
        if os.environ.get("SAERL_REQUIRE_REGISTRY") == "1":
            print(f"deps-check: FAILED: registry unreachable and SAERL_REQUIRE_REGISTRY=1 ({e})")
            return 1
        print(f"deps-check: SKIPPED: the registry is unreachable ({e}); the image dependency sets were NOT checked")
        return 0
    with tempfile.TemporaryDirectory(prefix="saerl_stub_") as stub:
        links = []
        if fa:
            if not any(re.fullmatch(rf"flash[_-]attn-{re.escape(fa)}(\.tar\.gz|\.zip|-.+\.whl)", f) for f in fa_files):
                print(f"deps-check: FAILED: flash-attn=={fa} is not on {index}")
                return 1
            _stub_wheel(Path(stub), "flash-attn", fa, FLASH_ATTN_REQUIRES)
            links.append(Path(stub))
        # Each resolution waits on the registry, not the CPU: run them side by side.
        with ThreadPoolExecutor(max_workers=len(sets)) as pool:
            results = list(pool.map(lambda s: check_set(s, index, links), sets))
    for _, line in results:
        print(line)
    ok = all(good for good, _ in results)
    if ok and fa:
        print(f"deps-check: flash-attn=={fa} checked by its declared requirements (a stand-in wheel); "
              f"{len(sets)} set(s) in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("pin", help="print one package's requirement as pyproject states it")
    sp.add_argument("name")
    sr = sub.add_parser("requirements", help="print core (+ extras) requirements, one per line")
    sr.add_argument("--extra", action="append", default=[])
    sr.add_argument("--exclude", action="append", default=[])
    which = sr.add_mutually_exclusive_group()
    which.add_argument("--set", choices=sorted(SETS), help="an image's whole set (core + its extras)")
    which.add_argument("--only", metavar="EXTRA", help="one extra's requirements alone, without the core")
    si = sub.add_parser("image", help="print the image tag of a set (gpu: the OpenRLHF image; verl)")
    si.add_argument("name", choices=sorted(IMAGE_REPOSITORIES))
    sc = sub.add_parser("check", help="resolve each image set against the registry (pip dry run)")
    sc.add_argument("--index-url", default=None)
    sc.add_argument("--set", action="append", choices=sorted(SETS), help="check only this set (repeatable)")
    a = ap.parse_args(argv)
    if a.cmd == "pin":
        print(pin(a.name))
    elif a.cmd == "image":
        print(image(a.name))
    elif a.cmd == "requirements":
        if a.set:
            reqs = set_requirements(a.set)
        elif a.only:
            reqs = extra(a.only)
        else:
            reqs = requirements(a.extra)
        drop = {_norm(x) for x in a.exclude}
        print("\n".join(r for r in reqs if _name(r) not in drop))
    else:
        return check(a.index_url, a.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
