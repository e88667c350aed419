"""Quality: a linear probe (logistic regression) on SAE codes scores prompts; the lowest are filtered out.

    from saerl_ray.quality import make_negatives, fit_quality_probe, score_from_json
    neg_texts, neg_types, source = make_negatives(texts, answers, seed=0, per_prompt=2)  # source: row of texts
    model, metrics = fit_quality_probe(X_pos, featurize(neg_texts), neg_types, neg_source=source)
    scores = score_from_json("runs/x/signals/quality.json", X_all)     # P(good) per prompt

Labels: a `prompts` quality column (1 good / 0 bad) when one is configured and present; otherwise
synthetic negatives, each a documented corruption of a real prompt (they are new texts, so they get
SAE codes from the features machinery through the `featurize` callable):
  truncate   the problem cut at a word boundary 30-70% of the way through (a strict prefix)
  shuffle    the problem's words in random order
  mismatch   the first half of this problem spliced onto the second half of another one
  leak       the problem followed by "The answer is <its answer>."
  offdomain  2-4 sentences of built-in non-math prose (no math prompt text at all)
  garble     ~30% of the characters replaced by random printable noise
Metrics, out-of-fold over `eval_folds` folds of the positives (a prompt's corruptions in its fold):
AUROC on held-out prompts, and leaving one corruption type out (train on the others, test on that type
+ held-out positives: does the probe catch a kind of bad prompt it never saw?).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from saerl_ray import storage
from saerl_ray.config import QualityConfig
from saerl_ray.difficulty import design, linear_json, linear_score, select_columns

CORRUPTIONS = ("truncate", "shuffle", "mismatch", "leak", "offdomain", "garble")
Featurizer = Callable[[list[str]], sp.csr_matrix]

# Non-math prose for `offdomain`, written for this project (no downloads, no licence questions).
OFFDOMAIN_SENTENCES = [
    "Preheat the oven and let the dough rest for twenty minutes before shaping the loaves.",
    "The museum's east wing reopens next spring after a long renovation of its glass roof.",
    "Our support team will reply to your ticket within two business days.",
    "Water the tomatoes early in the morning so the leaves dry before the afternoon sun.",
    "The striker curled the ball past the keeper in the final minute of extra time.",
    "Please remember to bring a reusable bag when you visit the farmers market on Saturday.",
    "The novel follows a lighthouse keeper who writes letters to a sister she has never met.",
    "Heavy rain is expected along the coast tonight, with winds easing by the weekend.",
    "To reset the router, hold the small button on the back for ten seconds.",
    "The committee thanked the volunteers who organised the charity run through the old town.",
    "Add a pinch of salt, stir in the chopped herbs, and simmer the soup on low heat.",
    "The hotel offers a shuttle from the airport every half hour until midnight.",
    "Many migratory birds rest in the wetlands before continuing their journey south.",
    "The band's second album is quieter, built around piano and a string quartet.",
    "Update your password regularly and never share it with anyone over the phone.",
    "The castle on the hill was built as a hunting lodge and later became a school.",
    "She painted the fence a pale green that matched the shutters on the cottage.",
    "Traffic on the main bridge will be diverted while the road surface is repaired.",
    "The documentary explores how coral reefs recover after a season of warm water.",
    "Dear customer, your parcel has been dispatched and should arrive on Thursday.",
    "The chef recommends pairing the mushroom risotto with a light white wine.",
    "Children can borrow up to ten books at a time from the public library.",
    "The hiking trail climbs through pine forest before reaching a quiet mountain lake.",
    "Our meeting is moved to the small conference room on the third floor.",
    "The actor thanked his family and the crew during a short, emotional speech.",
    "Keep the plant away from direct sunlight and mist its leaves once a week.",
    "The festival closes with fireworks over the harbour at ten in the evening.",
    "Knit the first row loosely so the edge of the scarf does not curl.",
    "The report describes how the village restored its mill with local donations.",
    "Please silence your phones before the performance begins.",
]


# ---------------------------------------------------------------- corruptions (pure, seeded)
def truncate(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    if len(words) < 2:
        return text[: max(1, len(text) // 2)]
    cut = int(np.clip(round(len(words) * rng.uniform(0.3, 0.7)), 1, len(words) - 1))
    return " ".join(words[:cut])


def shuffle(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    if len(set(words)) < 2:
        return "".join(rng.permutation(list(text)))
    for _ in range(10):  # a permutation can land on the original order for short texts
        out = " ".join(words[i] for i in rng.permutation(len(words)))
        if out != " ".join(words):
            return out
    return " ".join(words[::-1])


def mismatch(text: str, other: str, rng: np.random.Generator) -> str:
    a, b = text.split(), other.split()
    cut_a = max(1, len(a) // 2)
    cut_b = max(0, min(len(b) - 1, len(b) // 2))
    return " ".join(a[:cut_a] + b[cut_b:])


def leak(text: str, answer: str) -> str:
    return f"{text.rstrip()} The answer is {answer.strip()}."


def offdomain(rng: np.random.Generator) -> str:
    k = int(rng.integers(2, 5))
    return " ".join(OFFDOMAIN_SENTENCES[i] for i in rng.choice(len(OFFDOMAIN_SENTENCES), k, replace=False))


def garble(text: str, rng: np.random.Generator, rate: float = 0.3) -> str:
    chars = np.array(list(text), dtype=object)
    hit = rng.random(len(chars)) < rate
    noise = list(string.ascii_letters + string.digits + string.punctuation)
    chars[hit] = rng.choice(noise, size=int(hit.sum()))
    return "".join(chars)


def corrupt(kind: str, i: int, texts: list[str], answers: list[str], rng: np.random.Generator) -> str:
    text = texts[i]
    if kind == "truncate":
        return truncate(text, rng)
    if kind == "shuffle":
        return shuffle(text, rng)
    if kind == "mismatch":
        j = int(rng.integers(len(texts) - 1))
        return mismatch(text, texts[j + (j >= i)], rng)
    if kind == "leak":
        return leak(text, answers[i])
    if kind == "offdomain":
        return offdomain(rng)
    if kind == "garble":
        return garble(text, rng)
    raise ValueError(f"unknown corruption {kind!r}; signals.quality.corruptions must be among {CORRUPTIONS}")


def make_negatives(
    texts: list[str], answers: list[str] | None = None, seed: int = 0, types: list[str] | None = None,
    per_prompt: int = 1,
) -> tuple[list[str], list[str], np.ndarray]:
    """(negatives, their types, source): `per_prompt` negatives per text, negative j derived from
    texts[source[j]] (source[j] = j % len(texts); evaluation keeps each pair on one side). Types are dealt
    round-robin over a seeded permutation, so each type gets an equal share of random prompts, and each
    round shifts a prompt to the next type (its negatives differ in kind). `leak` needs an answer: rows
    without one get the next type instead."""
    types = list(types or CORRUPTIONS)
    bad = [t for t in types if t not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption {bad[0]!r}; signals.quality.corruptions must be among {CORRUPTIONS}")
    if len(texts) < 2:
        raise ValueError("synthetic quality negatives need at least 2 prompts")
    if per_prompt < 1:
        raise ValueError(f"signals.quality.negatives_per_prompt must be >= 1, got {per_prompt}")
    answers = list(answers) if answers is not None else [""] * len(texts)
    rng = np.random.default_rng(seed)
    slot = np.empty(len(texts), dtype=np.int64)
    slot[rng.permutation(len(texts))] = np.arange(len(texts)) % len(types)
    out_t, out_k = [], []
    for r in range(per_prompt):
        for i, s in enumerate((slot + r) % len(types)):
            kind = types[s]
            if kind == "leak" and not (answers[i] or "").strip() and len(types) > 1:
                kind = types[(s + 1) % len(types)]
            out_t.append(corrupt(kind, i, texts, answers, rng))
            out_k.append(kind)
    return out_t, out_k, np.arange(len(out_t)) % len(texts)


# ---------------------------------------------------------------- probe
def fit_linear_probe(X: sp.csr_matrix, y: np.ndarray, C: float, min_support: float, max_features: int,
                     seed: int = 0) -> dict:
    cols = select_columns(X, min_support, max_features)
    D = design(X, cols).toarray()
    scaler = StandardScaler().fit(D)
    clf = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit(scaler.transform(D), y)
    return linear_json(cols, scaler, clf.coef_, clf.intercept_)


def probe_scores(model: dict, X: sp.csr_matrix) -> np.ndarray:
    """P(good) per row."""
    return 1.0 / (1.0 + np.exp(-linear_score(model, X)))


def score_from_json(path: str | Path, X: sp.csr_matrix) -> np.ndarray:
    """Reload `signals/quality.json` and score CSR codes X (P(good))."""
    return probe_scores(storage.read_json(path), X).astype(np.float32)


def heldout_scores(
    pos_X: sp.csr_matrix, neg_X: sp.csr_matrix, train_pos: np.ndarray, test_pos: np.ndarray,
    train_neg: np.ndarray, test_neg: np.ndarray, C: float, min_support: float, max_features: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit on (train_pos, train_neg) rows; P(good) of the test_pos and test_neg rows."""
    Xtr = sp.vstack([pos_X[train_pos], neg_X[train_neg]]).tocsr()
    ytr = np.r_[np.ones(len(train_pos)), np.zeros(len(train_neg))]
    model = fit_linear_probe(Xtr, ytr, C, min_support, max_features, seed)
    return probe_scores(model, pos_X[test_pos]), probe_scores(model, neg_X[test_neg])


