import json

import numpy as np
import pytest
import scipy.sparse as sp

from saerl_ray.core.config import DifficultyConfig
from saerl_ray.validation import validate
from saerl_ray.validation.validate import (
    difficulty_spearman,
    quality_auroc,
    sae_design,
    topic_nmi,
)
from saerl_ray.validation.validate_difficulty import (
    auroc,
    difficulty_oof,
    pairwise_auroc,
    seeds_summary,
)

SMALL_GRID = {"signals.difficulty.alphas": [1e-2, 1e-1], "signals.difficulty.l1_ratios": [0.5]}


def test_difficulty_protocol_separates_signal_from_noise():
    """validate's difficulty row is the shipped estimator, out of fold; Gaussian baselines skip the log1p."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    y = np.clip(np.round(X[:, 0] + 0.5 * X[:, 1] + 3), 1, 5)
    dc = DifficultyConfig(alphas=[1e-2, 1e-1], l1_ratios=[0.5])
    assert difficulty_spearman(X, y, dc, transform="none") > 0.7
    assert abs(difficulty_spearman(rng.normal(size=(300, 20)), y, dc, transform="none") or 0.0) < 0.25
    # log1p on signed features throws the negative half away: the transform matters.
    assert difficulty_spearman(X, y, dc, transform="log1p") < difficulty_spearman(X, y, dc, transform="none")


def test_difficulty_oof_never_scores_a_row_with_a_model_that_saw_it():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(100, 5))
    y = X[:, 0] + rng.normal(scale=0.1, size=100)
    y_leak = y.copy()
    y_leak[::10] = 1000.0  # outliers: if a row's own label were in its model, its prediction would jump
    dc = DifficultyConfig(alphas=[1e-3], l1_ratios=[0.5], holdout=0.0)
    pred = difficulty_oof(X, y_leak, dc, transform="none")
    assert pred.shape == (100,) and np.max(pred[::10]) < 500


def test_auroc_hand_cases():
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5  # ties count 1/2
    assert auroc([1, 3], [2]) == 0.5  # one of the two pairs ordered
    assert auroc([2, 2], [1, 2]) == 0.75  # (1 + 1/2 + 1 + 1/2) / 4


def test_pairwise_auroc_compares_tiers_not_members_of_a_tier():
    scores = {"a": np.array([0.0, 1.0]), "b": np.array([2.0, 3.0]), "c": np.array([0.5]), "d": np.array([5.0])}
    r = pairwise_auroc(scores, [["a"], ["b"], ["c", "d"]])
    assert r["pairs"] == {"a<b": 1.0, "a<c": 0.5, "a<d": 1.0, "b<c": 0.0, "b<d": 1.0}
    assert r["mean"] == pytest.approx(3.5 / 5)
    assert pairwise_auroc(scores, [["a", "b"]]) == {"pairs": {}, "mean": None}


def test_seeds_summary_shape():
    s = seeds_summary({0: 0.5, 1: 0.4, 2: 0.3}, ensemble=0.55, explained_variance={0: 0.7, 1: 0.72, 2: 0.71})
    assert set(s) == {"mean", "min", "std", "per_seed", "ensemble", "explained_variance"}
    assert s["mean"] == pytest.approx(0.4) and s["min"] == pytest.approx(0.3) and s["std"] == pytest.approx(0.1)
    assert s["per_seed"] == {"0": 0.5, "1": 0.4, "2": 0.3} and s["ensemble"] == 0.55
    one = seeds_summary({7: 0.2})
    assert one["std"] == 0.0 and one["min"] == one["mean"] == 0.2 and one["ensemble"] is None
    json.dumps(s)  # goes into results.json as it is


def test_topic_nmi_finds_planted_topics():
    rng = np.random.default_rng(1)
    topics = np.repeat(np.arange(7), 40)
    centers = rng.normal(scale=5, size=(7, 16))
    X = centers[topics] + rng.normal(size=(280, 16))
    assert topic_nmi(X, topics) > 0.8
    assert topic_nmi(rng.normal(size=(280, 16)), topics) < 0.2


def test_quality_protocol_reports_overall_and_held_out_types():
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(120, 8))
    neg = rng.normal(size=(120, 8)) + np.array([3.0] + [0.0] * 7)  # every corruption shifts dim 0
    types = np.array(["a", "b", "c"] * 40)
    q = quality_auroc(pos, neg, types, np.arange(120), C=0.01)
    assert q["overall"] > 0.9 and q["loto"] > 0.9 and set(q["by_type"]) == {"a", "b", "c"}
    assert q["lofo"]["families"] == 3 and q["lofo"]["min"] <= q["lofo"]["mean"] == q["loto"]
    # corruption kinds are grouped into their families: garble and cipher are held out together
    kinds = np.array(["garble", "cipher", "leak"] * 40)
    q = quality_auroc(pos, np.abs(neg), kinds, np.arange(120), C=0.01, combine=("probe", "novelty"))
    assert set(q["by_type"]) == {"char_noise", "answer_leak"} and q["lofo"]["families"] == 2
    assert set(q["parts"]) >= {"probe", "novelty", "combined"}


def test_sae_design_drops_rare_latents():
    X = sp.csr_matrix(np.r_[np.ones((99, 1)) @ np.array([[1.0, 0, 2]]), [[1.0, 5.0, 2]]])
    D = sae_design(X)
    assert D.shape == (100, 2) and np.allclose(D[0], np.log1p([1.0, 2.0]))


def test_validate_seeds_and_benchmark_order_on_a_tiny_run(tmp_path, tiny_config, ray_cluster, require_data):
    """Two SAE seeds and the benchmark-order check on the tiny model, as validate computes them after its
    table (validate.main's JSON carries these keys: tests/test_pipeline_on_cpu.py): the keys, their
    shapes, side dirs that a rerun reuses."""
    require_data("gsm8k_test.jsonl", "amc23.jsonl", "olympiadbench.jsonl", "aime24.jsonl")
    from saerl_ray.core.config import signal_codes
    from saerl_ray.core.featureio import code_columns, read_surprisal
    from saerl_ray.validation.validate_difficulty import difficulty_extras, log_len

    run = tmp_path / "run"
    # features.surprisal on: the run's parts carry it, the difficulty side runs featurise codes only
    cfg = tiny_config(run, **SMALL_GRID, **{"validation.sae_seeds": 2, "validation.ood_max_prompts": 12,
                                            "features.surprisal": True})
    math, X, n_tokens = validate._load(cfg)  # ingest, sae, features of the run
    # validate's dense control: the lens's hook-layer residual, pooled (max) over the pooled tokens
    from saerl_ray.stages.features import dense_texts, run_featurizer

    D = dense_texts(math["prompt"].tolist()[:8], cfg.run_dir, cfg)
    d_model = run_featurizer(cfg.run_dir, cfg).model.config.hidden_size
    assert D.shape == (8, d_model) and np.isfinite(D).all() and D.std(0).max() > 0  # one pooled residual per prompt
    d_cols = code_columns(cfg.run_dir, signal_codes(cfg, "difficulty"))
    y = math["difficulty"].to_numpy(float)
    dc = cfg.signals.difficulty
    oof = {"sae": difficulty_oof(X[:, d_cols], y, dc, n_chars=math["prompt"].str.len().to_numpy(float)), "length": difficulty_oof(log_len(n_tokens), y, dc, transform="none")}
    res = difficulty_extras(cfg, math, y, oof, X, n_tokens, d_cols)
    json.dumps(res)
    seeds = res["difficulty_spearman_seeds"]
    assert set(seeds) == {"mean", "min", "std", "per_seed", "ensemble", "explained_variance"}
    assert list(seeds["per_seed"]) == ["0", "1"] and seeds["per_seed"]["0"] == pytest.approx(
        validate.spearman(oof["sae"], y))
    assert seeds["min"] <= seeds["mean"] and seeds["std"] >= 0 and -1 <= seeds["ensemble"] <= 1
    assert all(isinstance(ev, float) for ev in seeds["explained_variance"].values())  # both SAEs report one
    assert set(res["difficulty_ood_auroc"]) == {"sae", "length"}
    assert all(0 <= v <= 1 for v in res["difficulty_ood_auroc"].values())
    detail = res["difficulty_ood_detail"]
    assert detail["n"] == {"math500": 100, "gsm8k_test": 12, "amc23": 12, "olympiadbench": 12, "aime24": 12}
    assert len(detail["pairs"]["sae"]) == 9 and "gsm8k_test<aime24" in detail["pairs"]["length"]
    assert "olympiadbench<aime24" not in detail["pairs"]["sae"]  # same tier
    # Side dirs are stages: a rerun recomputes nothing (markers untouched) and gives the same numbers.
    side = run / "validate"
    markers = {p: p.read_text() for p in side.rglob("_DONE.json")}
    assert {str(p.relative_to(side)) for p in markers} == {
        "seeds/1/ingest/_DONE.json", "seeds/1/sae/_DONE.json", "seeds/1/math500/_DONE.json",
        "ood/ingest/_DONE.json", "ood/sae/_DONE.json", "ood/features/_DONE.json"}
    for stage in ("ingest", "sae"):  # mirrored with the run's own fingerprint: what comes after sees the same input
        mirror = "seeds/1/ingest" if stage == "ingest" else "ood/sae"
        assert json.loads((side / mirror / "_DONE.json").read_text())["fingerprint"] == \
            json.loads((run / stage / "_DONE.json").read_text())["fingerprint"]
    assert difficulty_extras(cfg, math, y, oof, X, n_tokens, d_cols) == res
    assert markers == {p: p.read_text() for p in side.rglob("_DONE.json")}
    own = read_surprisal(sorted(str(p) for p in (run / "features").glob("part-*.parquet")))
    ood = read_surprisal(sorted(str(p) for p in (side / "ood/features").glob("part-*.parquet")))
    assert len(own) >= len(math) and np.isfinite(own).all()  # the pool: MATH-500 and more
    assert len(ood) == 4 * 12 and np.isnan(ood).all()


def test_validate_without_extras(tmp_path, tiny_config):
    """sae_seeds=1 and ood off: the keys are there, with one seed and null."""
    from saerl_ray.validation.validate_difficulty import difficulty_extras

    cfg = tiny_config(tmp_path / "run", **SMALL_GRID, **{"validation.ood": False})
    y = np.arange(100) % 5 + 1.0
    out = difficulty_extras(cfg, None, y, {"sae": y + 0.1, "length": y}, None, None, None)
    assert out["difficulty_spearman_seeds"]["per_seed"] == {"0": pytest.approx(1.0)}
    assert out["difficulty_ood_auroc"] is None and out["difficulty_ood_detail"] is None


def test_pool_residuals_keeps_negative_maxima():
    import torch

    from saerl_ray.stages.features import pool, pool_residuals

    acts = torch.tensor([[[-2.0, 1.0], [-1.0, 3.0], [9.0, 9.0]], [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert pool_residuals(acts, mask, "max").tolist() == [[-1.0, 3.0], [0.0, 0.0]]
    assert pool(acts, mask, "max").tolist() == [[0.0, 3.0], [0.0, 0.0]]  # the codes' pooling clamps
    assert torch.equal(pool_residuals(acts, mask, "mean"), pool(acts, mask, "mean"))


def _held(pred, labels, pos, neg, n):
    """A representation's fixed out-of-fold outputs as validate keeps them: one negative per prompt."""
    rows = np.arange(n)
    fam = {"overall": {"pos_rows": rows, "pos": pos, "neg_rows": rows, "neg": neg}}
    for f in ("a", "b"):  # two held-out families, each half of the negatives
        sel = rows[(rows % 2) == (f == "b")]
        fam[f] = {"pos_rows": rows, "pos": pos, "neg_rows": sel, "neg": neg[sel]}
    return {"difficulty_oof": pred, "topic_labels": labels, "quality_scores": fam}


def test_sae_minus_dense_interval_covers_the_gap_and_zero_for_equals():
    from saerl_ray.validation.validate_dense import dense_inputs, sae_minus_dense

    assert "dense" in validate.REPS  # the table carries the dense control
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(1, 6, n).astype(float)
    topics = rng.integers(0, 4, n)
    good = _held(y + rng.normal(scale=0.5, size=n), topics.copy(), rng.normal(2, 1, n), rng.normal(0, 1, n), n)
    noise = _held(rng.normal(size=n), rng.integers(0, 4, n), rng.normal(size=n), rng.normal(size=n), n)
    good["difficulty_oof_codes_only"] = good["difficulty_oof"]
    r = sae_minus_dense(good, noise, y, topics, np.arange(n), resamples=200)
    rows = {"difficulty_spearman", "difficulty_spearman_codes_only", "topic_nmi", "quality_auroc",
            "quality_auroc_lofo_mean", "quality_auroc_lofo_min"}
    assert set(r) == rows | {"bootstrap"} and r["bootstrap"]["resamples"] == 200
    for k in rows:
        d = r[k]
        assert d["diff"] == pytest.approx(d["sae"] - d["dense"]) and 0 < d["lo"] <= d["hi"], k
    assert r["topic_nmi"]["sae"] == pytest.approx(1.0) and r["quality_auroc"]["sae"] > 0.85
    same = sae_minus_dense(noise, noise, y, topics, np.arange(n), resamples=50)
    assert all(same[k]["lo"] == same[k]["hi"] == same[k]["diff"] == 0 for k in set(same) - {"bootstrap"})
    json.dumps(r)
    # the probe's dense input: standardised, split into non-negative parts that add back to it
    Z, P, N = dense_inputs(rng.normal(size=(30, 4)), rng.normal(size=(60, 4)))
    assert Z.shape == (30, 4) and P.shape == (30, 8) and N.shape == (60, 8) and (P >= 0).all()
    assert np.allclose(P[:, :4] - P[:, 4:], Z)
