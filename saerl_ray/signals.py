"""signals stage: clusters (diversity), predicted difficulty (order) and quality scores (filter) per prompt.

    saerl-ray signals -c configs/gsm8k_math500.yaml --signals.cluster.k 32

Reads `ingest/prompts.parquet` + `features/`, writes `signals/` (docs/run_dir.md): assignments.parquet,
centroids.safetensors, difficulty.json, quality.json, summary.json. k-means rounds, the difficulty
CV grid and the quality probe's held-out fits run as Ray tasks.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors.numpy import save

from saerl_ray import storage
from saerl_ray.cluster import clustering_space, kmeans
from saerl_ray.config import RunConfig, fingerprint, signal_codes
from saerl_ray.difficulty import run_difficulty
from saerl_ray.featureio import check_stored, code_columns, keep_columns, load_features
from saerl_ray.quality import Featurizer, run_quality
from saerl_ray.raycluster import init_ray
from saerl_ray.stage import Stage, marker_of

ASSIGNMENTS_SCHEMA = pa.schema([
    ("id", pa.string()), ("cluster", pa.int32()), ("cluster_dist", pa.float32()),
    ("difficulty_pred", pa.float32()), ("quality_score", pa.float32()), ("keep", pa.bool_()),
])


def _file_digest(path: str | None) -> str | None:
    """A label file is an input: editing it must rerun the stage."""
    if not path:
        return None
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16] if storage.exists(path) else f"missing:{path}"


def default_featurizer(cfg: RunConfig) -> Featurizer:
    """SAE codes for new texts (quality negatives), same lens/pooling/top-k as the features stage."""
    def featurize(texts: list[str]):
        from saerl_ray.features import featurize_texts

        return featurize_texts(texts, cfg.run_dir, cfg)

    return featurize


def _num_tasks(requested: int) -> int:
    import ray

    return requested or max(1, int(ray.cluster_resources().get("CPU", 1)))


def run(cfg: RunConfig, featurize: Featurizer | None = None) -> dict[str, Any]:
    sc = cfg.signals
    # Each signal reads its own codes (signals.*.codes; docs/decisions.md). Fingerprinted resolved, not
    # as the config's None: a changed default must recompute the stage.
    codes = {name: signal_codes(cfg, name) for name in ("cluster", "difficulty", "quality")}
    fp = fingerprint(
        sc, codes, cfg.seed, marker_of(cfg.run_dir, "ingest"), marker_of(cfg.run_dir, "features"),
        _file_digest(sc.difficulty.label_file),
    )
    st = Stage(cfg.run_dir, "signals", fp)
    if st.done():
        return st.summary()
    t0 = time.time()
    init_ray(cfg.ray)
    tmp = st.begin(keep_partial=False)
    prompts = storage.read_parquet(storage.join(cfg.run_dir, "ingest", "prompts.parquet")).to_pandas()
    check_stored(cfg.run_dir, cfg.features)
    _, X, n_tokens = load_features(cfg.run_dir, order=prompts["id"].tolist())

    c = sc.cluster
    Z = clustering_space(X[:, code_columns(cfg.run_dir, codes["cluster"])], c.metric, c.projection, cfg.seed)
    km = kmeans(Z, c.k, max_iter=c.max_iter, tol=c.tol, init_sample=c.init_sample,
                init_trials=c.init_trials, seed=cfg.seed,
                num_tasks=_num_tasks(c.num_tasks))
    storage.write_bytes(storage.join(tmp, "centroids.safetensors"), save({"centroids": km.centroids}))

    X_d = keep_columns(X, code_columns(cfg.run_dir, codes["difficulty"]))
    difficulty, d_metrics = run_difficulty(prompts, X_d, n_tokens, sc.difficulty, cfg.seed,
                                          storage.join(tmp, "difficulty.json"))
    q_cols = code_columns(cfg.run_dir, codes["quality"])
    featurize = featurize or default_featurizer(cfg)
    score, keep, q_metrics = run_quality(
        prompts, keep_columns(X, q_cols), sc.quality, cfg.seed, lambda texts: keep_columns(featurize(texts), q_cols),
        storage.join(tmp, "quality.json"),
    )
    table = pa.table({
        "id": prompts["id"].astype(str).tolist(), "cluster": km.labels, "cluster_dist": km.dist,
        "difficulty_pred": difficulty.astype(np.float32), "quality_score": score, "keep": keep,
    }, schema=ASSIGNMENTS_SCHEMA)
    storage.write_parquet(table, storage.join(tmp, "assignments.parquet"))

    sizes = np.bincount(km.labels, minlength=c.k)
    summary = {
        "rows": len(prompts), "kept": int(keep.sum()),
        "codes": codes,
        "cluster": {"k": c.k, "metric": c.metric, "projection": c.projection, "sizes": sizes.tolist(),
                    "inertia": km.inertia, "n_iter": km.n_iter, "converged": km.converged,
                    "reseeded": km.n_reseeded, "dims": int(Z.shape[1])},
        "difficulty": d_metrics, "quality": q_metrics, "seconds": round(time.time() - t0, 2),
    }
    st.commit(summary)
    d_txt = ("FALLBACK length rank" if d_metrics.get("fallback")
             else f"holdout spearman {_fmt(d_metrics.get('holdout', {}).get('spearman'))}")
    print(f"[signals] {len(prompts)} prompts: {c.k} clusters (sizes {sizes.min()}-{sizes.max()}, "
          f"{km.n_iter} rounds), difficulty {d_txt}, quality AUROC {_fmt(q_metrics['auroc_overall'])}, "
          f"kept {int(keep.sum())}/{len(prompts)}", flush=True)
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
