"""validate's `dense` control and the SAE-minus-dense intervals.

`dense` is the model's residual at the SAE's hook layer, pooled over the tokens the features stage pools
with `features.pooling` (features.dense_texts: the same lens, tokens and massive-token exclusion), scored
by the same estimators as the other representations. The question it answers: do the SAE codes carry
anything the residual they were trained on does not, or only make it readable?

    D = dense_texts(texts, run_dir, cfg)               # (n, d_model)
    reg, probe_pos, probe_neg = dense_inputs(D_pos, D_neg)
    res["sae_minus_dense"] = sae_minus_dense(...)       # {row: {"sae", "dense", "diff", "lo", "hi"}}

Intervals: a paired bootstrap over MATH-500 prompts with every model's out-of-fold predictions held fixed
(the difficulty predictions, the k-means labels, the quality scores of each held-out row): a resample
draws prompts with replacement; each prompt brings its own corruptions (neg_source) with it; both
representations' metrics are recomputed on the same draw and differenced. Refitting every model per
resample would also count the models' fitting noise, at ~1,000x the cost; this interval is the
sampling noise of the 500 prompts given the fitted models. Percentile intervals: a resample repeats
prompts, which raises the chance-level NMI of a weak clustering, so the NMI interval can sit slightly
off its point difference (the point is the full-sample value, as in the table).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import normalized_mutual_info_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

RESAMPLES = 1000


def dense_inputs(D_pos: np.ndarray, D_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(regression / k-means input of the prompts, probe input of prompts, of negatives). Each residual
    dimension standardised over prompts and negatives together (label-free: the probe's folds see no
    statistic of a label); the probe's design takes non-negative features (it applies log1p, as to
    codes), so each standardised dimension is split into its positive and negative parts (lossless)."""
    Z = StandardScaler().fit_transform(np.r_[D_pos, D_neg].astype(np.float64))
    split = np.c_[np.maximum(Z, 0), np.maximum(-Z, 0)]
    return Z[: len(D_pos)], split[: len(D_pos)], split[len(D_pos):]


def _weighted_auroc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> float:
    keep_p, keep_n = w_pos > 0, w_neg > 0
    y = np.r_[np.ones(keep_p.sum()), np.zeros(keep_n.sum())]
    return float(roc_auc_score(y, np.r_[pos[keep_p], neg[keep_n]], sample_weight=np.r_[w_pos[keep_p], w_neg[keep_n]]))


def quality_rows(scores: dict, counts: np.ndarray, neg_source: np.ndarray) -> dict[str, float]:
    """quality_auroc (the `overall` split) and the leave-one-family-out mean / min, with each prompt
    counted `counts[i]` times and each negative as often as the prompt it was made from."""
    per = {}
    for name, s in scores.items():
        w_pos = counts[s["pos_rows"]].astype(float)
        w_neg = counts[np.asarray(neg_source)[s["neg_rows"]]].astype(float)
        per[name] = _weighted_auroc(s["pos"], s["neg"], w_pos, w_neg)
    fam = [v for k, v in per.items() if k != "overall"]
    return {"quality_auroc": per["overall"], "quality_auroc_lofo_mean": float(np.mean(fam)),
            "quality_auroc_lofo_min": float(np.min(fam))}


def metrics_on(rows: np.ndarray, rep: dict, y: np.ndarray, topics: np.ndarray, neg_source: np.ndarray) -> dict:
    """Every compared row of one representation on the prompts `rows` (a resample; repeats allowed).
    rep: {"difficulty_oof", "topic_labels", "quality_scores"} and optionally "difficulty_oof_codes_only"."""
    counts = np.bincount(rows, minlength=len(y))
    out = {"difficulty_spearman": float(spearmanr(rep["difficulty_oof"][rows], y[rows]).statistic),
           "topic_nmi": float(normalized_mutual_info_score(topics[rows], rep["topic_labels"][rows]))}
    if "difficulty_oof_codes_only" in rep:
        out["difficulty_spearman_codes_only"] = float(spearmanr(rep["difficulty_oof_codes_only"][rows], y[rows]).statistic)
    return {**out, **quality_rows(rep["quality_scores"], counts, neg_source)}


def sae_minus_dense(sae: dict, dense: dict, y: np.ndarray, topics: np.ndarray, neg_source: np.ndarray,
                    seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Per row: the SAE's value, dense's, their difference and its paired-bootstrap 95% interval
    (2.5th / 97.5th percentiles over `resamples` prompt resamples; module docstring). The codes-only
    difficulty row compares the SAE without its length term (dense has none either)."""
    y, topics = np.asarray(y, float), np.asarray(topics)
    full = np.arange(len(y))
    dense = {**dense, "difficulty_oof_codes_only": dense["difficulty_oof"]} if "difficulty_oof_codes_only" in sae else dense
    point_s, point_d = metrics_on(full, sae, y, topics, neg_source), metrics_on(full, dense, y, topics, neg_source)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {k: [] for k in point_s}
    for _ in range(resamples):
        rows = rng.integers(0, len(y), len(y))
        s, d = metrics_on(rows, sae, y, topics, neg_source), metrics_on(rows, dense, y, topics, neg_source)
        for k in diffs:
            diffs[k].append(s[k] - d[k])
    out = {}
    for k, v in diffs.items():
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        out[k] = {"sae": point_s[k], "dense": point_d[k], "diff": point_s[k] - point_d[k], "lo": float(lo), "hi": float(hi)}
    return {**out, "bootstrap": {"resamples": resamples, "unit": "MATH-500 prompt", "interval": "percentile 95%",
                                 "held_fixed": "out-of-fold predictions, k-means labels, quality scores"}}
