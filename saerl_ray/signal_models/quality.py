"""Quality: which prompts are bad? A linear probe on SAE codes (supervised, learned from synthetic
corruptions of real prompts), two unsupervised scores that need no negatives (neighbors: how far a
prompt's code is from its nearest clean prompts; novelty: how rare its latents are among clean prompts'
codes), the whole model's surprisal at its tokens and, optionally, prompt length, each compared with clean
held-out prompts; a prompt is dropped only when the evidence says it is bad (a threshold at a stated
false-positive rate), not by quota.
The clean prompts (the positives) come from a trusted reference (signals.quality.reference: curated files,
by default the math sets in data/), so the pool is only scored and its pollution teaches the filter
nothing; with `reference: []` they are a sample of the pool itself (benchmarks/pollution.py compares both).

    from saerl_ray.signal_models.corruptions import make_negatives
    from saerl_ray.signal_models.quality import fit_quality_probe, score_from_json
    neg_texts, neg_kinds, source = make_negatives(texts, answers, seed=0, per_prompt=3)  # source: row of texts
    model, metrics = fit_quality_probe(X_pos, featurize(neg_texts), families_of(neg_kinds), neg_source=source)
    scores = score_from_json("runs/x/signals/quality.json", X_all, n_chars)   # higher = cleaner

Labels: a `prompts` quality column (1 good / 0 bad) when one is configured and present; otherwise
synthetic negatives, each a corruption of a real prompt (saerl_ray.signal_models.corruptions: kinds
grouped in FAMILIES; leave-one-family-out holds all of a family's kinds out together). New texts get SAE
codes from the features machinery through the `featurize` callable.
Signals (each a "badness", standardised against clean held-out prompts by median / 1.4826 MAD):
  probe    -logit of the probe's P(good)
  neighbors  log of (1 - the mean cosine similarity of the prompt's code in one band, signals.quality.
           neighbors_code, default `last`: the state the model is in once it has read the whole prompt, to
           its k most similar positives; a positive is never its own neighbour)
  novelty  per code (signals.quality.codes), the mean -log p(latent active) over the prompt's active
           latents, p from the positives' document frequencies (add-one smoothed; leave-one-out for the
           positives themselves); the standardised per-code rarities averaged
  length   |log n_chars - median| (two-sided: too short and too long are both unusual)
  surprisal  the mean of the prompt's 3 most surprising tokens after its first 3 under the whole model
           (features.surprisal, on by default): the one signal here that sees a problem spliced from two,
           blanked values or markup residue
The combined badness is the sum (`combine_rule: sum`, the default without surprisal) or the max (with it)
of the configured signals' z-scores (`combine`); quality_score = -it, and `flag` names the signal with the largest z-score. Metrics,
out-of-fold over `eval_folds` folds of the positives (a prompt's corruptions in its fold): AUROC on
held-out prompts, and leaving one corruption FAMILY out (train on the others, test on that family +
held-out positives), per signal and combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from saerl_ray.core import storage
from saerl_ray.core.config import QualityConfig
from saerl_ray.signal_models.corruptions import families_of, make_negatives
from saerl_ray.signal_models.difficulty import (
    design,
    linear_json,
    linear_score,
    select_columns,
)

SIGNALS = ("probe", "novelty", "length", "neighbors", "surprisal")
CODE_SIGNALS = ("probe", "novelty", "neighbors")  # read from the SAE codes (length and surprisal are not)
RULES = ("sum", "max")
# Most positives kept as the neighbors signal's references (a labelled pool can have many): scoring costs
# rows x references.
NEIGHBOR_REFS = 4096
NEIGHBOR_EPS = 1e-3  # the neighbors signal is log(distance + this): near-duplicates stay finite
# Reference positives whose combined badness is beyond this many robust SDs of the reference's own
# combined badness are presumed pollution (of the pool, when the positives are sampled from it with
# `reference: []`; of a reference file otherwise) and left out of the threshold's quantile (docs/decisions.md).
TRIM_Z = 8.0
Featurizer = Callable[[list[str]], sp.csr_matrix]

# ---------------------------------------------------------------- probe (supervised)
def fit_linear_probe(X: sp.csr_matrix, y: np.ndarray, C: float, min_support: float, max_features: int,
                     seed: int = 0) -> dict:
    cols = select_columns(X, min_support, max_features)
    D = design(X, cols).toarray()
    scaler = StandardScaler().fit(D)
    clf = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit(scaler.transform(D), y)
    return linear_json(cols, scaler, clf.coef_, clf.intercept_)


def probe_scores(model: dict, X: sp.csr_matrix) -> np.ndarray:
    """The probe's P(good) per row (the probe alone; quality_scores combines it with the other signals)."""
    return 1.0 / (1.0 + np.exp(-linear_score(model, X)))


# ---------------------------------------------------------------- novelty (unsupervised)
def default_bands(width: int) -> list[tuple[int, int]]:
    return [(0, int(width))]


def _counts(X_pos: sp.csr_matrix, bands: list[tuple[int, int]]) -> dict:
    A = sp.csr_matrix(X_pos)
    df = np.bincount(A.indices[A.data > 0], minlength=A.shape[1])
    out = {"n": int(A.shape[0]), "bands": []}
    for a, b in bands:
        seen = np.flatnonzero(df[a:b]) + a
        out["bands"].append({"start": int(a), "end": int(b), "columns": seen.tolist(), "df": df[seen].tolist()})
    return out


