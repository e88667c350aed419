"""The curriculum sampler: serves `plan/plan.parquet` batch by batch and rebalances it online.

Contract: docs/sampler_api.md. `CurriculumState` is the pure logic (numpy, no Ray; unit-tested
directly); `CurriculumSampler` is the Ray actor around it, one named actor per run:

    from saerl_ray.sampler import get_or_create_sampler
    sampler = get_or_create_sampler(cfg)                # restores <run_dir>/sampler/state.json if present
    batch = ray.get(sampler.next_batch.remote(32))      # list of row dicts, plan order
    ray.get(sampler.report.remote([r["id"] for r in batch], groups))   # one reward group per prompt

How an epoch is served. The plan's row order fixes a *slot schedule*: slot k belongs to the cluster
of plan row k. Each cluster keeps its own easy->hard queue (its plan rows in position order), and
slot k serves the next prompt of its cluster's queue. With no online rules this is exactly the
plan (static mode); the online rules only change *which* prompt of a cluster fills that cluster's
slot, so batches stay cluster-first and the cluster rhythm of the plan is kept:

- saturated (last group all correct) -> when it comes up again (next epoch) it waits in its
  cluster's `delayed` FIFO until `postpone_batches` batches have passed (or the epoch's tail);
- hopeless (all wrong `retire_after` times in a row) -> retired for the rest of the run (logged);
- pacing: while a cluster's pass-rate EMA >= `fast_pass_rate`, `pace_skip` of its easiest waiting
  prompts are deferred per prompt served (its harder prompts come sooner); deferred prompts are
  served when the cluster's queue runs out, or, if its EMA falls `revisit_drop` below its best,
  moved back to the front (revisit);
- `replacement(cluster, n)` takes the cluster's next waiting prompts; the slot they would have filled
  later is skipped.

A prompt leaves these structures exactly once per epoch, so every kept prompt is served once per
epoch except retired ones; prompts still waiting when the slots run out (postponed near the end)
form the epoch's tail. Every decision is appended to `<run_dir>/sampler/decisions.jsonl` (buffered,
flushed at each checkpoint). State: `state.json` + the per-prompt arrays (sparse: rows ever served) in
`rows-<batch>.npy` beside it (a record array, loaded with allow_pickle=False); `state_dict()` returns one JSON object
with those arrays inline as zlib+base64 of little-endian buffers. Never pickle. Per call: O(batch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from saerl_ray.config import RunConfig, SamplerConfig

SAMPLER_NAMESPACE = "saerl"
STATE_FILE = "state.json"
DECISIONS_FILE = "decisions.jsonl"
STATE_VERSION = 1
PLAN_COLUMNS = ["position", "id", "prompt", "answer", "source", "cluster", "difficulty_pred"]
# Per-prompt state saved for rows ever served; `index` is the plan row.
ROW_DTYPE = np.dtype([
    ("index", "<i8"), ("attempts", "<i4"), ("reward_sum", "<f4"), ("wrong_run", "<i2"), ("last_served", "<i8"),
    ("served_epoch", "<i4"), ("postponed_epoch", "<i4"), ("saturated", "?"), ("retired", "?"),
])
# Decisions are flushed at checkpoints; this bound keeps memory flat if nobody checkpoints.
MAX_BUFFERED_DECISIONS = 10_000


# ---------------------------------------------------------------- plan + array encoding


def load_plan(plan: pa.Table | str | Path) -> pa.Table:
    """Read and check a plan: required columns, `position` = 0..n-1 in row order, unique ids."""
    where = "plan table"
    if not isinstance(plan, pa.Table):
        where = str(plan)
        if not Path(plan).exists():
            raise FileNotFoundError(f"plan file {plan} not found: run `saerl-ray plan` first")
        names = pq.read_schema(plan).names
        if missing := [c for c in PLAN_COLUMNS if c not in names]:
            raise ValueError(f"{where}: missing column(s) {missing}")
        plan = pq.read_table(plan, columns=PLAN_COLUMNS)
    elif missing := [c for c in PLAN_COLUMNS if c not in plan.column_names]:
        raise ValueError(f"{where}: missing column(s) {missing}")
    if plan.num_rows == 0:
        raise ValueError(f"{where}: the plan is empty")
    pos = plan["position"].to_numpy()
    if not np.array_equal(pos, np.arange(plan.num_rows)):
        bad = int(np.flatnonzero(pos != np.arange(plan.num_rows))[0])
        raise ValueError(f"{where}: column 'position' must be 0..{plan.num_rows - 1} in row order (row {bad} has {pos[bad]})")
    for col in ("id", "cluster", "difficulty_pred"):
        if plan[col].null_count:
            raise ValueError(f"{where}: column {col!r} has {plan[col].null_count} null value(s)")
    return plan


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A numpy array as JSON: dtype, shape, zlib+base64 of its little-endian bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError("object arrays are not stored (no pickle)")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.hasobject:
        raise ValueError("state holds an object array (refused: no pickle)")
    return np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype=dtype).reshape(d["shape"]).copy()


def plan_digest(ids: np.ndarray) -> str:
    """Identity of a plan's row order: a state only restores onto the plan it was written for."""
    h = hashlib.sha1(str(len(ids)).encode())
    h.update(b"\0".join(ids.tolist()))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the pure state machine


