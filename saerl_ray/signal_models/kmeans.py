"""Diversity: k-means over pooled SAE codes as Ray tasks (Lloyd map/reduce), k-means++ seeding on a sample.

    from saerl_ray.signal_models.kmeans import clustering_space, kmeans
    Z = clustering_space(X, metric="cosine")            # X: scipy CSR (n, d_sae) or dense (n, d)
    res = kmeans(Z, k=16, num_tasks=2, seed=0)          # num_tasks > 1 fans out over Ray (init Ray first)
    res.labels, res.dist, res.centroids, res.inertia

Each Lloyd round is a map (one Ray task per row block: assign to the nearest centroid with one BLAS
product, return per-cluster sums + counts + inertia + the block's farthest points) and a reduce on the
driver. Blocks go into the object store once and are reused every round; only the K x d centroids move.
`num_tasks=1` runs the very same map/reduce in-process without Ray (tests, small sets).

The blocks need not pass through the driver: a `BlockSet` of ObjectRefs made by tasks that read their
own part files (the signals stage at scale) is clustered the same way; the driver only ever holds the
k-means++ sample (`init_sample` rows), the reseed rows and the per-round sums.

    blocks = BlockSet(refs, sizes, width, sparse=True, on_ray=True)
    res = kmeans(blocks, k=16, order=perm)   # perm[i] = block row of the caller's row i

Sparse codes are clustered as they are (CSR @ dense centroids costs nnz x K per round, exact, no
densification); `projection > 0` instead projects onto that many TruncatedSVD components first
(benchmarks/RESULTS.md has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import kmeans_plusplus
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

Matrix = np.ndarray | sp.csr_matrix


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, d) float32, in the clustering space
    labels: np.ndarray  # (n,) int32
    dist: np.ndarray  # (n,) float32 Euclidean distance to the assigned centroid
    inertia: float  # sum of squared distances under `centroids`
    n_iter: int
    converged: bool
    n_reseeded: int  # empty clusters re-seeded from the farthest points
    history: list[float] = field(default_factory=list)  # inertia per Lloyd round


def clustering_space(X: Matrix, metric: str = "cosine", projection: int = 0, seed: int = 0) -> Matrix:
    """The space k-means runs in. cosine = unit rows (spherical geometry: topic, not activation mass)."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"signals.cluster.metric must be cosine or euclidean, got {metric!r}")
    X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    if metric == "cosine":
        X = normalize(X)
    if projection and projection < X.shape[1]:
        X = TruncatedSVD(projection, random_state=seed).fit_transform(X).astype(np.float32)
        if metric == "cosine":
            X = normalize(X)
    return X.tocsr() if sp.issparse(X) else X


