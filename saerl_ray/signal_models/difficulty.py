"""Difficulty: a linear model on SAE codes, fit on a small labelled subset, predicts every prompt's difficulty.

    from saerl_ray.signal_models.difficulty import fit_difficulty, predict_from_json
    model, metrics = fit_difficulty(X_labelled, y, estimator="ridge", ridge_alphas=[1.0, 10.0, 100.0])
    model, metrics = fit_difficulty(X_labelled, y, estimator="elasticnet", alphas=[1e-2], l1_ratios=[0.5], folds=5)
    model, metrics = fit_difficulty(X_labelled, y, n_chars=n_chars_labelled)  # + prompt length, unpenalised
    pred = predict_from_json("runs/x/signals/difficulty.json", X_all, n_chars_all)   # X: CSR (n, d_sae)

Design matrix (shared with the quality probe): the latents active in >= `min_support` of the labelled
rows (at most `max_features`, most frequent first), log1p (pooled activations are heavy-tailed), then
standardised on the training rows. `transform="none"` skips the log1p: the same estimator on features
that may be negative (validate's TF-IDF, random and length baselines go through this code path too).
Estimators: `ridge` (default; the ElasticNet family's l1_ratio = 0 end, its alpha picked by exact
leave-one-out CV in one fit: stable across SAE seeds where the ElasticNet grid was not, docs/decisions.md)
or `elasticnet` (the paper's): every (fold, alpha, l1_ratio) is one Ray task on the design put in the
object store once; the grid point with the lowest out-of-fold MSE wins. Metrics
are reported on a holdout split never used for selection (plus the optimistic CV figure), and
out-of-distribution when a source is held out. Labels: a `prompts` column (MATH level, DeepMath
difficulty) or a pass-rate file (difficulty = 1 - pass_rate). No labels at all: the token-count rank
stands in, flagged as a fallback everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import ElasticNet, RidgeCV
from sklearn.model_selection import KFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from saerl_ray.core import storage
from saerl_ray.core.config import DifficultyConfig

# Below this many labelled rows a 5-fold CV plus holdout is noise: fall back and say so.
MIN_LABELLED = 20


# ---------------------------------------------------------------- design matrix + linear model as JSON
def select_columns(X: sp.csr_matrix, min_support: float, max_features: int) -> np.ndarray:
    """Latents active in enough rows to estimate a weight; rarer ones only add variance."""
    support = np.diff(X.tocsc().indptr)
    cols = np.flatnonzero(support >= max(2, int(np.ceil(min_support * X.shape[0]))))
    if len(cols) > max_features:
        cols = np.sort(cols[np.argsort(-support[cols], kind="stable")[:max_features]])
    if len(cols) == 0:
        raise ValueError(
            f"no SAE latent is active in >= {min_support:.1%} of the {X.shape[0]} labelled rows; "
            "lower signals.*.min_support"
        )
    return cols.astype(np.int64)


TRANSFORMS = ("log1p", "none")


def design(X: sp.csr_matrix, cols: np.ndarray, transform: str = "log1p") -> sp.csr_matrix:
    """log1p of the kept latents (log1p(0) = 0 keeps it sparse); `none`: the kept columns as they are."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown design transform {transform!r} (one of {TRANSFORMS})")
    D = sp.csr_matrix(X)[:, cols].astype(np.float64).tocsr()
    if transform == "log1p":
        D.data = np.log1p(np.maximum(D.data, 0.0))
    return D


def linear_json(cols: np.ndarray, scaler: StandardScaler, coef: np.ndarray, intercept: float,
                transform: str = "log1p") -> dict:
    return {
        "columns": cols.tolist(),
        "transform": transform,
        "scaler_mean": scaler.mean_.tolist(),
        "scaler_scale": scaler.scale_.tolist(),
        "coef": np.asarray(coef, dtype=np.float64).ravel().tolist(),
        "intercept": float(np.ravel(intercept)[0]),
    }


