"""CurriculumSampler: static replay, the online rules on scripted rewards, state, kill + restore on Ray."""

from __future__ import annotations

from pathlib import Path

import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saerl_ray.config import SamplerConfig, load_config
from saerl_ray.plan import PLAN_SCHEMA, build_plan
from saerl_ray.sampler import CurriculumState, get_or_create_sampler
from saerl_ray.stage import Stage

B = 4


def plan_table(n_clusters=2, per_cluster=16, ratio=0.0, seed=0) -> pa.Table:
    n = n_clusters * per_cluster
    ids = np.array([f"p{i:04d}" for i in range(n)], dtype=object)
    clusters = np.repeat(np.arange(n_clusters) * 10, per_cluster)  # labels 0, 10, ...: not dense on purpose
    difficulty = np.tile(np.arange(per_cluster, dtype=np.float32), n_clusters)
    p = build_plan(ids, clusters, difficulty, np.ones(n, bool), np.ones(n), B, ratio, "saerl", seed)
    return pa.table({
        "position": p["position"], "batch": p["batch"], "id": p["id"].tolist(),
        "prompt": [f"question {i}" for i in p["id"]], "answer": [f"answer {i}" for i in p["id"]],
        "source": ["synthetic"] * n, "cluster": p["cluster"], "difficulty_pred": p["difficulty_pred"], "mixed": p["mixed"],
    }, schema=PLAN_SCHEMA)


def state(table, **cfg) -> CurriculumState:
    return CurriculumState(table, SamplerConfig(**cfg), batch_size=B)


def ids_of(batch):
    return [r["id"] for r in batch]


def serve_epoch(s: CurriculumState, n_batches: int) -> list[list[dict]]:
    return [s.next_batch() for _ in range(n_batches)]


def test_static_replay_equals_the_plan_epoch_after_epoch():
    table = plan_table(n_clusters=3, ratio=0.25)
    plan_ids = table["id"].to_pylist()
    s = state(table, mode="static")
    rows = [r for _ in range(20) for r in s.next_batch(5)]  # 100 rows: crosses two epoch ends
    assert ids_of(rows) == (plan_ids * 3)[:100]
    assert [r["epoch"] for r in rows] == [0] * 48 + [1] * 48 + [2] * 4
    by_id = {r["id"]: r for r in table.to_pylist()}
    for r in rows[:48]:
        p = by_id[r["id"]]
        assert (r["position"], r["cluster"], r["prompt"], r["answer"]) == (p["position"], p["cluster"], p["prompt"], p["answer"])
    assert s.next_batch()[0]["id"] == plan_ids[4]  # default n = plan batch size


def test_static_mode_applies_no_online_rule():
    table = plan_table()
    s = state(table, mode="static", retire_after=1)
    for _ in range(3):
        batches = serve_epoch(s, 8)
        for b in batches:
            s.report(ids_of(b), [[0.0, 0.0]] * len(b))
        assert [i for b in batches for i in ids_of(b)] == table["id"].to_pylist()
    assert s.stats()["retired"] == 0 and s.stats()["reported"] == 96


def test_saturated_prompt_is_postponed_in_the_next_epoch():
    table = plan_table()
    s = state(table, postpone_batches=3, fast_pass_rate=2.0)  # pacing off: only postponement acts
    first = serve_epoch(s, 8)
    x = first[0][0]["id"]  # easiest prompt of the first cluster
    for b in first:
        s.report(ids_of(b), [[1.0] * 4 if i == x else [1.0, 0.0] for i in ids_of(b)])
    second = serve_epoch(s, 8)
    served = [i for b in second for i in ids_of(b)]
    assert Counter(served) == Counter(table["id"].to_pylist())  # still exactly once in the epoch
    where = next(k for k, b in enumerate(second) if x in ids_of(b))
    assert where >= 3  # planned for the epoch's first batch, served at least 3 batches later
    assert {r["cluster"] for r in second[0]} == {first[0][0]["cluster"]}  # a cluster-mate took its slot
    log = [d for d in s.decisions if d["decision"] == "postpone"]
    assert [d["id"] for d in log] == [x] and "saturated" in log[0]["reason"]
    assert s.stats()["postponed"] == 1


def test_hopeless_prompt_is_retired_for_the_rest_of_the_run():
    table = plan_table()
    s = state(table, retire_after=2, fast_pass_rate=2.0)
    y = table["id"][5].as_py()
    for _ in range(2):
        for b in serve_epoch(s, 8):
            s.report(ids_of(b), [[0.0] * 4 if i == y else [1.0, 0.0] for i in ids_of(b)])
    assert s.stats()["retired"] == 1
    assert [d["id"] for d in s.decisions if d["decision"] == "retire"] == [y]
    later = [i for _ in range(2) for b in serve_epoch(s, 8) for i in ids_of(b)][: 2 * 31]
    assert y not in later
    assert Counter(later) == Counter({i: 2 for i in table["id"].to_pylist() if i != y})


