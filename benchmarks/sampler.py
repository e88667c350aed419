"""CurriculumSampler actor at scale: next_batch / report latency through Ray and the actor's RSS on a
synthetic 1,000,000-prompt plan (built by the real `build_plan`, saerl variant, 64 clusters).

Baselines measured in the same run:
- `per_prompt_remote_calls`: the same actor asked one prompt at a time (64 `next_batch(1)` round
  trips per batch), the naive integration the API forbids ("never one remote call per prompt");
- a no-op method of the same actor: the Ray round-trip floor on this machine (not a baseline to beat,
  the context for p99 on a shared CPU);
- `pandas_scan` (in-process, core logic only): a DataFrame with a served mask, each batch is the first
  64 unserved rows (`df[~served].head(64)`), against `CurriculumState.next_batch` in-process.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/sampler.py            # 1M prompts, 2000 calls
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/sampler.py --prompts 100000 --calls 500

Last stdout line: one JSON object (p50_ms, p99_ms, rss_mb, report_*, baseline_*, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def synthetic_plan(run_dir: Path, n: int, k: int, batch: int, seed: int) -> pa.Table:
    from saerl_ray.plan import PLAN_SCHEMA, build_plan
    from saerl_ray.stage import Stage

    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:016x}" for i in rng.permutation(n)], dtype=object)
    clusters = rng.zipf(1.5, n) % k  # skewed cluster sizes, like real topic clusters
    p = build_plan(ids, clusters, rng.random(n, dtype=np.float32), np.ones(n, bool), np.ones(n), batch, 0.125, "saerl", seed)
    m = len(p["id"])
    table = pa.table({
        "position": p["position"], "batch": p["batch"], "id": p["id"].tolist(),
        "prompt": [f"Problem {i}: find the value of x such that {i % 97}x + {i % 13} = {i % 1009}." for i in range(m)],
        "answer": [str(i % 1009) for i in range(m)], "source": ["synthetic"] * m,
        "cluster": p["cluster"], "difficulty_pred": p["difficulty_pred"], "mixed": p["mixed"],
    }, schema=PLAN_SCHEMA)
    st = Stage(run_dir, "plan", "bench")
    tmp = Path(st.begin(keep_partial=False))
    pq.write_table(table, tmp / "plan.parquet", row_group_size=65536)
    st.commit({"planned": m})
    return table


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def rewards_for(batch: list[dict], rng: np.random.Generator, group: int) -> list[list[float]]:
    # cluster-dependent pass rates (0 .. 1 by cluster % 8), so some clusters run fast and get paced
    return [[float(x) for x in rng.random(group) < (r["cluster"] % 8) / 7] for r in batch]


def bench_actor(cfg, calls: int, batch: int, group: int, seed: int) -> dict:
    import ray

    from saerl_ray.sampler import get_or_create_sampler

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    sampler = get_or_create_sampler(cfg)
    ray.get(sampler.stats.remote())  # constructor (plan load) finished
    load_s = time.perf_counter() - t
    for _ in range(20):  # warm-up: worker imports, first-touch pages
        ray.get(sampler.next_batch.remote(batch))
    nb, rep, noop = [], [], []
    for _ in range(calls):
        t = time.perf_counter()
        ray.get(sampler.ping.remote())
        noop.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = ray.get(sampler.next_batch.remote(batch))
        nb.append(time.perf_counter() - t)
        ids, rw = [r["id"] for r in b], rewards_for(b, rng, group)
        t = time.perf_counter()
        ray.get(sampler.report.remote(ids, rw))
        rep.append(time.perf_counter() - t)
    t = time.perf_counter()
    ray.get(sampler.checkpoint.remote())
    ckpt_s = time.perf_counter() - t
    per_prompt = []
    for _ in range(max(20, calls // 20)):
        t = time.perf_counter()
        for _ in range(batch):
            ray.get(sampler.next_batch.remote(1))
        per_prompt.append(time.perf_counter() - t)
    stats = ray.get(sampler.stats.remote())
    rss = ray.get(sampler.rss_mb.remote())
    ray.kill(sampler)
    return {"next_batch": nb, "report": rep, "noop": noop, "per_prompt": per_prompt, "load_s": load_s, "ckpt_s": ckpt_s, "rss_mb": rss, "stats": stats}


def bench_in_process(table: pa.Table, calls: int, batch: int) -> dict:
    import pandas as pd

    from saerl_ray.config import SamplerConfig
    from saerl_ray.sampler import CurriculumState

    state = CurriculumState(table, SamplerConfig(mode="online", checkpoint_every=0), batch_size=batch)
    ours = []
    for _ in range(calls):
        t = time.perf_counter()
        state.next_batch(batch)
        ours.append(time.perf_counter() - t)
    df = table.select(["position", "id", "prompt", "answer", "source", "cluster", "difficulty_pred"]).to_pandas()
    served = np.zeros(len(df), dtype=bool)
    scan = []
    for _ in range(min(calls, 200)):
        t = time.perf_counter()
        rows = df[~served].head(batch)
        served[rows.index.to_numpy()] = True
        rows.to_dict("records")
        scan.append(time.perf_counter() - t)
    del pd
    return {"ours": ours, "scan": scan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=10, help="sampler.checkpoint_every (0 = off)")
    args = ap.parse_args()

    import ray

    from saerl_ray.config import load_config

    with tempfile.TemporaryDirectory(prefix="saerl-bench-sampler-") as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        table = synthetic_plan(run_dir, args.prompts, args.clusters, args.batch, args.seed)
        plan_s = time.perf_counter() - t
        print(f"plan: {table.num_rows} prompts in {plan_s:.1f}s", flush=True)
        cfg = load_config(None, {"run_dir": str(run_dir), "plan.batch_size": args.batch, "ray.num_cpus": 2,
                                 "sampler.checkpoint_every": args.checkpoint_every})
        actor = bench_actor(cfg, args.calls, args.batch, args.group, args.seed)
        ray.shutdown()
        local = bench_in_process(table, min(args.calls, 1000), args.batch)

    p50, p99 = pct(actor["next_batch"])
    r50, r99 = pct(actor["report"])
    b50, b99 = pct(actor["per_prompt"])
    n50, n99 = pct(actor["noop"])
    i50, i99 = pct(local["ours"])
    s50, s99 = pct(local["scan"])
    st = actor["stats"]
    print(f"next_batch({args.batch}) through Ray: p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({args.calls} calls)")
    print(f"report({args.batch} groups of {args.group}):   p50 {r50:.2f} ms  p99 {r99:.2f} ms")
    print(f"no-op actor round trip (floor):  p50 {n50:.2f} ms  p99 {n99:.2f} ms")
    print(f"baseline per_prompt_remote_calls ({args.batch} x next_batch(1)): p50 {b50:.2f} ms  p99 {b99:.2f} ms  "
          f"-> {b50 / p50:.1f}x slower at p50")
    print(f"in-process next_batch p50 {i50:.3f} ms vs pandas_scan p50 {s50:.3f} ms -> {s50 / i50:.1f}x")
    print(f"actor RSS {actor['rss_mb']:.0f} MB; plan load {actor['load_s']:.1f}s; checkpoint {actor['ckpt_s'] * 1e3:.0f} ms; "
          f"postponed {st['postponed']} retired {st['retired']} paced {st['paced']} revisits {st['revisits']}")
    print(json.dumps({
        "prompts": table.num_rows, "batch": args.batch, "calls": args.calls, "checkpoint_every": args.checkpoint_every,
        "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "rss_mb": round(actor["rss_mb"], 1),
        "report_p50_ms": round(r50, 3), "report_p99_ms": round(r99, 3),
        "baseline": "per_prompt_remote_calls", "baseline_p50_ms": round(b50, 3), "baseline_p99_ms": round(b99, 3),
        "ratio_p50": round(b50 / p50, 2), "noop_p50_ms": round(n50, 3), "noop_p99_ms": round(n99, 3),
        "inproc_p50_ms": round(i50, 4), "pandas_scan_p50_ms": round(s50, 3), "pandas_ratio_p50": round(s50 / i50, 1),
        "checkpoint_ms": round(actor["ckpt_s"] * 1e3, 1), "plan_load_s": round(actor["load_s"], 2),
        "goal_met": bool(p99 < 5.0 and actor["rss_mb"] < 1024),
        "loadavg_1m": round(os.getloadavg()[0], 1),  # other jobs share these 2 cores: read p99 with it
    }))


if __name__ == "__main__":
    main()