def linear_score(model: dict, X: sp.csr_matrix) -> np.ndarray:
    """w . ((log1p(x) - mean) / scale) + b, computed on the sparse codes without densifying (no log1p
    for a model whose `transform` is `none`)."""
    cols = np.asarray(model["columns"], dtype=np.int64)
    if cols.size and cols.max() >= X.shape[1]:
        raise ValueError(f"model uses latent {cols.max()} but the features have d_sae={X.shape[1]}")
    w = np.asarray(model["coef"]) / np.asarray(model["scaler_scale"])
    b = model["intercept"] - float(np.dot(np.asarray(model["scaler_mean"]), w))
    return np.asarray(design(sp.csr_matrix(X), cols, model.get("transform", "log1p")) @ w).ravel() + b


def log_chars(n_chars: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(n_chars, dtype=float), 1.0))


def fit_length(n_chars: np.ndarray, y: np.ndarray) -> dict:
    """Least squares y ~ a * log(n_chars) + b (the unpenalised first step)."""
    a, b = np.polyfit(log_chars(n_chars), np.asarray(y, float), 1)
    return {"coef": float(a), "intercept": float(b), "of": "log n_chars"}


def length_term(model: dict, n_chars: np.ndarray | None) -> np.ndarray | float:
    """The model's length part for prompts of these lengths (0 for a codes-only model)."""
    term = model.get("length")
    if term is None:
        return 0.0
    if n_chars is None:
        raise ValueError("this difficulty model has a prompt-length term (signals.difficulty.length_covariate): "
                         "pass the prompts' n_chars")
    return term["coef"] * log_chars(n_chars) + term["intercept"]


def predict(model: dict, X: sp.csr_matrix, n_chars: np.ndarray | None = None) -> np.ndarray:
    """Predicted difficulty: the codes' linear score plus the length term (when the model has one)."""
    return linear_score(model, X) + length_term(model, n_chars)


def predict_from_json(path: str | Path, X: sp.csr_matrix, n_chars: np.ndarray | None = None) -> np.ndarray:
    """Reload `signals/difficulty.json` and predict difficulty for CSR codes X (and the prompts' lengths in
    characters, which a model with a length term needs)."""
    model = storage.read_json(path)
    if model.get("fallback"):
        raise ValueError(f"{path} is the no-label fallback (token-count rank); it has no linear model")
    return predict(model, X, n_chars).astype(np.float32)


# ---------------------------------------------------------------- labels
def read_pass_rates(path: str | Path) -> pd.DataFrame:
    """A file of measured pass rates: columns id, pass_rate in [0, 1]."""
    p = str(path)
    if not storage.exists(p):
        raise FileNotFoundError(f"signals.difficulty.label_file {p} does not exist")
    if p.endswith(".parquet"):
        df = storage.read_parquet(p).to_pandas()
    else:
        df = pd.DataFrame([r for _, r in storage.iter_jsonl(p)])
        if "id" in df.columns:
            df["id"] = df["id"].astype(str)
    for col in ("id", "pass_rate"):
        if col not in df.columns:
            raise ValueError(f"{p}: missing column {col!r} (need id, pass_rate)")
    rate = pd.to_numeric(df["pass_rate"], errors="coerce")
    bad = np.flatnonzero(~rate.between(0.0, 1.0).to_numpy())
    if len(bad):
        raise ValueError(f"{p} row {bad[0]}: pass_rate {df['pass_rate'].iloc[bad[0]]!r} is not a number in [0, 1]")
    return pd.DataFrame({"id": df["id"].astype(str), "pass_rate": rate.astype(float)})


def difficulty_labels(prompts: pd.DataFrame, cfg: DifficultyConfig) -> tuple[np.ndarray, str]:
    """Per prompt: a label or NaN, and where the labels came from."""
    if cfg.label_file:
        rates = read_pass_rates(cfg.label_file)
        unknown = ~rates["id"].isin(prompts["id"])
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ValueError(f"{cfg.label_file} row {row}: id {rates['id'].iloc[row]!r} is not in ingest/prompts")
        y = prompts["id"].map(rates.groupby("id")["pass_rate"].mean()).to_numpy(float)
        return 1.0 - y, f"1 - pass_rate from {cfg.label_file}"
    col = cfg.label_column
    if col and col in prompts.columns:
        return pd.to_numeric(prompts[col], errors="coerce").to_numpy(float), f"prompts.{col}"
    return np.full(len(prompts), np.nan), "none"