def evaluation_splits(
    neg_types: np.ndarray, n_pos: int, seed: int, neg_source: np.ndarray | None = None, folds: int = 2,
) -> list[tuple[str, tuple]]:
    """(name, (train_pos, test_pos, train_neg, test_neg)) per fold. Positives are cut into `folds` folds;
    each fold is tested once, by a probe trained on the other folds. `overall`: trained on every
    corruption type. Per type t: trained without t, tested on t only (t is never seen in training).
    `neg_source[j]` = the positive negative j was made from: a prompt and its corruptions share a fold
    (else a test prompt's own corruption would be in training). Without it (labelled negatives)
    negatives get random folds."""
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
        for t in types if len(types) > 1 else []:
            splits.append((str(t), (tr_pos, te_pos, np.flatnonzero(tr_neg & (neg_types != t)),
                                    np.flatnonzero(~tr_neg & (neg_types == t)))))
    return splits


def pooled_aurocs(splits: list[tuple[str, tuple]], scores: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """One AUROC per split name over the out-of-fold scores of all its folds."""
    out = {}
    for name in dict.fromkeys(n for n, _ in splits):
        parts = [sc for (n, _), sc in zip(splits, scores) if n == name]
        pos, neg = np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts])
        out[name] = float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))
    return out


def fit_quality_probe(
    pos_X: sp.csr_matrix, neg_X: sp.csr_matrix, neg_types: list[str] | np.ndarray, *, C: float = 0.01,
    min_support: float = 0.01, max_features: int = 4096, seed: int = 0, use_ray: bool = False,
    neg_source: np.ndarray | None = None, folds: int = 2,
) -> tuple[dict, dict]:
    """Out-of-fold AUROCs (overall + leave-one-corruption-type-out), then the final probe on all rows.
    `neg_source`: for synthetic negatives, the positive row each one was made from (see evaluation_splits)."""
    neg_types = np.asarray(neg_types, dtype=str)
    if neg_X.shape[0] != len(neg_types):
        raise ValueError(f"{neg_X.shape[0]} negative rows but {len(neg_types)} negative types")
    splits = evaluation_splits(neg_types, pos_X.shape[0], seed, neg_source, folds)
    args = (C, min_support, max_features, seed)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(heldout_scores)
        p_ref, n_ref = ray.put(pos_X), ray.put(neg_X)
        scores = ray.get([task.remote(p_ref, n_ref, *s, *args) for _, s in splits])
    else:
        scores = [heldout_scores(pos_X, neg_X, *s, *args) for _, s in splits]
    auroc = pooled_aurocs(splits, scores)
    per_type = {k: v for k, v in auroc.items() if k != "overall"}
    metrics: dict[str, Any] = {"auroc_overall": auroc["overall"], "auroc_leave_one_type_out": per_type,
                               "eval_folds": folds}
    if per_type:
        metrics["auroc_loto_mean"] = float(np.mean(list(per_type.values())))
    X = sp.vstack([pos_X, neg_X]).tocsr()
    y = np.r_[np.ones(pos_X.shape[0]), np.zeros(neg_X.shape[0])]
    model = fit_linear_probe(X, y, C, min_support, max_features, seed)
    metrics.update(n_pos=int(pos_X.shape[0]), n_neg=int(neg_X.shape[0]),
                   neg_types={str(t): int((neg_types == t).sum()) for t in np.unique(neg_types)})
    return model, metrics


