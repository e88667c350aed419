"""validate: do SAE features carry difficulty, topic and quality beyond cheap baselines? (MATH-500)

    saerl-ray validate -c configs/gsm8k_math500.yaml           # table
    saerl-ray validate -c configs/gsm8k_math500.yaml --json    # one JSON object

Uses the run's MATH-500 prompts (runs ingest/sae/features first if needed) and scores four
representations with one protocol each, so the numbers are comparable:
  difficulty_spearman  5-fold CV ElasticNet (alpha/l1 picked by inner CV), Spearman vs `level`
  topic_nmi            k-means with K=7 (cosine), NMI vs `subject`
  quality_auroc        logistic probe (the signals stage's, its C and negatives per prompt), 5-fold
                       out-of-fold AUROC on corruptions of held-out prompts
  quality_auroc_loto   the same, each corruption type also held out of training (mean over types)
Representations: `sae` (the features stage's codes, each metric on the codes its signal reads:
signals.difficulty/cluster/quality.codes), `length`
(token count), `tfidf` (word 1-2 grams; SVD-128 for the regression and k-means, the sparse TF-IDF
itself for the probe), `random` (Gaussian features: the control that must score ~0 / ~0.5).
Writes `<run_dir>/validate/results.json` (the report shows it).
"""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import scipy.sparse as sp
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import ElasticNetCV
from sklearn.metrics import normalized_mutual_info_score
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

from saerl_ray import storage
from saerl_ray.config import RunConfig

METRICS = ("difficulty_spearman", "topic_nmi", "quality_auroc", "quality_auroc_loto")
REPS = ("sae", "length", "tfidf", "random")


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def sae_design(X: sp.csr_matrix) -> np.ndarray:
    """SAE codes as regression inputs: log1p compresses heavy-tailed activations, then the latents
    active in >=1% of prompts (rarer ones only add variance on 500 rows)."""
    X = X.tocsc()
    keep = np.flatnonzero(np.diff(X.indptr) >= max(2, int(0.01 * X.shape[0])))
    return np.log1p(np.maximum(_dense(X[:, keep]), 0))