def split_blocks(X: Matrix, num_blocks: int) -> list[Matrix]:
    """Contiguous row blocks (contiguity keeps labels a plain concatenation)."""
    bounds = np.linspace(0, X.shape[0], max(1, min(num_blocks, X.shape[0])) + 1).astype(int)
    return [X[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _sq_norms(X: Matrix) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.multiply(X).sum(axis=1), dtype=np.float32).ravel()
    return np.einsum("ij,ij->i", X, X)


def assign(X: Matrix, C: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance per row: ||x||^2 - 2 x.c + ||c||^2, one GEMM per chunk."""
    c_sq = np.einsum("ij,ij->i", C, C)
    labels = np.empty(X.shape[0], dtype=np.int32)
    d2 = np.empty(X.shape[0], dtype=np.float32)
    # Chunks bound the (rows x K) score matrix; the loop is over chunks, never over points.
    for a in range(0, X.shape[0], chunk):
        xb = X[a : a + chunk]
        scores = np.asarray(xb @ C.T, dtype=np.float32)
        scores *= -2.0
        scores += c_sq
        lab = np.argmin(scores, axis=1)
        labels[a : a + chunk] = lab
        # float32 cancellation can dip a hair below zero for points sitting on a centroid.
        d2[a : a + chunk] = np.maximum(_sq_norms(xb) + scores[np.arange(len(lab)), lab], 0.0)
    return labels, d2


def lloyd_partial(X: Matrix, C: np.ndarray, n_far: int) -> dict[str, Any]:
    """Map step on one block: per-cluster sums and counts, inertia, and the block's farthest points."""
    k = C.shape[0]
    labels, d2 = assign(X, C)
    onehot = sp.csr_matrix(
        (np.ones(len(labels), dtype=np.float64), (labels, np.arange(len(labels)))), shape=(k, len(labels))
    )
    sums = onehot @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums, dtype=np.float64)
    far = np.argsort(-d2)[:n_far]
    return {
        "sums": sums,
        "counts": np.bincount(labels, minlength=k).astype(np.int64),
        "inertia": float(d2.astype(np.float64).sum()),
        "far_rows": far.astype(np.int64),
        "far_d2": d2[far],
    }


def assign_block(X: Matrix, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Final pass: labels and distances (not squared) for one block."""
    labels, d2 = assign(X, C)
    return labels, np.sqrt(d2)


class BlockSet:
    """Contiguous row blocks that the Lloyd rounds map over: matrices in this process (`on_ray=False`)
    or ObjectRefs in Ray's object store, put there by the driver or returned by tasks that loaded them.
    Rows are numbered across blocks in block order."""

    def __init__(self, blocks: list[Any], sizes: Sequence[int], width: int, sparse: bool, on_ray: bool):
        self.blocks, self.width, self.sparse, self.on_ray = list(blocks), int(width), sparse, on_ray
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.r_[0, np.cumsum(self.sizes)[:-1]].astype(np.int64)
        self.n = int(self.sizes.sum())

    @classmethod
    def of(cls, X: Matrix, num_blocks: int) -> "BlockSet":
        """X cut into `num_blocks` blocks; more than one goes into the object store (Ray must be up)."""
        blocks = split_blocks(X, num_blocks)
        sizes = [b.shape[0] for b in blocks]
        if num_blocks > 1:
            import ray

            return cls([ray.put(b) for b in blocks], sizes, X.shape[1], sp.issparse(X), True)
        return cls(blocks, sizes, X.shape[1], sp.issparse(X), False)

    def map(self, fn: Callable, *args: Any) -> list[Any]:
        """fn(block, *args) for every block, results in block order."""
        if self.on_ray:
            return _on_ray(fn, self.blocks, *args)
        return [fn(b, *args) for b in self.blocks]

    def transform(self, fn: Callable, width: int, sparse: bool, *args: Any) -> "BlockSet":
        """A new BlockSet of fn(block, *args); on Ray the new blocks stay in the object store."""
        if self.on_ray:
            import ray

            remote = _remote(fn)
            arg_refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
            blocks = [remote.remote(b, *arg_refs) for b in self.blocks]
        else:
            blocks = [fn(b, *args) for b in self.blocks]
        return BlockSet(blocks, self.sizes, width, sparse, self.on_ray)

    def take(self, rows: np.ndarray) -> Matrix:
        """The given rows (numbered across blocks), in the given order; one task per block touched."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.width), dtype=np.float32) if self.sparse else np.zeros((0, self.width), np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        jobs = [(bi, np.flatnonzero(which == bi)) for bi in np.unique(which)]
        local = [rows[sel] - self.starts[bi] for bi, sel in jobs]
        if self.on_ray:
            import ray

            got = ray.get([_remote(take_rows).remote(self.blocks[bi], loc) for (bi, _), loc in zip(jobs, local)])
        else:
            got = [take_rows(self.blocks[bi], loc) for (bi, _), loc in zip(jobs, local)]
        stacked = sp.vstack(got).tocsr() if self.sparse else np.concatenate(got)
        where = np.empty(len(rows), dtype=np.int64)  # requested position -> row of `stacked`
        where[np.concatenate([sel for _, sel in jobs])] = np.arange(len(rows))
        return stacked if np.array_equal(where, np.arange(len(rows))) else stacked[where]


def take_rows(block: Matrix, local: np.ndarray) -> Matrix:
    return block[local]


def seed_centroids(blocks: BlockSet, k: int, sample: int, seed: int, trials: int = 1,
                   refine_iter: int = 10, order: np.ndarray | None = None) -> np.ndarray:
    """Best of `trials` k-means++ seedings (sklearn), each refined by a few Lloyd rounds, all on a
    uniform sample of rows. A single k-means++ run often leaves a well-separated cluster without a
    seed, which Lloyd never repairs; on the sample, extra trials cost a fraction of one full round.
    The sample is drawn over the caller's row numbering (`order`, see kmeans), so it does not depend
    on how the rows are cut into blocks."""
    n = blocks.n
    if k > n:
        raise ValueError(f"signals.cluster.k={k} is larger than the number of prompts ({n})")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(n, size=min(max(sample, k), n), replace=False))
    S = blocks.take(take if order is None else np.asarray(order)[take])
    best: KMeansResult | None = None
    for t in range(max(1, trials)):
        centers, _ = kmeans_plusplus(S, k, random_state=int(rng.integers(2**31 - 1)))
        fit = kmeans(S, k, init=centers, max_iter=refine_iter, num_tasks=1, progress=False)
        if best is None or fit.inertia < best.inertia:
            best = fit
    return best.centroids


def _dense_rows(M: Matrix) -> np.ndarray:
    return (M.toarray() if sp.issparse(M) else np.asarray(M)).astype(np.float32)


def reduce_partials(
    parts: list[dict[str, Any]], C: np.ndarray, blocks: BlockSet
) -> tuple[np.ndarray, float, int]:
    """Reduce step: new centroids = sums / counts; empty clusters jump to the farthest points overall."""
    sums = sum(p["sums"] for p in parts)
    counts = sum(p["counts"] for p in parts)
    inertia = float(sum(p["inertia"] for p in parts))
    new = C.copy()
    filled = counts > 0
    new[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    empty = np.flatnonzero(~filled)
    if len(empty):
        cands = [(float(d), bi, int(r)) for bi, p in enumerate(parts) for r, d in zip(p["far_rows"], p["far_d2"])]
        cands.sort(reverse=True)
        chosen = list(zip(empty, cands))
        rows = _dense_rows(blocks.take(np.array([blocks.starts[bi] + r for _, (_, bi, r) in chosen], dtype=np.int64)))
        for j, (c, _) in enumerate(chosen):
            new[c] = rows[j]
    return new, inertia, len(empty)


@lru_cache(maxsize=None)
def _remote(fn: Callable) -> Any:
    import ray

    return ray.remote(num_cpus=1)(fn)


def _on_ray(fn: Callable, refs: list[Any], *args: Any) -> list[Any]:
    import ray

    remote = _remote(fn)
    arg_refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]  # broadcast once per round
    return ray.get([remote.remote(r, *arg_refs) for r in refs])


def project(block: Matrix, components: np.ndarray, metric: str) -> np.ndarray:
    """One block onto TruncatedSVD components (clustering_space's projection), unit rows for cosine."""
    Z = np.asarray(block @ components.T, dtype=np.float32)
    return normalize(Z) if metric == "cosine" else Z


# TruncatedSVD for `projection` is fit on at most this many rows (all of them below it, as
# clustering_space does); the components then project every block where it lives.
SVD_FIT_ROWS = 100_000


def project_blocks(blocks: BlockSet, projection: int, metric: str, seed: int = 0,
                   order: np.ndarray | None = None, fit_rows: int = SVD_FIT_ROWS) -> BlockSet:
    """`clustering_space(..., projection)` for blocks (already in the metric's space) that never meet."""
    if not projection or projection >= blocks.width:
        return blocks
    n = blocks.n
    rows = np.arange(n) if n <= fit_rows else np.sort(np.random.default_rng(seed).choice(n, fit_rows, replace=False))
    S = blocks.take(rows if order is None else np.asarray(order)[rows])
    comp = TruncatedSVD(projection, random_state=seed).fit(S).components_.astype(np.float32)
    return blocks.transform(project, projection, False, comp, metric)


def kmeans(
    X: Matrix | BlockSet,
    k: int,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    init_sample: int = 5000,
    init_trials: int = 4,
    seed: int = 0,
    num_tasks: int = 1,
    init: np.ndarray | None = None,
    progress: bool = True,
    order: np.ndarray | None = None,
) -> KMeansResult:
    """Lloyd k-means until the relative inertia change drops below `tol` (or `max_iter` rounds).

    X: a matrix, or a BlockSet (its blocks are used as they are and `num_tasks` is ignored).
    num_tasks > 1 runs each round as that many Ray tasks (Ray must be initialised); 1 runs in-process.
    `init` overrides k-means++ seeding (tests use it to force an empty cluster).
    `order[i]` = the block row of the caller's row i, when blocks hold the rows in another order:
    the seeding sample, `labels` and `dist` then follow the caller's numbering.
    """
    if k < 1:
        raise ValueError(f"signals.cluster.k must be >= 1, got {k}")
    blocks = X if isinstance(X, BlockSet) else BlockSet.of(X, num_tasks)
    if order is not None and len(order) != blocks.n:
        raise ValueError(f"order has {len(order)} rows, the blocks {blocks.n}")
    C = (np.asarray(init, dtype=np.float32).copy() if init is not None
         else seed_centroids(blocks, k, init_sample, seed, init_trials, order=order))
    if C.shape != (k, blocks.width):
        raise ValueError(f"initial centroids have shape {C.shape}, expected {(k, blocks.width)}")
    history: list[float] = []
    reseeded = 0
    converged = False
    bar = tqdm(range(max_iter), desc="k-means", disable=None if progress else True, leave=False)  # None: off when not a terminal
    for _ in bar:
        parts = blocks.map(lloyd_partial, C, k)
        C, inertia, n_empty = reduce_partials(parts, C, blocks)
        reseeded += n_empty
        history.append(inertia)
        bar.set_postfix(inertia=f"{inertia:.4g}")
        # A round that re-seeded a cluster is not a fixed point, whatever its inertia says.
        if n_empty == 0 and len(history) > 1 and abs(history[-2] - inertia) <= tol * max(history[-2], 1e-30):
            converged = True
            break
    outs = blocks.map(assign_block, C)
    labels = np.concatenate([o[0] for o in outs]).astype(np.int32)
    dist = np.concatenate([o[1] for o in outs]).astype(np.float32)
    if order is not None:
        labels, dist = labels[order], dist[order]
    return KMeansResult(
        centroids=C.astype(np.float32), labels=labels, dist=dist,
        inertia=float((dist.astype(np.float64) ** 2).sum()), n_iter=len(history),
        converged=converged, n_reseeded=reseeded, history=history,
    )
