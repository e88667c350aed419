"""The `plan` stage: signals -> one ordered curriculum file (`plan/plan.parquet`).

The paper's batch builder (its sections 3-4: cluster-first batches, easy-to-hard, moderate mixing), made concrete:

1. filter: prompts with `keep=False` (quality probe) are dropped;
2. easy -> hard inside each cluster: each cluster is a queue sorted by predicted difficulty;
3. cluster-first batches: every batch is filled from one cluster's queue head;
4. consecutive batches come from different clusters, scheduled proportionally: the next batch goes
   to the cluster that would be least far through its own queue after it (smallest
   `(planned + batch_size) / size`, the "virtual finish time" of fair schedulers), never the cluster
   of the previous batch while another one is left. A cluster of 3,000 prompts then gets ten batches
   for every one of a 300-prompt cluster, so all clusters walk through their easy->hard curricula at
   the same relative pace and the global difficulty rises too. A plain round-robin would exhaust the
   small clusters early and end the run on one big cluster's hardest prompts; ranking by *remaining*
   share instead of finish time lets small clusters go early and piles the big one up at the end;
5. when a cluster runs out mid-batch, the batch is completed from the next scheduled cluster (a
   "boundary" batch: the only batches that are impure without mixing);
6. moderate mixing: batches are paired (0<->1, 2<->3, ...) and the last `round(mixing_ratio *
   batch_size)` rows of each are swapped with the partner's, so every paired batch carries exactly
   that many rows of another cluster (`mixed=True`). Disjoint pairs keep a row from travelling
   further than one batch.

Ablations come out of the same code: `shuffled` (random order, plain batches), `length` (global
easy->hard by prompt length), `no_mix` (mixing 0), `full_mix` (mixing 0.5: half of every batch is the
partner cluster's), `no_filter` (keep=False rows kept).

    saerl-ray plan --run-dir runs/m --plan.batch_size 32 --plan.mixing_ratio 0.125
    from saerl_ray.stages.plan import build_plan  # the pure function, numpy in / numpy out
"""

from __future__ import annotations

from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, Variant, fingerprint
from saerl_ray.core.stage import Stage, marker_of

VARIANTS = get_args(Variant)
FULL_MIX = 0.5