def keep_mask(scores: np.ndarray, keep_fraction: float, threshold: float | None) -> tuple[np.ndarray, float]:
    """Everything at or above `threshold`, or the top `keep_fraction` by score; returns (keep, cut)."""
    if threshold is not None:
        return scores >= threshold, float(threshold)
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"signals.quality.keep_fraction must be in (0, 1], got {keep_fraction}")
    n_keep = int(np.ceil(keep_fraction * len(scores)))
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return keep, float(scores[keep].min()) if n_keep else float("inf")


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
    """Which prompt rows the probe trains on, decided before any code is read."""
    pos: np.ndarray  # prompt rows used as positives
    neg: np.ndarray | None  # labelled-bad prompt rows; None = synthetic negatives of the positives
    label_source: str


def quality_setup(prompts: pd.DataFrame, cfg: QualityConfig, seed: int) -> QualitySetup:
    """Labelled rows when the quality column has both classes, else a seeded sample of `n_train` positives."""
    rng = np.random.default_rng(seed)
    y = labelled_rows(prompts, cfg.label_column)
    if y is not None:
        good = np.flatnonzero(np.isfinite(y) & (y >= 0.5))
        bad = np.flatnonzero(np.isfinite(y) & (y < 0.5))
        return QualitySetup(good, bad, f"prompts.{cfg.label_column}")
    pick = np.sort(rng.choice(len(prompts), size=min(cfg.n_train, len(prompts)), replace=False))
    return QualitySetup(pick, None, "synthetic corruptions: " + ",".join(cfg.corruptions))