# ---------------------------------------------------------------- CV as Ray tasks
def fit_one(D: np.ndarray, y: np.ndarray, tr: np.ndarray, alpha: float, l1_ratio: float, seed: int):
    # 1000 sweeps: with ~3k latents and a few hundred rows the smallest alphas never converge and ran 5000
    # sweeps for the worst CV scores (main run, pooled + halves: difficulty CV 190 s -> 18 s).
    model = make_pipeline(
        StandardScaler(), ElasticNet(alpha=alpha, l1_ratio=l1_ratio, max_iter=1000, random_state=seed)
    )
    return model.fit(D[tr], y[tr])


def fit_ridge(D: np.ndarray, y: np.ndarray, tr: np.ndarray, alphas: list[float]):
    """Standardise, then ridge with alpha chosen by exact leave-one-out CV over `alphas` (RidgeCV's closed
    form: one fit, no grid of tasks); `cv_results_` keeps every row's leave-one-out prediction per alpha."""
    model = make_pipeline(
        StandardScaler(), RidgeCV(alphas=list(alphas), scoring="neg_mean_squared_error", store_cv_results=True)
    )
    return model.fit(D[tr], y[tr])


def ridge_cv(model, y: np.ndarray, alphas: list[float], offset: np.ndarray | float = 0.0) -> dict[str, Any]:
    """cross_validate's summary for a fitted `fit_ridge` pipeline (y: its training targets; `offset`: what
    was taken out of the labels before the fit, the length term, added back for the correlations)."""
    ridge = model.named_steps["ridgecv"]
    best = list(alphas).index(ridge.alpha_)
    loo = ridge.cv_results_[:, best]
    mse = ((ridge.cv_results_ - y[:, None]) ** 2).mean(axis=0)
    return {"alpha": float(ridge.alpha_), "l1_ratio": 0.0, "cv_mse": float(mse[best]), "cv": _corr(loo + offset, y + offset),
            "grid_mse": {f"{a}/0.0": float(m) for a, m in zip(alphas, mse)}, "tasks": 0}


def cv_task(D: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, alpha: float, l1: float, seed: int):
    """One (fold, grid point): out-of-fold predictions."""
    return fit_one(D, y, tr, alpha, l1, seed).predict(D[va])


