"""Fault drills for the curriculum sampler: a simulated trainer serves epochs through a `SamplerClient`
while the actor, the trainer, or both are killed at random points; the result counts what the
trainer's *committed* stream received, against what docs/sampler_api.md promises.

    from sampler_drill import drill
    r = drill(cfg, kill="actor", kills=2, seed=0, epochs=2)
    assert r.duplicated == r.lost == r.lost_reward_groups == 0

The simulated trainer: each step takes `next_batch`, reports one reward group per prompt (scripted
from the id, so a re-served prompt gets the same rewards), and every `checkpoint_every` steps
checkpoints (`checkpoint_blob` + `commit`): the steps since the last checkpoint become committed.
A trainer kill drops the uncommitted steps and starts a new client that `resume`s from the last
checkpoint (sometimes before the killed step's report went out). An actor kill is `ray.kill` a few
milliseconds after a random step starts, so it lands between calls or inside one; `kill_actor`
replaces it (the multi-node test takes a node down instead).

Used by tests/test_sampler_on_cpu.py and the multi-node test; needs a Ray cluster and a run dir
with a plan.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig
from saerl_ray.sampler.actor import SAMPLER_NAMESPACE, SamplerClient, actor_name
from saerl_ray.sampler.store import decode_array


@dataclass
class DrillResult:
    served_counts: dict[int, Counter]  # epoch -> id -> times it is in the committed stream
    lost: int  # kept prompts missing from a complete epoch of the committed stream
    duplicated: int  # extra copies of a prompt inside one epoch of the committed stream
    lost_reward_groups: int  # groups the sampler acknowledged but does not count
    double_counted_reward_groups: int  # groups it counts more often than they were acknowledged
    resumed_different: int  # after a trainer's resume, rows that differ from the uncommitted ones it lost
    kills: int
    steps: int
    epochs: int  # complete epochs checked
    plan_order: bool | None  # static mode: the committed stream is the plan, epoch after epoch
    stats: dict[str, Any] = field(default_factory=dict)
    # The trainer's client at the end. A non-detached actor lives while a handle does: keeping this
    # keeps the actor a kill brought back, so the next trial does not start yet another process.
    client: SamplerClient | None = field(default=None, repr=False)


def scripted_rewards(rows: list[dict[str, Any]], group: int = 4) -> list[list[float]]:
    """Per prompt, from its id alone: 1 in 8 always wrong (retired), 1 in 8 always right (postponed),
    the rest a fixed mix; the same prompt always gets the same group."""
    out = []
    for r in rows:
        h = int(hashlib.sha1(r["id"].encode()).hexdigest()[:8], 16)
        kind = h % 8
        out.append([0.0] * group if kind == 0 else [1.0] * group if kind == 1 else
                   [float((h >> k) & 1) for k in range(group)])
    return out


def wait_until_gone(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # ray.kill is asynchronous; the name frees once the GCS sees the death
        try:
            ray.get_actor(name, namespace=SAMPLER_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor {name} still registered {timeout}s after kill")


def kill_sampler(name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=SAMPLER_NAMESPACE))
    except ValueError:  # already gone
        pass


def drill(
    cfg: RunConfig,
    kill: str = "actor",
    kills: int = 1,
    seed: int = 0,
    epochs: int = 2,
    batch: int | None = None,
    checkpoint_every: int = 3,
    kill_actor: Callable[[str], None] | None = None,
    max_kill_delay_s: float = 0.02,
    start_from: dict[str, Any] | None = None,
) -> DrillResult:
    """Serve `epochs` complete epochs with `kills` kills of `kill` in {"actor", "trainer", "both"}.

    `start_from`: a full sampler state (`state_dict()` of a fresh sampler over the same plan) loaded
    first, so many trials can share one run dir and one actor instead of starting a process each."""
    if kill not in ("actor", "trainer", "both", "none"):
        raise ValueError(f"kill must be actor | trainer | both | none, got {kill!r}")
    rng = random.Random(seed)
    name = actor_name(cfg.run_dir)
    plan_ids = storage.read_parquet(storage.join(cfg.run_dir, "plan", "plan.parquet"), columns=["id"])["id"].to_pylist()
    b = batch or cfg.plan.batch_size
    steps_estimate = max(2, epochs * len(plan_ids) // b)
    kill_at = set(rng.sample(range(1, steps_estimate), min(kills, steps_estimate - 1))) if kill != "none" else set()
    kill_fn = kill_actor or kill_sampler

    client = SamplerClient(cfg)
    if start_from is not None:
        client.resume(start_from)
    ckpt = client.checkpoint_blob(full=False)
    committed: list[tuple[int, str]] = []
    pending: list[tuple[int, str]] = []
    acknowledged = 0
    step = done_kills = resumed_different = 0
    timers: list[threading.Timer] = []
    expect: list[tuple[int, str]] = []  # what a resumed trainer must be served first: what its predecessor lost
    while True:
        step += 1
        killing = step in kill_at
        if killing and kill == "actor":  # lands between calls or inside one of this step's calls
            timer = threading.Timer(rng.uniform(0, max_kill_delay_s), kill_fn, args=(name,))
            timer.start()
            timers.append(timer)
            done_kills += 1
        rows = client.next_batch(b)
        if not rows:
            break  # everything retired
        got = [(r["epoch"], r["id"]) for r in rows]
        resumed_different += sum(a != b for a, b in zip(got, expect))
        expect = expect[len(got):]
        pending += got
        trainer_dies_before_report = killing and kill in ("trainer", "both") and rng.random() < 0.5
        if not trainer_dies_before_report:
            acknowledged += client.report([r["id"] for r in rows], scripted_rewards(rows))["accepted"]
        if step % checkpoint_every == 0 and not trainer_dies_before_report:
            ckpt = client.checkpoint_blob(full=False)
            client.commit(ckpt["cursor"])
            committed += pending
            pending = []
        if max(e for e, _ in committed + pending) >= epochs:
            break
        if killing and kill != "actor":
            done_kills += 1
            if kill == "both":
                kill_fn(name)
                if kill_actor is None:
                    wait_until_gone(name)
            if kill in ("trainer", "both"):
                expect, pending = pending + expect, []  # the trainer's uncommitted steps die with it
                client = SamplerClient(cfg)
                client.resume(ckpt)
    for timer in timers:  # a kill from the last step lands in this trial, not in the next one's start
        timer.join()
    committed += pending
    stats = client.stats()
    state = client.state_dict()
    rows_state = decode_array(state["arrays"]["rows"])
    retired = {plan_ids[i] for i in rows_state["index"][rows_state["retired"]].tolist()}

    complete = max(e for e, _ in committed) if committed else 0
    counts = {e: Counter(i for ep, i in committed if ep == e) for e in range(complete + 1)}
    duplicated = sum(c - 1 for e in range(complete) for c in counts[e].values() if c > 1)
    lost = 0
    for e in range(complete):
        missing = set(plan_ids) - set(counts[e])
        lost += len(missing - retired)  # a kept prompt that skipped an epoch
        later = set().union(*(counts[x] for x in range(e + 1, complete + 1)))
        lost += len(missing & later)  # "retired" but served again later: it was skipped, not retired
    plan_order = None
    if stats["mode"] == "static":
        stream = [i for e, i in committed if e < complete]
        plan_order = stream == plan_ids * complete
    return DrillResult(
        served_counts=counts, lost=lost, duplicated=duplicated,
        lost_reward_groups=max(0, acknowledged - stats["reported"]),
        double_counted_reward_groups=max(0, stats["reported"] - acknowledged), resumed_different=resumed_different,
        kills=done_kills, steps=step, epochs=complete, plan_order=plan_order, stats=stats, client=client,
    )
