"""Unpack the bundle's wheels into a site-packages folder, the one the check puts first on PYTHONPATH.

    python3 benchmarks/gpu_check/install.py gpu_bundle .gpu_check/site-packages

The folder lies outside the bundle (and is git-ignored): the device tool carries gpu_bundle/ alone, and
an unpacked copy inside it would push it over the 64 MiB carried.

Standard library only: the host's venv may have no pip. A wheel is a zip laid out as site-packages
(PEP 427); the only part that moves is `<name>.data/purelib|platlib`, into the top of the folder. Scripts and
headers are not needed by the check and are left out. Skipped when the folder already holds this manifest's
wheels (a rerun on a warm host).
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path


def unpack(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            for item in (data / kind).glob("*") if (data / kind).is_dir() else ():
                target = site / item.name
                if target.is_dir() and item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True)
                else:
                    shutil.move(str(item), target)
        shutil.rmtree(data)


def install(bundle: Path, site: Path) -> Path:
    manifest_path = bundle / "manifest.json"
    if not manifest_path.exists():
        raise SystemExit(f"install: {manifest_path} missing; build the bundle with "
                         "`benchmarks/gpu_check.sh prepare` on a networked machine and carry it here")
    manifest = json.loads(manifest_path.read_text())
    want = sys.version_info[:2]
    if tuple(int(x) for x in manifest["python_version"].split(".")) != want:
        here = f"{want[0]}.{want[1]}"
        raise SystemExit(f"install: {bundle} was prepared for Python {manifest['python_version']} but this is {here} "
                         f"({sys.executable}); rerun prepare with --python-version {here}")
    # Named site-packages on purpose: dill (datasets' fingerprints, under TRL) pickles a module by value
    # unless its path contains "site-packages", and pyarrow's module does not pickle by value.
    if site.name != "site-packages":
        raise SystemExit(f"install: {site} must be a folder named site-packages "
                         "(dill pickles modules elsewhere by value)")
    stamp = site / ".installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == manifest["wheels"]:
        return site
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name in manifest["wheels"]:
        unpack(bundle / "wheels" / name, site)
    stamp.write_text(json.dumps(manifest["wheels"]))
    return site


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: install.py BUNDLE_DIR SITE_PACKAGES_DIR")
    print(install(Path(sys.argv[1]), Path(sys.argv[2])))
