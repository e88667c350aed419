"""Reading the features stage's output back as one sparse matrix, in `prompts` order.

    ids, X, n_tokens = load_features(run_dir)      # X: scipy.sparse.csr_matrix (n, n_columns) float32
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp


def read_feature_table(features_dir: str | Path) -> pa.Table:
    files = sorted(Path(features_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no part-*.parquet in {features_dir}; run `saerl-ray features` first")
    return pa.concat_tables([pq.read_table(f) for f in files])


def table_to_csr(table: pa.Table, d_sae: int) -> sp.csr_matrix:
    idx = table.column("idx").combine_chunks()
    val = table.column("val").combine_chunks()
    indptr = np.asarray(idx.offsets, dtype=np.int64)
    indptr = indptr - indptr[0]
    cols = np.asarray(idx.flatten(), dtype=np.int32)
    vals = np.asarray(val.flatten(), dtype=np.float32)
    return sp.csr_matrix((vals, cols, indptr), shape=(len(table), d_sae))


def load_features(run_dir: str | Path, order: list[str] | None = None):
    """(ids, csr, n_tokens). With `order`, rows follow that id list (ids missing there are an error)."""
    fdir = Path(run_dir) / "features"
    summary = json.loads((fdir / "summary.json").read_text())
    table = read_feature_table(fdir)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    # n_columns = 2 x d_sae when the last-token block is on (features.last_token)
    X = table_to_csr(table, summary.get("n_columns", summary["d_sae"]))
    n_tokens = np.asarray(table.column("n_tokens"), dtype=np.int32)
    if order is not None:
        pos = {k: i for i, k in enumerate(ids)}
        missing = [k for k in order if k not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids have no features (first: {missing[0]}) in {fdir}")
        perm = np.fromiter((pos[k] for k in order), dtype=np.int64, count=len(order))
        ids, X, n_tokens = ids[perm], X[perm], n_tokens[perm]
    return ids, X, n_tokens
