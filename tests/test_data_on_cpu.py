"""The data that ships with the repo (data/: GSM8K train/test and MATH-500, gzipped), SAERL_DATA, and
hub paths that fail with one line where there is no network."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from saerl_ray.core import data
from saerl_ray.core.config import load_config
from saerl_ray.stages.evaluate import load_benchmark
from saerl_ray.stages.ingest import IngestError, ingest, input_path

REPO = Path(__file__).resolve().parents[1]
# data/README.md's row counts (and the sources' own): a truncated or re-encoded file fails here.
SHIPPED = {"gsm8k_train": 7473, "gsm8k_test": 1319, "math500": 500}


@pytest.mark.parametrize("stem, n", sorted(SHIPPED.items()))
def test_shipped_files_are_whole_and_licensed(stem, n):
    rows = [json.loads(x) for x in gzip.decompress((REPO / "data" / f"{stem}.jsonl.gz").read_bytes()).splitlines()]
    assert len(rows) == n and all(isinstance(r, dict) for r in rows)
    readme = (REPO / "data" / "README.md").read_text()
    assert f"{stem}.jsonl.gz" in readme and "MIT" in readme


def test_the_main_config_reads_the_shipped_data_and_saerl_data_moves_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SAERL_DATA", raising=False)
    cfg = load_config(REPO / "configs" / "gsm8k_math500.yaml")
    paths = [Path(input_path(i)) for i in cfg.ingest.inputs]
    assert paths == [REPO / "data" / "gsm8k_train.jsonl.gz", REPO / "data" / "math500.jsonl.gz"]
    assert all(p.exists() for p in paths) and data.expand(cfg.eval.data_dir) == str(REPO / "data")
    assert cfg.validation.data_dir == "${SAERL_DATA}"  # as written: defaults.yaml is the same on every machine
    monkeypatch.setenv("SAERL_DATA", str(tmp_path))
    assert input_path(cfg.ingest.inputs[0]) == f"{tmp_path}/gsm8k_train.jsonl.gz"
    assert data.find(cfg.validation.data_dir, "math500") is None
    (tmp_path / "math500.jsonl.gz").write_bytes((REPO / "data" / "math500.jsonl.gz").read_bytes())
    assert data.find(cfg.validation.data_dir, "math500") == f"{tmp_path}/math500.jsonl.gz"


def test_no_data_folder_is_an_error_naming_the_input(monkeypatch, tmp_path):
    monkeypatch.delenv("SAERL_DATA", raising=False)
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "absent")
    cfg = load_config(None, {"ingest.inputs": [{"path": "${SAERL_DATA}/math500.jsonl.gz", "preset": "math"}]})
    with pytest.raises(IngestError, match=r"^ingest input \$\{SAERL_DATA\}/math500.jsonl.gz: .*set SAERL_DATA"):
        ingest(cfg.ingest.inputs)


def test_gzipped_inputs_ingest_like_plain_ones(tmp_path):
    """A .jsonl.gz file, and a folder holding one, give the same rows as the plain file, sourced by stem."""
    gz = REPO / "data" / "math500.jsonl.gz"
    plain = tmp_path / "math500.jsonl"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "math500.jsonl.gz").write_bytes(gz.read_bytes())
    from saerl_ray.core.config import InputSpec

    got = {name: ingest([InputSpec(path=str(p), preset="math", limit=40)])[0]
           for name, p in {"plain": plain, "gz": gz, "folder": folder}.items()}
    assert len(got["plain"]) == 40
    assert [r["id"] for r in got["gz"]] == [r["id"] for r in got["plain"]] == [r["id"] for r in got["folder"]]
    assert {r["source"] for r in got["gz"]} == {"math500"} == {r["source"] for r in got["plain"]}


def test_benchmarks_are_found_plain_or_gzipped(tmp_path):
    rows = load_benchmark(REPO / "data", "gsm8k", limit=5)
    assert len(rows) == 5 and all(r["answer"] for r in rows)
    assert data.find(tmp_path, "gsm8k_test") is None
    (tmp_path / "gsm8k_test.jsonl").write_bytes(gzip.decompress((REPO / "data" / "gsm8k_test.jsonl.gz").read_bytes()))
    assert data.find(tmp_path, "gsm8k_test") == str(tmp_path / "gsm8k_test.jsonl")
    assert load_benchmark(tmp_path, "gsm8k", limit=5) == rows


def test_a_hub_path_offline_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from saerl_ray.core.config import InputSpec

    with pytest.raises(IngestError) as e:
        ingest([InputSpec(path="hf://datasets/zwhe99/DeepMath-103K/data", preset="deepmath")])
    msg = str(e.value)
    assert "\n" not in msg and "hf://datasets/zwhe99/DeepMath-103K/data" in msg and "HF_HUB_OFFLINE" in msg


def test_heldout_file_takes_saerl_data(tmp_path, monkeypatch):
    from saerl_ray.trainers.common import read_heldout

    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 5?", "answer": "8"}]
    (tmp_path / "held.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    monkeypatch.setenv("SAERL_DATA", str(tmp_path))
    assert read_heldout("${SAERL_DATA}/held.jsonl.gz") == rows
