"""Reading the features stage's output back as one sparse matrix, in `prompts` order.

    ids, X, n_tokens = load_features(run_dir)      # X: scipy.sparse.csr_matrix (n, n_columns) float32
    cols = code_columns(run_dir, ["pooled", "last"])   # column indices of those codes in X
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from saerl_ray import storage


def read_feature_table(features_dir: str | Path) -> pa.Table:
    files = [f for f in storage.list_dir(features_dir, suffix=".parquet") if f.startswith("part-")]
    if not files:
        raise FileNotFoundError(f"no part-*.parquet in {features_dir}; run `saerl-ray features` first")
    return pa.concat_tables([storage.read_parquet(storage.join(features_dir, f)) for f in files])


def table_to_csr(table: pa.Table, d_sae: int) -> sp.csr_matrix:
    idx = table.column("idx").combine_chunks()
    val = table.column("val").combine_chunks()
    indptr = np.asarray(idx.offsets, dtype=np.int64)
    indptr = indptr - indptr[0]
    cols = np.asarray(idx.flatten(), dtype=np.int32)
    vals = np.asarray(val.flatten(), dtype=np.float32)
    return sp.csr_matrix((vals, cols, indptr), shape=(len(table), d_sae))


def stored_codes(run_dir: str | Path) -> tuple[list[str], int]:
    """(features.codes as stored, d_sae). Runs from before `codes` existed: pooled (+ last)."""
    summary = storage.read_json(storage.join(run_dir, "features", "summary.json"))
    codes = summary.get("codes") or ["pooled"] + (["last"] if summary.get("last_token") else [])
    return list(codes), int(summary["d_sae"])


def code_columns(run_dir: str | Path, wanted: list[str]) -> np.ndarray:
    """Column indices (into load_features' X) of the wanted codes; a code the run lacks is an error."""
    codes, d = stored_codes(run_dir)
    missing = [c for c in wanted if c not in codes]
    if missing:
        raise ValueError(f"code(s) {missing} not in {storage.join(run_dir, 'features')} (stored: {codes}); "
                         "add them to features.codes and rerun the features stage")
    return np.concatenate([np.arange(codes.index(c) * d, (codes.index(c) + 1) * d) for c in wanted])


def check_stored(run_dir: str | Path, f) -> None:
    """The run's features must be what `f` (FeaturesConfig) would compute: new texts (quality negatives)
    are featurised from the config, and their columns must line up with the stored ones."""
    summary = storage.read_json(storage.join(run_dir, "features", "summary.json"))
    stored = (stored_codes(run_dir)[0], summary.get("pooling"), summary.get("top_k"))
    wanted = (list(f.codes), f.pooling, f.top_k)
    if stored != wanted:
        raise ValueError(f"{storage.join(run_dir, 'features')} holds codes/pooling/top_k {stored} but the config asks for "
                         f"{wanted}; rerun the features stage (`saerl-ray features` with this config)")


def keep_columns(X: sp.spmatrix, cols: np.ndarray) -> sp.csr_matrix:
    """X with every column outside `cols` zeroed, same shape: a model fit on it stores column indices
    that are valid in the full matrix, so reloading it needs no knowledge of the codes."""
    mask = np.zeros(X.shape[1], np.float32)
    mask[cols] = 1.0
    out = sp.csr_matrix(X @ sp.diags(mask))
    out.eliminate_zeros()
    return out


def load_features(run_dir: str | Path, order: list[str] | None = None):
    """(ids, csr, n_tokens). With `order`, rows follow that id list (ids missing there are an error)."""
    fdir = storage.join(run_dir, "features")
    summary = storage.read_json(storage.join(fdir, "summary.json"))
    table = read_feature_table(fdir)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    X = table_to_csr(table, summary.get("n_columns", summary["d_sae"]))  # one d_sae-wide band per features.codes
    n_tokens = np.asarray(table.column("n_tokens"), dtype=np.int32)
    if order is not None:
        pos = {k: i for i, k in enumerate(ids)}
        missing = [k for k in order if k not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids have no features (first: {missing[0]}) in {fdir}")
        perm = np.fromiter((pos[k] for k in order), dtype=np.int64, count=len(order))
        ids, X, n_tokens = ids[perm], X[perm], n_tokens[perm]
    return ids, X, n_tokens