def fit_novelty(X_pos: sp.csr_matrix, bands: list[tuple[int, int]], groups: np.ndarray | None = None) -> dict:
    """Document frequency of every latent among the positives, per code band. With `groups` (each
    positive's source) of two or more names, also per group, with the location and scale of the group's
    own positives (each without its own counts) per band: novelty_raw then reads a prompt against the
    group it looks least novel in, so a latent common in one source (LaTeX in MATH) still counts as rare
    in a prompt of another (markup in a GSM8K problem; benchmarks/pollution.py)."""
    out = _counts(X_pos, bands)
    names = [] if groups is None else np.unique(np.asarray(groups, str))
    if len(names) > 1:
        groups = np.asarray(groups, str)
        out["groups"] = []
        for g in names:
            sub = _counts(X_pos[groups == g], bands)
            R = _band_raw(sub, X_pos[groups == g], loo=True)
            sub.update(name=str(g), location=[_robust(R[:, k]) for k in range(R.shape[1])])
            out["groups"].append(sub)
    return out


def _band_raw(model: dict, X: sp.csr_matrix, loo: bool) -> np.ndarray:
    """(rows, bands): per code band, the mean -log p(latent active) over the row's active latents,
    p = (df + 1) / (n + 2); a band with no active latent gets the weight of an unseen latent."""
    A = sp.csr_matrix(X, dtype=np.float64, copy=True)
    A.data = (A.data > 0).astype(np.float64)
    A.eliminate_zeros()
    n = model["n"] - (1 if loo else 0)
    out = np.empty((A.shape[0], len(model["bands"])))
    unseen = -np.log(1.0 / (n + 2))
    for k, band in enumerate(model["bands"]):
        a, b = band["start"], band["end"]
        w = np.full(b - a, unseen)
        df = np.asarray(band["df"], float) - (1 if loo else 0)
        w[np.asarray(band["columns"], np.int64) - a] = -np.log((df + 1.0) / (n + 2))
        sub = A[:, a:b]
        count = np.diff(sub.indptr)
        total = np.asarray(sub @ w).ravel()
        out[:, k] = np.where(count > 0, total / np.maximum(count, 1), unseen)
    return out


def novelty_raw(model: dict, X: sp.csr_matrix, loo: bool = False, groups: np.ndarray | None = None) -> np.ndarray:
    """(rows, bands) of rarity (_band_raw). `loo`: the rows are the positives the model counted; each is
    scored without its own counts (df - 1, n - 1). A model with groups (fit_novelty): per group, each band
    in robust SDs of that group's own positives; a row takes the group where its band mean is lowest.
    `loo` then needs each row's group (`groups`)."""
    if not model.get("groups"):
        return _band_raw(model, X, loo)
    if loo and groups is None:
        raise ValueError("novelty_raw: leave-one-out on a model with source groups needs each row's group")
    Z = []
    for g in model["groups"]:
        R = _band_raw(g, X, False)
        own = np.flatnonzero(np.asarray(groups, str) == g["name"]) if loo else []
        if len(own):
            R[own] = _band_raw(g, X[own], True)
        Z.append(np.stack([_z(R[:, k], r) for k, r in enumerate(g["location"])], axis=1))
    Z = np.stack(Z)  # (groups, rows, bands)
    pick = Z.mean(axis=2).argmin(axis=0)
    return Z[pick, np.arange(Z.shape[1])]


def _unit_rows(M: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); any number of rows, none included."""
    M = sp.csr_matrix(M, dtype=np.float64)
    norms = np.sqrt(np.asarray(M.multiply(M).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ M)


def fit_neighbors(X_pos: sp.csr_matrix, band: tuple[int, int], k: int, seed: int = 0) -> dict:
    """The positives' codes in `band`, L2-normalised (at most NEIGHBOR_REFS of them, seeded): the clean
    neighbourhood every prompt is compared with."""
    if k < 1:
        raise ValueError(f"signals.quality.neighbors_k must be >= 1, got {k}")
    a, b = int(band[0]), int(band[1])
    A = sp.csr_matrix(X_pos)[:, a:b]
    if A.shape[0] > NEIGHBOR_REFS:
        A = A[np.sort(np.random.default_rng(seed).choice(A.shape[0], NEIGHBOR_REFS, replace=False))]
    A = _unit_rows(A)
    return {"start": a, "end": b, "k": int(k), "n": int(A.shape[0]), "indptr": A.indptr.tolist(),
            "indices": A.indices.tolist(), "data": A.data.tolist()}


def neighbors_raw(model: dict, X: sp.csr_matrix, chunk: int = 4096) -> np.ndarray:
    """Per row: 1 - the mean cosine similarity of its band code to its k most similar references (1 with
    no reference). A reference identical to the row (cosine 1: the row itself when it is one of the
    positives, or an exact duplicate) is skipped, so a positive is scored as if left out."""
    a, b, n = model["start"], model["end"], model["n"]
    B = _unit_rows(sp.csr_matrix(X)[:, a:b])
    if n == 0:
        return np.ones(B.shape[0])
    A = sp.csr_matrix((model["data"], model["indices"], model["indptr"]), shape=(n, b - a)).T.tocsc()
    k = max(1, min(model["k"], n - 1))
    out = np.empty(B.shape[0])
    for i in range(0, B.shape[0], chunk):  # a dense (chunk x references) block at a time
        S = (B[i:i + chunk] @ A).toarray()
        S[S > 1.0 - 1e-9] = -1.0
        out[i:i + chunk] = 1.0 - np.partition(S, n - k, axis=1)[:, n - k:].mean(axis=1)
    return out


# ---------------------------------------------------------------- signals, references, combination
def raw_signals(model: dict, X: sp.csr_matrix, n_chars: np.ndarray | None = None, loo: bool = False,
                surprisal: np.ndarray | None = None, groups: np.ndarray | None = None) -> dict:
    """Per signal, its raw badness of each row (higher = worse): probe -logit, novelty per band, neighbors
    (when the model has references), log length, surprisal (given: it comes with the codes, not from them).
    `loo` / `groups`: the rows are the model's positives (novelty_raw)."""
    raw = {"probe": -linear_score(model, X), "novelty": novelty_raw(model["novelty"], X, loo, groups)}
    if "neighbors" in model:
        # log: the distances are heavy-tailed (main run: median 0.012, 99th percentile 0.08, max 1), and on
        # the raw scale one unusual ending outweighed every other signal in the sum (docs/decisions.md)
        raw["neighbors"] = np.log(neighbors_raw(model["neighbors"], X) + NEIGHBOR_EPS)
    if n_chars is not None:
        raw["length"] = np.log(np.maximum(np.asarray(n_chars, float), 1.0))
    if surprisal is not None:
        raw["surprisal"] = surprisal_raw(surprisal)
    return raw


