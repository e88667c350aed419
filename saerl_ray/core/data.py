"""Where the data is: the quickstart sets that ship with the repository (data/, gzipped JSONL), anywhere else
through `SAERL_DATA`, and benchmark files found by name in a folder (plain or gzipped).

    path: ${SAERL_DATA}/gsm8k_train.jsonl.gz     # in a run config: the repo's data/ unless SAERL_DATA is set
    SAERL_DATA=/mnt/datasets saerl-ray run -c configs/gsm8k_math500.yaml

Config fields that name data (ingest.inputs[].path, eval.data_dir, validation.data_dir, train.heldout_file)
keep `${SAERL_DATA}` as written (so defaults.yaml and fingerprints do not depend on the machine); the code
that reads them expands it. No other string is touched (prompts hold `$...$` maths).
"""

from __future__ import annotations

import os
from pathlib import Path

from saerl_ray.core import storage

DATA_ENV = "SAERL_DATA"
TOKEN = "${SAERL_DATA}"
# data/ beside the package in a checkout; a wheel install has none, and then SAERL_DATA must say where.
REPO_DATA = Path(__file__).resolve().parents[2] / "data"
# A benchmark named `math500` is math500.jsonl or, as shipped, math500.jsonl.gz.
SUFFIXES = (".jsonl", ".jsonl.gz")


def data_dir() -> str:
    """SAERL_DATA, else the repository's data/ folder."""
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    if REPO_DATA.is_dir():
        return str(REPO_DATA)
    raise FileNotFoundError(f"no data folder: {REPO_DATA} does not exist (an installed wheel ships none); "
                            f"set {DATA_ENV} to a folder holding the data files")


def expand(path: str | None) -> str | None:
    """`path` with ${SAERL_DATA} replaced by data_dir() (None stays None)."""
    if path is None or TOKEN not in path:
        return path
    return path.replace(TOKEN, data_dir().rstrip("/"))


def find(folder: str | Path, stem: str) -> str | None:
    """The file for data set `stem` in `folder` (<stem>.jsonl, else <stem>.jsonl.gz), or None."""
    for suffix in SUFFIXES:
        path = storage.join(expand(str(folder)), stem + suffix)
        if storage.exists(path):
            return path
    return None


def stem_of(path: str | Path) -> str:
    """`math500` for .../math500.jsonl and .../math500.jsonl.gz."""
    name = Path(str(path)).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name


def rows(stem: str, folder: str | Path | None = None) -> list[dict]:
    """Every row of data set `stem` (in `folder`, default data_dir()), in file order."""
    folder = str(folder) if folder is not None else data_dir()
    path = find(folder, stem)
    if path is None:
        raise FileNotFoundError(f"{folder} holds no {stem}.jsonl or {stem}.jsonl.gz (set {DATA_ENV})")
    return [row for _, row in storage.iter_jsonl(path)]