class CurriculumState:
    """Curriculum serving logic over a plan (see the module docstring). No Ray inside."""

    def __init__(
        self,
        plan: pa.Table | str | Path,
        cfg: SamplerConfig | dict[str, Any] | None = None,
        state_dir: str | Path | None = None,
        batch_size: int | None = None,
        restore: bool = True,
    ):
        self.cfg = cfg if isinstance(cfg, SamplerConfig) else SamplerConfig.model_validate(cfg or {})
        table = load_plan(plan)
        self.n = table.num_rows
        self.text = table.select(["id", "prompt", "answer", "source"]).combine_chunks()
        ids = np.array(table["id"].cast(pa.binary()).to_numpy(zero_copy_only=False), dtype="S")
        self.digest = plan_digest(ids)
        self._id_order = np.argsort(ids, kind="stable")
        self._ids_sorted = ids[self._id_order]
        if (dup := self._ids_sorted[1:] == self._ids_sorted[:-1]).any():
            raise ValueError(f"plan: id {self._ids_sorted[1:][dup][0].decode()!r} appears more than once")
        del ids
        self.labels, cluster = np.unique(table["cluster"].to_numpy(), return_inverse=True)
        self.cluster = cluster.astype(np.int32)  # dense 0..K-1, slot k belongs to cluster[k]
        self.k = len(self.labels)
        self.difficulty = table["difficulty_pred"].to_numpy().astype(np.float32)
        by_cluster = np.argsort(self.cluster, kind="stable")  # position order inside each cluster
        self.members = np.split(by_cluster, np.cumsum(np.bincount(self.cluster, minlength=self.k))[:-1])
        self.batch_size = int(batch_size or self._plan_batch_size(table))
        self.state_dir = Path(state_dir) if state_dir is not None else None
        # per prompt
        self.attempts = np.zeros(self.n, np.int32)
        self.reward_sum = np.zeros(self.n, np.float32)  # sum of group mean rewards
        self.wrong_run = np.zeros(self.n, np.int16)  # consecutive all-wrong groups
        self.last_served = np.full(self.n, -1, np.int64)  # batch counter at last serve
        self.saturated = np.zeros(self.n, bool)
        self.retired = np.zeros(self.n, bool)
        self.postponed_epoch = np.full(self.n, -1, np.int32)
        self.served_epoch = np.full(self.n, -1, np.int32)
        # per cluster
        self.ema = np.full(self.k, np.nan)
        self.best = np.full(self.k, -np.inf)
        self.groups = np.zeros(self.k, np.int64)
        self._last_periodic = float("-inf")
        self.counters = dict(batches=0, served=0, reported=0, postponed=0, retired=0, paced=0, revisits=0, replacements=0)
        # rows ever served or reported, in first-touch order: what a checkpoint saves, without a 1M scan
        self._touched = np.empty(1024, np.int64)
        self._n_touched = 0
        self.decisions: list[dict[str, Any]] = []
        self._writer: threading.Thread | None = None
        self._start_epoch(0)
        if restore and self.state_dir is not None and (self.state_dir / STATE_FILE).exists():
            self.load_state_dict(json.loads((self.state_dir / STATE_FILE).read_text()))

    @staticmethod
    def _plan_batch_size(table: pa.Table) -> int:
        if "batch" not in table.column_names:
            return 32
        return int(np.bincount(table["batch"].to_numpy()[: 1 << 16]).max())

    # ------------------------------------------------------------ epoch structures

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.slot = 0
        self.epoch_served = 0
        self.ptr = np.zeros(self.k, np.int64)
        self.skip_credit = np.zeros(self.k, np.int64)
        self.front: list[deque[int]] = [deque() for _ in range(self.k)]
        self.deferred: list[deque[int]] = [deque() for _ in range(self.k)]
        self.delayed: list[deque[tuple[int, int]]] = [deque() for _ in range(self.k)]
        self.tail: deque[int] | None = None

    def _servable(self, i: int) -> bool:
        return not self.retired[i] and self.served_epoch[i] != self.epoch

    def _fast(self, c: int) -> bool:
        return self.groups[c] >= self.cfg.pace_min_groups and self.ema[c] >= self.cfg.fast_pass_rate

    def _pop(self, c: int) -> int | None:
        """The next prompt of cluster c: due postponed, revisited, queue (with the rules), deferred."""
        online = self.cfg.mode == "online"
        delayed, front, queue = self.delayed[c], self.front[c], self.members[c]
        while delayed and delayed[0][0] <= self.counters["batches"]:
            i = delayed.popleft()[1]
            if self._servable(i):
                return i
        while front:
            i = front.popleft()
            if self._servable(i):
                return i
        while self.ptr[c] < len(queue):
            i = int(queue[self.ptr[c]])
            self.ptr[c] += 1
            if not self._servable(i):
                continue
            if online and self.saturated[i] and self.postponed_epoch[i] != self.epoch:
                self._postpone(i, c)
                continue
            if online and self.skip_credit[c] < self.cfg.pace_skip and self.ptr[c] < len(queue) and self._fast(c):
                self.deferred[c].append(i)
                self.skip_credit[c] += 1
                self._log("pace_skip", i, f"cluster pass rate {self.ema[c]:.2f} >= fast_pass_rate; easiest prompt deferred")
                self.counters["paced"] += 1
                continue
            self.skip_credit[c] = 0
            return i
        while self.deferred[c]:
            i = self.deferred[c].popleft()
            if self._servable(i):
                return i
        return None

    def _postpone(self, i: int, c: int) -> None:
        self.postponed_epoch[i] = self.epoch
        self.delayed[c].append((self.counters["batches"] + self.cfg.postpone_batches, i))
        self.counters["postponed"] += 1
        self._log("postpone", i, f"saturated (last group all correct); waits {self.cfg.postpone_batches} batches")

    def _next_index(self) -> int | None:
        while self.slot < self.n:
            c = int(self.cluster[self.slot])
            self.slot += 1
            i = self._pop(c)
            if i is not None:
                return i
        if self.tail is None:  # slots used up: whatever still waits (postponed late, deferred)
            self.tail = deque(self._waiting())
        while self.tail:
            i = self.tail.popleft()
            if self._servable(i):
                return i
        return None

    def _waiting(self) -> list[int]:
        out: list[int] = []
        for c in range(self.k):
            out += list(self.front[c]) + self.members[c][self.ptr[c] :].tolist() + list(self.deferred[c])
            out += [i for _, i in self.delayed[c]]
            self.front[c].clear()
            self.deferred[c].clear()
            self.delayed[c].clear()
            self.ptr[c] = len(self.members[c])
        return out

    def _touch(self, i: int) -> None:
        if self.last_served[i] >= 0 or self.attempts[i] > 0:
            return
        if self._n_touched == len(self._touched):
            self._touched = np.resize(self._touched, 2 * len(self._touched))
        self._touched[self._n_touched] = i
        self._n_touched += 1

    def _mark_served(self, i: int) -> None:
        self._touch(i)
        self.served_epoch[i] = self.epoch
        self.last_served[i] = self.counters["batches"]
        self.epoch_served += 1
        self.counters["served"] += 1

    def _rows(self, idx: list[int], epochs: list[int]) -> list[dict[str, Any]]:
        if not idx:
            return []
        t = self.text.take(pa.array(idx, pa.int64())).to_pydict()
        return [
            {"id": t["id"][j], "prompt": t["prompt"][j], "answer": t["answer"][j], "source": t["source"][j],
             "cluster": int(self.labels[self.cluster[i]]), "difficulty_pred": float(self.difficulty[i]),
             "position": i, "epoch": epochs[j]}
            for j, i in enumerate(idx)
        ]

    # ------------------------------------------------------------ public API

    def next_batch(self, n: int | None = None) -> list[dict[str, Any]]:
        """The next n prompts (default: the plan's batch size); crosses into the next epoch if needed."""
        n = self.batch_size if n is None else int(n)
        if n < 1:
            raise ValueError(f"next_batch: n must be >= 1, got {n}")
        idx: list[int] = []
        epochs: list[int] = []
        while len(idx) < n:
            i = self._next_index()
            if i is None:
                if self.epoch_served == 0:
                    break  # every prompt is retired: nothing left to serve
                self._log("epoch_end", None, f"epoch {self.epoch} served {self.epoch_served} prompts")
                self._start_epoch(self.epoch + 1)
                continue
            self._mark_served(i)
            idx.append(i)
            epochs.append(self.epoch)
        self.counters["batches"] += 1
        if (self.cfg.checkpoint_every and self.state_dir is not None
                and self.counters["batches"] % self.cfg.checkpoint_every == 0
                and time.monotonic() - self._last_periodic >= self.cfg.checkpoint_min_seconds):
            self._last_periodic = time.monotonic()
            self.checkpoint(wait=False)
        return self._rows(idx, epochs)

    def replacement(self, cluster: int, n: int = 1) -> list[dict[str, Any]]:
        """Up to n waiting prompts of `cluster` this epoch (fewer, maybe none, once it runs dry)."""
        where = np.searchsorted(self.labels, cluster)
        if where >= self.k or self.labels[where] != cluster:
            raise ValueError(f"replacement: cluster {cluster!r} is not in the plan (clusters {self.labels.tolist()[:20]})")
        idx: list[int] = []
        while len(idx) < n and (i := self._pop(int(where))) is not None:
            self._mark_served(i)
            idx.append(i)
        for i in idx:
            self._log("replacement", i, "same-cluster replacement for a group the trainer filtered out")
        self.counters["replacements"] += len(idx)
        return self._rows(idx, [self.epoch] * len(idx))

    def report(self, ids: list[str], rewards: list[list[float]]) -> int:
        """Per-prompt reward groups (values in [0, 1]) -> stats and the online rules. Returns groups taken."""
        if len(ids) != len(rewards):
            raise ValueError(f"report: {len(ids)} ids but {len(rewards)} reward groups")
        idx = self.lookup(ids)
        try:
            lens = np.array([len(g) for g in rewards], dtype=np.int64)
            flat = np.fromiter((float(x) for g in rewards for x in g), np.float64, count=int(lens.sum()))
            ok = bool((lens > 0).all() and (np.isfinite(flat) & (flat >= 0) & (flat <= 1)).all())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            first = self._first_bad_group(rewards)
            raise ValueError(f"report: rewards for id {ids[first]!r} must be a non-empty list of numbers in [0, 1], got {rewards[first]!r}")
        if len(ids) == 0:
            return 0
        starts = np.r_[0, np.cumsum(lens)[:-1]]
        means = np.add.reduceat(flat, starts) / lens
        all_right = np.minimum.reduceat(flat, starts) >= 1
        all_wrong = np.maximum.reduceat(flat, starts) <= 0
        for i, m, right, wrong in zip(idx.tolist(), means.tolist(), all_right.tolist(), all_wrong.tolist()):
            self._take_group(i, m, right, wrong)
        self.counters["reported"] += len(idx)
        return len(idx)

    @staticmethod
    def _first_bad_group(rewards: list[list[float]]) -> int:
        for k, group in enumerate(rewards):
            try:
                g = np.asarray(group, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                return k
            if g.size == 0 or not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
                return k
        raise AssertionError("no bad group found")

    def _take_group(self, i: int, mean: float, all_right: bool, all_wrong: bool) -> None:
        online = self.cfg.mode == "online"
        self._touch(i)
        self.attempts[i] += 1
        self.reward_sum[i] += mean
        self.saturated[i] = all_right
        self.wrong_run[i] = self.wrong_run[i] + 1 if all_wrong else 0
        if online and not self.retired[i] and self.wrong_run[i] >= self.cfg.retire_after:
            self.retired[i] = True
            self.counters["retired"] += 1
            self._log("retire", i, f"all wrong {int(self.wrong_run[i])} times in a row (retire_after={self.cfg.retire_after})")
        c = int(self.cluster[i])
        a = self.cfg.ema_alpha
        self.ema[c] = mean if np.isnan(self.ema[c]) else (1 - a) * self.ema[c] + a * mean
        self.groups[c] += 1
        if self.groups[c] < self.cfg.pace_min_groups:
            return
        self.best[c] = max(self.best[c], self.ema[c])
        if online and self.best[c] - self.ema[c] >= self.cfg.revisit_drop:
            self._revisit(c)

    def _revisit(self, c: int) -> None:
        """The cluster got harder for the policy: bring back the easier prompts pacing skipped."""
        k = min(len(self.deferred[c]), self.batch_size)
        if k == 0:  # nothing was skipped: the cluster is simply at its hard end
            self.best[c] = self.ema[c]
            return
        back = [self.deferred[c].pop() for _ in range(k)][::-1]  # the hardest skipped ones, easy->hard
        self.front[c].extendleft(reversed(back))
        self._log("revisit", None, f"cluster pass rate {self.ema[c]:.2f} fell {self.best[c] - self.ema[c]:.2f} below its best; "
                  f"{k} deferred prompts moved to the front", cluster=int(self.labels[c]), n=k)
        self.counters["revisits"] += 1
        self.best[c] = self.ema[c]  # re-arm only on a new drop from here

    def lookup(self, ids: list[str]) -> np.ndarray:
        """Plan row of each id; ValueError naming the first unknown id."""
        q = np.array([s.encode() if isinstance(s, str) else s for s in ids], dtype="S")
        if len(q) == 0:
            return np.zeros(0, np.int64)
        if q.dtype.itemsize > self._ids_sorted.dtype.itemsize:
            bad = next(s for s in ids if len(s.encode() if isinstance(s, str) else s) > self._ids_sorted.dtype.itemsize)
            raise ValueError(f"report: id {bad!r} is not in the plan")
        q = q.astype(self._ids_sorted.dtype)
        pos = np.minimum(np.searchsorted(self._ids_sorted, q), self.n - 1)
        if (miss := self._ids_sorted[pos] != q).any():
            raise ValueError(f"report: id {ids[int(np.flatnonzero(miss)[0])]!r} is not in the plan")
        return self._id_order[pos]

    def stats(self) -> dict[str, Any]:
        clusters = {
            str(int(self.labels[c])): {
                "pass_rate": None if np.isnan(self.ema[c]) else float(self.ema[c]),
                "groups": int(self.groups[c]), "fast": bool(self._fast(c)), "deferred": len(self.deferred[c]),
            }
            for c in range(self.k)
        }
        tried = self.attempts > 0
        return {
            "mode": self.cfg.mode, "epoch": self.epoch, **self.counters, "served_this_epoch": self.epoch_served,
            "retired_total": int(self.retired.sum()), "prompts": self.n,
            "mean_reward": float(self.reward_sum[tried].sum() / self.attempts[tried].sum()) if tried.any() else None,
            "pass_rates": {k: v["pass_rate"] for k, v in clusters.items()}, "clusters": clusters,
        }

    def _log(self, decision: str, i: int | None, reason: str, **extra: Any) -> None:
        line: dict[str, Any] = {"batch": self.counters["batches"], "epoch": self.epoch, "decision": decision}
        if i is not None:
            line |= {"id": self.text["id"][i].as_py(), "position": i, "cluster": int(self.labels[self.cluster[i]])}
        self.decisions.append(line | extra | {"reason": reason})
        if len(self.decisions) >= MAX_BUFFERED_DECISIONS and self.state_dir is not None:
            self.checkpoint(wait=False)  # through the one writer thread, so log lines stay in order

    # ------------------------------------------------------------ state

    def _snapshot(self) -> dict[str, Any]:
        """Everything needed to resume, with numpy copies (encoded later, possibly off-thread)."""
        touched = self._touched[: self._n_touched]
        return {
            "version": STATE_VERSION, "plan_digest": self.digest, "prompts": self.n, "clusters": self.labels.tolist(),
            "mode": self.cfg.mode, "batch_size": self.batch_size, "epoch": self.epoch, "slot": self.slot,
            "epoch_served": self.epoch_served, "counters": dict(self.counters),
            "ptr": self.ptr.tolist(), "skip_credit": self.skip_credit.tolist(),
            "front": [list(q) for q in self.front], "deferred": [list(q) for q in self.deferred],
            "delayed": [[list(x) for x in q] for q in self.delayed],
            "tail": None if self.tail is None else list(self.tail),
            "ema": [None if np.isnan(x) else float(x) for x in self.ema],
            "best": [None if np.isinf(x) else float(x) for x in self.best], "groups": self.groups.tolist(),
            "rows": self._touched_rows(touched),
        }

    def _touched_rows(self, touched: np.ndarray) -> np.ndarray:
        """Per-prompt arrays of the given rows as one record array: one buffer to copy and to write."""
        rec = np.empty(len(touched), dtype=ROW_DTYPE)
        rec["index"] = touched
        for name in ROW_DTYPE.names[1:]:
            rec[name] = getattr(self, name)[touched]
        return rec

    @staticmethod
    def _encode(snap: dict[str, Any]) -> dict[str, Any]:
        return snap | {"rows": {k: encode_array(snap["rows"][k]) for k in ROW_DTYPE.names}}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; `load_state_dict` on a sampler over the same plan resumes exactly."""
        return self._encode(self._snapshot())

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {st.get('version')!r} is not {STATE_VERSION}")
        if st.get("plan_digest") != self.digest:
            raise ValueError(
                f"sampler state was written for a different plan (digest {st.get('plan_digest')} != {self.digest}); "
                f"delete {self.state_dir / STATE_FILE if self.state_dir else 'the state'} to start this plan fresh"
            )
        if st.get("clusters") != self.labels.tolist():
            raise ValueError("sampler state was written for a plan with other cluster labels; delete it to start fresh")
        rows = self._read_rows(st)
        idx = rows.pop("index").astype(np.int64)
        self._touched, self._n_touched = idx.copy(), len(idx)
        if len(self._touched) == 0:
            self._touched = np.empty(1024, np.int64)
        for name, values in rows.items():
            arr = getattr(self, name)
            arr[:] = -1 if name in ("last_served", "served_epoch", "postponed_epoch") else 0
            arr[idx] = values
        self.epoch, self.slot, self.epoch_served = int(st["epoch"]), int(st["slot"]), int(st["epoch_served"])
        self.counters = {k: int(v) for k, v in st["counters"].items()}
        self.ptr = np.array(st["ptr"], np.int64)
        self.skip_credit = np.array(st["skip_credit"], np.int64)
        self.front = [deque(q) for q in st["front"]]
        self.deferred = [deque(q) for q in st["deferred"]]
        self.delayed = [deque((int(d), int(i)) for d, i in q) for q in st["delayed"]]
        self.tail = None if st["tail"] is None else deque(st["tail"])
        self.ema = np.array([np.nan if x is None else x for x in st["ema"]])
        self.best = np.array([-np.inf if x is None else x for x in st["best"]])
        self.groups = np.array(st["groups"], np.int64)
        self.decisions = []

    def _take_decisions(self) -> list[dict[str, Any]]:
        out, self.decisions = self.decisions, []
        return out

    def _append_decisions(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / DECISIONS_FILE).open("a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))

    def _write(self, snap: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        """Decisions first, then the per-prompt record array (`rows-<batches>.npy`: one raw buffer, no
        base64/zlib holding the GIL while the actor serves), then state.json naming that file; each
        file is tmp + fsync + rename, so a kill at any point leaves the previous consistent pair."""
        self._append_decisions(lines)
        rows_file = f"rows-{snap['counters']['batches']:012d}.npy"
        with (self.state_dir / (rows_file + ".tmp")).open("wb") as f:
            np.save(f, snap["rows"], allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.state_dir / (rows_file + ".tmp"), self.state_dir / rows_file)
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        with tmp.open("w") as f:
            json.dump({k: v for k, v in snap.items() if k != "rows"} | {"rows_file": rows_file}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_dir / STATE_FILE)
        for old in self.state_dir.glob("rows-*.npy"):
            if old.name != rows_file:
                old.unlink(missing_ok=True)

    def _read_rows(self, st: dict[str, Any]) -> dict[str, np.ndarray]:
        if "rows" in st:  # state_dict() form: everything inline
            return {k: decode_array(v) for k, v in st["rows"].items()}
        if self.state_dir is None:
            raise ValueError(f"sampler state refers to {st.get('rows_file')!r} but this sampler has no state_dir")
        path = self.state_dir / st["rows_file"]
        if not path.exists():
            raise FileNotFoundError(f"sampler state {self.state_dir / STATE_FILE} names {path}, which is missing")
        rec = np.load(path, allow_pickle=False)
        if rec.dtype != ROW_DTYPE:
            raise ValueError(f"{path}: fields {rec.dtype.names} are not the sampler's {ROW_DTYPE.names}")
        return {k: rec[k] for k in ROW_DTYPE.names}

    def checkpoint(self, wait: bool = True) -> str | None:
        """Write state.json (+ its rows-*.npy) and pending decisions. wait=False writes on a background
        thread (the snapshot itself is taken now), so periodic checkpoints stay off the serving path."""
        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._writer is not None and self._writer.is_alive() and not wait:
            return None  # a periodic write is still in flight: skip this one rather than stall serving
        if self._writer is not None:
            self._writer.join()  # one write at a time keeps state.json and the log in order
        snap, lines = self._snapshot(), self._take_decisions()
        if wait:
            self._write(snap, lines)
            self._writer = None
        else:
            self._writer = threading.Thread(target=self._write, args=(snap, lines), daemon=True)
            self._writer.start()
        return str(self.state_dir / STATE_FILE)


# ---------------------------------------------------------------- Ray actor


class _SamplerActor(CurriculumState):
    """CurriculumState as an actor, plus what only a process can report about itself."""

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def ping(self) -> int:
        """A no-op round trip (health checks; the latency floor in benchmarks/sampler.py)."""
        return self.counters["batches"]


# num_cpus=0: the sampler must never hold a CPU a trainer or Ray Data task is waiting for.
CurriculumSampler = ray.remote(num_cpus=0, max_concurrency=1)(_SamplerActor)


def actor_name(run_dir: str | Path) -> str:
    """One actor per run: named after the run_dir string every process of the run shares in its config."""
    tag = Path(str(run_dir)).name or "run"
    return f"saerl-sampler-{tag}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def get_or_create_sampler(cfg: RunConfig, plan_path: str | Path | None = None) -> Any:
    """The run's named CurriculumSampler actor (namespace "saerl"), created on first use.

    A new actor loads `<run_dir>/plan/plan.parquet` (or `plan_path`) and restores
    `<run_dir>/sampler/state.json` when present. Lifetime follows the creating process; set
    `sampler.detached: true` for long runs whose driver may restart (then `ray.kill` it when done).
    """
    from saerl_ray.raycluster import init_ray

    init_ray(cfg.ray)
    name = actor_name(cfg.run_dir)
    try:
        return ray.get_actor(name, namespace=SAMPLER_NAMESPACE)
    except ValueError:
        pass
    # Paths are resolved here, in the creating process: the actor's working directory may differ.
    plan = Path(plan_path or Path(cfg.run_dir) / "plan" / "plan.parquet").resolve()
    if not plan.exists():
        raise FileNotFoundError(f"plan file {plan} not found: run `saerl-ray plan` first")
    state_dir = (Path(cfg.run_dir) / "sampler").resolve()
    return CurriculumSampler.options(
        name=name, namespace=SAMPLER_NAMESPACE, get_if_exists=True,
        lifetime="detached" if cfg.sampler.detached else None,
    ).remote(str(plan), cfg.sampler.model_dump(), str(state_dir), cfg.plan.batch_size)
