"""k-means (saerl_ray.signal_models.kmeans): agreement with sklearn, the Ray map/reduce path, empty clusters, sparse input."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from saerl_ray.signal_models.kmeans import (
    BlockSet,
    assign,
    clustering_space,
    kmeans,
    project_blocks,
)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=3000, centers=8, n_features=16, cluster_std=1.5, random_state=3)
    return X.astype(np.float32), y


def test_agrees_with_sklearn_kmeans(blobs):
    X, _ = blobs
    ours = kmeans(X, 8, seed=0, num_tasks=1, progress=False)
    ref = KMeans(8, init="k-means++", n_init=1, random_state=0, tol=1e-4).fit(X)
    assert adjusted_rand_score(ours.labels, ref.labels_) == pytest.approx(1.0)  # same partition
    assert ours.inertia / ref.inertia_ == pytest.approx(1.0, abs=0.01)
    # Reported distances are the distances to the returned centroids.
    d = np.linalg.norm(X - ours.centroids[ours.labels], axis=1)
    np.testing.assert_allclose(ours.dist, d, rtol=1e-3, atol=1e-3)
    assert ours.converged and ours.history[-1] <= ours.history[0]


def test_ray_tasks_match_in_process(blobs, ray_cluster):
    X, _ = blobs
    local = kmeans(X, 8, seed=1, num_tasks=1, progress=False)
    dist = kmeans(X, 8, seed=1, num_tasks=3, progress=False)
    assert adjusted_rand_score(local.labels, dist.labels) == pytest.approx(1.0)
    assert dist.inertia == pytest.approx(local.inertia, rel=1e-4)


def test_empty_cluster_is_reseeded_from_farthest_points(blobs):
    X, _ = blobs
    k = 8
    init = X[np.random.default_rng(0).choice(len(X), k, replace=False)].copy()
    init[3] = 1e4  # nothing is ever closest to this centroid: cluster 3 is empty after round 1
    res = kmeans(X, k, init=init, num_tasks=1, progress=False)
    assert res.n_reseeded >= 1
    assert np.bincount(res.labels, minlength=k).min() > 0
    assert np.abs(res.centroids).max() < 1e3


def test_sparse_codes_cluster_like_their_dense_copy(ray_cluster):
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 4, 600)
    X = sp.random(600, 300, density=0.03, random_state=0, format="csr", dtype=np.float32)
    X = (X + sp.csr_matrix((np.full(600, 5.0, np.float32), (np.arange(600), topics * 7)), shape=(600, 300))).tocsr()
    Zs = clustering_space(X, "cosine")
    Zd = clustering_space(X.toarray(), "cosine")
    assert sp.issparse(Zs)
    np.testing.assert_allclose(np.linalg.norm(Zd, axis=1), 1.0, rtol=1e-5)
    a = kmeans(Zs, 4, seed=0, num_tasks=2, progress=False)
    b = kmeans(Zd, 4, seed=0, num_tasks=1, progress=False)
    assert adjusted_rand_score(a.labels, b.labels) == pytest.approx(1.0)
    assert adjusted_rand_score(a.labels, topics) > 0.9


def test_cosine_ignores_row_scale():
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(50, 10))).astype(np.float32)
    scaled = X * rng.uniform(0.1, 10, size=(50, 1)).astype(np.float32)
    np.testing.assert_allclose(clustering_space(X), clustering_space(scaled), atol=1e-5)


def test_assign_matches_bruteforce():
    rng = np.random.default_rng(1)
    X, C = rng.normal(size=(200, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)
    labels, d2 = assign(X, C, chunk=64)
    full = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(d2, full.min(1), rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
    X = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="signals.cluster.k"):
        kmeans(X, 6, num_tasks=1, progress=False)
    with pytest.raises(ValueError, match="metric"):
        clustering_space(X, "manhattan")


def test_blocks_in_another_order_cluster_like_the_matrix(blobs, ray_cluster):
    # The signals stage clusters blocks in part-file order and maps them back with `order`: the seeding
    # sample, labels and distances must follow the caller's rows, whatever the blocks' order.
    X, _ = blobs
    shuffle = np.random.default_rng(5).permutation(len(X))
    order = np.argsort(shuffle)  # caller's row i sits at block row order[i]
    blocks = BlockSet.of(X[shuffle], 3)
    assert blocks.on_ray and blocks.n == len(X)
    np.testing.assert_array_equal(blocks.take(order[[5, 0, 2999, 5]]), X[[5, 0, 2999, 5]])
    ref = kmeans(X, 8, seed=1, num_tasks=1, progress=False)
    got = kmeans(blocks, 8, seed=1, order=order, progress=False)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.dist, ref.dist, rtol=1e-4, atol=1e-5)
    assert got.inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_projection_over_blocks_matches_clustering_space(ray_cluster):
    X = sp.random(400, 60, density=0.2, random_state=1, format="csr", dtype=np.float32)
    want = clustering_space(X, "cosine", projection=8, seed=0)
    blocks = project_blocks(BlockSet.of(clustering_space(X, "cosine"), 2), 8, "cosine", seed=0)
    assert blocks.width == 8 and not blocks.sparse
    np.testing.assert_allclose(blocks.take(np.arange(400)), want, atol=1e-4)
