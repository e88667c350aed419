import numpy as np
import scipy.sparse as sp

from saerl_ray.validate import difficulty_spearman, quality_auroc, sae_design, topic_nmi


def test_difficulty_protocol_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    y = np.clip(np.round(X[:, 0] + 0.5 * X[:, 1] + 3), 1, 5)
    assert difficulty_spearman(X, y) > 0.7
    assert abs(difficulty_spearman(rng.normal(size=(300, 20)), y)) < 0.25


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


def test_sae_design_drops_rare_latents():
    X = sp.csr_matrix(np.r_[np.ones((99, 1)) @ np.array([[1.0, 0, 2]]), [[1.0, 5.0, 2]]])
    D = sae_design(X)
    assert D.shape == (100, 2) and np.allclose(D[0], np.log1p([1.0, 2.0]))
