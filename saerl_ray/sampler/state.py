"""The curriculum sampler: serves `plan/plan.parquet` batch by batch and rebalances it online.

Contract: docs/sampler_api.md. `CurriculumState` (here) is the pure logic (numpy, no Ray; unit-tested
directly); `CurriculumSampler` (saerl_ray.sampler.actor) is the Ray actor around it, one named actor per
run; `SamplerClient` (same module) is what a trainer holds: it survives the actor's death and resumes it
from the trainer's checkpoint.

    from saerl_ray.sampler.actor import SamplerClient
    client = SamplerClient(cfg)                         # the run's actor, created on first use
    batch = client.next_batch(32)                       # list of row dicts, plan order
    client.report([r["id"] for r in batch], groups)     # one reward group per prompt
    ckpt = client.checkpoint_blob()                     # into the trainer's checkpoint; later:
    client.resume(ckpt)                                 # batches served after ckpt are served again

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
form the epoch's tail.

Recovery. Every mutating call is made durable before it returns: one log record per call
(`saerl_ray.sampler.store`), replayed on top of the last compacted base when an actor is rebuilt, so a
restarted actor serves what comes next, and no acknowledged reward is lost. Every serving call gets a
sequence number (`seq`, carried by its rows) and is kept in a *ledger*; `resume(cursor)` takes the
calls after the cursor back and serves their rows again, first and in the same order: that is how a
trainer restarted from its checkpoint, or a client whose reply was lost with the actor, gets exactly
the batches it never committed. Per call: O(batch). Never pickle.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saerl_ray.core import storage
from saerl_ray.core.config import SamplerConfig
from saerl_ray.sampler.store import (
    STATE_FILE,
    STATE_VERSION,
    SamplerStore,
    decode_state_arrays,
    encode_state,
    plan_digest,
    restore_into,
    snapshot,
)

PLAN_COLUMNS = ["position", "id", "prompt", "answer", "source", "cluster", "difficulty_pred"]
# Decisions are flushed at checkpoints; this bound keeps memory flat if nobody checkpoints.
MAX_BUFFERED_DECISIONS = 10_000
# Served rows kept for `resume`: covers a trainer checkpoint interval of 4096 batches of 64; a
# trainer's `commit` prunes it sooner. ~12 bytes per row in memory.
LEDGER_MAX_ROWS = 1 << 18
# Report tokens remembered, so a client retrying a report after the actor died is not counted twice.
RECENT_TOKENS = 4096

log = logging.getLogger("saerl_ray.sampler")

__all__ = ["CurriculumState", "PLAN_COLUMNS", "load_plan"]


def load_plan(plan: pa.Table | str | Path) -> pa.Table:
    """Read and check a plan: required columns, `position` = 0..n-1 in row order, unique ids."""
    where = "plan table"
    if not isinstance(plan, pa.Table):
        where = str(plan)
        if not storage.exists(plan):
            raise FileNotFoundError(f"plan file {plan} not found: run `saerl-ray plan` first")
        if missing := [c for c in PLAN_COLUMNS if c not in storage.parquet_columns(plan)]:
            raise ValueError(f"{where}: missing column(s) {missing}")
        fs, inner = storage.filesystem(plan)
        plan = pq.read_table(inner, columns=PLAN_COLUMNS, filesystem=fs)
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


# ---------------------------------------------------------------- the pure state machine


class CurriculumState:
    """Curriculum serving logic over a plan (see the module docstring). No Ray inside.

    With `state_dir` (a local dir or URI, normally `<run_dir>/sampler`) every mutating call is logged
    before it returns and the constructor restores base + log; without it the state lives in memory.
    """

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
        self.store = SamplerStore(str(state_dir)) if state_dir is not None else None
        self._last_periodic = float("-inf")
        self._replaying = False
        self._fresh()
        if self.store is not None:
            self._open(restore)

    @staticmethod
    def _plan_batch_size(table: pa.Table) -> int:
        if "batch" not in table.column_names:
            return 32
        return int(np.bincount(table["batch"].to_numpy()[: 1 << 16]).max())

    def _fresh(self) -> None:
        """Everything that changes while serving, as at the start of a run."""
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
        self.counters = dict(
            batches=0, served=0, reported=0, postponed=0, retired=0, paced=0, revisits=0, replacements=0,
            reserved=0, rewinds=0, unknown=0, invalid=0, duplicate_reports=0,
        )
        # rows ever served or reported, in first-touch order: what a checkpoint saves, without a 1M scan
        self._touched = np.empty(1024, np.int64)
        self._n_touched = 0
        self.decisions: list[dict[str, Any]] = []
        # recovery: history id (cursors name it), log generation, ops logged, serving calls made
        self.uid = uuid.uuid4().hex[:16]
        self.gen = 0
        self.ops = 0
        self.seq = 0
        # serving calls after the floor, oldest first: (seq, plan rows, epochs); what `resume` takes back
        self.ledger: deque[tuple[int, np.ndarray, np.ndarray]] = deque()
        self.ledger_rows = 0
        self.ledger_floor = 0
        self.committed = 0
        self.redo: deque[tuple[int, int]] = deque()  # (row, epoch) taken back, served again first
        self.tokens: OrderedDict[str, int] = OrderedDict()
        self._start_epoch(0)

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

    def _rows(self, idx: list[int], epochs: list[int], seq: int) -> list[dict[str, Any]]:
        if not idx:
            return []
        t = self.text.take(pa.array(idx, pa.int64())).to_pydict()
        return [
            {"id": t["id"][j], "prompt": t["prompt"][j], "answer": t["answer"][j], "source": t["source"][j],
             "cluster": int(self.labels[self.cluster[i]]), "difficulty_pred": float(self.difficulty[i]),
             "position": i, "epoch": epochs[j], "seq": seq}
            for j, i in enumerate(idx)
        ]

    # ------------------------------------------------------------ serving (the logged operations)

    def _serve(self, n: int) -> tuple[list[int], list[int]]:
        idx: list[int] = []
        epochs: list[int] = []
        while self.redo and len(idx) < n:  # taken back by a resume: the same rows, in the same order
            i, e = self.redo.popleft()
            idx.append(i)
            epochs.append(e)
        self.counters["reserved"] += len(idx)
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
        self._ledger_add(idx, epochs)
        return idx, epochs

    def _replace(self, c: int, n: int) -> tuple[list[int], list[int]]:
        idx: list[int] = []
        epochs: list[int] = []
        if self.redo:  # a rewound replacement of this cluster comes back as the replacement
            keep: deque[tuple[int, int]] = deque()
            for i, e in self.redo:
                if len(idx) < n and self.cluster[i] == c:
                    idx.append(i)
                    epochs.append(e)
                else:
                    keep.append((i, e))
            self.redo = keep
            self.counters["reserved"] += len(idx)
        fresh: list[int] = []
        while len(idx) < n and (i := self._pop(c)) is not None:
            self._mark_served(i)
            fresh.append(i)
            idx.append(i)
            epochs.append(self.epoch)
        for i in fresh:
            self._log("replacement", i, "same-cluster replacement for a group the trainer filtered out")
        self.counters["replacements"] += len(fresh)
        self._ledger_add(idx, epochs)
        return idx, epochs

    def _ledger_add(self, idx: list[int], epochs: list[int]) -> None:
        self.seq += 1
        self.ledger.append((self.seq, np.array(idx, np.int64), np.array(epochs, np.int32)))
        self.ledger_rows += len(idx)
        while self.ledger_rows > LEDGER_MAX_ROWS and len(self.ledger) > 1:
            s, rows, _ = self.ledger.popleft()
            self.ledger_rows -= len(rows)
            self.ledger_floor = s

    def _cursor_seq(self) -> int:
        return self.ledger[-1][0] if self.ledger else self.ledger_floor

    def _cursor_known(self, v: int) -> bool:
        if v == self.ledger_floor:
            return True
        for s, _, _ in reversed(self.ledger):
            if s <= v:
                return s == v
        return False

    def _rewind(self, v: int) -> tuple[int, int]:
        """Serving calls after `v` go back to the front, rows in their order: (calls, rows)."""
        back = []
        while self.ledger and self.ledger[-1][0] > v:
            _, rows, epochs = self.ledger.pop()
            self.ledger_rows -= len(rows)
            back.append((rows, epochs))
        rows = [(int(i), int(e)) for r, ep in reversed(back) for i, e in zip(r.tolist(), ep.tolist())]
        self.redo.extendleft(reversed(rows))
        if back:
            self.counters["rewinds"] += 1
        return len(back), len(rows)

    def _commit(self, v: int) -> None:
        """The trainer's checkpoint at `v` is durable: calls up to its *previous* commit can go (one
        commit of slack, in case the newest checkpoint is the one that turns out unreadable)."""
        bound = min(self.committed, v)
        self.committed = v
        while self.ledger and self.ledger[0][0] <= bound:
            s, rows, _ = self.ledger.popleft()
            self.ledger_rows -= len(rows)
            self.ledger_floor = s
        if self.ledger_floor < bound <= self._cursor_seq():
            self.ledger_floor = bound

    def _apply_groups(self, rows: list[int], means: list[float], right: list[bool], wrong: list[bool], token: str | None) -> None:
        for i, m, r, w in zip(rows, means, right, wrong):
            self._take_group(i, m, r, w)
        self.counters["reported"] += len(rows)
        if token is not None:
            self.tokens[token] = len(rows)
            while len(self.tokens) > RECENT_TOKENS:
                self.tokens.popitem(last=False)

    # ------------------------------------------------------------ public API

    def next_batch(self, n: int | None = None) -> list[dict[str, Any]]:
        """The next n prompts (default: the plan's batch size); crosses into the next epoch if needed."""
        n = self.batch_size if n is None else int(n)
        if n < 1:
            raise ValueError(f"next_batch: n must be >= 1, got {n}")
        idx, epochs = self._serve(n)
        self._persist({"op": "serve", "n": n, "idx": idx})
        if (self.cfg.checkpoint_every and self.store is not None
                and self.counters["batches"] % self.cfg.checkpoint_every == 0
                and time.monotonic() - self._last_periodic >= self.cfg.checkpoint_min_seconds):
            self._last_periodic = time.monotonic()
            self.checkpoint(wait=False)
        return self._rows(idx, epochs, self.seq)

    def replacement(self, cluster: int, n: int = 1) -> list[dict[str, Any]]:
        """Up to n waiting prompts of `cluster` this epoch (fewer, maybe none, once it runs dry)."""
        c = self._cluster_index(cluster)
        n = int(n)
        idx, epochs = self._replace(c, n)
        self._persist({"op": "replacement", "c": int(self.labels[c]), "n": n, "idx": idx})
        return self._rows(idx, epochs, self.seq)

    def _cluster_index(self, cluster: int) -> int:
        where = int(np.searchsorted(self.labels, cluster))
        if where >= self.k or self.labels[where] != cluster:
            raise ValueError(f"replacement: cluster {cluster!r} is not in the plan (clusters {self.labels.tolist()[:20]})")
        return where

    def report(self, ids: list[str], rewards: list[list[float]], token: str | None = None) -> dict[str, Any]:
        """Per-prompt reward groups (values in [0, 1]) -> stats and the online rules.

        Groups of unknown ids or with bad values are skipped and named, the rest applied:
        `{"accepted": n, "unknown": [ids], "invalid": [ids], "duplicate": bool}`. A `token` seen before
        (a client retrying after the actor died) is not applied again: `duplicate` is true and
        `accepted` repeats what the first call took."""
        if len(ids) != len(rewards):
            raise ValueError(f"report: {len(ids)} ids but {len(rewards)} reward groups")
        if token is not None and token in self.tokens:
            self.counters["duplicate_reports"] += 1
            return {"accepted": self.tokens[token], "unknown": [], "invalid": [], "duplicate": True}
        rows, known = self.lookup(ids)
        means, right, wrong, ok = _summarise(rewards)
        take = known & ok
        unknown = [ids[k] for k in np.flatnonzero(~known).tolist()]
        invalid = [ids[k] for k in np.flatnonzero(known & ~ok).tolist()]
        if unknown or invalid:
            self.counters["unknown"] += len(unknown)
            self.counters["invalid"] += len(invalid)
            log.warning("report: skipped %d unknown id(s) %s and %d group(s) with values outside [0, 1] %s",
                        len(unknown), unknown[:5], len(invalid), invalid[:5])
        rec = {"i": rows[take].tolist(), "m": means[take].tolist(), "r": right[take].tolist(), "w": wrong[take].tolist()}
        if rec["i"] or token is not None:
            self._apply_groups(rec["i"], rec["m"], rec["r"], rec["w"], token)
            self._persist({"op": "report", **rec, "t": token})
        return {"accepted": len(rec["i"]), "unknown": unknown, "invalid": invalid, "duplicate": False}

    def cursor(self) -> dict[str, Any]:
        """Where serving stands, cheaply: what a trainer stores every step (`resume` takes it back)."""
        return {"run": self.uid, "seq": self._cursor_seq(), "epoch": self.epoch, "version": STATE_VERSION}

    def resume(self, st: dict[str, Any]) -> dict[str, Any]:
        """Put serving back to a trainer's checkpoint. `st` is a cursor, a full `state_dict()`, or
        `{"cursor": ..., "state": ...}` (what `SamplerClient.checkpoint_blob` returns).

        A cursor of this sampler's history takes back the serving calls made after it: their rows are
        served again first, in the same order, with the epochs they had; rewards already reported
        stay. Otherwise the full state is loaded (then rewound to the cursor); neither -> ValueError."""
        cursor = st.get("cursor") if "cursor" in st else (st if "plan_digest" not in st else None)
        full = st.get("state") if "cursor" in st else (st if "plan_digest" in st else None)
        mode = "rewind"
        if not self._resumable(cursor):
            if full is None:
                raise ValueError(self._why_not(cursor))
            self.load_state_dict(full)
            mode = "restore"
        calls = rows = 0
        if self._resumable(cursor):
            calls, rows = self._rewind(int(cursor["seq"]))
            if calls:
                self._persist({"op": "resume", "seq": int(cursor["seq"])})
        return {"mode": mode, "calls_taken_back": calls, "rows_taken_back": rows, "redo": len(self.redo), "cursor": self.cursor()}

    def _resumable(self, cursor: dict[str, Any] | None) -> bool:
        return cursor is not None and cursor.get("run") == self.uid and self._cursor_known(int(cursor["seq"]))

    def _why_not(self, cursor: dict[str, Any] | None) -> str:
        if cursor is None or "seq" not in cursor:
            return "resume: pass a cursor, a sampler state_dict, or {'cursor': ..., 'state': ...}"
        v = int(cursor["seq"])
        if cursor.get("run") != self.uid:
            return (f"resume: the cursor belongs to sampler history {cursor.get('run')!r}, this sampler's is "
                    f"{self.uid!r} (its state was deleted or belongs to another run); pass the full state saved "
                    f"with the trainer's checkpoint to restore it")
        if v < self.ledger_floor:
            return (f"resume: cursor seq {v} is older than what this sampler can take back (calls after "
                    f"{self.ledger_floor}; a trainer's commit() and the {LEDGER_MAX_ROWS}-row ledger bound it); "
                    f"pass the full state saved with that checkpoint")
        return f"resume: cursor seq {v} is not a serving call this sampler has (latest {self._cursor_seq()})"

    def commit(self, cursor: dict[str, Any]) -> None:
        """The trainer's checkpoint at `cursor` is durable: lets the ledger forget older calls."""
        if cursor.get("run") != self.uid:
            raise ValueError(self._why_not(cursor))
        self._commit(int(cursor["seq"]))
        self._persist({"op": "commit", "seq": int(cursor["seq"])})

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

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(plan row of each id, -1 where unknown; mask of the known ones)."""
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        q = np.array([s.encode() if isinstance(s, str) else s if isinstance(s, bytes) else str(s).encode() for s in ids], dtype="S")
        width = self._ids_sorted.dtype.itemsize
        too_long = np.char.str_len(q) > width if q.dtype.itemsize > width else np.zeros(len(q), bool)
        q = q.astype(self._ids_sorted.dtype)
        pos = np.minimum(np.searchsorted(self._ids_sorted, q), self.n - 1)
        known = (self._ids_sorted[pos] == q) & ~too_long
        return np.where(known, self._id_order[pos], -1), known

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
            "seq": self._cursor_seq(), "redo": len(self.redo), "ledger_rows": self.ledger_rows, "ops": self.ops,
        }

    def _log(self, decision: str, i: int | None, reason: str, **extra: Any) -> None:
        line: dict[str, Any] = {"batch": self.counters["batches"], "epoch": self.epoch, "decision": decision}
        if i is not None:
            line |= {"id": self.text["id"][i].as_py(), "position": i, "cluster": int(self.labels[self.cluster[i]])}
        self.decisions.append(line | extra | {"reason": reason})

    # ------------------------------------------------------------ durability

    def _persist(self, record: dict[str, Any]) -> None:
        """Make the call that just changed the state durable before it returns. If that fails, the
        state is rebuilt from storage (as a restart would), so memory never holds what storage lacks."""
        if self.store is None or self._replaying:
            return
        self.ops += 1
        try:
            self.store.append(self.gen, self.ops, record)
        except BaseException:
            self._reload()
            raise
        if len(self.decisions) >= MAX_BUFFERED_DECISIONS:
            # Only here, between operations: a snapshot taken inside one (from _log, as it once was)
            # holds half of it, and the replay of its record then applies that half twice.
            self.checkpoint(wait=False)  # through the one writer thread, so segments stay in order

    def _reload(self) -> None:
        self.store.wait()
        self._fresh()
        self._open(restore=True, compact=False)

    def _open(self, restore: bool, compact: bool = True) -> None:
        """Base + log replay; then a new base (the replay ran with the config the log was written
        under, and from here on the current one applies)."""
        self.store.wait()
        base = self.store.read_base() if restore else None
        if base is None:
            self.gen = self.store.next_generation()
        else:
            st, arrays = base
            self._check_compatible(st, self.store.path(STATE_FILE))
            self._load(st, arrays)
            self.gen, self.ops = int(st.get("gen", 0)), int(st.get("ops", 0))
            self.store.drop_stale_decisions(self.gen, self.ops)
            records = self.store.read_log(self.gen, self.ops)
            logged_cfg = SamplerConfig.model_validate(st["cfg"]) if "cfg" in st else self.cfg
            self._replay(records, logged_cfg, int(st.get("batch_size") or self.batch_size))
        if compact:
            self.checkpoint(wait=True)
            self.store.tidy(self.gen, self.ops)

    def _replay(self, records: list[dict[str, Any]], cfg: SamplerConfig, batch_size: int) -> None:
        live = self.cfg, self.batch_size
        self.cfg, self.batch_size, self._replaying = cfg, batch_size, True
        try:
            for rec in records:
                self.ops += 1
                self._apply_record(rec)
        finally:
            (self.cfg, self.batch_size), self._replaying = live, False

    def _apply_record(self, rec: dict[str, Any]) -> None:
        op = rec.get("op")
        if op in ("serve", "replacement"):
            idx, _ = self._serve(rec["n"]) if op == "serve" else self._replace(self._cluster_index(rec["c"]), rec["n"])
            if idx != rec["idx"]:
                raise RuntimeError(
                    f"sampler log record {self.gen}-{self.ops} ({op}) replays to rows {idx[:8]} but served {rec['idx'][:8]}: "
                    f"the sampler's code changed since it was written. Restore with the version that wrote it, or "
                    f"delete {self.store.path('log')} to lose the calls after the last checkpoint"
                )
        elif op == "report":
            self._apply_groups(rec["i"], rec["m"], rec["r"], rec["w"], rec.get("t"))
        elif op == "resume":
            self._rewind(int(rec["seq"]))
        elif op == "commit":
            self._commit(int(rec["seq"]))
        else:
            raise ValueError(f"sampler log record {self.gen}-{self.ops}: unknown op {op!r}")

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return snapshot(self)

    def state_dict(self) -> dict[str, Any]:
        """The full state as one JSON object (arrays inline); `load_state_dict` on a sampler over the
        same plan resumes exactly. For every step, `cursor()` is the cheap alternative."""
        return encode_state(*snapshot(self))

    def _check_compatible(self, st: dict[str, Any], where: str) -> None:
        if st.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"{where}: sampler state version {st.get('version')!r} is not {STATE_VERSION}")
        if st.get("plan_digest") != self.digest:
            raise ValueError(
                f"{where}: sampler state was written for a different plan (digest {st.get('plan_digest')} != "
                f"{self.digest}); delete {self.store.root if self.store else 'the state'} to start this plan fresh"
            )
        if st.get("clusters") != self.labels.tolist():
            raise ValueError(f"{where}: sampler state was written for a plan with other cluster labels; delete it to start fresh")

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Replace the whole state (a trainer restoring a checkpoint whose history this sampler lost).
        A new log generation starts, so nothing logged before can replay on top of it."""
        self._check_compatible(st, "load_state_dict")
        arrays = decode_state_arrays(st)
        if self.store is not None:
            self.checkpoint(wait=True)  # the history being replaced keeps its decisions
        gen = self.gen
        self._load(st, arrays)
        self.gen, self.ops = max(gen, int(st.get("gen", 0))) + 1, int(st.get("ops", 0))
        if self.store is not None:
            self.checkpoint(wait=True)

    def _load(self, st: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._fresh()
        restore_into(self, st, arrays)

    def _take_decisions(self) -> list[dict[str, Any]]:
        out, self.decisions = self.decisions, []
        return out

    def checkpoint(self, wait: bool = True) -> str | None:
        """Compact: write a new base (state.json + its arrays + the decisions since the last one) and
        drop the log records it holds. Durability does not depend on it (the log has every call);
        it bounds restore time and log size. wait=False writes on a background thread (the snapshot
        is taken now) and is skipped while a write is in flight, so serving never waits on it."""
        if self.store is None:
            return None
        if not wait and self.store.busy():
            return None
        st, arrays = self._snapshot()
        self.store.write_base(st, arrays, self._take_decisions(), wait)
        return self.store.path(STATE_FILE)


def _summarise(rewards: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group: mean, all right, all wrong, valid (non-empty, every value a number in [0, 1])."""
    n = len(rewards)
    if n == 0:
        z = np.zeros(0)
        return z, z.astype(bool), z.astype(bool), z.astype(bool)
    try:
        lens = np.fromiter(map(len, rewards), np.int64, n)
        flat = np.fromiter((float(x) for g in rewards for x in g), np.float64, int(lens.sum()))
    except (TypeError, ValueError):
        lens = None
    if lens is None or (lens == 0).any():  # rare: one group at a time, to name only the bad ones
        out = [_summarise_one(g) for g in rewards]
        return (np.array([o[0] for o in out]), np.array([o[1] for o in out]), np.array([o[2] for o in out]),
                np.array([o[3] for o in out]))
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    bad = np.add.reduceat((~(np.isfinite(flat) & (flat >= 0) & (flat <= 1))).astype(np.int64), starts) > 0
    return (np.add.reduceat(flat, starts) / lens, np.minimum.reduceat(flat, starts) >= 1,
            np.maximum.reduceat(flat, starts) <= 0, ~bad)


def _summarise_one(group: Any) -> tuple[float, bool, bool, bool]:
    try:
        g = np.asarray(group, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return 0.0, False, False, False
    if g.size == 0 or not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
        return 0.0, False, False, False
    return float(g.mean()), bool(g.min() >= 1), bool(g.max() <= 0), True
