import pyarrow.parquet as pq
import pytest

import saerl_ray.stages.label as label
from saerl_ray.core.config import load_config
from saerl_ray.pipeline import call_stage


def _cfg(run_dir, model_dir, shared_data, **extra):
    return load_config(None, {
        "run_dir": str(run_dir),
        "model.name": str(model_dir),
        "ingest.inputs": [
            {"path": str(shared_data / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": 30},
            {"path": str(shared_data / "math500.jsonl"), "preset": "math", "split": "test", "limit": 10},
        ],
        "label.n_prompts": 7,
        "label.k": 3,
        "label.batch_size": 3,
        "label.max_new_tokens": 4,
        **extra,
    })


def test_label_writes_pass_rates_for_a_seeded_train_subset(tmp_path, tiny_model_dir, shared_data):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data)
    call_stage("ingest", cfg)
    summary = call_stage("label", cfg)
    prompts = pq.read_table(tmp_path / "run/ingest/prompts.parquet").to_pylist()
    train_ids = {p["id"] for p in prompts if p["split"] == "train"}
    table = pq.read_table(tmp_path / "run/label/pass_rates.parquet")
    assert table.column_names == ["id", "pass_rate", "k", "correct"]
    rows = table.to_pylist()
    assert len(rows) == 7 == summary["rows"] and len({r["id"] for r in rows}) == 7
    assert {r["id"] for r in rows} <= train_ids  # only the configured split
    for r in rows:
        assert r["k"] == 3 and 0 <= r["correct"] <= 3 and r["pass_rate"] == r["correct"] / 3
    assert not (tmp_path / "run/label/chunks").exists()
    # Same seed -> same subset; another seed -> another subset.
    again = label.choose_subset(pq.read_table(tmp_path / "run/ingest/prompts.parquet"), "train", 7, cfg.seed)
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    other = label.choose_subset(pq.read_table(tmp_path / "run/ingest/prompts.parquet"), "train", 7, cfg.seed + 1)
    assert [r["id"] for r in other] != [r["id"] for r in rows]


def test_label_resumes_from_finished_chunks_after_a_crash(tmp_path, tiny_model_dir, shared_data, monkeypatch):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data)
    call_stage("ingest", cfg)
    real_chunk = label.label_chunk
    calls = []

    def crash_on_second(sampler, rows, *args):
        calls.append([r["id"] for r in rows])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_chunk(sampler, rows, *args)

    monkeypatch.setattr(label, "label_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        call_stage("label", cfg)
    assert len(list((tmp_path / "run/label/chunks").glob("*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(label, "label_chunk", lambda *a: (calls.append([r["id"] for r in a[1]]), real_chunk(*a))[1])
    call_stage("label", cfg)
    assert len(calls) == 2  # chunks 1 and 2 only; chunk 0 was kept from the crashed run
    ids = pq.read_table(tmp_path / "run/label/pass_rates.parquet").column("id").to_pylist()
    assert ids[3:] == calls[0] + calls[1] and len(ids) == 7


def test_label_without_gradable_prompts_names_the_split(tmp_path, tiny_model_dir, shared_data):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data, **{"label.split": "validation"})
    call_stage("ingest", cfg)
    with pytest.raises(ValueError, match="no prompts of split 'validation'"):
        call_stage("label", cfg)