def test_fast_cluster_skips_ahead_then_revisits_when_it_struggles():
    table = plan_table()
    s = state(table, fast_pass_rate=0.8, pace_min_groups=2, pace_skip=1, ema_alpha=0.5, revisit_drop=0.3)
    a_queue = [r["id"] for r in table.to_pylist() if r["cluster"] == 0]  # easy -> hard
    b0 = s.next_batch()
    assert ids_of(b0) == a_queue[:4]
    s.report(ids_of(b0), [[1.0] * 4] * 4)  # cluster 0 solved: fast
    s.report(ids_of(s.next_batch()), [[0.5, 0.5]] * 4)  # cluster 10, middling
    b2 = s.next_batch()
    assert ids_of(b2) == [a_queue[5], a_queue[7], a_queue[9], a_queue[11]]  # one easy prompt deferred per served
    assert [d["id"] for d in s.decisions if d["decision"] == "pace_skip"] == [a_queue[k] for k in (4, 6, 8, 10)]
    s.report(ids_of(b2), [[0.0] * 4] * 4)  # the harder prompts fail: EMA 1 -> 0.5, a 0.5 drop
    assert [d["decision"] for d in s.decisions].count("revisit") == 1
    s.next_batch()  # cluster 10
    b4 = s.next_batch()
    assert ids_of(b4) == [a_queue[k] for k in (4, 6, 8, 10)]  # the skipped easier prompts come back first
    rest = [i for _ in range(3) for i in ids_of(s.next_batch())]
    served = ids_of(b0) + ids_of(b2) + ids_of(b4) + [i for i in rest if i in a_queue]
    assert Counter(served) == Counter(a_queue)


def test_replacement_serves_waiting_same_cluster_prompts_and_never_repeats():
    table = plan_table()
    s = state(table)
    a_queue = [r["id"] for r in table.to_pylist() if r["cluster"] == 10]
    s.next_batch()
    got = s.replacement(10, 3)
    assert ids_of(got) == a_queue[:3] and {r["cluster"] for r in got} == {10}
    rest = [r for _ in range(7) for r in s.next_batch()]  # 28 rows: the epoch had 25 left
    epoch0 = [r["id"] for r in rest if r["epoch"] == 0]
    assert Counter(ids_of(got) + epoch0) == Counter(table["id"].to_pylist()[4:])
    assert [r["id"] for r in rest if r["epoch"] == 1] == table["id"].to_pylist()[:3]
    s.replacement(10, 16)
    assert s.replacement(10, 5) == []  # this epoch's cluster 10 is used up
    assert s.stats()["replacements"] == 3 + 16
    with pytest.raises(ValueError, match="cluster 7 is not in the plan"):
        s.replacement(7, 1)


def test_report_names_bad_input():
    s = state(plan_table())
    with pytest.raises(ValueError, match="'nope' is not in the plan"):
        s.report(["p0000", "nope"], [[1.0], [0.0]])
    with pytest.raises(ValueError, match="p0001"):
        s.report(["p0001"], [[1.5]])
    with pytest.raises(ValueError, match="p0001"):
        s.report(["p0001"], [[]])
    with pytest.raises(ValueError, match="2 ids but 1 reward groups"):
        s.report(["p0000", "p0001"], [[1.0]])
    assert s.stats()["reported"] == 0  # nothing half-applied


def test_plan_file_errors_name_the_file(tmp_path):
    bad = plan_table().drop_columns(["difficulty_pred"])
    pq.write_table(bad, tmp_path / "plan.parquet")
    with pytest.raises(ValueError, match=r"plan.parquet: missing column\(s\) \['difficulty_pred'\]"):
        CurriculumState(tmp_path / "plan.parquet")
    with pytest.raises(FileNotFoundError, match="saerl-ray plan"):
        CurriculumState(tmp_path / "absent.parquet")


def scripted_rewards(ids, rng):
    return [[float(x) for x in rng.integers(0, 2, 4)] if rng.random() < 0.6 else [float(rng.random() < 0.5)] * 4 for _ in ids]


