"""Difficulty proxy (saerl_ray.signal_models.difficulty): CV as Ray tasks, signal vs a shuffled-label control, JSON
round trip, label sources, the no-label fallback."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saerl_ray.core.config import DifficultyConfig
from saerl_ray.signal_models.difficulty import (
    cross_validate,
    design,
    fit_difficulty,
    fit_one,
    predict,
    predict_from_json,
    run_difficulty,
    select_columns,
)

GRID = dict(estimator="elasticnet", alphas=[1e-3, 1e-2, 1e-1], l1_ratios=[0.2, 0.8])


def synthetic_codes(n=400, d=120, k=12, seed=0):
    """Sparse non-negative top-k-like codes; difficulty is linear in (log1p of) latents 0, 1, 2, which
    are active in every row (common latents), the other k-3 are random."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n), k)
    cols = np.concatenate([np.r_[0, 1, 2, 3 + rng.choice(d - 3, k - 3, replace=False)] for _ in range(n)])
    vals = rng.exponential(1.0, n * k).astype(np.float32)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n, d))
    L = np.log1p(X[:, :3].toarray())
    y = 2.0 * L[:, 0] - 1.5 * L[:, 1] + 1.0 * L[:, 2] + rng.normal(0, 0.2, n)
    return X, y


def test_cv_on_ray_beats_shuffled_label_control(ray_cluster):
    X, y = synthetic_codes()
    _, real = fit_difficulty(X, y, folds=4, seed=0, use_ray=True, **GRID)
    shuffled = np.random.default_rng(1).permutation(y)
    _, control = fit_difficulty(X, shuffled, folds=4, seed=0, use_ray=True, **GRID)
    assert real["tasks"] == 4 * 6  # one Ray task per (fold, alpha, l1_ratio)
    assert real["holdout"]["spearman"] > 0.7 and real["cv"]["spearman"] > 0.7
    assert (control["holdout"]["spearman"] or 0.0) < 0.3
    assert real["holdout"]["spearman"] - (control["holdout"]["spearman"] or 0.0) > 0.5


def test_ray_and_in_process_cv_agree(ray_cluster):
    X, y = synthetic_codes(n=150)
    D = design(X, select_columns(X, 0.01, 4096)).toarray()
    grid = {k: v for k, v in GRID.items() if k != "estimator"}
    a = cross_validate(D, y, folds=3, seed=0, use_ray=True, **grid)
    b = cross_validate(D, y, folds=3, seed=0, use_ray=False, **grid)
    assert (a["alpha"], a["l1_ratio"]) == (b["alpha"], b["l1_ratio"])
    assert a["cv_mse"] == pytest.approx(b["cv_mse"])


def test_json_round_trip_gives_sklearns_predictions(tmp_path):
    X, y = synthetic_codes(n=200)
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(200)], "source": "s", "difficulty": y})
    cfg = DifficultyConfig(n_labelled=150, folds=3, length_covariate=False, **GRID)
    pred, metrics = run_difficulty(prompts, X, np.ones(200), cfg, seed=0, out_path=tmp_path / "d.json", use_ray=False)
    model = json.loads((tmp_path / "d.json").read_text())  # plain JSON, no pickle
    np.testing.assert_allclose(predict_from_json(tmp_path / "d.json", X), pred, rtol=1e-5, atol=1e-5)
    # The folded sparse prediction equals sklearn's own pipeline refit on the same labelled rows.
    train = np.sort(np.random.default_rng(0).choice(200, 150, replace=False))
    cols = np.asarray(model["columns"])
    pipe = fit_one(design(X[train], cols).toarray(), y[train], np.arange(150), model["alpha"], model["l1_ratio"], 0)
    np.testing.assert_allclose(pipe.predict(design(X, cols).toarray()), pred, rtol=1e-4, atol=1e-4)
    assert metrics["n_labelled"] == 150 and not metrics["fallback"]


