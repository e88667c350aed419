"""The sampler as a Ray actor, and the trainer's handle on it.

`CurriculumSampler` wraps `CurriculumState` (saerl_ray.sampler.state) as one named, restartable actor per
run; `SamplerClient` is what a trainer holds: it survives the actor's death and resumes it from the
trainer's checkpoint. Contract: docs/sampler_api.md.

    from saerl_ray.sampler.actor import SamplerClient
    client = SamplerClient(cfg)                         # the run's actor, created on first use
    batch = client.next_batch(32)                       # list of row dicts, plan order
    client.report([r["id"] for r in batch], groups)     # one reward group per prompt
    ckpt = client.checkpoint_blob()                     # into the trainer's checkpoint; later:
    client.resume(ckpt)                                 # batches served after ckpt are served again
"""

from __future__ import annotations

import gc
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig
from saerl_ray.sampler.state import CurriculumState

# The one definition: every process that looks the actor up by name imports it from here.
SAMPLER_NAMESPACE = "saerl"


class _SamplerActor(CurriculumState):
    """CurriculumState as an actor, plus what only a process can report about itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # What the load built lives as long as the actor: out of the collector's sight, a full
        # collection no longer walks it in the middle of a call (a 78 ms pause at 1M prompts).
        gc.collect()
        gc.freeze()

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def ping(self) -> int:
        """A no-op round trip (health checks; the latency floor in benchmarks/sampler.py)."""
        return self.counters["batches"]


# num_cpus=0: the sampler must never hold a CPU a trainer or Ray Data task is waiting for.
# max_restarts=-1: a crashed actor (process or node lost) comes back under the same handle and
# rebuilds itself from storage; ray.kill is final (no_restart), and get_or_create_sampler makes a new one.
CurriculumSampler = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1)(_SamplerActor)

def actor_name(run_dir: str | Path) -> str:
    """One actor per run: named after the run_dir string every process of the run shares in its config."""
    import hashlib

    tag = Path(str(run_dir)).name or "run"
    return f"saerl-sampler-{tag}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def get_or_create_sampler(cfg: RunConfig, plan_path: str | Path | None = None, run_dir: str | None = None) -> Any:
    """The run's named CurriculumSampler actor (namespace SAMPLER_NAMESPACE), created on first use.

    A new actor loads `<run_dir>/plan/plan.parquet` (or `plan_path`) and restores `<run_dir>/sampler/`
    (base + log) when present. `run_dir`: where `cfg.run_dir` is, resolved by the driver, for a process
    whose working directory differs (a Ray Train worker); the actor's name always comes from
    `cfg.run_dir`. Lifetime follows the creating process; set `sampler.detached: true` for long runs
    whose driver may restart (then `ray.kill` it when done).
    """
    from saerl_ray.core.ray_init import init_ray

    init_ray(cfg.ray)
    name = actor_name(cfg.run_dir)
    try:
        return ray.get_actor(name, namespace=SAMPLER_NAMESPACE)
    except ValueError:
        pass
    # Paths are resolved here, in the creating process: the actor's working directory may differ.
    root = run_dir or cfg.run_dir
    plan = storage.resolve(plan_path or storage.join(root, "plan", "plan.parquet"))
    if not storage.exists(plan):
        raise FileNotFoundError(f"plan file {plan} not found: run `saerl-ray plan` first")
    state_dir = storage.resolve(storage.join(root, "sampler"))
    return CurriculumSampler.options(
        name=name, namespace=SAMPLER_NAMESPACE, get_if_exists=True,
        lifetime="detached" if cfg.sampler.detached else None,
    ).remote(plan, cfg.sampler.model_dump(), state_dir, cfg.plan.batch_size)


# ---------------------------------------------------------------- the trainer's side


class SamplerClient:
    """A trainer's handle on the run's sampler that outlives the actor.

    If the actor dies mid-call (or its storage fails a write), the client gets the actor back
    (`get_or_create_sampler(cfg)`, or the same handle, which Ray restarts), asks it to `resume` at the
    last batch this client received (so a batch whose reply was lost is served again, not skipped) and
    retries; reports carry a token, so a retried report is counted once. One client per consumer.
    """

    def __init__(self, cfg: RunConfig | None = None, actor: Any = None, retry_s: float = 300.0,
                 run_dir: str | None = None):
        if cfg is None and actor is None:
            raise ValueError("SamplerClient needs a run config or an actor handle")
        self.cfg, self.retry_s, self.run_dir = cfg, retry_s, run_dir  # run_dir: see get_or_create_sampler
        self.actor = actor if actor is not None else get_or_create_sampler(cfg, run_dir=run_dir)
        self._tag = uuid.uuid4().hex[:12]
        self._reports = 0
        self._stale = False
        self._cursor: dict[str, Any] = self._call("cursor")

    def _call(self, method: str, *args: Any) -> Any:
        # A retried `resume` sets the position itself: putting the new actor back at this client's old
        # cursor first would fail when the blob being resumed replaced the history that cursor belongs to.
        rewind = method != "resume"
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        init_failed = False
        while True:
            try:
                if self._stale:
                    self._reconnect(rewind)
                return ray.get(getattr(self.actor, method).remote(*args))
            except (ray.exceptions.RayActorError, storage.StorageError) as e:
                # A constructor that raised twice in a row (state for another plan, a bad config) will
                # raise again: say so now instead of retrying for retry_s.
                if getattr(e, "actor_init_failed", False):
                    if init_failed:
                        raise
                    init_failed = True
                if time.monotonic() > deadline:
                    raise
                self._stale = True
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _reconnect(self, rewind: bool = True) -> None:
        if self.cfg is not None:
            self.actor = get_or_create_sampler(self.cfg, run_dir=self.run_dir)
        if rewind and getattr(self, "_cursor", None) is not None:
            ray.get(self.actor.resume.remote({"cursor": self._cursor}))
        self._stale = False

    def next_batch(self, n: int | None = None) -> list[dict[str, Any]]:
        rows = self._call("next_batch", n)
        if rows:
            self._cursor = self._cursor | {"seq": rows[0]["seq"], "epoch": rows[-1]["epoch"]}
        return rows

    def replacement(self, cluster: int, n: int = 1) -> list[dict[str, Any]]:
        rows = self._call("replacement", cluster, n)
        if rows:
            self._cursor = self._cursor | {"seq": rows[0]["seq"]}
        return rows

    def report(self, ids: list[str], rewards: list[list[float]]) -> dict[str, Any]:
        self._reports += 1
        return self._call("report", ids, rewards, f"{self._tag}-{self._reports}")

    def cursor(self, seq: int | None = None) -> dict[str, Any]:
        """The last batch this client received (or batch `seq`): no remote call."""
        return dict(self._cursor) if seq is None else self._cursor | {"seq": int(seq)}

    def checkpoint_blob(self, cursor: dict[str, Any] | None = None, full: bool = True) -> dict[str, Any]:
        """What a trainer saves with its checkpoint: the cursor of what it committed and (full=True)
        the whole state, used only if the actor's own history is gone when the trainer resumes."""
        out: dict[str, Any] = {"cursor": cursor or self.cursor()}
        if full:
            out["state"] = self._call("state_dict")
        return out

    def commit(self, cursor: dict[str, Any] | None = None) -> None:
        self._call("commit", cursor or self.cursor())

    def resume(self, blob: dict[str, Any]) -> dict[str, Any]:
        out = self._call("resume", blob)
        self._cursor = out["cursor"]
        return out

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")