PLAN_SCHEMA = pa.schema([
    ("position", pa.int64()), ("batch", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
    ("answer", pa.string()), ("source", pa.string()), ("cluster", pa.int32()),
    ("difficulty_pred", pa.float32()), ("mixed", pa.bool_()),
])


# ---------------------------------------------------------------- pure core


def cluster_queues(clusters: np.ndarray, difficulty: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Row indices of every cluster, easy -> hard; ties broken by a seeded shuffle, not by input order."""
    tiebreak = rng.permutation(len(clusters))
    order = np.lexsort((tiebreak, difficulty, clusters))  # last key is primary
    sorted_clusters = clusters[order]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]])
    return {int(sorted_clusters[s]): order[s:e] for s, e in zip(starts, np.r_[starts[1:], len(order)])}


def schedule_batches(queues: dict[int, np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Cluster-first batches in proportional (virtual-finish-time) order (module docstring, 3-5)."""
    labels = np.array(sorted(queues))
    sizes = np.array([len(queues[c]) for c in labels], dtype=np.float64)
    taken = np.zeros(len(labels), dtype=np.int64)
    batches: list[np.ndarray] = []
    previous = -1
    while (taken < sizes).any():
        parts, need = [], batch_size
        while need and (taken < sizes).any():
            # the cluster that would be least far through its curriculum after this batch
            finish = np.where(taken < sizes, (taken + batch_size) / sizes, np.inf)
            if previous >= 0 and np.isfinite(finish).sum() > 1:
                finish[previous] = np.inf  # consecutive batches from different clusters
            k = int(np.argmin(finish))  # ties: the lower cluster label, deterministic
            got = queues[int(labels[k])][taken[k] : taken[k] + need]
            taken[k] += len(got)
            need -= len(got)
            parts.append(got)
            previous = k
        batches.append(np.concatenate(parts))
    return batches


def mix_pairs(
    batches: list[np.ndarray], clusters: np.ndarray, mixing_ratio: float, batch_size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Swap the last round(ratio*B) rows (at least 1 when ratio > 0) of batches 2j and 2j+1; returns
    (batches, mixed flags).
    A pair whose tails share a cluster (possible only next to a cluster's end) is not swapped:
    that would reorder a cluster's own curriculum without mixing anything."""
    m = int(round(mixing_ratio * batch_size))
    if mixing_ratio > 0 and m == 0:  # small batches (0.125 x 4 rounds to 0) would silently not mix
        m = 1
    out = [b.copy() for b in batches]
    flags = [np.zeros(len(b), dtype=bool) for b in batches]
    for j in range(0, len(out) - 1, 2):
        a, b = out[j], out[j + 1]
        k = min(m, len(a), len(b))
        if k == 0 or np.intersect1d(clusters[a[-k:]], clusters[b[-k:]]).size:
            continue
        a_tail, b_tail = a[-k:].copy(), b[-k:].copy()
        a[-k:], b[-k:] = b_tail, a_tail
        flags[j][-k:] = True
        flags[j + 1][-k:] = True
    return out, flags


def plain_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def build_plan(
    ids: np.ndarray,
    clusters: np.ndarray,
    difficulty: np.ndarray,
    keep: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    mixing_ratio: float,
    variant: str = "saerl",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Order prompts into a curriculum. Returns plan-ordered arrays: position, batch, id, cluster,
    difficulty_pred, mixed, and `row` (index into the inputs, to join other columns)."""
    n = len(ids)
    for name, arr in (("clusters", clusters), ("difficulty", difficulty), ("keep", keep), ("lengths", lengths)):
        if len(arr) != n:
            raise ValueError(f"build_plan: {name} has {len(arr)} rows, ids has {n}")
    if variant not in VARIANTS:
        raise ValueError(f"build_plan: unknown variant {variant!r}; one of {VARIANTS}")
    if batch_size < 1:
        raise ValueError(f"build_plan: batch_size must be >= 1, got {batch_size}")
    if not np.isfinite(np.asarray(difficulty, dtype=np.float64)).all():
        bad = int(np.flatnonzero(~np.isfinite(np.asarray(difficulty, dtype=np.float64)))[0])
        raise ValueError(f"build_plan: difficulty_pred is not finite for id {ids[bad]!r}")
    if variant == "length_difficulty":  # the same plan, ordered by length instead of the proxy
        difficulty = np.asarray(lengths, dtype=np.float64)
    rng = np.random.default_rng(seed)
    clusters = np.asarray(clusters, dtype=np.int64)
    rows = np.arange(n) if variant == "no_filter" else np.flatnonzero(np.asarray(keep, dtype=bool))

    if variant == "shuffled":
        batches, flags = plain_batches(rng.permutation(rows), batch_size), None
    elif variant == "length":
        tiebreak = rng.permutation(len(rows))
        batches, flags = plain_batches(rows[np.lexsort((tiebreak, np.asarray(lengths)[rows]))], batch_size), None
    else:
        ratio = {"no_mix": 0.0, "full_mix": FULL_MIX}.get(variant, mixing_ratio)
        local = cluster_queues(clusters[rows], np.asarray(difficulty, dtype=np.float64)[rows], rng)
        batches = schedule_batches({c: rows[q] for c, q in local.items()}, batch_size)
        batches, flags = mix_pairs(batches, clusters, ratio, batch_size)

    order = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    batch_of = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    mixed = np.concatenate(flags) if flags else np.zeros(len(order), dtype=bool)
    return {
        "position": np.arange(len(order), dtype=np.int64),
        "batch": batch_of.astype(np.int64),
        "id": np.asarray(ids)[order],
        "cluster": clusters[order].astype(np.int32),
        "difficulty_pred": np.asarray(difficulty, dtype=np.float32)[order],
        "mixed": mixed,
        "row": order.astype(np.int64),
    }


# ---------------------------------------------------------------- metrics


def batch_purity(batch: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Per batch (ascending batch label): share of rows in the batch's most common cluster."""
    if len(batch) == 0:
        return np.zeros(0)
    # One pass over (batch, cluster) pairs: a mask per batch was O(rows x batches), 100 s at 1M prompts.
    _, b = np.unique(batch, return_inverse=True)
    _, c = np.unique(cluster, return_inverse=True)
    width = int(c.max()) + 1
    pairs, counts = np.unique(b.astype(np.int64) * width + c, return_counts=True)
    top = np.zeros(int(b.max()) + 1, dtype=np.int64)
    np.maximum.at(top, pairs // width, counts)
    return top / np.bincount(b)


def within_cluster_spearman(position: np.ndarray, cluster: np.ndarray, difficulty: np.ndarray, mixed: np.ndarray) -> float | None:
    """Mean over clusters (size-weighted) of Spearman(position, difficulty) on non-mixed rows."""
    total, weight = 0.0, 0
    for c in np.unique(cluster):
        sel = (cluster == c) & ~mixed
        if sel.sum() < 3 or np.ptp(difficulty[sel]) == 0:
            continue
        rho = spearmanr(position[sel], difficulty[sel]).statistic
        total += float(rho) * int(sel.sum())
        weight += int(sel.sum())
    return total / weight if weight else None


def plan_summary(plan: dict[str, np.ndarray], n_input: int, n_filtered: int, variant: str, batch_size: int, mixing_ratio: float) -> dict[str, Any]:
    pur = batch_purity(plan["batch"], plan["cluster"]) if len(plan["batch"]) else np.zeros(0)
    global_rho = (
        float(spearmanr(plan["position"], plan["difficulty_pred"]).statistic)
        if len(plan["position"]) > 2 and np.ptp(plan["difficulty_pred"]) > 0 else None
    )
    return {
        "variant": variant, "batch_size": batch_size, "mixing_ratio": mixing_ratio,
        "input": n_input, "planned": int(len(plan["id"])), "filtered": n_filtered,
        "batches": int(plan["batch"].max() + 1) if len(plan["batch"]) else 0,
        "clusters": int(len(np.unique(plan["cluster"]))),
        "purity_mean": float(pur.mean()) if len(pur) else None,
        "mixing_realised": float(plan["mixed"].mean()) if len(plan["mixed"]) else 0.0,
        "spearman_within_cluster": within_cluster_spearman(plan["position"], plan["cluster"], plan["difficulty_pred"], plan["mixed"]),
        "spearman_global": global_rho,
    }


# ---------------------------------------------------------------- stage


def read_inputs(run_dir: str, split: str) -> tuple[pa.Table, pa.Table]:
    """Prompts of `split` and their signals, row-aligned. Errors name the file and the offending id."""
    prompts_path = storage.join(run_dir, "ingest", "prompts.parquet")
    signals_path = storage.join(run_dir, "signals", "assignments.parquet")
    prompts = storage.read_parquet(prompts_path, columns=["id", "prompt", "answer", "source", "split", "n_chars"])
    in_split = pac.equal(prompts["split"], split)
    if in_split.null_count or not pac.all(in_split).as_py():  # filter copies every column: only when needed
        prompts = prompts.filter(in_split)
    if prompts.num_rows == 0:
        raise ValueError(f"{prompts_path}: no prompts with split {split!r} (set plan.split)")
    signals = storage.read_parquet(signals_path)
    need = {"id", "cluster", "difficulty_pred", "keep"}
    if missing := need - set(signals.column_names):
        raise ValueError(f"{signals_path}: missing column(s) {sorted(missing)}")
    # Counted in Arrow: np.unique over a million Python strings was seconds and a copy of every id.
    counts = pac.value_counts(signals["id"].combine_chunks())
    dup = counts.filter(pac.greater(counts.field("counts"), 1))
    if len(dup):
        raise ValueError(f"{signals_path}: id {dup.field('values')[0].as_py()!r} appears "
                         f"{pac.max(dup.field('counts')).as_py()} times")
    where = pac.index_in(prompts["id"], value_set=signals["id"])
    if where.null_count:
        first = prompts["id"][int(np.flatnonzero(pac.is_null(where).to_numpy(zero_copy_only=False))[0])].as_py()
        raise ValueError(f"{signals_path}: no signals for prompt id {first!r} (rerun `saerl-ray signals`)")
    return prompts, signals.take(where)


ROW_GROUP = 65536


def write_plan(path: str, plan: dict[str, np.ndarray], prompts: pa.Table) -> None:
    """One ordered parquet file written with pyarrow directly (Ray Data would shard and reorder). Rows are
    gathered one row group at a time: a full reordered copy of the prompt texts was ~0.5 GB at 1M prompts."""
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, PLAN_SCHEMA) as writer:
        for a in range(0, len(plan["row"]), ROW_GROUP):
            rows = pa.array(plan["row"][a : a + ROW_GROUP])
            part = {k: plan[k][a : a + ROW_GROUP] for k in ("position", "batch", "cluster", "difficulty_pred", "mixed")}
            writer.write_table(pa.table({
                "position": part["position"], "batch": part["batch"], "id": prompts["id"].take(rows),
                "prompt": prompts["prompt"].take(rows), "answer": prompts["answer"].take(rows),
                "source": prompts["source"].take(rows), "cluster": part["cluster"],
                "difficulty_pred": part["difficulty_pred"], "mixed": part["mixed"],
            }, schema=PLAN_SCHEMA), row_group_size=ROW_GROUP)
    storage.write_bytes(path, memoryview(buf.getvalue()))  # bytes-like, without a copy of the file


def run(cfg: RunConfig) -> dict[str, Any]:
    pc = cfg.plan
    fp = fingerprint(pc, cfg.seed, marker_of(cfg.run_dir, "ingest"), marker_of(cfg.run_dir, "signals"))
    st = Stage(cfg.run_dir, "plan", fp)
    if st.done():
        return st.summary()
    tmp = st.begin(keep_partial=False)
    prompts, signals = read_inputs(cfg.run_dir, pc.split)
    keep = signals["keep"].fill_null(False).to_numpy(zero_copy_only=False)
    plan = build_plan(
        ids=prompts["id"].to_numpy(zero_copy_only=False),
        clusters=signals["cluster"].to_numpy(zero_copy_only=False),
        difficulty=signals["difficulty_pred"].to_numpy(zero_copy_only=False),
        keep=keep,
        lengths=prompts["n_chars"].fill_null(0).to_numpy(zero_copy_only=False),
        batch_size=pc.batch_size, mixing_ratio=pc.mixing_ratio, variant=pc.variant, seed=cfg.seed,
    )
    write_plan(storage.join(tmp, "plan.parquet"), plan, prompts)
    filtered = 0 if pc.variant == "no_filter" else int((~keep).sum())
    summary = plan_summary(plan, prompts.num_rows, filtered, pc.variant, pc.batch_size, pc.mixing_ratio)
    st.commit(summary)
    rho = summary["spearman_within_cluster"]
    print(
        f"[plan] {summary['variant']}: {summary['planned']} prompts ({summary['filtered']} filtered) in "
        f"{summary['batches']} batches of {pc.batch_size}, purity {summary['purity_mean'] or 0:.3f}, "
        f"mixed {summary['mixing_realised']:.3f}, within-cluster Spearman {'n/a' if rho is None else f'{rho:.3f}'}",
        flush=True,
    )
    return summary