def _corr(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return {"spearman": None, "pearson": None}  # constant predictions: correlation undefined
    return {"spearman": float(spearmanr(a, b).statistic), "pearson": float(pearsonr(a, b).statistic)}


def cross_validate(
    D: np.ndarray, y: np.ndarray, alphas: list[float], l1_ratios: list[float], folds: int, seed: int,
    use_ray: bool = True, offset: np.ndarray | float = 0.0,
) -> dict[str, Any]:
    """Grid x folds; returns the best (alpha, l1_ratio) by out-of-fold MSE and its CV correlations."""
    grid = [(a, l) for a in alphas for l in l1_ratios]
    splits = list(KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(D))
    jobs = [(g, f) for g in range(len(grid)) for f in range(len(splits))]
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(cv_task)
        D_ref, y_ref = ray.put(D), ray.put(y)  # once; every task reads the same objects
        refs = [task.remote(D_ref, y_ref, splits[f][0], splits[f][1], *grid[g], seed) for g, f in jobs]
        results = [ray.get(r) for r in tqdm(refs, desc="difficulty CV", leave=False)]
    else:
        results = [cv_task(D, y, splits[f][0], splits[f][1], *grid[g], seed) for g, f in jobs]
    oof = np.zeros((len(grid), len(y)))
    for (g, f), pred in zip(jobs, results):
        oof[g, splits[f][1]] = pred
    mse = ((oof - y) ** 2).mean(axis=1)
    best = int(np.argmin(mse))
    return {
        "alpha": grid[best][0], "l1_ratio": grid[best][1], "cv_mse": float(mse[best]),
        "cv": _corr(oof[best] + offset, y + offset), "grid_mse": {f"{a}/{l}": float(m) for (a, l), m in zip(grid, mse)},
        "tasks": len(jobs),
    }


ESTIMATORS = ("ridge", "elasticnet")


def fit_difficulty(
    X: sp.csr_matrix, y: np.ndarray, *, estimator: str = "ridge", alphas: list[float] = (1e-2,),
    l1_ratios: list[float] = (0.5,), ridge_alphas: list[float] = (1.0, 10.0, 100.0, 1000.0), folds: int = 5,
    seed: int = 0, min_support: float = 0.01, max_features: int = 4096, holdout: float = 0.2,
    use_ray: bool = True, transform: str = "log1p", n_chars: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Select hyperparameters, score the holdout, fit the final model on all rows. ridge: alpha by
    leave-one-out over `ridge_alphas` on all rows (one closed-form fit), the holdout scored by the same
    selection run on the other rows; elasticnet: `folds`-fold CV over alphas x l1_ratios on the
    non-holdout rows (one Ray task per point and fold: run once), then refit on all rows.
    With `n_chars`, each fit first takes log length out of y (`fit_length`, on that fit's rows) and the
    codes' regression fits the residual.

    Returns (model JSON dict, metrics)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"signals.difficulty.estimator must be one of {ESTIMATORS}, got {estimator!r}")
    X = sp.csr_matrix(X)
    cols = select_columns(X, min_support, max_features)
    D = design(X, cols, transform).toarray()
    y = np.asarray(y, dtype=float)
    n_chars = None if n_chars is None else np.asarray(n_chars, dtype=float)
    chars_of = lambda rows: None if n_chars is None else n_chars[rows]  # noqa: E731
    idx = np.arange(len(y))
    fit_idx, test_idx = train_test_split(idx, test_size=holdout, random_state=seed) if holdout > 0 else (idx, idx[:0])

    def residual(rows: np.ndarray) -> tuple[np.ndarray, dict | None]:
        """y minus the length term fit on `rows` (y itself without lengths): what the codes fit."""
        if n_chars is None:
            return y, None
        term = fit_length(n_chars[rows], y[rows])
        return y - length_term({"length": term}, n_chars), term

    r_fit, term_fit = residual(fit_idx)
    r_all, term = residual(idx)
    if estimator == "ridge":
        # Selection is one closed-form fit, so the final model's alpha uses every label (leave-one-out on
        # all rows); the holdout scores the same procedure run without the holdout rows.
        final = fit_ridge(D, r_all, idx, ridge_alphas)
        cv = ridge_cv(final, r_all, ridge_alphas, y - r_all)
        fitted = fit_ridge(D, r_fit, fit_idx, ridge_alphas) if len(test_idx) else None
    else:
        cv = cross_validate(D[fit_idx], r_fit[fit_idx], list(alphas), list(l1_ratios), folds, seed, use_ray,
                            (y - r_fit)[fit_idx])
        refit = lambda r, rows: fit_one(D, r, rows, cv["alpha"], cv["l1_ratio"], seed)  # noqa: E731
        fitted = refit(r_fit, fit_idx) if len(test_idx) else None
        final = refit(r_all, idx)
    metrics: dict[str, Any] = {**cv, "estimator": estimator, "n_labelled": len(y), "n_features": len(cols),
                               "length_covariate": n_chars is not None}
    if len(test_idx):
        pred = fitted.predict(D[test_idx]) + length_term({"length": term_fit}, chars_of(test_idx))
        metrics["holdout"] = {**_corr(pred, y[test_idx]), "n": len(test_idx)}
    scaler, lin = final.steps[0][1], final.steps[-1][1]
    model = {**linear_json(cols, scaler, lin.coef_, lin.intercept_, transform),
             "estimator": estimator, "alpha": cv["alpha"], "l1_ratio": cv["l1_ratio"], "length": term}
    metrics["nonzero_coef"] = int(np.count_nonzero(lin.coef_))
    return model, metrics


def fit_config(X: sp.spmatrix | np.ndarray, y: np.ndarray, cfg: DifficultyConfig, seed: int, use_ray: bool = True,
               transform: str = "log1p", n_chars: np.ndarray | None = None) -> tuple[dict, dict]:
    """fit_difficulty with the config's grid, CV folds, column selection and holdout: the estimator the
    signals stage ships (`fit_setup`), for any rows. `n_chars` is used only when cfg.length_covariate."""
    return fit_difficulty(
        sp.csr_matrix(X), np.asarray(y, dtype=float), estimator=cfg.estimator, alphas=cfg.alphas,
        l1_ratios=cfg.l1_ratios, ridge_alphas=cfg.ridge_alphas, folds=cfg.folds,
        seed=seed, min_support=cfg.min_support, max_features=cfg.max_features, holdout=cfg.holdout,
        use_ray=use_ray, transform=transform, n_chars=n_chars if cfg.length_covariate else None,
    )


def out_of_fold(X: sp.spmatrix | np.ndarray, y: np.ndarray, cfg: DifficultyConfig, seed: int = 0, folds: int = 5,
                use_ray: bool = True, transform: str = "log1p", n_chars: np.ndarray | None = None) -> np.ndarray:
    """Every row's prediction by the shipped estimator (`fit_config`: its own column selection, inner CV
    grid and, with `n_chars`, length term) fit on the other folds of a `folds`-fold split: validate's
    difficulty protocol."""
    X, y = sp.csr_matrix(X), np.asarray(y, dtype=float)
    n = None if n_chars is None else np.asarray(n_chars, dtype=float)
    pred = np.zeros(len(y))
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y))):
        model, _ = fit_config(X[tr], y[tr], cfg, seed, use_ray, transform, None if n is None else n[tr])
        pred[te] = predict(model, X[te], None if n is None else n[te])
    return pred