def surprisal_raw(x: np.ndarray) -> np.ndarray:
    """The features' surprisal column as the signal's raw badness (an error if any row lacks it)."""
    x = np.asarray(x, float)
    if not np.isfinite(x).all():
        raise ValueError("surprisal has NaN rows: the features were computed without features.surprisal")
    return x


def _robust(x: np.ndarray) -> dict:
    x = np.asarray(x, float)
    med = float(np.median(x))
    scale = 1.4826 * float(np.median(np.abs(x - med)))
    if not scale > 1e-9:
        scale = float(np.std(x)) if np.std(x) > 1e-9 else 1.0
    return {"median": med, "scale": scale}


def _z(x: np.ndarray, r: dict) -> np.ndarray:
    return (np.asarray(x, float) - r["median"]) / r["scale"]


def _novelty_mean(R: np.ndarray, bands: list[dict]) -> np.ndarray:
    return np.mean([_z(R[:, k], r) for k, r in enumerate(bands)], axis=0)


def fit_reference(raw: dict) -> dict:
    """Location and scale of each signal on clean held-out prompts (robust: median, 1.4826 MAD)."""
    ref: dict[str, Any] = {}
    for name in ("probe", "neighbors", "surprisal"):
        if name in raw:
            ref[name] = _robust(raw[name])
    if "novelty" in raw:
        bands = [_robust(raw["novelty"][:, k]) for k in range(raw["novelty"].shape[1])]
        ref["novelty"] = {"bands": bands, **_robust(_novelty_mean(raw["novelty"], bands))}
    if "length" in raw:
        center = float(np.median(raw["length"]))
        ref["length"] = {"center": center, **_robust(np.abs(raw["length"] - center))}
    return ref


def zscores(raw: dict, ref: dict) -> dict[str, np.ndarray]:
    """Each signal's badness in robust SDs above a typical clean prompt's."""
    z = {}
    for name in ("probe", "neighbors", "surprisal"):
        if name in raw and name in ref:
            z[name] = _z(raw[name], ref[name])
    if "novelty" in raw and "novelty" in ref:
        z["novelty"] = _z(_novelty_mean(raw["novelty"], ref["novelty"]["bands"]), ref["novelty"])
    if "length" in raw and "length" in ref:
        z["length"] = _z(np.abs(raw["length"] - ref["length"]["center"]), ref["length"])
    return z


