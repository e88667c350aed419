"""Quality (saerl_ray.signal_models.quality): each corruption does what it says, leave-one-family-out AUROC is computed
on a family the probe never saw, the novelty signal needs no negatives, JSON round trip, the
false-positive-rate cut, keep rules and flags."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from saerl_ray.core.config import QualityConfig
from saerl_ray.signal_models.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    LEGACY_CORRUPTIONS,
    OFFDOMAIN_SENTENCES,
    corrupt,
    families_of,
    garble,
    leak,
    make_negatives,
    mismatch,
    offdomain,
    shuffle,
    truncate,
)
from saerl_ray.signal_models.difficulty import design
from saerl_ray.signal_models.quality import (
    auroc,
    balanced_sample,
    evaluation_splits,
    fit_novelty,
    fit_quality_probe,
    keep_mask,
    novelty_raw,
    pooled_aurocs,
    probe_scores,
    quality_scores,
    run_quality,
    score_from_json,
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
    legacy = list(LEGACY_CORRUPTIONS)
    neg, types, source = make_negatives(texts, answers, seed=7, types=legacy)
    assert (neg, types) == make_negatives(texts, answers, seed=7, types=legacy)[:2]
    assert source.tolist() == list(range(60))
    assert len(neg) == 60 and set(types) <= set(LEGACY_CORRUPTIONS)
    for i, (t, k) in enumerate(zip(neg, types)):
        if k == "leak":
            assert answers[i] and t == leak(texts[i], answers[i])
        if k == "truncate":
            assert texts[i].startswith(t)
    counts = Counter(types)
    assert counts["leak"] <= 10 and min(counts[k] for k in LEGACY_CORRUPTIONS if k != "leak") >= 10
    with pytest.raises(ValueError, match="unknown corruption 'typo'"):
        make_negatives(texts, answers, types=["typo"])


def test_more_negatives_per_prompt_vary_the_kind_and_keep_the_first_round():
    texts = [f"{TEXT} variant {i}" for i in range(30)]
    answers = [str(i) for i in range(30)]
    neg, types, source = make_negatives(texts, answers, seed=3, per_prompt=2, types=list(LEGACY_CORRUPTIONS))
    assert len(neg) == 60 and source.tolist() == list(range(30)) * 2
    assert (neg[:30], types[:30]) == make_negatives(texts, answers, seed=3, types=list(LEGACY_CORRUPTIONS))[:2]
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


def test_leave_one_family_out_tests_a_family_never_seen(ray_cluster):
    pos, neg, types = planted()
    model, m = fit_quality_probe(pos, neg, types, C=1.0, seed=0, use_ray=True)
    table = m["auroc_lofo_table"]
    assert set(table) == set(m["auroc_leave_one_family_out"]) == {"A", "B", "C", "copy"} and m["n_families"] == 4
    # A held-out family's marker latent never appears in the probe's training, so the probe alone cannot
    # see it: ~chance (~50 test negatives per family: 0.5 +- ~0.05).
    for t in ["A", "B", "C", "copy"]:
        assert 0.3 < table[t]["probe"] < 0.7
    # The novelty signal needs no negatives: a latent no clean prompt uses is rare, whichever family
    # brought it, so the combined score catches held-out A/B/C; copies of positives stay at chance.
    for t in "ABC":
        assert table[t]["novelty"] > 0.95 and m["auroc_leave_one_family_out"][t] > 0.95
    assert 0.3 < m["auroc_leave_one_family_out"]["copy"] < 0.7
    assert m["auroc_lofo_min"] == min(m["auroc_leave_one_family_out"].values())
    # Trained on every family, the probe alone sits near (3 * 1.0 + 0.5) / 4.
    assert 0.8 < m["auroc_overall_by_signal"]["probe"] < 0.93
    scores = probe_scores(model, neg)
    assert scores[types == "A"].mean() < 0.2 < scores[types == "copy"].mean()


def test_shared_corruption_signal_generalises_to_held_out_family():
    pos, neg, types = planted(seed=1)
    neg = neg.tolil()
    neg[np.flatnonzero(types != "copy"), 35] = 2.0  # a latent every real corruption shares
    _, m = fit_quality_probe(pos, neg.tocsr(), types, seed=0)
    assert all(m["auroc_lofo_table"][t]["probe"] > 0.9 for t in "ABC")


def test_json_round_trip_equals_sklearn(tmp_path):
    pos, neg, types = planted(seed=2)
    model, _ = fit_quality_probe(pos, neg, types, C=0.5, seed=0)
    (tmp_path / "q.json").write_text(json.dumps(model))
    X = sp.vstack([pos, neg]).tocsr()
    y = np.r_[np.ones(pos.shape[0]), np.zeros(neg.shape[0])]
    D = design(X, np.asarray(model["columns"])).toarray()
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000, random_state=0)).fit(D, y)
    np.testing.assert_allclose(probe_scores(json.loads((tmp_path / "q.json").read_text()), X),
                               ref.predict_proba(D)[:, 1], atol=1e-5)
    np.testing.assert_allclose(score_from_json(tmp_path / "q.json", X), quality_scores(model, X)[0], atol=1e-6)


def test_keep_rules():
    s = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    keep, cut = keep_mask(s, 0.6, None)
    assert keep.tolist() == [True, False, True, True, False] and cut == 0.5
    keep, cut = keep_mask(s, 0.6, 0.6)
    assert keep.tolist() == [True, False, False, True, False] and cut == 0.6
    keep, cut = keep_mask(s, None, 0.6)
    assert keep.tolist() == [True, False, False, True, False]
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_mask(s, 0.0, None)


REAL = [  # real-looking problems: several sentences, numbers, a question (GSM8K / MATH style)
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer as a common fraction.",
    "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates. Enter your answer in the form $(r,\\theta).$",
]


def test_at_least_twelve_families_each_kind_in_exactly_one():
    assert len(FAMILIES) >= 12
    kinds = [k for ks in FAMILIES.values() for k in ks]
    assert sorted(kinds) == sorted(CORRUPTIONS) and len(set(kinds)) == len(kinds)
    assert set(LEGACY_CORRUPTIONS) <= set(CORRUPTIONS)
    assert families_of(["garble", "cipher", "leak", "labelled"]).tolist() == ["char_noise", "char_noise",
                                                                           "answer_leak", "labelled"]


@pytest.mark.parametrize("i", range(len(REAL)))
def test_every_kind_changes_the_prompt_and_kinds_differ(i):
    outs = {k: corrupt(k, i, REAL, ["12", "72", "-14/3", "(3, pi/2)"], np.random.default_rng(5)) for k in CORRUPTIONS}
    for k, t in outs.items():
        assert t.strip() and t != REAL[i], k
    assert len(set(outs.values())) == len(outs)  # no two kinds make the same text


def test_kinds_do_what_they_say():
    r = np.random.default_rng(0)
    t = REAL[0]
    assert "___" in corrupt("blank_numbers", 0, REAL, ["12"], r) and "12" not in corrupt("blank_numbers", 0, REAL, ["12"], r)
    assert "?" not in corrupt("drop_question", 0, REAL, ["12"], r)
    assert corrupt("concat", 0, REAL, ["12"], r).startswith(t) and len(corrupt("concat", 0, REAL, ["12"], r)) > len(t) + 20
    rep = corrupt("repeat", 0, REAL, ["12"], r)
    assert len(rep) > len(t) and all(w in rep for w in t.split())
    con = corrupt("contradict", 0, REAL, ["12"], r)
    assert con.count("earns") == 2 or con.count("did") >= 3  # a numbered sentence stated twice
    assert any(tok in corrupt("markup", 0, REAL, ["12"], r) for tok in ("<", "\\", "&", "[", "{{"))
    assert t not in corrupt("stub", 0, REAL, ["12"], r)


def fpr_planted(n=600, d=60, seed=0, pollution=0):
    """Positives: codes on latents 0..39 (+ `pollution` rows that are really garbage: latents 50..59,
    unlabelled, as a polluted pool would hand them over); negatives of families A/B/C: positive-like codes
    plus a marker latent 40/41/42."""
    rng = np.random.default_rng(seed)

    def codes(m, lo=0, hi=40):
        X = np.zeros((m, d), np.float32)
        for r in range(m):
            X[r, lo + rng.choice(hi - lo, 6, replace=False)] = rng.exponential(1.0, 6)
        return X

    pos = codes(n)
    pos[:pollution] = codes(pollution, 50, 60)
    types = np.array(list("ABC") * (n // 3))
    neg = codes(n)
    for j, t in enumerate("ABC"):
        neg[types == t, 40 + j] = 3.0
    return sp.csr_matrix(pos), sp.csr_matrix(neg), types


def test_fpr_cut_drops_at_most_the_rate_of_clean_held_out_prompts():
    pos, neg, types = fpr_planted()
    model, m = fit_quality_probe(pos, neg, types, C=0.1, seed=0, max_false_positive_rate=0.02)
    # fresh clean prompts from the same distribution, never seen in training
    fresh, _, _ = fpr_planted(n=3000, seed=9)
    score, _ = quality_scores(model, fresh)
    assert (score < model["fpr_threshold"]).mean() <= 0.035  # 0.02 + sampling error of ~600 references
    assert m["calibration"]["max_false_positive_rate"] == 0.02 and m["calibration"]["trimmed_as_pollution"] == 0
    # the corruptions themselves fall below it
    score_neg, _ = quality_scores(model, neg)
    assert (score_neg < model["fpr_threshold"]).mean() > 0.9


def test_polluted_pool_loses_its_pollution_and_almost_nothing_else(tmp_path):
    """run_quality in-pool (`reference: []`, the positives a sample of the pool) on a pool with 5% garbage it was not told about: the garbage is dropped (by novelty:
    the probe never saw that kind), the clean prompts almost all kept, and every drop carries its flag."""
    n, bad = 600, 30
    pos, neg, types = fpr_planted(n=n, seed=3, pollution=bad)
    prompts = pd.DataFrame({"prompt": [f"problem {i} " + "x" * (40 + i % 7) for i in range(n)], "answer": "1"})
    neg_by_text = {}

    def featurize(texts):  # negatives' codes: the planted ones, dealt in order
        rows = [neg_by_text.setdefault(t, len(neg_by_text)) % neg.shape[0] for t in texts]
        return neg[rows]

    cfg = QualityConfig(n_train=n, C=0.1, max_false_positive_rate=0.01, negatives_per_prompt=1, reference=[])  # in-pool
    score, keep, flags, m = run_quality(prompts, pos, cfg, 0, featurize, str(tmp_path / "q.json"), use_ray=False)
    assert not keep[:bad].any()  # all the pollution dropped
    assert (~keep[bad:]).mean() <= 0.03  # clean rows: the rate + a little
    assert set(flags[~keep]) <= {"probe", "novelty", "neighbors"} and (flags[keep] == "").all() and (flags[:bad] != "").all()
    assert m["rule"] == "max_false_positive_rate" and m["dropped"] == int((~keep).sum())
    assert m["calibration"]["trimmed_as_pollution"] >= bad // 2  # garbage left out of the reference quantile
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["threshold"] == m["threshold"] and saved["combine"] == ["probe", "novelty", "neighbors"]
    assert saved["combine_rule"] == "sum" and saved["neighbors"]["n"] == n  # the references travel in the JSON
    # neighbors alone is blind to pollution that clusters (30 alike rows: each has 10 alike neighbours);
    # novelty, in the same sum, is what catches it
    _, keep_nb, _, _ = run_quality(prompts, pos, cfg.model_copy(update={"combine": ["probe", "neighbors"]}), 0,
                                   featurize, str(tmp_path / "q3.json"), use_ray=False)
    assert keep_nb[:bad].mean() > 0.5
    # the legacy quota and the explicit threshold still work
    _, keep_q, _, mq = run_quality(prompts, pos, QualityConfig(n_train=n, C=0.1, negatives_per_prompt=1,
                                   keep_fraction=0.5, reference=[]), 0, featurize, str(tmp_path / "q2.json"), use_ray=False)
    assert keep_q.sum() == n // 2 and mq["rule"] == "keep_fraction"


def test_balanced_sample_gives_each_source_an_equal_share():
    rng = np.random.default_rng(0)
    sources = np.array(["gsm8k"] * 7473 + ["math500"] * 500 + ["amc"] * 40)
    pick = balanced_sample(sources, 1200, rng)
    assert len(pick) == len(set(pick)) == 1200 and (np.diff(pick) > 0).all()
    assert Counter(sources[pick]) == {"amc": 40, "math500": 500, "gsm8k": 660}  # small sources give all they have
    assert Counter(sources[balanced_sample(sources, 90, rng)]) == {"amc": 30, "math500": 30, "gsm8k": 30}
    assert len(balanced_sample(sources[:100], 1200, rng)) == 100


def test_minority_source_is_not_read_as_pollution(tmp_path):
    """A clean pool where 5% of the prompts come from a second source with codes of their own (MATH-500's
    LaTeX beside GSM8K's prose): sampled uniformly with one novelty count over all positives, the positives
    hold ~15 of them, novelty calls the whole source unusual and the filter drops it. Sampled evenly by
    source, or with novelty counted per source (the default), the filter keeps it."""
    n, small = 1200, 60
    pos, neg, types = fpr_planted(n=n, seed=4, pollution=small)  # the "pollution" rows: a clean second source
    prompts = pd.DataFrame({"prompt": [f"problem {i} " + "x" * (40 + i % 7) for i in range(n)], "answer": "1",
                            "source": ["small"] * small + ["big"] * (n - small)})
    neg_by_text = {}

    def featurize(texts):
        return neg[[neg_by_text.setdefault(t, len(neg_by_text)) % neg.shape[0] for t in texts]]

    dropped = {}
    for balance, by_source in ((False, False), (True, False), (False, True)):
        cfg = QualityConfig(n_train=300, C=0.1, max_false_positive_rate=0.01, negatives_per_prompt=1,
                            balance_sources=balance, novelty_by_source=by_source, reference=[])
        _, keep, _, _ = run_quality(prompts, pos, cfg, 0, featurize, str(tmp_path / f"q{balance}{by_source}.json"),
                                    use_ray=False)
        dropped[balance, by_source] = ((~keep[:small]).mean(), (~keep[small:]).mean())
    assert dropped[False, False][0] > 0.1  # uniform, one count: a share of the minority source dropped (20% when written)
    for arm in ((True, False), (False, True)):  # neither source loses more than noise
        assert dropped[arm][0] <= 0.05 and dropped[arm][1] <= 0.03, (arm, dropped[arm])


def test_report_lists_every_filtered_prompt_with_score_and_flag():
    from saerl_ray.stages import report

    n = 40
    df = pd.DataFrame({"id": [str(i) for i in range(n)], "prompt": [f"prompt number {i}" for i in range(n)],
                       "source": "gsm8k", "cluster": np.arange(n) % 2, "quality_score": np.linspace(-9, 1, n),
                       "keep": np.arange(n) >= 3, "quality_flag": ["novelty", "probe", "probe"] + [""] * (n - 3)})

    class Run:
        def __init__(self):
            self.df, self.clusters = df, df["cluster"].to_numpy()

        def summary(self, stage):
            return {"quality": {"rule": "max_false_positive_rate", "threshold": -5.0,
                                "auroc_lofo_table": {"stub": {"probe": 0.6, "novelty": 0.99, "combined": 0.98}}}}

    page = report._quality_section(Run())
    assert "3 of 40 prompts filtered" in page and "max_false_positive_rate" in page
    for i, f in enumerate(["novelty", "probe", "probe"]):
        assert f"prompt number {i}</td>" in page
    assert page.count(">novelty<") == 2 and page.count(">probe<") >= 2  # flags in the rows (+ LOFO header)
    assert "prompt number 3<" not in page  # kept prompts are not listed
    assert "stub" in page  # the leave-one-family-out table


def test_neighbors_distance_skips_the_row_itself_and_reads_only_its_band():
    from saerl_ray.signal_models.quality import fit_neighbors, neighbors_raw

    rng = np.random.default_rng(0)
    X = sp.csr_matrix(np.abs(rng.normal(size=(50, 12))) * (rng.random((50, 12)) < 0.4))
    model = fit_neighbors(X, (4, 12), k=3)
    inside = neighbors_raw(model, X)  # every row is one of the references
    without = np.array([neighbors_raw(fit_neighbors(X[np.r_[:i, i + 1:50]], (4, 12), k=3), X[i])[0] for i in range(50)])
    np.testing.assert_allclose(inside, without, atol=1e-12)  # scored as if left out
    # by hand for one row: 1 - mean of its 3 largest cosines to the other rows, in columns 4..11 only
    B = X[:, 4:].toarray()
    B = B / np.maximum(np.linalg.norm(B, axis=1, keepdims=True), 1e-300)
    cos = np.delete(B @ B[7], 7)
    assert inside[7] == pytest.approx(1 - np.sort(cos)[-3:].mean())
    far = sp.csr_matrix(np.r_[np.ones(4), np.zeros(8)][None])  # nothing in the band: as far as can be
    assert neighbors_raw(model, far)[0] == pytest.approx(1.0)
    assert neighbors_raw(model, X[:0]).shape == (0,)  # a fold can hold no row of a family
    X_other = X.tolil()
    X_other[:, :4] = 5.0  # columns outside the band change nothing
    np.testing.assert_allclose(neighbors_raw(model, X_other.tocsr()), inside)


def test_sum_rule_adds_evidence_and_flags_the_largest_signal():
    from saerl_ray.signal_models.quality import combine

    z = {"probe": np.array([1.5, 4.0, 0.0]), "novelty": np.array([1.5, 0.0, -1.0]), "neighbors": np.array([1.0, 0.5, 0.0])}
    bad, flag = combine(z, ["probe", "novelty", "neighbors"], "sum")
    np.testing.assert_allclose(bad, [4.0, 4.5, -1.0])  # two weak signals together count as much as one strong
    assert flag.tolist() == [0, 0, 0]
    np.testing.assert_allclose(combine(z, ["novelty", "neighbors"], "max")[0], [1.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="combine_rule"):
        combine(z, ["probe"], "mean")


def test_surprisal_signal_sees_a_family_the_codes_cannot(tmp_path):
    """Family S: corruptions whose codes look like clean prompts' (a spliced problem reads like a problem)
    but whose tokens surprise the model. Held out of training, only the surprisal signal catches it."""
    pos, neg, types = fpr_planted(n=600, seed=4)
    neg = neg.tolil()
    s_rows = np.flatnonzero(types == "C")  # C becomes S: no marker latent, only surprising tokens
    neg[s_rows, 42] = 0.0
    neg, types = neg.tocsr(), np.where(types == "C", "S", types)
    g = np.random.default_rng(0)
    pos_s, neg_s = g.normal(3.0, 0.3, pos.shape[0]), g.normal(3.0, 0.3, neg.shape[0])
    neg_s[s_rows] += 2.0
    signals = ("probe", "novelty", "neighbors", "surprisal")
    with pytest.raises(ValueError, match="surprisal"):
        fit_quality_probe(pos, neg, types, C=0.1, seed=0, combine_signals=signals, combine_rule="sum")
    scores: dict = {}
    _, m = fit_quality_probe(pos, neg, types, C=0.1, seed=0, combine_signals=signals, combine_rule="max",
                             pos_surprisal=pos_s, neg_surprisal=neg_s, scores_out=scores)
    table = m["auroc_lofo_table"]["S"]
    assert table["probe+novelty+neighbors"] < 0.7 < 0.95 < table["combined"]
    # `codes`: the combination's code signals summed, without surprisal; it is what scores_out keeps
    # (validate's SAE-vs-dense rows compare representations, and surprisal is neither's)
    assert table["codes"] < 0.7 and m["auroc_lofo_table"]["A"]["codes"] > 0.9
    assert auroc(scores["S"]["pos"], scores["S"]["neg"]) == pytest.approx(table["codes"])
    assert table["surprisal"] > 0.95 and m["auroc_lofo_table"]["A"]["surprisal"] < 0.7
    bad_s = neg_s.copy()
    bad_s[0] = np.nan  # a row featurised without features.surprisal
    with pytest.raises(ValueError, match="features.surprisal"):
        fit_quality_probe(pos, neg, types, C=0.1, seed=0, combine_signals=signals, pos_surprisal=pos_s,
                          neg_surprisal=bad_s)
    # The stage body: featurize returns (codes, surprisal) of the negatives; pool rows that surprise are
    # dropped and flagged by surprisal, and the JSON model scores the same with the surprisal column.
    n = pos.shape[0]
    prompts = pd.DataFrame({"prompt": [f"problem {i} " + "x" * (40 + i % 7) for i in range(n)], "answer": "1"})
    pool_s = g.normal(3.0, 0.3, n)
    pool_s[:10] += 10.0  # far enough out to be trimmed from the reference the cut is set on
    dealt = {}

    def featurize(texts):
        rows = [dealt.setdefault(t, len(dealt)) % neg.shape[0] for t in texts]
        return neg[rows], neg_s[rows]

    cfg = QualityConfig(n_train=n, C=0.1, negatives_per_prompt=1, combine=list(signals), reference=[])
    score, keep, flags, _ = run_quality(prompts, pos, cfg, 0, featurize, str(tmp_path / "q.json"), use_ray=False,
                                        surprisal=pool_s)
    assert not keep[:10].any() and (flags[:10] == "surprisal").all() and (~keep[10:]).mean() <= 0.03
    np.testing.assert_allclose(score_from_json(tmp_path / "q.json", pos, surprisal=pool_s), score, atol=1e-5)


def test_config_refuses_a_surprisal_signal_without_surprisal_features():
    from saerl_ray.core.config import load_config

    with pytest.raises(Exception, match="features.surprisal"):
        load_config(None, {"signals.quality.combine": ["probe", "surprisal"], "features.surprisal": False})
    cfg = load_config(None, {"signals.quality.combine": ["probe", "surprisal"], "features.surprisal": True})
    assert cfg.features.surprisal and "surprisal" in cfg.signals.quality.combine


def test_novelty_per_source_sees_a_latent_common_only_in_another_source():
    """Two clean sources: "prose" on latents 0..19 and "latex" on 20..39, every latex prompt also firing
    latent 50 (LaTeX markup). A prose prompt with latent 50 (markup where prose has none) looks ordinary to
    one count over both sources (half the positives fire 50) but novel to counts per source; clean prompts
    of either source stay ordinary, and the model reloads from JSON."""
    rng = np.random.default_rng(0)

    def rows(m, lo, hi, extra=None):
        X = np.zeros((m, 60), np.float32)
        for r in range(m):
            X[r, lo + rng.choice(hi - lo, 5, replace=False)] = 1.0
        if extra is not None:
            X[:, extra] = 1.0
        return X

    pos = sp.csr_matrix(np.r_[rows(300, 0, 20), rows(300, 20, 40, extra=50)])
    groups = np.array(["prose"] * 300 + ["latex"] * 300)
    clean = sp.csr_matrix(np.r_[rows(100, 0, 20), rows(100, 20, 40, extra=50)])
    marked = sp.csr_matrix(rows(100, 0, 20, extra=50))

    def z(model, X):  # mean band rarity in robust SDs of the positives (each scored without its own counts)
        ref = novelty_raw(model, pos, loo=True, groups=groups if "groups" in model else None).mean(axis=1)
        med, mad = np.median(ref), 1.4826 * np.median(np.abs(ref - np.median(ref)))
        return (novelty_raw(model, X).mean(axis=1) - med) / mad

    one, per = fit_novelty(pos, [(0, 60)]), fit_novelty(pos, [(0, 60)], groups)
    assert "groups" not in one and [g["name"] for g in per["groups"]] == ["latex", "prose"]
    assert np.median(z(per, marked)) > np.median(z(one, marked)) + 1.0
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(100)], np.r_[z(per, clean), z(per, marked)]) > 0.95
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(100)], np.r_[z(one, clean), z(one, marked)]) < 0.8
    zc = z(per, clean)  # neither clean source is read as unusual against its own counts
    assert abs(np.median(zc[:100])) < 1.0 and abs(np.median(zc[100:])) < 1.0
    assert np.allclose(novelty_raw(json.loads(json.dumps(per)), marked), novelty_raw(per, marked))
    with pytest.raises(ValueError, match="needs each row's group"):
        novelty_raw(per, pos, loo=True)
    # one source: no groups, the one count
    assert "groups" not in fit_novelty(pos, [(0, 60)], np.array(["prose"] * 600))