def length_fallback(n_tokens: np.ndarray) -> np.ndarray:
    """Token-count rank in [0, 1]: the 'traditional' length cue, used only when no label exists."""
    n = len(n_tokens)
    return (pd.Series(n_tokens).rank(method="average").to_numpy() - 1) / max(n - 1, 1)


@dataclass
class DifficultySetup:
    """What the fit needs before any code is read: labels, the held-out source, the training rows."""
    y_all: np.ndarray  # label per prompt, NaN where none
    label_source: str
    ood: np.ndarray  # bool per prompt: its source is held out
    train: np.ndarray | None  # prompt rows the regression is fit on; None = no usable labels (fallback)
    reason: str = ""  # why there is no fit
    n_chars: np.ndarray | None = None  # every prompt's length in characters (the length term's input)


def prompt_chars(prompts: pd.DataFrame) -> np.ndarray | None:
    """Each prompt's length in characters: ingest's n_chars, else measured on the text (None: neither)."""
    if "n_chars" in prompts.columns:
        return prompts["n_chars"].fillna(0).to_numpy(float)
    if "prompt" in prompts.columns:
        return prompts["prompt"].fillna("").str.len().to_numpy(float)
    return None


def difficulty_setup(prompts: pd.DataFrame, cfg: DifficultyConfig, seed: int) -> DifficultySetup:
    """Labels -> the labelled subset to fit on (`n_labelled` of the usable rows, seeded)."""
    y_all, label_source = difficulty_labels(prompts, cfg)
    n_chars = prompt_chars(prompts)
    labelled = np.isfinite(y_all)
    ood = (prompts["source"] == cfg.ood_source).to_numpy() if cfg.ood_source else np.zeros(len(prompts), bool)
    pool = np.flatnonzero(labelled & ~ood)
    if len(pool) < MIN_LABELLED or np.ptp(y_all[pool]) == 0:
        why = f"{len(pool)} usable labelled prompts from {label_source} (need >= {MIN_LABELLED}, not constant)"
        return DifficultySetup(y_all, label_source, ood, None, why, n_chars)
    if cfg.length_covariate and n_chars is None:
        raise ValueError("signals.difficulty.length_covariate needs the prompts' n_chars (or prompt) column; "
                         "set it to false for codes only")
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(pool, size=min(cfg.n_labelled or len(pool), len(pool)), replace=False))
    return DifficultySetup(y_all, label_source, ood, train, n_chars=n_chars)


