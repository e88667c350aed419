"""signals stage: clusters (diversity), predicted difficulty (order) and quality scores (filter) per prompt.

    saerl-ray signals -c configs/gsm8k_math500.yaml --signals.cluster.k 32

Reads `ingest/prompts.parquet` + `features/`, writes `signals/` (docs/run_dir.md): assignments.parquet,
centroids.safetensors, difficulty.json, quality.json, summary.json. k-means rounds, the difficulty
CV grid and the quality probe's held-out fits run as Ray tasks.

The codes never gather on the driver (a million prompts carry ~4 GB of them; benchmarks/scale.py):
  1. one Ray task per group of part files (~GROUP_ROWS rows) reads its parts from storage and returns
     the ids + token counts (small, to the driver), its rows in the clustering space (left in the
     object store for the k-means rounds), and the few rows the models train on (the difficulty
     labelled subset and the probe's positives, chosen from `prompts` and the quality reference's files
     before any code is read; reference prompts not in the pool are featurised, like the negatives);
  2. k-means rounds map over the blocks left in the object store (saerl_ray.signal_models.kmeans.BlockSet);
  3. the regression and the probe are fit on the gathered rows, as before;
  4. one task per group reads its parts again and scores every row with both models.
Results are computed in part order and put in `prompts` order on the driver (n floats each).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pac
import scipy.sparse as sp
from safetensors.numpy import save

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, fingerprint, signal_codes
from saerl_ray.core.featureio import (
    check_stored,
    code_columns,
    group_parts,
    keep_columns,
    part_paths,
    positions,
    read_parts,
    read_surprisal,
    stored_codes,
)
from saerl_ray.core.ray_init import init_ray
from saerl_ray.core.stage import Stage, marker_of
from saerl_ray.signal_models import difficulty as dif
from saerl_ray.signal_models import quality as qual
from saerl_ray.signal_models.kmeans import (
    BlockSet,
    clustering_space,
    kmeans,
    project_blocks,
)
from saerl_ray.signal_models.quality import Featurizer
from saerl_ray.stages.ingest import IngestError, ingest, input_versions

# Rows per Ray task: bounds a task's memory (its parts' table + codes, ~0.5 GB at the main run's
# ~500 entries per prompt) while keeping the per-round k-means partials the driver sums few (one
# K x d array per task).
GROUP_ROWS = 32_768

ASSIGNMENTS_SCHEMA = pa.schema([
    ("id", pa.string()), ("cluster", pa.int32()), ("cluster_dist", pa.float32()),
    ("difficulty_pred", pa.float32()), ("quality_score", pa.float32()), ("keep", pa.bool_()),
    ("quality_flag", pa.string()),
])


def _file_digest(path: str | None) -> str | None:
    """A label file is an input: editing it must rerun the stage."""
    if not path:
        return None
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16] if storage.exists(path) else f"missing:{path}"


def read_reference(specs: list) -> tuple[pd.DataFrame, dict]:
    """Every usable row of the reference files (read like ingest inputs, deduplicated; ids as ingest makes
    them, so a reference prompt also in the pool has the pool's id), and per file its rows / accepted /
    rejected. A file that is missing, unreadable or holds no usable prompt is an error naming it."""
    try:
        rows, _, counts = ingest(list(specs), dedup=True, require_answer=False)
    except IngestError as e:
        raise IngestError(f"signals.quality.reference: {e}") from None
    for path, c in counts.items():
        if c["accepted"] == 0:
            raise IngestError(f"signals.quality.reference: {path} holds no usable prompt ({c['rows']} rows, "
                              f"rejected: {c['by_reason'] or 'none'}); name a curated file, or set "
                              f"signals.quality.reference: [] to take the positives from the pool")
    cols = ["id", "prompt", "answer", "source", "n_chars"]
    return pd.DataFrame(rows, columns=cols), {p: {k: c[k] for k in ("rows", "accepted", "rejected")} for p, c in counts.items()}


def default_featurizer(cfg: RunConfig) -> Featurizer:
    """SAE codes for new texts (quality negatives), same lens/pooling/top-k as the features stage; with
    their surprisal too when the quality signal combines it."""
    def featurize(texts: list[str]):
        from saerl_ray.stages.features import featurize_texts

        return featurize_texts(texts, cfg.run_dir, cfg, with_surprisal="surprisal" in cfg.signals.quality.combine)

    return featurize


def _quality_columns(out, q_cols: np.ndarray):
    """The probe's columns of a featurizer's output: codes, or (codes, surprisal)."""
    return (keep_columns(out[0], q_cols), out[1]) if isinstance(out, tuple) else keep_columns(out, q_cols)


def _num_tasks(requested: int) -> int:
    import ray

    return requested or max(1, int(ray.cluster_resources().get("CPU", 1)))


def load_group(paths: list[str], n_columns: int, cluster_cols: np.ndarray, metric: str, wanted: pa.Array):
    """Ray task, 3 returns: (ids, n_tokens, surprisal) for the driver; the rows in the clustering space (a
    block for the k-means rounds, kept in the object store); (ids, codes) of the rows in `wanted`."""
    ids, n_tokens, X = read_parts(paths, n_columns)
    Z = clustering_space(X[:, cluster_cols], metric)
    rows = np.flatnonzero(pac.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))
    return (ids, n_tokens, read_surprisal(paths)), Z, (ids.take(pa.array(rows, pa.int64())), X[rows])


def score_group(paths: list[str], n_columns: int, d_model: dict | None, q_model: dict) -> tuple:
    """Ray task: the difficulty model's code score (None for the length fallback) and the quality model's
    raw code signals (probe, novelty per band) of a group's rows; the driver adds the length terms and
    combines."""
    _, _, X = read_parts(paths, n_columns)
    d = dif.linear_score(d_model, X).astype(np.float32) if d_model is not None else None
    return d, qual.raw_signals(q_model, X)


def _meta_columns(path: str, sc) -> list[str]:
    """What the signals need of every prompt: ids, sources, label columns; prompt texts only for the probe sample."""
    have = storage.parquet_columns(path)
    want = ["id", "source", "n_chars", sc.difficulty.label_column, sc.quality.label_column]
    return [c for c in dict.fromkeys(w for w in want if w) if c in have]


def run(cfg: RunConfig, featurize: Featurizer | None = None) -> dict[str, Any]:
    import ray

    sc = cfg.signals
    # Each signal reads its own codes (signals.*.codes; docs/decisions.md). Fingerprinted resolved, not
    # as the config's None: a changed default must recompute the stage.
    codes = {name: signal_codes(cfg, name) for name in ("cluster", "difficulty", "quality")}
    fp = fingerprint(
        sc, codes, cfg.seed, marker_of(cfg.run_dir, "ingest"), marker_of(cfg.run_dir, "features"),
        _file_digest(sc.difficulty.label_file), input_versions(sc.quality.reference),
    )
    st = Stage(cfg.run_dir, "signals", fp)
    if st.done():
        return st.summary()
    t0 = time.time()
    init_ray(cfg.ray)
    tmp = st.begin(keep_partial=False)
    prompts_path = storage.join(cfg.run_dir, "ingest", "prompts.parquet")
    meta = storage.read_parquet(prompts_path, columns=_meta_columns(prompts_path, sc))
    prompts = meta.to_pandas()
    n = len(prompts)
    check_stored(cfg.run_dir, cfg.features)
    fdir = storage.join(cfg.run_dir, "features")
    n_columns = storage.read_json(storage.join(fdir, "summary.json")).get("n_columns", stored_codes(cfg.run_dir)[1])

    # Which rows the models train on depends on `prompts` alone: decided first, fetched in the same pass.
    d_setup = dif.difficulty_setup(prompts, sc.difficulty, cfg.seed)
    q_setup = qual.quality_setup(prompts, sc.quality, cfg.seed,
                                 read_reference(sc.quality.reference) if sc.quality.reference else None)
    fit_rows = np.unique(np.concatenate([a for a in (d_setup.train, q_setup.pos, q_setup.neg) if a is not None]))

    c = sc.cluster
    groups = group_parts(part_paths(cfg.run_dir), n, GROUP_ROWS, _num_tasks(c.num_tasks))
    load = ray.remote(num_cpus=1, num_returns=3)(load_group)
    c_cols = code_columns(cfg.run_dir, codes["cluster"])
    fit_ids = meta["id"].combine_chunks().take(pa.array(fit_rows, pa.int64()))
    c_ref, ids_ref = ray.put(c_cols), ray.put(fit_ids)
    phase = {"start": time.time()}
    loaded = [load.remote(g, n_columns, c_ref, c.metric, ids_ref) for g in groups]
    index = ray.get([m for m, _, _ in loaded])
    sizes = [len(ids) for ids, _, _ in index]
    if sum(sizes) != n:
        raise ValueError(f"{fdir} holds {sum(sizes)} rows but ingest/prompts.parquet {n}; rerun the features stage")
    # perm[i] = row (in part order) of prompt i; every result below is put in prompts order with it.
    perm = positions(meta["id"], pa.chunked_array([ids for ids, _, _ in index], pa.string()), fdir)
    n_tokens = np.concatenate([t for _, t, _ in index])[perm]
    # NaN unless features.surprisal was on (RunConfig refuses a surprisal signal without it)
    surprisal = np.concatenate([s for _, _, s in index])[perm]
    del index
    phase["read"] = time.time()

    fitted = ray.get([w for _, _, w in loaded])
    blocks = BlockSet([z for _, z, _ in loaded], sizes, len(c_cols), sparse=True, on_ray=True)
    del loaded
    blocks = project_blocks(blocks, c.projection, c.metric, cfg.seed, order=perm)
    km = kmeans(blocks, c.k, max_iter=c.max_iter, tol=c.tol, init_sample=c.init_sample,
                init_trials=c.init_trials, seed=cfg.seed, order=perm)
    dims = blocks.width
    del blocks  # the last references: the clustering blocks leave the object store
    phase["kmeans"] = time.time()
    storage.write_bytes(storage.join(tmp, "centroids.safetensors"), save({"centroids": km.centroids}))

    # The training rows in fit_rows order; rows_of(r) = the codes of prompt rows r (all among fit_rows).
    X_fit = sp.vstack([x for _, x in fitted]).tocsr()
    X_fit = X_fit[positions(fit_ids, pa.chunked_array([i for i, _ in fitted], pa.string()), fdir)]
    del fitted
    rows_of = lambda r: X_fit[np.searchsorted(fit_rows, r)]  # noqa: E731

    d_cols = code_columns(cfg.run_dir, codes["difficulty"])
    d_model = None
    if d_setup.train is not None:
        d_model, d_metrics = dif.fit_setup(d_setup, keep_columns(rows_of(d_setup.train), d_cols), sc.difficulty, cfg.seed)
    q_cols = code_columns(cfg.run_dir, codes["quality"])
    featurize = featurize or default_featurizer(cfg)
    q_featurize = lambda t: _quality_columns(featurize(t), q_cols)  # noqa: E731
    # Prompt lengths (the `length` signal); the novelty counts read each quality code as its own band.
    n_chars = (prompts["n_chars"].fillna(0).to_numpy(float) if "n_chars" in prompts.columns
               else pac.utf8_length(storage.read_parquet(prompts_path, columns=["prompt"])["prompt"]).to_numpy().astype(float))
    texts = answers = None
    pos_len, pos_sur = n_chars[q_setup.pos], surprisal[q_setup.pos]
    if q_setup.ref is not None:  # trusted reference: its prompts in the pool reuse their codes, the rest are featurised
        pos_X, pos_sur = qual.reference_positives(q_setup, lambda r: keep_columns(rows_of(r), q_cols), q_featurize,
                                                  surprisal)
        pos_len = q_setup.ref["n_chars"].to_numpy(float)
        texts, answers = q_setup.ref["prompt"].tolist(), q_setup.ref["answer"].fillna("").tolist()
    else:
        pos_X = keep_columns(rows_of(q_setup.pos), q_cols)
        if q_setup.neg is None:
            text = storage.read_parquet(prompts_path, columns=["prompt", "answer"]).take(pa.array(q_setup.pos, pa.int64()))
            texts = text["prompt"].to_pylist()
            answers = [a or "" for a in text["answer"].to_pylist()]
            del text
    d_sae = stored_codes(cfg.run_dir)[1]
    q_bands = [(int(code_columns(cfg.run_dir, [c])[0]), int(code_columns(cfg.run_dir, [c])[0]) + d_sae)
               for c in codes["quality"]]
    q_model, q_metrics = qual.fit_setup(
        q_setup, pos_X, None if q_setup.neg is None else keep_columns(rows_of(q_setup.neg), q_cols), texts, answers,
        q_featurize, sc.quality, cfg.seed, bands=q_bands,
        pos_len=pos_len, neg_len=None if q_setup.neg is None else n_chars[q_setup.neg],
        neighbor_band=q_bands[codes["quality"].index(sc.quality.neighbors_code)],  # RunConfig checked it is one
        pos_surprisal=pos_sur, neg_surprisal=None if q_setup.neg is None else surprisal[q_setup.neg],
    )
    phase["fit"] = time.time()

    score = ray.remote(num_cpus=1)(score_group)
    d_ref, q_ref = ray.put(d_model), ray.put(q_model)
    scored = ray.get([score.remote(g, n_columns, d_ref, q_ref) for g in groups])
    q_raw = {k: np.concatenate([q[k] for _, q in scored], axis=0)[perm] for k in scored[0][1]}
    if "length" in q_model["combine"]:
        q_raw["length"] = np.log(np.maximum(n_chars, 1.0))
    if "surprisal" in q_model["combine"]:
        q_raw["surprisal"] = qual.surprisal_raw(surprisal)
    score_q, q_flag_idx = qual.scores_from_raw(q_model, q_raw)
    del q_raw
    if d_model is None:
        difficulty, d_metrics = dif.difficulty_fallback(d_setup, n_tokens, storage.join(tmp, "difficulty.json"))
    else:
        difficulty = np.concatenate([d for d, _ in scored])[perm] + dif.length_term(d_model, d_setup.n_chars)
        d_metrics = dif.finish_difficulty(d_setup, d_model, d_metrics, difficulty, sc.difficulty,
                                          storage.join(tmp, "difficulty.json"))
    del scored
    keep, q_flags, q_metrics = qual.finish_quality(q_setup, q_model, q_metrics, score_q, q_flag_idx, sc.quality,
                                                   storage.join(tmp, "quality.json"))
    table = pa.table({
        "id": meta["id"], "cluster": km.labels, "cluster_dist": km.dist,
        "difficulty_pred": difficulty.astype(np.float32), "quality_score": score_q, "keep": keep,
        "quality_flag": pa.array(q_flags, pa.string()),
    }, schema=ASSIGNMENTS_SCHEMA)
    storage.write_parquet(table, storage.join(tmp, "assignments.parquet"))
    phase["score"] = time.time()

    sizes = np.bincount(km.labels, minlength=c.k)
    summary = {
        "rows": n, "kept": int(keep.sum()),
        "codes": codes,
        "cluster": {"k": c.k, "metric": c.metric, "projection": c.projection, "sizes": sizes.tolist(),
                    "inertia": km.inertia, "n_iter": km.n_iter, "converged": km.converged,
                    "reseeded": km.n_reseeded, "dims": int(dims)},
        "difficulty": d_metrics, "quality": q_metrics, "seconds": round(time.time() - t0, 2),
        # read = one pass over the parts (index, clustering blocks, training rows); score = the second pass
        "phase_seconds": {k: round(phase[k] - phase[p], 2) for p, k in zip(list(phase), list(phase)[1:])},
    }
    st.commit(summary)
    d_txt = ("FALLBACK length rank" if d_metrics.get("fallback")
             else f"holdout spearman {_fmt(d_metrics.get('holdout', {}).get('spearman'))}")
    print(f"[signals] {n} prompts: {c.k} clusters (sizes {sizes.min()}-{sizes.max()}, "
          f"{km.n_iter} rounds), difficulty {d_txt}, quality AUROC {_fmt(q_metrics['auroc_overall'])} "
          f"(leave-one-family-out mean {_fmt(q_metrics.get('auroc_lofo_mean'))}), "
          f"kept {int(keep.sum())}/{n} ({q_metrics['rule']})", flush=True)
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
