"""Quality probe (saerl_ray.quality): each corruption does what it says, leave-one-type-out AUROC is
computed on a type the probe never saw, JSON round trip, keep rules."""

import json
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from saerl_ray.difficulty import design
from saerl_ray.quality import (
    CORRUPTIONS, OFFDOMAIN_SENTENCES, evaluation_splits, pooled_aurocs, fit_quality_probe, garble, keep_mask, leak,
    make_negatives, mismatch, offdomain, probe_scores, score_from_json, shuffle, truncate,
)

TEXT = "Find the number of positive integers n such that n squared is less than one hundred and n is odd."
OTHER = "A triangle has sides of length three four and five so compute its area in square units please."


def rng():
    return np.random.default_rng(0)


def test_truncate_is_a_strict_prefix():
    for s in range(20):
        t = truncate(TEXT, np.random.default_rng(s))
        assert TEXT.startswith(t) and 0.2 * len(TEXT) < len(t) < len(TEXT)


def test_shuffle_keeps_the_words_and_changes_the_order():
    t = shuffle(TEXT, rng())
    assert t != TEXT and Counter(t.split()) == Counter(TEXT.split())


def test_mismatch_splices_two_problems():
    t = mismatch(TEXT, OTHER, rng())
    a, b = TEXT.split(), OTHER.split()
    assert t.startswith(" ".join(a[: len(a) // 2])) and t.endswith(" ".join(b[len(b) // 2 :]))
    assert t not in (TEXT, OTHER)


def test_leak_appends_the_answer():
    assert leak(TEXT, " 5 ") == TEXT + " The answer is 5."


def test_offdomain_is_builtin_non_math_prose():
    t = offdomain(rng())
    parts = [s for s in OFFDOMAIN_SENTENCES if s in t]
    assert 2 <= len(parts) <= 4 and sum(map(len, parts)) + len(parts) - 1 == len(t)


def test_garble_replaces_about_a_third_of_characters():
    t = garble(TEXT * 5, rng())
    changed = sum(a != b for a, b in zip(t, TEXT * 5)) / len(t)
    assert len(t) == len(TEXT * 5) and 0.15 < changed < 0.4


def test_make_negatives_is_balanced_seeded_and_skips_leak_without_answer():
    texts = [f"{TEXT} variant {i}" for i in range(60)]
    answers = ["" if i % 2 else str(i) for i in range(60)]
    neg, types, source = make_negatives(texts, answers, seed=7)
    assert (neg, types) == make_negatives(texts, answers, seed=7)[:2]
    assert source.tolist() == list(range(60))
    assert len(neg) == 60 and set(types) <= set(CORRUPTIONS)
    for i, (t, k) in enumerate(zip(neg, types)):
        if k == "leak":
            assert answers[i] and t == leak(texts[i], answers[i])
        if k == "truncate":
            assert texts[i].startswith(t)
    counts = Counter(types)
    assert counts["leak"] <= 10 and min(counts[k] for k in CORRUPTIONS if k != "leak") >= 10
    with pytest.raises(ValueError, match="unknown corruption 'typo'"):
        make_negatives(texts, answers, types=["typo"])


def test_more_negatives_per_prompt_vary_the_kind_and_keep_the_first_round():
    texts = [f"{TEXT} variant {i}" for i in range(30)]
    answers = [str(i) for i in range(30)]
    neg, types, source = make_negatives(texts, answers, seed=3, per_prompt=2)
    assert len(neg) == 60 and source.tolist() == list(range(30)) * 2
    assert (neg[:30], types[:30]) == make_negatives(texts, answers, seed=3)[:2]
    assert all(types[i] != types[i + 30] for i in range(30))  # a prompt's two negatives differ in kind
    with pytest.raises(ValueError, match="negatives_per_prompt must be >= 1"):
        make_negatives(texts, answers, per_prompt=0)


@pytest.mark.parametrize("folds", [2, 5])
def test_splits_keep_a_prompt_and_its_negatives_in_one_fold_and_test_each_row_once(folds):
    types = np.array(list("abc") * 40)
    source = np.arange(120) % 60  # two negatives per prompt, as make_negatives(per_prompt=2) makes them
    splits = evaluation_splits(types, 60, seed=0, neg_source=source, folds=folds)
    assert len(splits) == folds * 4  # overall + one per held-out type, per fold
    for name, (tr_pos, te_pos, tr_neg, te_neg) in splits:
        assert set(source[tr_neg]) <= set(tr_pos) and set(source[te_neg]) <= set(te_pos)
        assert not set(tr_pos) & set(te_pos)
        if name != "overall":
            assert set(types[te_neg]) == {name} and name not in set(types[tr_neg])
    for name in ("overall", "a"):
        test_pos = np.concatenate([s[1] for n, s in splits if n == name])
        test_neg = np.concatenate([s[3] for n, s in splits if n == name])
        assert sorted(test_pos) == list(range(60))  # every positive scored exactly once, out of fold
        assert sorted(test_neg) == sorted(np.flatnonzero(types == name) if name != "overall" else range(120))
    with pytest.raises(ValueError, match="eval_folds must be >= 2"):
        evaluation_splits(types, 60, seed=0, folds=1)


def test_pooled_aurocs_is_one_auroc_over_all_folds_scores():
    rng = np.random.default_rng(0)
    splits = [("overall", None), ("a", None), ("overall", None), ("a", None)]
    scores = [(rng.random(5), rng.random(7)) for _ in splits]
    out = pooled_aurocs(splits, scores)
    for name, idx in (("overall", [0, 2]), ("a", [1, 3])):
        pos = np.concatenate([scores[i][0] for i in idx])
        neg = np.concatenate([scores[i][1] for i in idx])
        assert out[name] == pytest.approx(roc_auc_score(np.r_[np.ones(10), np.zeros(14)], np.r_[pos, neg]))


def planted(n=400, d=40, seed=0):
    """Positives: random codes on latents 0..29. Negatives of type A/B/C: a positive-like code plus a
    latent only that type uses (30/31/32); type 'copy': exact copies of positives (undetectable)."""
    rng = np.random.default_rng(seed)

    def codes(m):
        X = np.zeros((m, d), np.float32)
        for r in range(m):
            X[r, rng.choice(30, 6, replace=False)] = rng.exponential(1.0, 6)
        return X

    pos = codes(n)
    types = np.array(["A", "B", "C", "copy"] * (n // 4))
    neg = codes(n)
    for j, t in enumerate("ABC"):
        neg[types == t, 30 + j] = 3.0
    neg[types == "copy"] = pos[types == "copy"]
    return sp.csr_matrix(pos), sp.csr_matrix(neg), types


def test_leave_one_type_out_tests_a_type_never_seen(ray_cluster):
    pos, neg, types = planted()
    model, m = fit_quality_probe(pos, neg, types, C=1.0, seed=0, use_ray=True)
    loto = m["auroc_leave_one_type_out"]
    assert set(loto) == {"A", "B", "C", "copy"}
    # A held-out type's marker latent never appears in training, so the probe cannot see it: ~chance.
    # (~50 test negatives per type: chance is 0.5 +- ~0.05.)
    for t in ["A", "B", "C", "copy"]:
        assert 0.3 < loto[t] < 0.7
    # Trained on every type, the held-out rows of A/B/C are easy; copies stay at chance, so overall
    # sits near (3 * 1.0 + 0.5) / 4.
    assert 0.8 < m["auroc_overall"] < 0.93
    scores = probe_scores(model, neg)
    assert scores[types == "A"].mean() < 0.2 < scores[types == "copy"].mean()


def test_shared_corruption_signal_generalises_to_held_out_type():
    pos, neg, types = planted(seed=1)
    neg = neg.tolil()
    neg[np.flatnonzero(types != "copy"), 35] = 2.0  # a latent every real corruption shares
    _, m = fit_quality_probe(pos, neg.tocsr(), types, seed=0)
    assert all(m["auroc_leave_one_type_out"][t] > 0.9 for t in "ABC")


def test_json_round_trip_equals_sklearn(tmp_path):
    pos, neg, types = planted(seed=2)
    model, _ = fit_quality_probe(pos, neg, types, C=0.5, seed=0)
    (tmp_path / "q.json").write_text(json.dumps(model))
    X = sp.vstack([pos, neg]).tocsr()
    y = np.r_[np.ones(pos.shape[0]), np.zeros(neg.shape[0])]
    D = design(X, np.asarray(model["columns"])).toarray()
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000, random_state=0)).fit(D, y)
    np.testing.assert_allclose(score_from_json(tmp_path / "q.json", X), ref.predict_proba(D)[:, 1], atol=1e-5)


def test_keep_rules():
    s = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    keep, cut = keep_mask(s, 0.6, None)
    assert keep.tolist() == [True, False, True, True, False] and cut == 0.5
    keep, cut = keep_mask(s, 0.6, 0.6)
    assert keep.tolist() == [True, False, False, True, False] and cut == 0.6
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_mask(s, 0.0, None)
