"""`benchmarks/difficulty_cost.py`: the cost arithmetic, the statistics, and the whole record on a tiny
random model (the label stage's real sampler) with stand-in SAE codes."""

import importlib.util
import json
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saerl_ray.core.config import load_config
from saerl_ray.core.reward import prompt_style
from saerl_ray.stages.label import HFSampler

spec = importlib.util.spec_from_file_location(
    "difficulty_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "difficulty_cost.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_route_costs_add_the_labelled_subset_and_the_fit_to_the_sae_route():
    c = bench.route_costs(features_s=0.1, rollout_s=10.0, fit_s=5.0, predict_s=0.001, n_labelled=100, n_prompts=1000)
    assert c["sae_route_s"] == pytest.approx(1000 * 0.1 + 100 * 10.0 + 5.0 + 1000 * 0.001)
    assert c["rollout_route_s"] == pytest.approx(10_000.0)
    assert c["ratio_rollout_over_sae"] == pytest.approx(10_000.0 / 1106.0)
    # Linear in the pool: the fixed part (labelled subset, fit) is paid once, so the ratio grows with N.
    big = bench.route_costs(0.1, 10.0, 5.0, 0.001, 100, 103_000)
    assert big["rollout_route_s"] == pytest.approx(103 * c["rollout_route_s"])
    assert big["ratio_rollout_over_sae"] > c["ratio_rollout_over_sae"]
    # A pool smaller than the labelled subset labels only what it has.
    small = bench.route_costs(0.1, 10.0, 5.0, 0.001, 100, 10)
    assert small["n_labelled"] == 10 and small["ratio_rollout_over_sae"] < 1


def test_mix_rate_weights_each_source_by_its_share_of_the_pool():
    rate = bench.mix_rate({"a": 10.0, "b": 40.0}, {"a": 5, "b": 10}, {"a": 3, "b": 1})
    assert rate == pytest.approx(0.75 * 2.0 + 0.25 * 4.0)


def test_interleave_spreads_the_second_list_between_the_first_keeping_both_orders():
    assert bench.interleave([1, 2], list("abcd")) == [1, "a", "b", 2, "c", "d"]
    assert bench.interleave([1, 2, 3], ["a"]) == [1, 2, "a", 3]
    assert bench.interleave([], ["a"]) == ["a"]


def test_spearman_ci_brackets_the_estimate_and_is_none_for_a_constant_side():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=60)
    r = bench.spearman_ci(ref + rng.normal(scale=0.5, size=60), ref, n_boot=300)
    assert 0.5 < r["spearman"] < 1 and r["ci95"][0] <= r["spearman"] <= r["ci95"][1] and r["n"] == 60
    assert bench.spearman_ci(np.zeros(60), ref)["spearman"] is None
    d = bench.paired_diff_ci(ref, np.zeros(60), ref, n_boot=300)
    assert d["diff"] == pytest.approx(1.0) and d["ci95"][0] <= 1.0 <= d["ci95"][1]


def _fake_codes(texts, d=48):
    """Deterministic stand-in SAE codes: a few positive latents per text, seeded by the text."""
    rows = []
    for t in texts:
        rng = np.random.default_rng(zlib.crc32(t.encode()))
        v = np.zeros(d, np.float32)
        v[rng.choice(d, 12, replace=False)] = rng.exponential(size=12) + len(t) / 100
        rows.append(v)
    return sp.csr_matrix(np.asarray(rows))


def test_benchmark_record_has_its_fields_and_ratios_from_the_measured_seconds(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(1)
    n_math, n_gsm = 40, 30
    prompts = pd.DataFrame({
        "id": [f"m{i}" for i in range(n_math)] + [f"g{i}" for i in range(n_gsm)],
        "prompt": [f"Compute {i} {'x' * int(rng.integers(1, 40))}" for i in range(n_math + n_gsm)],
        "answer": [str(i) for i in range(n_math + n_gsm)],
        "source": ["math500"] * n_math + ["gsm8k"] * n_gsm,
        "difficulty": list(rng.integers(1, 6, n_math).astype(float)) + [np.nan] * n_gsm,
    })
    prompts["n_chars"] = prompts["prompt"].str.len()
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "label.k": 2, "label.max_new_tokens": 3,
                             "label.batch_size": 3, "label.n_prompts": 24})
    sampler = HFSampler(str(tiny_model_dir), cfg.model.dtype, False, prompt_style(cfg.prompt))
    by_id = dict(zip(prompts["id"], prompts["prompt"]))
    args = Namespace(n_cost_gsm8k=4, n_cost_math=5, n_features=20, feature_block=8, n_labelled=None,
                     max_new_tokens=None, max_operand=20, task_labelled=24, task_heldout=6, task_new_tokens=3,
                     task_batch=6, ref_k=3, seed=0, n_boot=200)
    call = dict(prompts=prompts, cfg=cfg, args=args, out=tmp_path, featurize=_fake_codes,
                codes_of=lambda ids: _fake_codes([by_id[i] for i in ids]))
    res = bench.benchmark(sampler=sampler, **call)
    json.dumps(res)  # one JSON line: every value serialisable

    s = res["settings"]
    assert (s["k"], s["max_new_tokens"], s["n_labelled"], s["main_run_prompts"]) == (2, 3, 24, 70)
    assert s["cost_sample"] == {"rollout_gsm8k": 4, "rollout_math500": 5, "features": 20}
    # The per-prompt seconds are the cost phase's measured seconds (mix-weighted), and the totals follow.
    cost = json.loads((tmp_path / "cache" / "cost.json").read_text())["value"]
    lab = cost["label"]
    rollout_s = (lab["gsm8k"]["seconds"] / 4 * n_gsm + lab["math500"]["seconds"] / 5 * n_math) / 70
    features_s = cost["features"]["seconds"] / 20
    per = res["seconds_per_prompt"]
    assert per["rollout"] == pytest.approx(rollout_s) and per["features"] == pytest.approx(features_s)
    # Totals from the record's own per-prompt seconds (the independent sums above differ in the last bit).
    assert res["main_run"] == bench.route_costs(per["features"], per["rollout"], res["fit_s"], per["predict"], 24, 70)
    assert res["ratio_main_run"] == pytest.approx(rollout_s * 70 / res["main_run"]["sae_route_s"])
    assert res["extrapolated_103k"]["prompts"] == 103_000
    assert res["extrapolated_103k"]["rollout_route_s"] == pytest.approx(rollout_s * 103_000)
    a, b = res["ordering_math500"], res["ordering_calculations"]
    assert (a["n_labelled_levels"], a["n_heldout"], a["n_rolled_out"]) == (24, 16, 5)
    assert a["sae_proxy_all_heldout"]["n"] == 16 and a["rollout_rolled_out"]["n"] == 5
    assert (b["n_labelled"], b["n_heldout"]) == (24, 6)
    for part in ("sae_proxy", "rollout", "length", "sae_minus_rollout"):
        assert part in b
    assert res["cached"] == []

    # A rerun with the same settings reuses the cached rollouts: no sampler call, the same cost numbers.
    def no_sampling(*_):
        raise AssertionError("sampled again")

    again = bench.benchmark(sampler=no_sampling, **call)
    assert again["cached"] == ["cost", "task"] and again["seconds_per_prompt"]["rollout"] == per["rollout"]