def test_online_rules_keep_exactly_once_per_epoch_under_random_rewards():
    table = plan_table(n_clusters=4, per_cluster=24, ratio=0.25)
    s = state(table, retire_after=2, pace_min_groups=2, postpone_batches=2)
    rng = np.random.default_rng(0)
    served: list[tuple[int, str]] = []
    for _ in range(120):
        batch = s.next_batch()
        if rng.random() < 0.2:
            batch += s.replacement(batch[0]["cluster"], 2)
        served += [(r["epoch"], r["id"]) for r in batch]
        s.report(ids_of(batch), scripted_rewards(batch, rng))
    st = s.stats()
    assert st["postponed"] > 0 and st["retired"] > 0 and st["paced"] > 0 and st["replacements"] > 0
    retired = {d["id"] for d in s.decisions if d["decision"] == "retire"}
    everyone = set(table["id"].to_pylist())
    for epoch in range(st["epoch"]):  # complete epochs only
        got = [i for e, i in served if e == epoch]
        assert len(got) == len(set(got))  # nobody twice
        assert everyone - set(got) <= retired  # nobody lost but the retired


def test_state_dict_round_trip_resumes_exactly():
    table = plan_table(n_clusters=3, per_cluster=20, ratio=0.25)
    cfg = dict(retire_after=2, pace_min_groups=2, postpone_batches=2)
    a = state(table, **cfg)
    rng = np.random.default_rng(1)
    for _ in range(25):
        b = a.next_batch()
        a.report(ids_of(b), scripted_rewards(b, rng))
    saved = json.loads(json.dumps(a.state_dict()))  # plain JSON, no pickle
    b_state = state(table, **cfg)
    b_state.load_state_dict(saved)
    for _ in range(30):
        x, y = a.next_batch(), b_state.next_batch()
        assert x == y
        r = scripted_rewards(x, rng)
        a.report(ids_of(x), r)
        b_state.report(ids_of(y), r)
    assert a.stats() == b_state.stats()
    with pytest.raises(ValueError, match="different plan"):
        state(plan_table(per_cluster=15)).load_state_dict(saved)


def test_checkpoint_writes_state_and_decisions(tmp_path):
    table = plan_table()
    s = CurriculumState(table, SamplerConfig(checkpoint_every=2, retire_after=1), state_dir=tmp_path, batch_size=B)
    for _ in range(4):
        b = s.next_batch()
        s.report(ids_of(b), [[0.0]] * len(b))
    s.checkpoint()
    lines = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and {x["decision"] for x in lines} == {"retire"} and all(x["reason"] for x in lines)
    restored = CurriculumState(table, SamplerConfig(retire_after=1), state_dir=tmp_path, batch_size=B)
    assert restored.stats()["served"] == 16 and restored.stats()["retired_total"] == 16
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in tmp_path.glob("rows-*.npy")] == [json.loads((tmp_path / "state.json").read_text())["rows_file"]]


# ---------------------------------------------------------------- on a real Ray cluster


def write_plan_stage(run_dir, table):
    st = Stage(run_dir, "plan", "test-plan")
    tmp = Path(st.begin(keep_partial=False))
    pq.write_table(table, tmp / "plan.parquet")
    st.commit({"planned": table.num_rows})


def wait_until_gone(ray, name):
    for _ in range(100):  # ray.kill is asynchronous; the name frees once the GCS sees the actor dead
        try:
            ray.get_actor(name, namespace="saerl")
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor {name} still registered after kill")


def test_actor_kill_and_restore_serves_each_prompt_once(ray_cluster, tmp_path):
    ray = ray_cluster
    from saerl_ray.sampler import actor_name

    table = plan_table(n_clusters=3, per_cluster=16, ratio=0.25)
    run_dir = tmp_path / "run"
    write_plan_stage(run_dir, table)
    cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": B, "sampler.checkpoint_every": 0})
    sampler = get_or_create_sampler(cfg)
    assert get_or_create_sampler(cfg)._actor_id == sampler._actor_id  # one named actor per run
    assert actor_name(cfg.run_dir) in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "saerl"}

    kept: list[str] = []
    for _ in range(3):
        batch = ray.get(sampler.next_batch.remote(B))
        kept += ids_of(batch)
        ray.get(sampler.report.remote(ids_of(batch), [[1.0, 0.0]] * len(batch)))
    assert ray.get(sampler.checkpoint.remote()).endswith("state.json")
    lost = ids_of(ray.get(sampler.next_batch.remote(B))) + ids_of(ray.get(sampler.next_batch.remote(B)))
    assert lost  # served after the checkpoint: the restored actor serves them again
    ray.kill(sampler)
    wait_until_gone(ray, actor_name(cfg.run_dir))

    sampler = get_or_create_sampler(cfg)  # a new actor, restored from <run_dir>/sampler/state.json
    assert ray.get(sampler.stats.remote())["reported"] == 3 * B
    while len(kept) < table.num_rows:
        batch = ray.get(sampler.next_batch.remote(B))
        assert {r["epoch"] for r in batch} == {0}
        kept += ids_of(batch)
    assert Counter(kept) == Counter(table["id"].to_pylist())  # each kept id exactly once in the epoch
    assert ray.get(sampler.rss_mb.remote()) > 0
    ray.kill(sampler)
