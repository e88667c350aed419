"""CurriculumSampler: static replay, the online rules on scripted rewards, durable state, and the
recovery contract of docs/sampler_api.md (actor dies / trainer dies / both) as drills on a real Ray
cluster, 20 trials each, over a local run dir and an S3 one (moto on localhost)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from sampler_drill import drill, wait_until_gone
from testkit import commit_plan

from saerl_ray.core import storage
from saerl_ray.core.config import SamplerConfig, load_config
from saerl_ray.sampler.actor import SAMPLER_NAMESPACE, actor_name, get_or_create_sampler
from saerl_ray.sampler.state import CurriculumState
from saerl_ray.sampler.store import SamplerStore, read_decisions
from saerl_ray.stages.plan import PLAN_SCHEMA, build_plan

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


def test_report_applies_known_ids_and_names_the_rest():
    s = state(plan_table())
    got = s.report(["p0000", "nope", "p0001", "p0002", 7], [[1.0], [0.0], [1.5], [], [1.0]])
    assert got == {"accepted": 1, "unknown": ["nope", 7], "invalid": ["p0001", "p0002"], "duplicate": False}
    st = s.stats()
    assert (st["reported"], st["unknown"], st["invalid"]) == (1, 2, 2)
    assert s.attempts[s.lookup(["p0000"])[0][0]] == 1 and s.attempts[s.lookup(["p0001"])[0][0]] == 0
    with pytest.raises(ValueError, match="2 ids but 1 reward groups"):
        s.report(["p0000", "p0001"], [[1.0]])  # which group is whose is ambiguous: nothing applied
    assert s.stats()["reported"] == 1
    assert s.report([], []) == {"accepted": 0, "unknown": [], "invalid": [], "duplicate": False}


def test_a_retried_report_token_is_counted_once():
    s = state(plan_table())
    b = ids_of(s.next_batch())
    first = s.report(b, [[1.0, 0.0]] * 4, token="trainer-1")
    again = s.report(b, [[1.0, 0.0]] * 4, token="trainer-1")  # the reply was lost; the client retries
    assert first["accepted"] == again["accepted"] == 4 and again["duplicate"] and not first["duplicate"]
    assert s.stats()["reported"] == 4 and s.stats()["duplicate_reports"] == 1
    assert not s.report(b, [[1.0]] * 4, token="trainer-2")["duplicate"] and s.stats()["reported"] == 8


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


def test_checkpoint_writes_a_base_and_decision_segments(tmp_path):
    table = plan_table()
    s = CurriculumState(table, SamplerConfig(checkpoint_every=2, checkpoint_min_seconds=0, retire_after=1),
                        state_dir=tmp_path, batch_size=B)
    for _ in range(4):
        b = s.next_batch()
        s.report(ids_of(b), [[0.0]] * len(b))
    s.checkpoint()
    lines = read_decisions(str(tmp_path))
    assert len(lines) == 16 and {x["decision"] for x in lines} == {"retire"} and all(x["reason"] for x in lines)
    restored = CurriculumState(table, SamplerConfig(retire_after=1), state_dir=tmp_path, batch_size=B)
    assert restored.stats()["served"] == 16 and restored.stats()["retired_total"] == 16
    assert len(read_decisions(str(tmp_path))) == 16  # the restore's compaction adds no copy
    st = json.loads((tmp_path / "state.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(["state.json", st["arrays_file"]])
    assert not list((tmp_path / "log").iterdir())  # the base holds every call: its log records are gone


def test_served_batches_survive_a_crash_between_checkpoints(tmp_path):
    """The issue's first defect: serving was not durable before it was returned."""
    table = plan_table(n_clusters=3, per_cluster=16, ratio=0.25)
    cfg = SamplerConfig(checkpoint_every=0)  # no compaction at all: the log alone carries the state
    a = CurriculumState(table, cfg, state_dir=tmp_path, batch_size=B)
    got = [r for _ in range(5) for r in a.next_batch()]
    a.report([r["id"] for r in got[:4]], [[0.0, 1.0]] * 4)  # rewards of a batch served before a compaction
    del a  # crash: nothing but the per-call log objects
    b = CurriculumState(table, cfg, state_dir=tmp_path, batch_size=B)
    assert b.stats()["reported"] == 4 and b.stats()["served"] == 20
    got += [r for _ in range(7) for r in b.next_batch()]
    assert Counter(r["id"] for r in got) == Counter(table["id"].to_pylist())  # once each, none lost
    assert {r["epoch"] for r in got} == {0}


