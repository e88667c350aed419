"""End to end on a real local Ray cluster: raw real prompts -> report, with a tiny random model."""

import json

import pyarrow.parquet as pq
import pytest

from saerl_ray.pipeline import run_pipeline
from saerl_ray.signal_models.corruptions import families_of
from saerl_ray.validation import validate


def test_pipeline_end_to_end(pipeline_run_dir, tiny_config, ray_cluster):
    run = pipeline_run_dir  # run_pipeline(tiny_config(run)) ran in the session fixture
    cfg = tiny_config(run)
    prompts = pq.read_table(run / "ingest/prompts.parquet")
    sig = pq.read_table(run / "signals/assignments.parquet")
    plan = pq.read_table(run / "plan/plan.parquet").to_pandas()
    assert set(sig.column("id").to_pylist()) == set(prompts.column("id").to_pylist())
    kept = {i for i, k in zip(sig.column("id").to_pylist(), sig.column("keep").to_pylist()) if k}
    assert sorted(plan["id"]) == sorted(kept)  # every kept prompt exactly once
    assert list(plan["position"]) == list(range(len(plan)))
    page = (run / "report/report.html").read_text()
    assert page.count("data:image/png;base64") >= 5 and "Curriculum" in page
    # A second run with the same config recomputes nothing.
    markers = {s: (run / s / "_DONE.json").read_text() for s in ("ingest", "sae", "features", "signals", "plan")}
    run_pipeline(cfg)
    assert markers == {s: (run / s / "_DONE.json").read_text() for s in markers}
    # Changing the plan's mixing recomputes the plan only.
    cfg2 = tiny_config(run, **{"plan.mixing_ratio": 0.25})
    run_pipeline(cfg2)
    assert (run / "plan/_DONE.json").read_text() != markers["plan"]
    assert (run / "features/_DONE.json").read_text() == markers["features"]
    plan_summary = json.loads((run / "plan/summary.json").read_text())
    assert plan_summary["mixing_ratio"] == 0.25 and plan_summary["planned"] == len(kept)


def test_validate_json_is_the_only_stdout(tmp_path, tiny_config, ray_cluster, capsys, require_data):
    require_data("gsm8k_test.jsonl", "amc23.jsonl", "olympiadbench.jsonl", "aime24.jsonl")  # validate's default benchmark-order tiers
    cfg = tiny_config(tmp_path / "run")
    assert validate.main(cfg, as_json=True) == 0  # runs ingest/sae/features itself
    out, err = capsys.readouterr()
    res = json.loads(out)  # stage progress went to stderr, not into the JSON
    assert "[saerl-ray] features" in err
    for metric in validate.METRICS:
        assert set(res[metric]) == set(validate.REPS)
    for rep in validate.REPS:
        assert -1 <= res["difficulty_spearman"][rep] <= 1 and 0 <= res["topic_nmi"][rep] <= 1
        families = set(families_of(cfg.signals.quality.corruptions))
        assert 0 <= res["quality_auroc"][rep] <= 1 and set(res["quality_auroc_by_type"][rep]) == families
        assert res["quality_auroc_lofo"][rep]["families"] == len(families) >= 12
        assert res["quality_auroc_lofo"][rep]["min"] <= res["quality_auroc_lofo"][rep]["mean"] == res["quality_auroc_loto"][rep]
    assert set(res["quality_auroc_lofo_parts"]) >= {"probe", "novelty", "length", "combined"}
    assert 0 <= res["filter_rate_clean"] <= 1 and res["filter_rate_clean_detail"]["gsm8k_test"]["n"] == 1319
    assert res["filter_rate_clean_detail"]["math500"]["n"] == 100
    assert {"difficulty_spearman", "topic_nmi", "quality_auroc_lofo_min"} <= set(res["sae_minus_dense"])
    gap = res["sae_minus_dense"]["topic_nmi"]
    assert gap["lo"] <= gap["hi"] and gap["diff"] == pytest.approx(
        res["topic_nmi"]["sae"] - res["topic_nmi"]["dense"])
    assert res["n"] == {"prompts": 100, "negatives": 100 * cfg.signals.quality.negatives_per_prompt}
    # The difficulty row over SAE seeds (one here: validation.sae_seeds=1 in the tiny config) and the
    # benchmark-order check (tests/test_validate_on_cpu.py covers both in depth).
    assert res["difficulty_spearman_seeds"]["per_seed"] == {"0": res["difficulty_spearman"]["sae"]}
    assert set(res["difficulty_ood_auroc"]) == {"sae", "length"} and len(res["difficulty_ood_detail"]["pairs"]["sae"]) == 9
    # The quality row over corruption seeds (two here: validation.quality_seeds=2 in the tiny config):
    # seed 0 is the table's; seed 1 has its own negatives, so its own numbers.
    qs = res["quality_auroc_lofo_seeds"]
    assert list(qs["per_seed"]) == ["0", "1"] and qs["per_seed"]["0"] == {
        k: res["quality_auroc_lofo"]["sae"][k] for k in ("mean", "min")}
    assert qs["per_seed"]["1"] != qs["per_seed"]["0"]
    assert qs["mean"] == pytest.approx((qs["per_seed"]["0"]["mean"] + qs["per_seed"]["1"]["mean"]) / 2)
    assert qs["lowest_min"] <= qs["min"] <= qs["mean"] and qs["lowest_mean"] <= qs["mean"]
    assert json.loads((tmp_path / "run/validate/results.json").read_text()) == res


def test_cli_run_with_s3_run_dir_writes_only_to_the_bucket(tmp_path, tiny_config, s3_server):
    """`saerl-ray run --run_dir s3://...` from an empty working dir: every stage lands in the bucket."""
    import os
    import subprocess
    import sys

    import yaml

    from saerl_ray.core import storage

    run_dir = f"s3://saerl-test/cli-run-{os.getpid()}"
    cfg = tiny_config(run_dir).model_dump(mode="json")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **s3_server.env(), "SAERL_CACHE": str(tmp_path / "cache")}
    for name in ("RAY_ADDRESS", "CI", "TQDM_DISABLE"):  # a log file, not a terminal, is what turns the bars off
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "saerl_ray.cli", "run", "-c", str(tmp_path / "cfg" / "run.yaml"),
                          "--ray.num_cpus", "2"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("ingest", "sae", "features", "signals", "plan", "report"):
        assert storage.exists(storage.join(run_dir, stage, "_DONE.json")), stage
    assert list(work.iterdir()) == []  # nothing under the working directory
    log = out.stdout + out.stderr
    assert "\r" not in log and "it/s]" not in log, log[-2000:]  # no redrawn bars in a log file
    assert "Progress will be logged" not in log  # nor Ray Data's progress banner every 10 s
    for stage in ("ingest", "sae", "features", "signals", "plan", "report"):
        assert log.count(f"[saerl-ray] {stage}: done") == 1, stage
    sig = storage.read_parquet(storage.join(run_dir, "signals", "assignments.parquet"))
    plan = storage.read_parquet(storage.join(run_dir, "plan", "plan.parquet"))
    kept = {i for i, k in zip(sig.column("id").to_pylist(), sig.column("keep").to_pylist()) if k}
    assert sorted(plan.column("id").to_pylist()) == sorted(kept)
    assert "data:image/png;base64" in storage.read_text(storage.join(run_dir, "report", "report.html"))