def difficulty_spearman(X: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    pred = np.zeros_like(y, dtype=float)
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(X):
        model = make_pipeline(StandardScaler(), ElasticNetCV(l1_ratio=[0.1, 0.5, 0.9], alphas=12, cv=3,
                                                              random_state=seed, max_iter=5000))
        model.fit(X[tr], y[tr])
        pred[te] = model.predict(X[te])
    return float(spearmanr(pred, y).statistic)


def topic_nmi(X: np.ndarray, topics: np.ndarray, k: int = 7, seed: int = 0) -> float:
    Z = normalize(StandardScaler().fit_transform(X)) if X.shape[1] > 1 else X
    labels = KMeans(k, n_init=4, random_state=seed).fit_predict(Z)
    return float(normalized_mutual_info_score(topics, labels))


def quality_auroc(X_pos: np.ndarray, X_neg: np.ndarray, neg_types: np.ndarray, neg_source: np.ndarray, C: float,
                  seed: int = 0, folds: int = 5) -> dict:
    """The signals stage's own probe and splits (quality.fit_quality_probe), `folds`-fold: `overall` tests
    on corruptions of held-out prompts; `loto` also holds the corruption type out of training.
    neg_source[j] = the positive negative j was made from (each pair stays in one fold)."""
    import ray

    from saerl_ray.quality import fit_quality_probe

    _, m = fit_quality_probe(sp.csr_matrix(X_pos), sp.csr_matrix(X_neg), neg_types, C=C, seed=seed,
                             neg_source=neg_source, folds=folds, use_ray=ray.is_initialized())
    return {"overall": m["auroc_overall"], "loto": m["auroc_loto_mean"], "by_type": m["auroc_leave_one_type_out"]}


def _load(cfg: RunConfig):
    from saerl_ray.featureio import check_stored, load_features
    from saerl_ray.pipeline import run_pipeline
    from saerl_ray.ray_init import init_ray

    run_pipeline(cfg, ["ingest", "sae", "features"])
    check_stored(cfg.run_dir, cfg.features)
    init_ray(cfg.ray)  # the probe's folds run as Ray tasks
    prompts = storage.read_parquet(storage.join(cfg.run_dir, "ingest", "prompts.parquet")).to_pandas()
    math = prompts[prompts["source"] == "math500"].reset_index(drop=True)
    if len(math) < 100:
        raise ValueError(f"validate needs MATH-500 in the run (source 'math500'); {cfg.run_dir} has {len(math)} rows")
    _, X, n_tokens = load_features(cfg.run_dir, order=list(math["id"]))
    return math, X, n_tokens


def validate(cfg: RunConfig) -> dict:
    from saerl_ray.config import signal_codes
    from saerl_ray.featureio import code_columns
    from saerl_ray.features import featurize_texts
    from saerl_ray.quality import make_negatives

    math, X_all, n_tokens = _load(cfg)
    q_cols = code_columns(cfg.run_dir, signal_codes(cfg, "quality"))
    texts = math["prompt"].tolist()
    y = math["difficulty"].to_numpy(float)
    topics = math["topic"].to_numpy()
    rng = np.random.default_rng(cfg.seed)

    qc = cfg.signals.quality
    neg_texts, neg_types, neg_source = make_negatives(texts, math["answer"].tolist(), seed=cfg.seed,
                                                      types=qc.corruptions, per_prompt=qc.negatives_per_prompt)
    neg_types = np.asarray(neg_types)
    X_neg_sae = featurize_texts(neg_texts, cfg.run_dir, cfg)[:, q_cols]

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts + neg_texts)
    svd = TruncatedSVD(128, random_state=cfg.seed).fit(tfidf.transform(texts + neg_texts))
    tok = __import__("saerl_ray.models", fromlist=["load_tokenizer"]).load_tokenizer(
        cfg.model.name, cfg.model.trust_remote_code)
    neg_len = np.array([len(tok(t).input_ids) for t in neg_texts], dtype=float)
    rand = rng.normal(size=(len(texts) + len(neg_texts), 128))
    # Per representation: (dense design for the regression, for k-means, and non-negative features of
    # prompts and negatives for the probe, which applies its own log1p design).
    D_tfidf = svd.transform(tfidf.transform(texts))
    D_len = np.log(n_tokens.astype(float))[:, None]
    reps = {
        "sae": (sae_design(X_all[:, code_columns(cfg.run_dir, signal_codes(cfg, "difficulty"))]),
                sae_design(X_all[:, code_columns(cfg.run_dir, signal_codes(cfg, "cluster"))]), X_all[:, q_cols], X_neg_sae),
        "length": (D_len, D_len, n_tokens.astype(float)[:, None], neg_len[:, None]),
        "tfidf": (D_tfidf, D_tfidf, tfidf.transform(texts), tfidf.transform(neg_texts)),
        "random": (rand[: len(texts)], rand[: len(texts)], np.abs(rand[: len(texts)]), np.abs(rand[len(texts):])),
    }
    res: dict = {m: {} for m in METRICS}
    per_type: dict = {}
    for name, (D, D_topic, Xp, Xn) in reps.items():
        res["difficulty_spearman"][name] = difficulty_spearman(D, y, cfg.seed)
        res["topic_nmi"][name] = topic_nmi(D_topic, topics, 7, cfg.seed)
        q = quality_auroc(Xp, Xn, neg_types, neg_source, qc.C, cfg.seed)
        res["quality_auroc"][name] = q["overall"]
        res["quality_auroc_loto"][name] = q["loto"]
        per_type[name] = q["by_type"]
    res["quality_auroc_by_type"] = per_type
    res["n"] = {"prompts": len(texts), "negatives": len(neg_texts)}
    return res


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="saerl-ray validate (MATH-500)")
    t.add_column("metric")
    for r in REPS:
        t.add_column(r, justify="right")
    for m in METRICS:
        t.add_row(m, *[f"{res[m][r]:.3f}" for r in REPS])
    Console().print(t)


def main(cfg: RunConfig, as_json: bool = False) -> int:
    if as_json:  # stdout carries the JSON object only; stage progress lines go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            res = validate(cfg)
    else:
        res = validate(cfg)
    storage.write_json(storage.join(cfg.run_dir, "validate", "results.json"), res)
    if as_json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0
