"""The plan stage: cluster-first easy->hard batches with moderate mixing, and its ablation variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saerl_ray.core.config import load_config
from saerl_ray.core.stage import Stage
from saerl_ray.stages.plan import PLAN_SCHEMA, batch_purity, build_plan, run

B = 16


def inputs(n: int = 1200, seed: int = 1, sizes=(0.5, 0.3, 0.15, 0.05)):
    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:016x}" for i in range(n)], dtype=object)
    clusters = rng.choice(len(sizes), n, p=sizes)
    difficulty = rng.integers(1, 6, n).astype(np.float32) + rng.normal(0, 0.3, n).astype(np.float32)
    keep = rng.random(n) > 0.1
    lengths = rng.integers(20, 2000, n)
    return ids, clusters, difficulty, keep, lengths


def plan_of(variant="saerl", ratio=0.25, seed=0, **kw):
    ids, clusters, difficulty, keep, lengths = kw.pop("data", None) or inputs()
    return build_plan(ids, clusters, difficulty, keep, lengths, B, ratio, variant, seed), (ids, clusters, difficulty, keep, lengths)


def boundary_free(plan) -> np.ndarray:
    """Batches whose own (non-mixed) rows come from one cluster: not where a cluster ran out."""
    out = []
    for b in np.unique(plan["batch"]):
        sel = (plan["batch"] == b) & ~plan["mixed"]
        out.append(len(np.unique(plan["cluster"][sel])) == 1 and (plan["batch"] == b).sum() == B)
    return np.array(out)


def clean_pairs(plan) -> np.ndarray:
    """Per batch: its mixing pair (2j, 2j+1) is away from boundaries, i.e. both batches are and they
    belong to two clusters (at the very end one cluster may be left; an odd last batch has no pair)."""
    clean = boundary_free(plan)
    n_batches = len(clean)
    head = [plan["cluster"][plan["batch"] == b][0] for b in range(n_batches)]
    return np.array([b ^ 1 < n_batches and clean[b] and clean[b ^ 1] and head[b] != head[b ^ 1] for b in range(n_batches)])


def test_every_kept_prompt_exactly_once_and_filtered_removed():
    plan, (ids, _, _, keep, _) = plan_of()
    assert sorted(plan["id"]) == sorted(ids[keep])
    assert not set(plan["id"]) & set(ids[~keep])
    assert np.array_equal(plan["position"], np.arange(keep.sum()))
    assert np.array_equal(ids[plan["row"]], plan["id"])
    assert (np.diff(plan["batch"]) >= 0).all() and np.bincount(plan["batch"])[:-1].tolist() == [B] * (plan["batch"].max())


@pytest.mark.parametrize("ratio", [0.125, 0.25])
def test_batch_purity_is_one_minus_mixing_ratio_away_from_cluster_boundaries(ratio):
    plan, _ = plan_of(ratio=ratio)
    pur = batch_purity(plan["batch"], plan["cluster"])
    check = clean_pairs(plan)
    assert check.sum() > 0.8 * len(check)  # boundaries are the exception
    assert np.allclose(pur[check], 1 - ratio)
    # the mixed rows of a batch are the tail of its pair partner, which is another cluster
    for b in np.flatnonzero(check):
        own = plan["cluster"][(plan["batch"] == b) & ~plan["mixed"]]
        guest = plan["cluster"][(plan["batch"] == b) & plan["mixed"]]
        assert len(guest) == round(ratio * B) and not set(guest) & set(own)


def test_consecutive_batches_come_from_different_clusters():
    plan, _ = plan_of(variant="no_mix")
    n_batches = plan["batch"].max() + 1
    scheduled = [plan["cluster"][plan["batch"] == b][0] for b in range(n_batches)]  # a batch's first cluster
    for b in range(1, n_batches):
        later = set(plan["cluster"][plan["batch"] >= b])
        if len(later) > 1:  # once one cluster is left, repeats are unavoidable
            assert scheduled[b] != plan["cluster"][plan["batch"] == b - 1][-1], b


def test_easy_to_hard_within_each_cluster_ignoring_mixed_rows():
    plan, _ = plan_of()
    for c in np.unique(plan["cluster"]):
        d = plan["difficulty_pred"][(plan["cluster"] == c) & ~plan["mixed"]]
        assert (np.diff(d) >= 0).all()


def test_clusters_progress_at_the_same_relative_pace():
    # proportional (virtual finish time) scheduling: at the plan's midpoint every cluster is about half done,
    # so the global difficulty rises with position too
    plan, _ = plan_of(variant="no_mix")
    half = plan["position"] < len(plan["position"]) // 2
    for c in np.unique(plan["cluster"]):
        size = (plan["cluster"] == c).sum()
        done = (half & (plan["cluster"] == c)).sum() / size
        assert abs(done - 0.5) <= max(0.1, B / size), (c, done)  # one batch is the granularity
    rho = np.corrcoef(plan["position"], plan["difficulty_pred"].argsort().argsort())[0, 1]
    assert rho > 0.9


def test_deterministic_for_a_seed_and_seed_breaks_ties():
    data = inputs()
    ids, clusters, difficulty, keep, lengths = data
    tied = np.round(difficulty)  # many ties: the seed decides their order
    a = build_plan(ids, clusters, tied, keep, lengths, B, 0.25, "saerl", 7)
    b = build_plan(ids, clusters, tied, keep, lengths, B, 0.25, "saerl", 7)
    c = build_plan(ids, clusters, tied, keep, lengths, B, 0.25, "saerl", 8)
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["id"], c["id"])
    assert sorted(a["id"]) == sorted(c["id"])


def test_variant_shuffled_is_a_random_plain_order():
    plan, (ids, _, difficulty, keep, _) = plan_of("shuffled")
    assert sorted(plan["id"]) == sorted(ids[keep]) and not plan["mixed"].any()
    assert abs(np.corrcoef(plan["position"], plan["difficulty_pred"])[0, 1]) < 0.15
    assert batch_purity(plan["batch"], plan["cluster"]).mean() < 0.8


def test_variant_length_orders_globally_by_length():
    plan, (_, _, _, _, lengths) = plan_of("length")
    assert (np.diff(lengths[plan["row"]]) >= 0).all() and not plan["mixed"].any()


def test_variant_length_difficulty_is_the_saerl_plan_with_length_as_difficulty():
    plan, (ids, clusters, _, keep, lengths) = plan_of("length_difficulty")
    twin = build_plan(ids, clusters, lengths.astype(np.float64), keep, lengths, B, 0.25, "saerl", 0)
    for k in plan:
        assert np.array_equal(plan[k], twin[k]), k
    saerl, _ = plan_of("saerl")
    assert not np.array_equal(plan["id"], saerl["id"])  # the proxy's order is not length's here
    assert plan["mixed"].any()  # clusters and mixing kept, unlike the global length order


def test_variants_no_mix_and_full_mix_set_the_mixing():
    no_mix, _ = plan_of("no_mix", ratio=0.25)
    full, _ = plan_of("full_mix", ratio=0.25)
    assert not no_mix["mixed"].any()
    assert np.allclose(batch_purity(no_mix["batch"], no_mix["cluster"])[boundary_free(no_mix)], 1.0)
    check = clean_pairs(full)
    assert check.mean() > 0.8
    assert np.allclose(batch_purity(full["batch"], full["cluster"])[check], 0.5)
    assert full["mixed"].mean() > 0.45


def test_variant_no_filter_keeps_everything():
    plan, (ids, _, _, keep, _) = plan_of("no_filter")
    assert sorted(plan["id"]) == sorted(ids) and (~keep).sum() > 0


def test_bad_input_names_the_problem():
    ids, clusters, difficulty, keep, lengths = inputs(50)
    difficulty[7] = np.nan
    with pytest.raises(ValueError, match=ids[7]):
        build_plan(ids, clusters, difficulty, keep, lengths, B, 0.25, "saerl", 0)
    with pytest.raises(ValueError, match="variant"):
        build_plan(ids, clusters, np.zeros(50), keep, lengths, B, 0.25, "nope", 0)
    with pytest.raises(ValueError, match="keep has 3 rows"):
        build_plan(ids, clusters, np.zeros(50), keep[:3], lengths, B, 0.25, "saerl", 0)


# ---------------------------------------------------------------- the stage


def write_upstream(run_dir, n=100, drop_signal_for: int | None = None):
    ids, clusters, difficulty, keep, lengths = inputs(n, seed=3)
    st = Stage(run_dir, "ingest", "fp-ingest")
    tmp = Path(st.begin(keep_partial=False))
    split = ["train"] * (n - 5) + ["test"] * 5
    pq.write_table(pa.table({
        "id": list(ids), "prompt": [f"problem {i}" for i in range(n)], "answer": [str(i) for i in range(n)],
        "source": ["synthetic"] * n, "split": split, "row": pa.array(range(n), pa.int64()),
        "difficulty": pa.array([None] * n, pa.float64()), "topic": pa.array([None] * n, pa.string()),
        "quality": pa.array([None] * n, pa.float64()), "n_chars": pa.array(lengths, pa.int32()),
    }), tmp / "prompts.parquet")
    st.commit({"rows": n})
    st = Stage(run_dir, "signals", "fp-signals")
    tmp = Path(st.begin(keep_partial=False))
    rows = [i for i in range(n)[::-1] if i != drop_signal_for]  # signals in another order than prompts
    pq.write_table(pa.table({
        "id": [ids[i] for i in rows], "cluster": pa.array(clusters[rows], pa.int32()),
        "cluster_dist": pa.array(np.zeros(len(rows)), pa.float32()),
        "difficulty_pred": pa.array(difficulty[rows], pa.float32()),
        "quality_score": pa.array(np.zeros(len(rows)), pa.float32()), "keep": keep[rows],
    }), tmp / "assignments.parquet")
    st.commit({"rows": len(rows)})
    return ids, clusters, keep, split


def test_stage_writes_one_ordered_plan_joined_with_prompts(tmp_path):
    run_dir = tmp_path / "run"
    ids, clusters, keep, split = write_upstream(run_dir)
    cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": 8})
    summary = run(cfg)
    table = pq.read_table(run_dir / "plan" / "plan.parquet")
    assert table.schema.equals(PLAN_SCHEMA)
    t = table.to_pydict()
    train_kept = {i for i, k, s in zip(ids, keep, split) if k and s == "train"}
    assert set(t["id"]) == train_kept and len(t["id"]) == len(train_kept)
    assert t["position"] == list(range(len(t["id"])))
    index = {i: n for n, i in enumerate(ids)}
    assert all(p == f"problem {index[i]}" and a == str(index[i]) for i, p, a in zip(t["id"], t["prompt"], t["answer"]))
    assert all(c == clusters[index[i]] for i, c in zip(t["id"], t["cluster"]))
    assert summary["planned"] == len(train_kept) and summary["input"] == 95
    assert summary["spearman_within_cluster"] == pytest.approx(1.0)
    assert json.loads((run_dir / "plan" / "summary.json").read_text()) == summary
    marker = (run_dir / "plan" / "_DONE.json").read_text()
    assert run(cfg) == summary and (run_dir / "plan" / "_DONE.json").read_text() == marker  # no-op rerun


def test_stage_names_a_prompt_without_signals(tmp_path):
    run_dir = tmp_path / "run"
    ids, *_ = write_upstream(run_dir, drop_signal_for=4)
    with pytest.raises(ValueError, match=ids[4]):
        run(load_config(None, {"run_dir": str(run_dir)}))


def test_small_batches_still_mix_one_prompt():
    from saerl_ray.stages.plan import mix_pairs

    clusters = np.array([0] * 4 + [1] * 4)
    batches = [np.arange(4), np.arange(4, 8)]
    out, flags = mix_pairs(batches, clusters, mixing_ratio=0.125, batch_size=4)  # 0.5 rounds to 0
    assert [b.tolist() for b in out] == [[0, 1, 2, 7], [4, 5, 6, 3]]
    assert [f.tolist() for f in flags] == [[False, False, False, True], [False, False, False, True]]
    out, _ = mix_pairs(batches, clusters, mixing_ratio=0.0, batch_size=4)
    assert [b.tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