def test_resume_takes_back_the_calls_after_the_cursor():
    table = plan_table(n_clusters=3, per_cluster=8, ratio=0.25)
    s = state(table, mode="static")
    first = [s.next_batch() for _ in range(2)]
    cur = s.cursor()
    after = [s.next_batch(), s.replacement(10, 2), s.next_batch(3)]
    s.report(ids_of(after[0]), [[1.0]] * 4)  # a report of an uncommitted step stays
    got = s.resume(cur)
    assert (got["mode"], got["calls_taken_back"], got["rows_taken_back"]) == ("rewind", 3, 9)
    assert s.resume(cur)["calls_taken_back"] == 0  # idempotent: a retried resume takes nothing more
    again = [s.next_batch(), s.replacement(10, 2), s.next_batch(3)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seq"} for r in rows]
    assert [strip(x) for x in again] == [strip(x) for x in after]  # same rows, same order, same epochs
    assert s.stats()["reported"] == 4 and s.stats()["reserved"] == 9
    rest = [r for _ in range(4) for r in s.next_batch()]
    stream = [r["id"] for b in first + again for r in b] + [r["id"] for r in rest if r["epoch"] == 0]
    assert Counter(stream) == Counter(table["id"].to_pylist())
    with pytest.raises(ValueError, match="belongs to sampler history"):
        s.resume({"run": "someone-else", "seq": 1})
    with pytest.raises(ValueError, match="not a serving call"):
        s.resume(s.cursor() | {"seq": 10_000})
    # A trainer whose sampler lost its history: the full state saved with the checkpoint restores it.
    blob = {"cursor": cur, "state": state(table, mode="static").state_dict()}
    blob["state"]["uid"] = cur["run"]
    fresh = state(table, mode="static")
    assert fresh.resume(blob)["mode"] == "restore" and ids_of(fresh.next_batch()) == table["id"].to_pylist()[:B]


def test_commit_bounds_what_resume_can_take_back():
    s = state(plan_table())
    s.next_batch()
    c1 = s.cursor()
    s.next_batch()
    s.commit(c1)
    c2 = s.cursor()
    s.next_batch()
    s.commit(c2)  # one commit of slack: c1 is still resumable, nothing before it
    assert s.stats()["ledger_rows"] == 2 * B
    assert s.resume(c1)["calls_taken_back"] == 2
    with pytest.raises(ValueError, match="older than"):
        s.resume(c1 | {"seq": 0})


def core(s: CurriculumState) -> dict:
    """What decides every later answer and statistic (history identity and log position aside)."""
    st, arrays = s._snapshot()
    for k in ("uid", "gen", "ops", "cfg"):
        st.pop(k)
    return {"state": st, **{k: v.tolist() for k, v in arrays.items()}}


@pytest.mark.parametrize("where", ["local", "s3", "local-decision-flushes"])
def test_state_rebuilt_from_storage_after_crashes_and_failed_writes_equals_the_live_one(where, tmp_path, request, monkeypatch):
    """Random calls on a durable sampler and an in-memory twin; storage writes fail at random (the
    failed call raises and must leave no trace), and the durable one is rebuilt from storage at random
    points: it must always equal the twin. `local-decision-flushes`: a base is written whenever two
    decisions are buffered, which happens inside serving and reporting calls."""
    if where == "local-decision-flushes":
        import saerl_ray.sampler.state as sampler_module

        monkeypatch.setattr(sampler_module, "MAX_BUFFERED_DECISIONS", 2)
    root = request.getfixturevalue("s3_run_dir") + "/sampler" if where == "s3" else str(tmp_path / "sampler")
    table = plan_table(n_clusters=3, per_cluster=12, ratio=0.25)
    cfg = SamplerConfig(checkpoint_every=3, checkpoint_min_seconds=0, retire_after=2, pace_min_groups=2, postpone_batches=2)
    rng = np.random.default_rng(7)
    real_write, real_delete = storage.write_bytes, storage.delete
    flaky = {"on": False}

    def write_bytes(path, data):
        if flaky["on"] and rng.random() < 0.05:
            raise storage.StorageError(f"injected failure writing {path}")
        real_write(path, data)

    def delete(path):
        if flaky["on"] and rng.random() < 0.05:
            raise storage.StorageError(f"injected failure deleting {path}")
        real_delete(path)

    real_append = SamplerStore._append_local

    def append_local(self, op, data):  # local disk: a write that fails half way leaves a torn last line
        if flaky["on"] and rng.random() < 0.05:
            if self._segment is not None:
                self._segment.write(b"[%d,%s" % (op, data[: len(data) // 2]))
            self.close_segment()
            raise storage.StorageError(f"injected failure appending op {op}")
        real_append(self, op, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "delete", delete)
    monkeypatch.setattr(SamplerStore, "_append_local", append_local)
    durable, twin = CurriculumState(table, cfg, state_dir=root, batch_size=B), state(table, **cfg.model_dump())
    flaky["on"] = True
    cursors: list[int] = []
    failures = rebuilds = 0
    for step in range(40 if where == "s3" else 160):
        u = rng.random()
        if u < 0.4:
            call = ("next_batch", (int(rng.integers(1, 6)),))
        elif u < 0.5:
            call = ("replacement", (int(rng.choice([0, 10, 20])), int(rng.integers(1, 3))))
        elif u < 0.85:
            ids = rng.choice(table["id"].to_pylist(), size=int(rng.integers(1, 6)), replace=False).tolist()
            call = ("report", (ids, scripted_rewards(ids, rng), f"t{step}"))
        elif u < 0.95 and cursors:
            call = ("resume", (int(rng.choice(cursors)),))
        else:
            call = ("commit", ())
        args = call[1]
        if call[0] in ("resume", "commit"):
            seq = args[0] if args else twin.cursor()["seq"]
            if call[0] == "resume" and not twin._cursor_known(seq):
                continue
            args_d, args_t = (durable.cursor() | {"seq": seq},), (twin.cursor() | {"seq": seq},)
        else:
            args_d = args_t = args
        try:
            out_d = getattr(durable, call[0])(*args_d)
        except storage.StorageError:
            failures += 1  # not applied: the twin does not do it either
        else:
            out_t = getattr(twin, call[0])(*args_t)
            if call[0] in ("next_batch", "replacement"):
                assert out_d == out_t
                cursors.append(twin.cursor()["seq"])
            elif call[0] == "resume":
                assert {k: v for k, v in out_d.items() if k != "cursor"} == {k: v for k, v in out_t.items() if k != "cursor"}
            elif call[0] == "report":
                assert out_d == out_t
        assert core(durable) == core(twin), f"diverged after step {step} ({call[0]})"
        if step % 10 == 9 or rng.random() < 0.05:  # crash: drop the object (its writer thread finishes, as a kill would not wait)
            durable.store.wait()
            while True:
                try:
                    durable = CurriculumState(table, cfg, state_dir=root, batch_size=B)
                    break
                except storage.StorageError:
                    failures += 1  # the restore's own compaction failed: the next start tries again
            rebuilds += 1
            assert core(durable) == core(twin), f"rebuilt state differs after step {step}"
    assert failures >= 3 and rebuilds >= 3  # the scenario really ran


# ---------------------------------------------------------------- on a real Ray cluster


def test_client_fails_fast_when_the_actor_cannot_be_built(ray_cluster, tmp_path, monkeypatch):
    from saerl_ray.sampler import state as sampler_mod
    from saerl_ray.sampler.actor import SamplerClient

    waits = []

    def sleep(s):  # the client's back-off between tries
        waits.append(s)
        if len(waits) > 3:
            raise AssertionError("the client kept retrying a constructor that fails every time")


    run_dir = tmp_path / "run"
    commit_plan(run_dir, plan_table(n_clusters=3, per_cluster=8))
    cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": B})
    first = get_or_create_sampler(cfg)
    ray.get(first.checkpoint.remote())  # state for this plan
    ray.kill(first)
    wait_until_gone(actor_name(cfg.run_dir))
    commit_plan(run_dir, plan_table(n_clusters=3, per_cluster=9))  # re-planned: the state is stale
    monkeypatch.setattr(sampler_mod.time, "sleep", sleep)
    with pytest.raises(ray.exceptions.RayActorError, match="different plan"):
        SamplerClient(cfg, retry_s=3600)
    assert len(waits) == 1  # one retry (a restart could have been transient), then the error


def test_a_resume_whose_reply_was_lost_is_retried_as_itself(ray_cluster, tmp_path):
    """The actor dies after a resume to an earlier state took effect but before its reply reached the
    client: the retry resumes that blob again. Putting the new actor back at the client's own old
    cursor first fails, because the restored history no longer has the calls that cursor names."""
    from saerl_ray.sampler.actor import SamplerClient

    run_dir = tmp_path / "run"
    commit_plan(run_dir, plan_table(n_clusters=3, per_cluster=8))
    cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": B})
    client = SamplerClient(cfg)
    start = client.checkpoint_blob()
    first = ids_of(client.next_batch(B))
    for _ in range(2):
        client.next_batch(B)
    assert client.cursor()["seq"] > start["cursor"]["seq"]
    SamplerClient(cfg).resume(start)  # takes effect and is written; then the actor dies
    ray.kill(client.actor)
    wait_until_gone(actor_name(cfg.run_dir))
    out = client.resume(start)
    assert out["cursor"]["seq"] == start["cursor"]["seq"]
    assert ids_of(client.next_batch(B)) == first  # served again from the resumed position
    ray.kill(client.actor)


def test_actor_kill_and_restore_serves_each_prompt_once(ray_cluster, tmp_path):
    table = plan_table(n_clusters=3, per_cluster=16, ratio=0.25)
    run_dir = tmp_path / "run"
    commit_plan(run_dir, table)
    cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": B, "sampler.checkpoint_every": 0})
    sampler = get_or_create_sampler(cfg)
    assert get_or_create_sampler(cfg)._actor_id == sampler._actor_id  # one named actor per run
    named = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    assert (SAMPLER_NAMESPACE, actor_name(cfg.run_dir)) in named

    kept: list[str] = []
    for _ in range(3):
        batch = ray.get(sampler.next_batch.remote(B))
        kept += ids_of(batch)
        ray.get(sampler.report.remote(ids_of(batch), [[1.0, 0.0]] * len(batch)))
    assert ray.get(sampler.checkpoint.remote()).endswith("state.json")
    for _ in range(2):  # served after the last checkpoint: durable all the same, never served again
        kept += ids_of(ray.get(sampler.next_batch.remote(B)))
    ray.get(sampler.report.remote(kept[-B:], [[1.0]] * B))
    ray.kill(sampler)
    wait_until_gone(actor_name(cfg.run_dir))

    sampler = get_or_create_sampler(cfg)  # a new actor, rebuilt from <run_dir>/sampler (base + log)
    assert ray.get(sampler.stats.remote())["reported"] == 4 * B
    while len(kept) < table.num_rows:
        batch = ray.get(sampler.next_batch.remote(B))
        assert {r["epoch"] for r in batch} == {0}
        kept += ids_of(batch)
    assert Counter(kept) == Counter(table["id"].to_pylist())  # each id exactly once in the epoch
    assert 20 < ray.get(sampler.rss_mb.remote()) < 2048  # a real process's resident memory, in MB
    ray.kill(sampler)


TRIALS = 20


def drill_setup(run_dir, mode="online"):
    """48 prompts in 4 clusters, batches of 8, 3 epochs a trial (hopeless prompts retire after the
    second); returns the config and a fresh state every trial starts from (one actor for all trials,
    a new process only when a kill takes it down). Compaction every 6 batches, the trainer's
    checkpoint every 3 steps: both happen several times a trial."""
    commit_plan(run_dir, plan_table(n_clusters=4, per_cluster=12, ratio=0.25))
    cfg = load_config(None, {
        "run_dir": str(run_dir), "plan.batch_size": 8, "sampler.mode": mode, "sampler.retire_after": 2,
        "sampler.pace_min_groups": 2, "sampler.postpone_batches": 2, "sampler.checkpoint_every": 6,
        "sampler.checkpoint_min_seconds": 0.0,
    })
    actor = get_or_create_sampler(cfg)  # this handle keeps the actor alive between trials
    return cfg, actor, ray.get(actor.state_dict.remote())


def run_drills(run_dir, kill, kills, seed, modes=("online", "online", "online", "static")):
    """TRIALS drills, every 4th in static mode, each from a fresh state of its mode's run dir."""
    results = []
    for mode in dict.fromkeys(modes):
        cfg, actor, fresh = drill_setup(storage.join(str(run_dir), mode), mode)
        for trial in range(TRIALS):
            if modes[trial % len(modes)] == mode:
                results.append(drill(cfg, kill=kill, kills=kills(trial), seed=seed + trial, epochs=3, start_from=fresh))
        del actor
    return results


def assert_drills(results):
    """The table's promise for every trial: nothing twice, nothing lost, no reward group lost."""
    assert len(results) == TRIALS
    bad = [(k, r.duplicated, r.lost, r.lost_reward_groups, r.double_counted_reward_groups, r.resumed_different)
           for k, r in enumerate(results)
           if r.duplicated or r.lost or r.lost_reward_groups or r.double_counted_reward_groups or r.resumed_different]
    assert not bad, f"trials (index, duplicated, lost, lost groups, double-counted groups, resumed different): {bad}"
    assert all(r.epochs >= 3 for r in results)
    assert all(r.plan_order for r in results if r.plan_order is not None)  # static: exactly the plan
    online = [r for r in results if r.plan_order is None]
    assert all(r.stats["retired_total"] > 0 and r.stats["postponed"] > 0 for r in online)  # the rules ran


@pytest.mark.parametrize("where", ["local", "s3"])
def test_actor_death_at_random_points_loses_and_repeats_nothing(where, ray_cluster, tmp_path, request):
    """Row "actor dies": ray.kill at a random moment of a random step (between or inside calls), a
    new actor from storage; the client resumes at the last batch it received and retries."""
    run_dir = request.getfixturevalue("s3_run_dir") if where == "s3" else tmp_path
    results = run_drills(run_dir, "actor", lambda t: 1, seed=0)
    assert_drills(results)
    assert sum(r.kills for r in results) == TRIALS


def test_trainer_death_resumes_at_its_checkpoint(ray_cluster, tmp_path):
    """Row "trainer dies": the trainer restarts from its last checkpoint's cursor; the batches it
    served after that checkpoint are served again, first and identically, and nothing else."""
    results = run_drills(tmp_path, "trainer", lambda t: 1 + t % 3, seed=100)
    assert_drills(results)
    assert sum(r.kills for r in results) >= 2 * TRIALS - 5
    assert sum(r.stats["reserved"] > 0 for r in results) >= TRIALS // 2  # uncommitted batches came back


def test_actor_and_trainer_dying_together_resume_at_the_trainer_checkpoint(ray_cluster, tmp_path):
    """Row "both die": a new actor from storage, a new trainer from its checkpoint's cursor."""
    results = run_drills(tmp_path, "both", lambda t: 1, seed=200)
    assert_drills(results)
    assert sum(r.kills for r in results) == TRIALS and sum(r.stats["reserved"] > 0 for r in results) >= TRIALS // 2
