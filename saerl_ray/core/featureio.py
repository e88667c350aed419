"""Reading the features stage's output back: as one sparse matrix in `prompts` order, or part by part.

    ids, X, n_tokens = load_features(run_dir)      # X: scipy.sparse.csr_matrix (n, n_columns) float32
    s = read_surprisal(part_paths(run_dir))        # the per-prompt surprisal column (NaN: not computed)
    cols = code_columns(run_dir, ["pooled", "last"])   # column indices of those codes in X
    ids, n_tokens, X = read_parts(part_paths(run_dir)[:4], n_columns)   # a few parts (what a Ray task reads)
    for ids, X, peaks in iter_band(run_dir, "pooled"):   # one code, part by part, with its peak tokens
        ...  # X: csr (rows, d_sae); peaks: (X.nnz, 2) char spans aligned with X.data, or None

`load_features` gathers everything in one process: fine for thousands of prompts, not for a million
(~500 stored entries per prompt = 4 GB of codes at 1M). The signals stage instead hands each Ray task a
group of part paths (`group_parts`), so the codes never pass through the driver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from saerl_ray.core import storage


def part_paths(run_dir: str | Path) -> list[str]:
    """The part files of a run's features, in name order (= `prompts` order, docs/run_dir.md)."""
    fdir = storage.join(run_dir, "features")
    files = [f for f in storage.list_dir(fdir, suffix=".parquet") if f.startswith("part-")]
    if not files:
        raise FileNotFoundError(f"no part-*.parquet in {fdir}; run `saerl-ray features` first")
    return [storage.join(fdir, f) for f in files]


def read_feature_table(features_dir: str | Path) -> pa.Table:
    files = [f for f in storage.list_dir(features_dir, suffix=".parquet") if f.startswith("part-")]
    if not files:
        raise FileNotFoundError(f"no part-*.parquet in {features_dir}; run `saerl-ray features` first")
    # Parts written before the peak columns existed (a resumed run) get nulls there, not a schema error.
    return pa.concat_tables([storage.read_parquet(storage.join(features_dir, f)) for f in files],
                            promote_options="default")


def read_parts(paths: list[str], n_columns: int) -> tuple[pa.Array, np.ndarray, sp.csr_matrix]:
    """(ids, n_tokens, codes) of some part files, stacked in the given order."""
    tables = [storage.read_parquet(p, columns=["id", "n_tokens", "idx", "val"]) for p in paths]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return (table.column("id").combine_chunks(), np.asarray(table.column("n_tokens"), dtype=np.int32),
            table_to_csr(table, n_columns))


def read_surprisal(paths: list[str]) -> np.ndarray:
    """The `surprisal` column of some part files, stacked in the given order; NaN for rows computed
    without features.surprisal and for parts written before the column existed."""
    out = []
    for p in paths:
        if "surprisal" in storage.parquet_columns(p):
            col = storage.read_parquet(p, columns=["surprisal"]).column(0)
            out.append(col.to_numpy(zero_copy_only=False).astype(float))
        else:
            out.append(np.full(storage.read_parquet(p, columns=["id"]).num_rows, np.nan))
    return np.concatenate(out) if out else np.zeros(0)


PEAK_COLUMNS = ("peak_start", "peak_end")


def iter_band(run_dir: str | Path, code: str):
    """Per part file, in `prompts` order: (ids, X, peaks) for one stored code. X: csr (rows, d_sae) of
    that code's band; peaks: for `pooled`, the character span [start, end) in the prompt of each entry's
    peak token, (X.nnz, 2) int32 aligned with X.data; None for other codes or parts without peaks."""
    codes, d = stored_codes(run_dir)
    if code not in codes:
        code_columns(run_dir, [code])  # raises, naming the stored codes and the fix
    band = codes.index(code)
    for path in part_paths(run_dir):
        table = storage.read_parquet(path)
        yield (np.asarray(table.column("id").to_pylist(), dtype=object),
               *band_with_peaks(table, d, band, with_peaks=code == "pooled"))