def combine(z: dict[str, np.ndarray], signals: list[str] | tuple[str, ...],
            rule: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """(badness, index into `signals` of the signal with the largest z-score): the sum (evidence adds up)
    or the max of the signals' z-scores."""
    missing = [s for s in signals if s not in z]
    if missing:
        raise ValueError(f"quality signal(s) {missing} not computed (length needs n_chars, neighbors a band, "
                         f"surprisal the features' surprisal column)")
    if rule not in RULES:
        raise ValueError(f"signals.quality.combine_rule must be one of {RULES}, got {rule!r}")
    Z = np.stack([z[s] for s in signals], axis=1)
    return (Z.sum(axis=1) if rule == "sum" else Z.max(axis=1)), Z.argmax(axis=1)


def fpr_cut(bad_clean: np.ndarray, rate: float) -> tuple[float, int]:
    """(z cut, rows trimmed): the smallest cut that at most `rate` of the clean reference rows exceed,
    after leaving out rows beyond TRIM_Z robust SDs of the reference's combined badness (presumed pollution
    of the pool the positives were sampled from). Measured on the combined score itself, not per signal: a
    sum of three z-scores spreads wider than one, and an absolute cut trimmed 6% of clean rows."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"signals.quality.max_false_positive_rate must be in [0, 1), got {rate}")
    bad_clean = np.asarray(bad_clean, float)
    ref = bad_clean[_z(bad_clean, _robust(bad_clean)) <= TRIM_Z] if len(bad_clean) else bad_clean
    if len(ref) == 0:
        return TRIM_Z, len(bad_clean)
    return float(np.quantile(ref, 1.0 - rate, method="higher")), int(len(bad_clean) - len(ref))


def quality_scores(model: dict, X: sp.csr_matrix, n_chars: np.ndarray | None = None,
                   surprisal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(quality_score, flag index into model["combine"]) per row; quality_score = -(combined badness), so
    higher = cleaner and 0 = a typical clean prompt."""
    use = model["combine"]
    return scores_from_raw(model, raw_signals(model, X, n_chars if "length" in use else None,
                                              surprisal=surprisal if "surprisal" in use else None))


def scores_from_raw(model: dict, raw: dict) -> tuple[np.ndarray, np.ndarray]:
    bad, arg = combine(zscores(raw, model["reference"]), model["combine"], model.get("combine_rule", "max"))
    return (-bad).astype(np.float32), arg


def score_from_json(path: str | Path, X: sp.csr_matrix, n_chars: np.ndarray | None = None,
                    surprisal: np.ndarray | None = None) -> np.ndarray:
    """Reload `signals/quality.json` and score CSR codes X (+ prompt lengths when `length` is combined,
    + the features' surprisal column when `surprisal` is)."""
    return quality_scores(storage.read_json(path), X, n_chars, surprisal)[0]


# ---------------------------------------------------------------- held-out evaluation
def heldout_scores(
    pos_X: sp.csr_matrix, neg_X: sp.csr_matrix, train_pos: np.ndarray, test_pos: np.ndarray,
    train_neg: np.ndarray, test_neg: np.ndarray, C: float, min_support: float, max_features: int, seed: int,
    bands: list[tuple[int, int]] | None = None, neighbor_band: tuple[int, int] | None = None, neighbor_k: int = 10,
    pos_groups: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Fit the probe on (train_pos, train_neg) rows, the novelty counts (per source group, with
    `pos_groups`) and the neighbors' references on train_pos (negatives are never either); raw signals
    (probe, novelty, neighbors) of the test rows."""
    Xtr = sp.vstack([pos_X[train_pos], neg_X[train_neg]]).tocsr()
    ytr = np.r_[np.ones(len(train_pos)), np.zeros(len(train_neg))]
    model = fit_linear_probe(Xtr, ytr, C, min_support, max_features, seed)
    model["novelty"] = fit_novelty(pos_X[train_pos], bands or default_bands(pos_X.shape[1]),
                                   None if pos_groups is None else np.asarray(pos_groups)[train_pos])
    model["neighbors"] = fit_neighbors(pos_X[train_pos], neighbor_band or (0, pos_X.shape[1]), neighbor_k, seed)
    return raw_signals(model, pos_X[test_pos]), raw_signals(model, neg_X[test_neg])


def evaluation_splits(
    neg_types: np.ndarray, n_pos: int, seed: int, neg_source: np.ndarray | None = None, folds: int = 2,
    held_out: bool = True,
) -> list[tuple[str, tuple]]:
    """(name, (train_pos, test_pos, train_neg, test_neg)) per fold. Positives are cut into `folds` folds;
    each fold is tested once, by a probe trained on the other folds. `overall`: trained on every
    group. Per group t (a corruption family, `held_out`): trained without t, tested on t only (t is never
    seen in training). `neg_source[j]` = the positive negative j was made from: a prompt and its
    corruptions share a fold (else a test prompt's own corruption would be in training). Without it
    (labelled negatives) negatives get random folds."""
    if folds < 2:
        raise ValueError(f"signals.quality.eval_folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    pos_fold = rng.permutation(n_pos) % folds
    neg_fold = (pos_fold[np.asarray(neg_source)] if neg_source is not None
                else rng.permutation(len(neg_types)) % folds)
    types = np.unique(neg_types)
    splits = []
    for f in range(folds):
        tr_pos, te_pos = np.flatnonzero(pos_fold != f), np.flatnonzero(pos_fold == f)
        tr_neg = neg_fold != f
        splits.append(("overall", (tr_pos, te_pos, np.flatnonzero(tr_neg), np.flatnonzero(~tr_neg))))
        for t in types if (held_out and len(types) > 1) else []:
            splits.append((str(t), (tr_pos, te_pos, np.flatnonzero(tr_neg & (neg_types != t)),
                                    np.flatnonzero(~tr_neg & (neg_types == t)))))
    return splits


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of "good" scores (higher = cleaner) of positives against negatives."""
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def pooled_aurocs(splits: list[tuple[str, tuple]], scores: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """One AUROC per split name over the out-of-fold scores of all its folds (scores: higher = cleaner)."""
    out = {}
    for name in dict.fromkeys(n for n, _ in splits):
        parts = [sc for (n, _), sc in zip(splits, scores) if n == name]
        out[name] = auroc(np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts]))
    return out


def _cat(parts: list[dict], key: str) -> np.ndarray:
    return np.concatenate([p[key] for p in parts], axis=0)


def pooled_signal_aurocs(
    splits: list[tuple[str, tuple]], raws: list[tuple[dict, dict]], combos: dict[str, tuple[str, ...]],
    pos_len: np.ndarray | None = None, neg_len: np.ndarray | None = None, rule: str = "max",
    pos_surprisal: np.ndarray | None = None, neg_surprisal: np.ndarray | None = None,
    scores_out: dict | None = None, combo_rules: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[dict, np.ndarray]]]:
    """Per split name, the AUROC of each signal alone and of each named combination, over the out-of-fold
    rows of all its folds; each signal is standardised against that split's out-of-fold positives (as the
    stage calibrates on them). Also per name: (pooled raw signals of the positives, their rows).
    `scores_out` (a dict, filled in place): per name, the `codes` score if there is one, else the `combined`
    score (higher = cleaner) of each out-of-fold row, {"pos_rows", "pos", "neg_rows", "neg"}, so a caller
    can resample rows (validate). `combo_rules`: a rule other than `rule` for some combinations."""
    out, pos_raw = {}, {}
    for name in dict.fromkeys(n for n, _ in splits):
        idx = [k for k, (n, _) in enumerate(splits) if n == name]
        rp = {s: _cat([raws[k][0] for k in idx], s) for s in raws[idx[0]][0]}
        rn = {s: _cat([raws[k][1] for k in idx], s) for s in raws[idx[0]][1]}
        te_pos = np.concatenate([splits[k][1][1] for k in idx])
        te_neg = np.concatenate([splits[k][1][3] for k in idx])
        if pos_len is not None and neg_len is not None:
            rp["length"] = np.log(np.maximum(np.asarray(pos_len, float)[te_pos], 1.0))
            rn["length"] = np.log(np.maximum(np.asarray(neg_len, float)[te_neg], 1.0))
        if pos_surprisal is not None and neg_surprisal is not None:
            rp["surprisal"] = surprisal_raw(pos_surprisal)[te_pos]
            rn["surprisal"] = surprisal_raw(neg_surprisal)[te_neg]
        ref = fit_reference(rp)
        zp, zn = zscores(rp, ref), zscores(rn, ref)
        res = {s: auroc(-zp[s], -zn[s]) for s in SIGNALS if s in zp}
        good = {}  # per combination: (positives', negatives') score, higher = cleaner
        for label, sig in combos.items():
            if all(s in zp for s in sig):
                r = (combo_rules or {}).get(label, rule)
                good[label] = (-combine(zp, sig, r)[0], -combine(zn, sig, r)[0])
                res[label] = auroc(*good[label])
        kept = "codes" if "codes" in combos else "combined"
        if scores_out is not None and kept in good:
            scores_out[name] = {"pos_rows": te_pos, "pos": good[kept][0], "neg_rows": te_neg, "neg": good[kept][1]}
        out[name] = res
        pos_raw[name] = (rp, te_pos)
    return out, pos_raw


def fit_quality_probe(
    pos_X: sp.csr_matrix, neg_X: sp.csr_matrix, neg_types: list[str] | np.ndarray, *, C: float = 0.01,
    min_support: float = 0.01, max_features: int = 4096, seed: int = 0, use_ray: bool = False,
    neg_source: np.ndarray | None = None, folds: int = 2, bands: list[tuple[int, int]] | None = None,
    pos_len: np.ndarray | None = None, neg_len: np.ndarray | None = None,
    combine_signals: list[str] | tuple[str, ...] = ("probe", "novelty"), held_out: bool = True,
    max_false_positive_rate: float = 0.01, combine_rule: str = "max", neighbor_band: tuple[int, int] | None = None,
    neighbor_k: int = 10, pos_surprisal: np.ndarray | None = None, neg_surprisal: np.ndarray | None = None,
    scores_out: dict | None = None, pos_groups: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Out-of-fold AUROCs (overall + leaving one group of negatives out: pass corruption families), per
    signal and combined; then the final probe on all rows, the novelty counts on all positives, each
    signal's reference (location, scale) from the out-of-fold positives, and the `max_false_positive_rate`
    cut on the combined score of those clean held-out positives. `neg_source`: for synthetic negatives,
    the positive row each one was made from (see evaluation_splits). Lengths (n_chars) enable `length`,
    the features' surprisal column `surprisal`. `scores_out`: see pooled_signal_aurocs. `pos_groups`: each
    positive's source, for novelty per source (fit_novelty)."""
    neg_types = np.asarray(neg_types, dtype=str)
    combine_signals = tuple(combine_signals)
    if neg_X.shape[0] != len(neg_types):
        raise ValueError(f"{neg_X.shape[0]} negative rows but {len(neg_types)} negative types")
    bad = [s for s in combine_signals if s not in SIGNALS]
    if bad or not combine_signals:
        raise ValueError(f"signals.quality.combine must be a non-empty subset of {SIGNALS}, got {list(combine_signals)}")
    if "length" in combine_signals and (pos_len is None or neg_len is None):
        raise ValueError("the length signal needs prompt lengths (pos_len, neg_len)")
    if "surprisal" in combine_signals and (pos_surprisal is None or neg_surprisal is None):
        raise ValueError("the surprisal signal needs the rows' surprisal (features.surprisal: true)")
    if combine_rule not in RULES:
        raise ValueError(f"signals.quality.combine_rule must be one of {RULES}, got {combine_rule!r}")
    bands = bands or default_bands(pos_X.shape[1])
    neighbor_band = tuple(neighbor_band or (0, pos_X.shape[1]))
    splits = evaluation_splits(neg_types, pos_X.shape[0], seed, neg_source, folds, held_out)
    if pos_groups is not None and len(pos_groups) != pos_X.shape[0]:
        raise ValueError(f"{pos_X.shape[0]} positive rows but {len(pos_groups)} positive groups")
    args = (C, min_support, max_features, seed, bands, neighbor_band, neighbor_k, pos_groups)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(heldout_scores)
        p_ref, n_ref = ray.put(pos_X), ray.put(neg_X)
        raws = ray.get([task.remote(p_ref, n_ref, *s, *args) for _, s in splits])
    else:
        raws = [heldout_scores(pos_X, neg_X, *s, *args) for _, s in splits]
    combos = {"combined": combine_signals, "probe+novelty": ("probe", "novelty"),
              "probe+neighbors": ("probe", "neighbors"), "probe+novelty+neighbors": ("probe", "novelty", "neighbors")}
    if pos_len is not None and neg_len is not None:
        combos["probe+novelty+length"] = ("probe", "novelty", "length")
    combo_rules = {}
    if pos_surprisal is not None and neg_surprisal is not None:
        combos["probe+neighbors+surprisal"] = ("probe", "neighbors", "surprisal")
        combos["probe+novelty+neighbors+surprisal"] = ("probe", "novelty", "neighbors", "surprisal")
    codes = tuple(s for s in combine_signals if s in CODE_SIGNALS)
    if codes and codes != combine_signals:  # `codes`: what the SAE codes alone give, summed as by default
        combos["codes"], combo_rules["codes"] = codes, "sum"
    auroc, pos_raw = pooled_signal_aurocs(splits, raws, combos, pos_len, neg_len, combine_rule,
                                          pos_surprisal, neg_surprisal, scores_out, combo_rules)
    per_group = {k: v for k, v in auroc.items() if k != "overall"}
    metrics: dict[str, Any] = {
        "combine": list(combine_signals), "combine_rule": combine_rule, "auroc_overall": auroc["overall"]["combined"],
        "auroc_overall_by_signal": auroc["overall"], "eval_folds": folds,
    }
    if per_group:
        fam = {k: v["combined"] for k, v in per_group.items()}
        metrics.update(
            auroc_leave_one_family_out=fam, auroc_lofo_mean=float(np.mean(list(fam.values()))),
            auroc_lofo_min=float(min(fam.values())), n_families=len(fam),
            auroc_lofo_by_signal={s: {"mean": float(np.mean([v[s] for v in per_group.values()])),
                                      "min": float(min(v[s] for v in per_group.values()))}
                                  for s in next(iter(per_group.values()))},
            auroc_lofo_table=per_group,
        )
    X = sp.vstack([pos_X, neg_X]).tocsr()
    y = np.r_[np.ones(pos_X.shape[0]), np.zeros(neg_X.shape[0])]
    model = fit_linear_probe(X, y, C, min_support, max_features, seed)
    model["novelty"] = fit_novelty(pos_X, bands, pos_groups)
    model["neighbors"] = fit_neighbors(pos_X, neighbor_band, neighbor_k, seed)
    # The reference: every positive scored out of fold (the "overall" splits test each one once); novelty
    # and neighbors with the final model, each positive without its own counts / itself (leave-one-out),
    # so their scale is the final model's.
    rp, te_pos = pos_raw["overall"]
    final = raw_signals(model, pos_X[te_pos], loo=True,
                        groups=None if pos_groups is None else np.asarray(pos_groups)[te_pos])
    rp = {**rp, "novelty": final["novelty"], "neighbors": final["neighbors"]}
    model["reference"] = fit_reference({s: rp[s] for s in rp})
    model["combine"] = list(combine_signals)
    model["combine_rule"] = combine_rule
    bad_clean, _ = combine(zscores(rp, model["reference"]), combine_signals, combine_rule)
    z_cut, trimmed = fpr_cut(bad_clean, max_false_positive_rate)
    model["fpr_threshold"] = -z_cut
    metrics.update(n_pos=int(pos_X.shape[0]), n_neg=int(neg_X.shape[0]),
                   neg_types={str(t): int((neg_types == t).sum()) for t in np.unique(neg_types)},
                   calibration={"reference_rows": int(len(bad_clean)), "trimmed_as_pollution": trimmed,
                                "trim_z": TRIM_Z, "max_false_positive_rate": max_false_positive_rate,
                                "threshold": -z_cut})
    return model, metrics


# ---------------------------------------------------------------- filter
def keep_mask(scores: np.ndarray, keep_fraction: float | None, threshold: float | None) -> tuple[np.ndarray, float]:
    """Everything at or above `threshold`, or (legacy quota) the top `keep_fraction` by score; returns (keep, cut)."""
    if threshold is not None:
        return scores >= threshold, float(threshold)
    if keep_fraction is None or not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"signals.quality.keep_fraction must be in (0, 1], got {keep_fraction}")
    n_keep = int(np.ceil(keep_fraction * len(scores)))
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return keep, float(scores[keep].min()) if n_keep else float("inf")


def filter_rule(model: dict, cfg: QualityConfig) -> tuple[str, float | None]:
    """Which rule decides, and its threshold: an explicit `threshold`, else a legacy `keep_fraction` quota
    (cut known only after scoring), else the model's `max_false_positive_rate` cut."""
    if cfg.threshold is not None:
        return "threshold", float(cfg.threshold)
    if cfg.keep_fraction is not None:
        return "keep_fraction", None
    return "max_false_positive_rate", float(model["fpr_threshold"])


def flags_for(keep: np.ndarray, flag_idx: np.ndarray, signals: list[str]) -> np.ndarray:
    """Per row, the signal that flagged a dropped prompt ("" for kept ones)."""
    names = np.asarray(list(signals), dtype=object)
    return np.where(keep, "", names[np.asarray(flag_idx, np.int64)]).astype(object)


def labelled_rows(prompts: pd.DataFrame, column: str | None) -> np.ndarray | None:
    """Quality labels (1 good / 0 bad) when the column is configured, present, and has both classes."""
    if not column or column not in prompts.columns:
        return None
    y = pd.to_numeric(prompts[column], errors="coerce").to_numpy(float)
    known = np.isfinite(y)
    if known.sum() < 10 or len(np.unique(y[known] >= 0.5)) < 2:
        return None
    return y


@dataclass
class QualitySetup:
    """Which rows the probe trains on, decided before any code is read."""
    pos: np.ndarray  # prompt rows whose codes the positives take (with a reference: the sampled ones in the pool)
    neg: np.ndarray | None  # labelled-bad prompt rows; None = synthetic negatives of the positives
    label_source: str
    # With a trusted reference (signals.quality.reference): the sampled reference rows (id, prompt, answer,
    # source, n_chars), the positives in this order, and each one's prompt row (-1: not in the pool).
    ref: pd.DataFrame | None = None
    ref_rows: np.ndarray | None = None
    ref_counts: dict | None = None
    pos_source: np.ndarray | None = None  # each positive's source (novelty per source), in the positives' order


def quality_setup(prompts: pd.DataFrame, cfg: QualityConfig, seed: int,
                  reference: tuple[pd.DataFrame, dict] | None = None) -> QualitySetup:
    """Labelled rows when the quality column has both classes; else a seeded sample of `n_train` positives
    from the trusted reference files (cfg.reference; `reference` = their rows and per-file counts, as
    saerl_ray.stages.signals.read_reference reads them) or, with none, from the pool itself."""
    rng = np.random.default_rng(seed)
    y = labelled_rows(prompts, cfg.label_column)
    pool_source = prompts["source"].astype(str).to_numpy() if "source" in prompts.columns else None
    if y is not None:
        good = np.flatnonzero(np.isfinite(y) & (y >= 0.5))
        bad = np.flatnonzero(np.isfinite(y) & (y < 0.5))
        return QualitySetup(good, bad, f"prompts.{cfg.label_column}",
                            pos_source=None if pool_source is None else pool_source[good])
    synthetic = "synthetic corruptions: " + ",".join(cfg.corruptions)
    if cfg.reference:
        if reference is None:
            raise ValueError("quality_setup: signals.quality.reference is set; pass its rows "
                             "(saerl_ray.stages.signals.read_reference(cfg.reference))")
        ref, counts = reference
        sources = ref["source"].to_numpy() if cfg.balance_sources else np.zeros(len(ref))
        ref = ref.iloc[balanced_sample(sources, cfg.n_train, rng)].reset_index(drop=True)
        ids = prompts["id"].astype(str) if "id" in prompts.columns else pd.Series([], dtype=str)
        row_of = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
        row_of = row_of[~row_of.index.duplicated()]
        rows = row_of.reindex(ref["id"].to_numpy()).fillna(-1).to_numpy(np.int64)
        files = ",".join(s.path for s in cfg.reference)
        return QualitySetup(np.sort(rows[rows >= 0]), None, f"reference {files}; {synthetic}", ref, rows, counts,
                            ref["source"].astype(str).to_numpy())
    # One source for all rows = a uniform sample of the pool.
    balance = cfg.balance_sources and "source" in prompts
    sources = prompts["source"].to_numpy() if balance else np.zeros(len(prompts))
    pick = balanced_sample(sources, cfg.n_train, rng)
    return QualitySetup(pick, None, synthetic, pos_source=None if pool_source is None else pool_source[pick])


def reference_positives(setup: QualitySetup, pool_codes: Callable[[np.ndarray], sp.csr_matrix],
                        featurize: Featurizer | None, pool_surprisal: np.ndarray | None = None,
                        ) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """(codes, surprisal or None) of the sampled reference rows, in setup.ref order: a row in the pool takes
    the pool's codes (pool_codes(prompt rows)) and surprisal, the others are featurised here. Surprisal is
    None unless every row has one (the pool's, where given, or the featurizer's)."""
    rows = setup.ref_rows
    inside = rows >= 0
    X_in = sp.csr_matrix(pool_codes(rows[inside]))
    s = np.full(len(rows), np.nan)
    if pool_surprisal is not None:
        s[inside] = np.asarray(pool_surprisal, float)[rows[inside]]
    X_out = sp.csr_matrix((0, X_in.shape[1]), dtype=np.float32)
    if (~inside).any():
        if featurize is None:
            raise ValueError("reference prompts outside the pool need a featurizer (saerl_ray.stages.features.featurize_texts)")
        out = featurize(setup.ref["prompt"].to_numpy()[~inside].tolist())
        X_out, s_out = out if isinstance(out, tuple) else (out, None)
        X_out = sp.csr_matrix(X_out)
        if X_out.shape != ((~inside).sum(), X_in.shape[1]):
            raise ValueError(f"featurizer returned shape {X_out.shape}, expected {((~inside).sum(), X_in.shape[1])}")
        if s_out is not None:
            s[~inside] = np.asarray(s_out, float)
    order = np.argsort(np.r_[np.flatnonzero(inside), np.flatnonzero(~inside)], kind="stable")
    X = sp.vstack([X_in, X_out]).tocsr()[order]
    return X, (s if np.isfinite(s).all() else None)


def balanced_sample(sources: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices, at most n: each source an equal share of what is left, smallest sources first
    (a source smaller than its share gives all of its rows and the rest goes to the others)."""
    inverse = np.unique(np.asarray(sources, str), return_inverse=True)[1]
    groups = sorted((np.flatnonzero(inverse == k) for k in np.unique(inverse)), key=len)
    picked, left = [], min(n, len(sources))
    for i, rows in enumerate(groups):
        take = min(len(rows), left // (len(groups) - i))
        picked.append(rng.choice(rows, size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def fit_setup(setup: QualitySetup, pos_X: sp.csr_matrix, neg_X: sp.csr_matrix | None, texts: list[str] | None,
              answers: list[str] | None, featurize: Featurizer | None, cfg: QualityConfig, seed: int,
              use_ray: bool = True, bands: list[tuple[int, int]] | None = None,
              pos_len: np.ndarray | None = None, neg_len: np.ndarray | None = None,
              neighbor_band: tuple[int, int] | None = None, pos_surprisal: np.ndarray | None = None,
              neg_surprisal: np.ndarray | None = None) -> tuple[dict, dict]:
    """The probe + novelty on the codes of `setup.pos` (+ `setup.neg`, or negatives made from `texts` /
    `answers`, the positives' own prompts, featurised here). Lengths: n_chars of the positives (and of
    labelled negatives; synthetic negatives' are their texts' lengths). Surprisal likewise, when the
    combination uses it: `featurize` then returns (codes, surprisal) of the new texts."""
    if setup.neg is not None:
        neg_types, neg_source = ["labelled"] * len(setup.neg), None
        kinds = neg_types
    else:
        if featurize is None:
            raise ValueError("synthetic quality negatives need a featurizer (saerl_ray.stages.features.featurize_texts)")
        neg_texts, kinds, neg_source = make_negatives(
            texts, answers, seed=seed, types=cfg.corruptions, per_prompt=cfg.negatives_per_prompt,
        )
        neg_types = families_of(kinds)
        neg_len = np.array([len(t) for t in neg_texts], float)
        out = featurize(neg_texts)
        neg_X, neg_surprisal = out if isinstance(out, tuple) else (out, None)
        neg_X = sp.csr_matrix(neg_X)
        if neg_X.shape != (len(neg_texts), pos_X.shape[1]):
            raise ValueError(f"featurizer returned shape {neg_X.shape}, expected {(len(neg_texts), pos_X.shape[1])}")
    model, metrics = fit_quality_probe(
        pos_X, neg_X, neg_types, C=cfg.C, min_support=cfg.min_support, max_features=cfg.max_features,
        seed=seed, use_ray=use_ray, neg_source=neg_source, folds=cfg.eval_folds, bands=bands,
        pos_len=pos_len, neg_len=neg_len, combine_signals=cfg.combine, held_out=cfg.leave_one_family_out,
        max_false_positive_rate=cfg.max_false_positive_rate, combine_rule=cfg.combine_rule,
        neighbor_band=neighbor_band, neighbor_k=cfg.neighbors_k,
        pos_surprisal=pos_surprisal if "surprisal" in cfg.combine else None,
        neg_surprisal=neg_surprisal if "surprisal" in cfg.combine else None,
        pos_groups=setup.pos_source if cfg.novelty_by_source else None,
    )
    metrics["neg_kinds"] = {str(k): int(v) for k, v in zip(*np.unique(np.asarray(kinds, str), return_counts=True))}
    return model, metrics


def finish_quality(setup: QualitySetup, model: dict, metrics: dict, scores: np.ndarray, flag_idx: np.ndarray,
                   cfg: QualityConfig, out_path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Keep flags from every prompt's score (filter_rule), the flag of each dropped prompt, then quality.json."""
    rule, cut = filter_rule(model, cfg)
    keep, cut = keep_mask(scores, cfg.keep_fraction, cut)
    flags = flags_for(keep, flag_idx, model["combine"])
    by_flag = {s: int((flags == s).sum()) for s in model["combine"]}
    metrics.update(label_source=setup.label_source, rule=rule, threshold=cut, kept=int(keep.sum()),
                   dropped=int((~keep).sum()), dropped_by_signal=by_flag)
    if setup.ref is not None:
        metrics["reference"] = {"files": setup.ref_counts, "sampled": int(len(setup.ref)),
                                "in_pool": int((setup.ref_rows >= 0).sum()),
                                "featurised": int((setup.ref_rows < 0).sum())}
    storage.write_json(out_path, {**model, "threshold": cut, "metrics": metrics})
    return keep, flags, metrics


def run_quality(
    prompts: pd.DataFrame, X: sp.csr_matrix, cfg: QualityConfig, seed: int, featurize: Featurizer | None,
    out_path: str, use_ray: bool = True, bands: list[tuple[int, int]] | None = None,
    surprisal: np.ndarray | None = None, neighbor_band: tuple[int, int] | None = None,
    reference: tuple[pd.DataFrame, dict] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Stage body on codes in memory: labels or synthetic negatives -> probe + novelty -> score every
    prompt -> keep flags. (The signals stage runs the same steps with the codes left in their part files.)
    `surprisal`: every prompt's (the features' column), when combined; `reference`: as quality_setup.
    Returns (quality_score, keep, flag, metrics)."""
    setup = quality_setup(prompts, cfg, seed, reference)
    n_chars = (prompts["n_chars"].to_numpy(float) if "n_chars" in prompts.columns
               else prompts["prompt"].str.len().to_numpy(float))
    texts = answers = None
    pos_X, pos_len = X[setup.pos], n_chars[setup.pos]
    pos_s = None if surprisal is None else surprisal[setup.pos]
    if setup.ref is not None:
        pos_X, pos_s = reference_positives(setup, lambda r: X[r], featurize, surprisal)
        pos_len = setup.ref["n_chars"].to_numpy(float)
        texts, answers = setup.ref["prompt"].tolist(), setup.ref["answer"].fillna("").tolist()
    elif setup.neg is None:
        sub = prompts.iloc[setup.pos]
        texts, answers = sub["prompt"].tolist(), sub["answer"].fillna("").tolist()
    model, metrics = fit_setup(setup, pos_X, None if setup.neg is None else X[setup.neg], texts, answers,
                               featurize, cfg, seed, use_ray, bands, pos_len,
                               None if setup.neg is None else n_chars[setup.neg], neighbor_band=neighbor_band, pos_surprisal=pos_s,
                               neg_surprisal=None if surprisal is None or setup.neg is None else surprisal[setup.neg])
    scores, flag_idx = quality_scores(model, X, n_chars, surprisal)
    keep, flags, metrics = finish_quality(setup, model, metrics, scores, flag_idx, cfg, out_path)
    return scores, keep, flags, metrics