def test_ridge_default_beats_control_and_round_trips_its_loo_choice(tmp_path):
    """The default estimator: ridge, alpha by leave-one-out (no Ray tasks); real labels beat shuffled ones,
    the chosen alpha is the grid point with the lowest leave-one-out MSE, and the JSON model predicts what
    sklearn's refit with that alpha predicts."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = synthetic_codes(n=300)
    alphas = [0.1, 10.0, 1e3, 1e5]
    model, real = fit_difficulty(X, y, ridge_alphas=alphas, seed=0, use_ray=False)
    _, control = fit_difficulty(X, np.random.default_rng(1).permutation(y), ridge_alphas=alphas, seed=0, use_ray=False)
    assert real["estimator"] == model["estimator"] == "ridge" and real["tasks"] == 0
    assert real["holdout"]["spearman"] > 0.7 and (control["holdout"]["spearman"] or 0.0) < 0.3
    assert min(real["grid_mse"].values()) == pytest.approx(real["cv_mse"])  # the alpha with the lowest LOO MSE
    cols = np.asarray(model["columns"])
    D = design(X, cols).toarray()
    # The shipped alpha is leave-one-out's choice on every labelled row, not only the non-holdout ones.
    from sklearn.linear_model import RidgeCV
    assert model["alpha"] == make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(D, y)[-1].alpha_
    pipe = make_pipeline(StandardScaler(), Ridge(alpha=model["alpha"])).fit(D, y)
    (tmp_path / "d.json").write_text(json.dumps(model))
    np.testing.assert_allclose(predict_from_json(tmp_path / "d.json", X), pipe.predict(D), rtol=1e-4, atol=1e-4)
    # the reported LOO MSE is a real leave-one-out: sklearn refit without each row, on the same scaled rows
    Z = StandardScaler().fit_transform(design(X[:60], select_columns(X[:60], 0.0, 4096)).toarray())
    loo = cross_val_predict(Ridge(alpha=10.0), Z, y[:60], cv=LeaveOneOut())
    _, small = fit_difficulty(X[:60], y[:60], ridge_alphas=[10.0], holdout=0.0, use_ray=False, min_support=0.0)
    assert small["cv_mse"] == pytest.approx(float(((loo - y[:60]) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fit_difficulty(X, y, estimator="lasso")


def test_pass_rate_file_labels_and_ood(tmp_path):
    X, y = synthetic_codes(n=240)
    ids = [f"p{i}" for i in range(240)]
    rates = pd.DataFrame({"id": ids[:200], "pass_rate": 1 / (1 + np.exp(y[:200]))})  # hard = low pass rate
    rates.to_json(tmp_path / "rates.jsonl", orient="records", lines=True)
    src = np.where(np.arange(240) < 160, "a", "b")
    prompts = pd.DataFrame({"id": ids, "source": src, "difficulty": np.nan})
    cfg = DifficultyConfig(label_file=str(tmp_path / "rates.jsonl"), n_labelled=None, folds=3, ood_source="b",
                           length_covariate=False, **GRID)
    pred, m = run_difficulty(prompts, X, np.ones(240), cfg, seed=0, out_path=tmp_path / "d.json", use_ray=False)
    assert m["n_labelled"] == 160  # source b held out of training
    assert m["ood"]["n"] == 40 and m["ood"]["spearman"] > 0.6  # labelled b rows: 160..199
    assert np.corrcoef(pred, y)[0, 1] > 0.7  # difficulty = 1 - pass rate, so it tracks y


def test_bad_pass_rate_file_names_the_row(tmp_path):
    prompts = pd.DataFrame({"id": ["a", "b"], "source": "s", "difficulty": np.nan})
    (tmp_path / "r.jsonl").write_text('{"id": "a", "pass_rate": 0.5}\n{"id": "b", "pass_rate": 1.7}\n')
    cfg = DifficultyConfig(label_file=str(tmp_path / "r.jsonl"))
    with pytest.raises(ValueError, match=r"r.jsonl row 1: pass_rate"):
        run_difficulty(prompts, sp.csr_matrix((2, 4)), np.ones(2), cfg, 0, tmp_path / "d.json", use_ray=False)
    (tmp_path / "r.jsonl").write_text('{"id": "zzz", "pass_rate": 0.5}\n')
    with pytest.raises(ValueError, match="'zzz' is not in ingest/prompts"):
        run_difficulty(prompts, sp.csr_matrix((2, 4)), np.ones(2), cfg, 0, tmp_path / "d.json", use_ray=False)


def test_no_labels_falls_back_to_length_rank_loudly(tmp_path, capsys):
    n_tokens = np.array([30, 10, 20, 40])
    prompts = pd.DataFrame({"id": list("abcd"), "source": "s", "difficulty": np.nan})
    pred, m = run_difficulty(prompts, sp.csr_matrix((4, 8)), n_tokens, DifficultyConfig(), 0, tmp_path / "d.json",
                             use_ray=False)
    np.testing.assert_allclose(pred, [2 / 3, 0, 1 / 3, 1])
    assert m["fallback"] and "WARNING" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fallback"):
        predict_from_json(tmp_path / "d.json", sp.csr_matrix((4, 8)))


def test_a_fit_that_keeps_no_feature_falls_back_to_length_rank(tmp_path, capsys):
    X, y = synthetic_codes(n=120)
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(120)], "source": "s", "difficulty": y})
    n_tokens = np.arange(120)[::-1]
    # A penalty so large that every coefficient is zero: the fit predicts one constant, i.e. no order.
    cfg = DifficultyConfig(folds=3, estimator="elasticnet", alphas=[1e3], l1_ratios=[0.9], length_covariate=False)
    pred, m = run_difficulty(prompts, X, n_tokens, cfg, seed=0, out_path=tmp_path / "d.json", use_ray=False)
    assert m["fallback"] and "kept no feature" in m["reason"]
    np.testing.assert_allclose(pred, (n_tokens - n_tokens.min()) / (len(n_tokens) - 1))
    assert "NO USABLE FIT" in capsys.readouterr().out
    # With a length term the same fit still orders prompts (by length): no fallback.
    prompts["n_chars"] = np.arange(120) + 50
    pred, m = run_difficulty(prompts, X, n_tokens, cfg.model_copy(update={"length_covariate": True}), seed=0,
                             out_path=tmp_path / "d.json", use_ray=False)
    assert not m["fallback"] and m["nonzero_coef"] == 0 and len(np.unique(pred)) == 120


def test_length_term_is_fit_first_and_the_codes_explain_what_it_leaves(tmp_path):
    """y = length part + codes part, codes independent of length: the model with the length term recovers
    the length slope, its JSON needs the lengths to predict, and it ranks held-out rows better than either
    the codes alone or length alone."""
    from scipy.stats import spearmanr

    X, codes_part = synthetic_codes(n=400)
    rng = np.random.default_rng(3)
    n_chars = np.exp(rng.uniform(np.log(40), np.log(2000), 400))
    y = 1.5 * np.log(n_chars) + codes_part
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(400)], "source": "s", "difficulty": y, "n_chars": n_chars})
    train, test = np.arange(300), np.arange(300, 400)
    cfg = DifficultyConfig(n_labelled=None)
    model, metrics = fit_difficulty(X[train], y[train], n_chars=n_chars[train], use_ray=False)
    assert metrics["length_covariate"] and model["length"]["coef"] == pytest.approx(1.5, abs=0.3)
    # The reported CV is of the whole prediction (length term added back), not of the codes' residual fit:
    # where length explains everything and the codes nothing, it is still high.
    y_len = 3.0 * np.log(n_chars[train]) + rng.normal(0, 0.5, len(train))
    _, len_metrics = fit_difficulty(X[train], y_len, n_chars=n_chars[train], use_ray=False)
    assert len_metrics["cv"]["spearman"] > 0.8
    (tmp_path / "m.json").write_text(json.dumps(model))
    with pytest.raises(ValueError, match="pass the prompts' n_chars"):
        predict_from_json(tmp_path / "m.json", X[test])
    both = spearmanr(predict_from_json(tmp_path / "m.json", X[test], n_chars[test]), y[test]).statistic
    codes_model, codes_metrics = fit_difficulty(X[train], y[train], use_ray=False)
    assert codes_model["length"] is None and not codes_metrics["length_covariate"]
    codes_only = spearmanr(predict(codes_model, X[test]), y[test]).statistic
    length_only = spearmanr(n_chars[test], y[test]).statistic
    assert both > max(codes_only, length_only) + 0.05
    # The stage body reads the lengths from prompts.n_chars; without them it says what is missing.
    pred, m = run_difficulty(prompts, X, np.ones(400), cfg, seed=0, out_path=tmp_path / "d.json", use_ray=False)
    np.testing.assert_allclose(predict_from_json(tmp_path / "d.json", X, n_chars), pred, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="length_covariate needs the prompts' n_chars"):
        run_difficulty(prompts.drop(columns="n_chars"), X, np.ones(400), cfg, 0, tmp_path / "d.json", use_ray=False)