def fit_setup(setup: QualitySetup, pos_X: sp.csr_matrix, neg_X: sp.csr_matrix | None, texts: list[str] | None,
              answers: list[str] | None, featurize: Featurizer | None, cfg: QualityConfig, seed: int,
              use_ray: bool = True) -> tuple[dict, dict]:
    """The probe on the codes of `setup.pos` (+ `setup.neg`, or negatives made from `texts`/`answers`,
    the positives' own prompts, and featurised here)."""
    if setup.neg is not None:
        neg_types, neg_source = ["labelled"] * len(setup.neg), None
    else:
        if featurize is None:
            raise ValueError("synthetic quality negatives need a featurizer (saerl_ray.features.featurize_texts)")
        neg_texts, neg_types, neg_source = make_negatives(
            texts, answers, seed=seed, types=cfg.corruptions, per_prompt=cfg.negatives_per_prompt,
        )
        neg_X = sp.csr_matrix(featurize(neg_texts))
        if neg_X.shape != (len(neg_texts), pos_X.shape[1]):
            raise ValueError(f"featurizer returned shape {neg_X.shape}, expected {(len(neg_texts), pos_X.shape[1])}")
    return fit_quality_probe(
        pos_X, neg_X, neg_types, C=cfg.C, min_support=cfg.min_support, max_features=cfg.max_features,
        seed=seed, use_ray=use_ray, neg_source=neg_source, folds=cfg.eval_folds,
    )


def finish_quality(setup: QualitySetup, model: dict, metrics: dict, scores: np.ndarray, cfg: QualityConfig,
                   out_path: str) -> tuple[np.ndarray, dict]:
    """Keep flags from every prompt's score, then quality.json."""
    keep, cut = keep_mask(scores, cfg.keep_fraction, cfg.threshold)
    metrics.update(label_source=setup.label_source, threshold=cut, kept=int(keep.sum()), dropped=int((~keep).sum()))
    storage.write_json(out_path, {**model, "threshold": cut, "metrics": metrics})
    return keep, metrics


def run_quality(
    prompts: pd.DataFrame, X: sp.csr_matrix, cfg: QualityConfig, seed: int, featurize: Featurizer | None,
    out_path: str, use_ray: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stage body on codes in memory: labels or synthetic negatives -> probe -> score every prompt ->
    keep flags. (The signals stage runs the same steps with the codes left in their part files.)"""
    setup = quality_setup(prompts, cfg, seed)
    texts = answers = None
    if setup.neg is None:
        sub = prompts.iloc[setup.pos]
        texts, answers = sub["prompt"].tolist(), sub["answer"].fillna("").tolist()
    model, metrics = fit_setup(setup, X[setup.pos], None if setup.neg is None else X[setup.neg], texts, answers,
                               featurize, cfg, seed, use_ray)
    scores = probe_scores(model, X).astype(np.float32)
    keep, metrics = finish_quality(setup, model, metrics, scores, cfg, out_path)
    return scores, keep, metrics