def _flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (row of each element, the elements); None rows count as empty."""
    arr = table.column(column).combine_chunks()
    lengths = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    return np.repeat(np.arange(len(arr)), lengths), np.asarray(arr.flatten())


def band_with_peaks(table: pa.Table, d_sae: int, band: int,
                    with_peaks: bool) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """(codes of one band as csr (rows, d_sae), peak spans aligned with its data or None): see iter_band."""
    rows, idx = _flat(table, "idx")
    _, val = _flat(table, "val")
    inside = (idx >= band * d_sae) & (idx < (band + 1) * d_sae)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[inside], minlength=len(table)))])
    X = sp.csr_matrix((val[inside].astype(np.float32), idx[inside] - band * d_sae, indptr),
                      shape=(len(table), d_sae))
    if not with_peaks or not set(PEAK_COLUMNS) <= set(table.column_names):
        return X, None
    (peak_rows, start), (_, end) = _flat(table, "peak_start"), _flat(table, "peak_end")
    if len(start) != X.nnz or not np.array_equal(peak_rows, rows[inside]):
        return X, None  # a part whose peaks do not line up with this band (none stored): no peaks
    return X, np.stack([start, end], axis=1).astype(np.int32)


def group_parts(paths: list[str], rows: int, target_rows: int, min_groups: int = 1) -> list[list[str]]:
    """Consecutive runs of part files, about `target_rows` rows each (at least `min_groups` groups when
    there are that many parts): one group = one Ray task's share, sized to bound that task's memory
    while keeping the number of per-round results the driver sums small. Parts hold equal row counts
    (the last one fewer), so cutting by file count balances rows."""
    n_groups = max(min_groups, -(-rows // max(1, target_rows)) if rows else 1)
    n_groups = max(1, min(len(paths), n_groups))
    bounds = np.linspace(0, len(paths), n_groups + 1).round().astype(int)
    return [paths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def positions(order: pa.Array | pa.ChunkedArray, ids: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """For every id of `order`, its row in `ids` (a KeyError names the first id missing there)."""
    import pyarrow.compute as pac

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    pos = pac.index_in(order, value_set=ids)
    if pos.null_count:
        missing = pac.filter(order, pac.is_null(pos))
        raise KeyError(f"{pos.null_count} ids have no features (first: {missing[0].as_py()}) in {where}")
    return np.asarray(pos.to_numpy(zero_copy_only=False), dtype=np.int64)


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
    """(ids, csr, n_tokens). With `order`, rows follow that id list (ids missing there are an error);
    parts are then read one at a time and only the wanted rows kept, so a few rows of a big run cost
    one part's memory, not the whole run's."""
    fdir = storage.join(run_dir, "features")
    summary = storage.read_json(storage.join(fdir, "summary.json"))
    n_columns = summary.get("n_columns", summary["d_sae"])  # one d_sae-wide band per features.codes
    if order is None:
        table = read_feature_table(fdir)
        return (np.asarray(table.column("id").to_pylist(), dtype=object), table_to_csr(table, n_columns),
                np.asarray(table.column("n_tokens"), dtype=np.int32))
    import pyarrow.compute as pac

    want = pa.array(list(order), pa.string())
    got_ids, got_X, got_tok = [], [], []
    for path in part_paths(run_dir):
        ids, n_tokens, X = read_parts([path], n_columns)
        rows = np.flatnonzero(pac.is_in(ids, value_set=want).to_numpy(zero_copy_only=False))
        got_ids.append(ids.take(pa.array(rows)))
        got_X.append(X[rows])
        got_tok.append(n_tokens[rows])
    perm = positions(want, pa.chunked_array(got_ids, pa.string()), fdir)
    X = sp.vstack(got_X).tocsr() if got_X else sp.csr_matrix((0, n_columns), dtype=np.float32)
    return np.asarray(want.to_pylist(), dtype=object), X[perm], np.concatenate(got_tok)[perm]


def load_surprisal(run_dir: str | Path, order: list[str]) -> np.ndarray:
    """The `surprisal` column (read_surprisal) of the prompts in `order` (ids missing there are an error)."""
    paths = part_paths(run_dir)
    ids = pa.chunked_array([storage.read_parquet(p, columns=["id"]).column(0).combine_chunks() for p in paths],
                           pa.string())
    return read_surprisal(paths)[positions(pa.array(list(order), pa.string()), ids, storage.join(run_dir, "features"))]