def difficulty_fallback(setup: DifficultySetup, n_tokens: np.ndarray, out_path: str) -> tuple[np.ndarray, dict]:
    """No usable labels (or a fit that learned nothing): the token-count rank, flagged as such in the JSON
    and the metrics."""
    pred = length_fallback(n_tokens).astype(np.float32)
    summary = {"fallback": True, "method": "n_tokens rank", "reason": setup.reason, "label_source": setup.label_source}
    storage.write_json(out_path, summary)
    print(f"[signals] WARNING difficulty: NO USABLE FIT ({setup.reason}); using the token-count rank as difficulty")
    return pred, summary


def fit_setup(setup: DifficultySetup, X_train: sp.csr_matrix, cfg: DifficultyConfig, seed: int,
              use_ray: bool = True) -> tuple[dict | None, dict]:
    """fit_difficulty on the codes of `setup.train` (X_train: those rows, in that order). A fit that kept
    no feature and has no length term predicts one constant, no order at all: its model comes back None,
    and `setup.reason` says why, so the caller falls back to the length rank as for a run without labels
    (sparse labels, e.g. a policy that solves almost nothing, make cross-validation pick the largest penalty)."""
    n_chars = None if setup.n_chars is None else setup.n_chars[setup.train]
    model, metrics = fit_config(X_train, setup.y_all[setup.train], cfg, seed, use_ray, n_chars=n_chars)
    if metrics.get("nonzero_coef", 1) > 0 or model.get("length"):
        return model, metrics
    setup.reason = (f"the ElasticNet fit on {len(setup.train)} labelled prompts kept no feature (CV chose "
                    f"alpha={metrics.get('alpha')}, l1_ratio={metrics.get('l1_ratio')}): its prediction is a constant")
    return None, metrics


def finish_difficulty(setup: DifficultySetup, model: dict, metrics: dict, pred: np.ndarray, cfg: DifficultyConfig,
                      out_path: str) -> dict:
    """Out-of-distribution check on every prompt's prediction, then difficulty.json."""
    labelled = np.isfinite(setup.y_all)
    if setup.ood.any() and labelled[setup.ood].sum() >= 3:
        sel = setup.ood & labelled
        metrics["ood"] = {**_corr(pred[sel], setup.y_all[sel]), "source": cfg.ood_source, "n": int(sel.sum())}
    metrics.update(fallback=False, label_source=setup.label_source)
    storage.write_json(out_path, {**model, "metrics": metrics})
    return metrics


def run_difficulty(
    prompts: pd.DataFrame, X: sp.csr_matrix, n_tokens: np.ndarray, cfg: DifficultyConfig, seed: int,
    out_path: str, use_ray: bool = True,
) -> tuple[np.ndarray, dict]:
    """Stage body on codes in memory: labels -> subset -> fit -> predict every prompt; writes
    difficulty.json. (The signals stage runs the same steps with the codes left in their part files.)"""
    setup = difficulty_setup(prompts, cfg, seed)
    if setup.train is None:
        return difficulty_fallback(setup, n_tokens, out_path)
    model, metrics = fit_setup(setup, X[setup.train], cfg, seed, use_ray)
    if model is None:
        return difficulty_fallback(setup, n_tokens, out_path)
    pred = predict(model, X, setup.n_chars).astype(np.float32)
    return pred, finish_difficulty(setup, model, metrics, pred, cfg, out_path)
