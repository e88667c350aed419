"""OpenRLHF reward file (`--reward.remote_url <this file>`): scores math answers and reports them
to the run's CurriculumSampler actor so the curriculum can rebalance online.

OpenRLHF 0.11 loads this file by path inside every vLLM rollout actor and calls
`reward_func(queries, prompts, labels)` once per sample, in a worker thread. It swallows any
exception we raise (the sample silently gets reward None), so nothing here raises: errors are logged.

Labels are JSON strings `{"id", "answer", "cluster", "sampler", "n"}` written by `openrlhf_launch`:
`sampler` names the CurriculumSampler actor (namespace "saerl"), `n` is the group size
(`--rollout.n_samples_per_prompt`); a group's scores are reported once all n have arrived.
A label without `sampler` (a plain answer string, or `{"answer"}`: eval sets) is scored, not reported.

Delivery of reports (one process-wide state, however many times OpenRLHF loads this file):
- complete groups are sent in batches (>= FLUSH_GROUPS groups, or FLUSH_SECONDS after the last send)
  from `reward_func` and from a daemon timer thread, so an idle engine's last groups still go out;
- `final_flush()` sends everything, incomplete groups included, and waits for the sampler's answers.
  The trainer calls it in every rollout engine at the end of `fit()` (`flush_in_actor` through
  `__ray_call__`); an atexit hook tries the same on a clean interpreter exit;
- a sampler answers `{"accepted", "unknown", "invalid"}` (groups it skipped are named); one that
  refuses a whole report instead (raises on the first unknown id, as `report()` did before) has it
  retried without the id its error names, or split in halves when no id can be read, so a bad id
  costs only its own group. Every dropped group is logged at ERROR and counted in `stats()`.

    python -c "from saerl_ray.trainers.openrlhf_reward import reward_func; \
print(reward_func(['Q: 1+1? A: \\\\boxed{2}'], ['Q: 1+1? A:'], ['{\"id\": \"a\", \"answer\": \"2\"}']))"
"""

from __future__ import annotations

import ast
import atexit
import json
import logging
import re
import threading
import time
from typing import Any

import torch

from saerl_ray.core.reward import math_reward
from saerl_ray.sampler.actor import SAMPLER_NAMESPACE

log = logging.getLogger("saerl_ray.openrlhf_reward")

CANONICAL = "saerl_ray.trainers.openrlhf_reward"
# Flush reports once this many prompt groups are complete, or this long after the last flush:
# one remote call per group would flood the sampler actor at rollout speed.
FLUSH_GROUPS = 8
FLUSH_SECONDS = 2.0
# The timer thread's period: it sends what FLUSH_SECONDS made due and checks the sampler's answers.
TICK_SECONDS = 0.5
# Dropped ids kept for stats(); the count is exact, the list only has to help a human find the cause.
MAX_LISTED_IDS = 100
# Matches the sampler's "report: id 'abc' is not in the plan" and "report: rewards for id 'abc' must be ...".
_ID_IN_ERROR = re.compile(r"""\bid (b?(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"))""")

_lock = threading.Lock()
_partial: dict[str, tuple[str, list[float]]] = {}  # prompt id -> (sampler name, scores so far in its group)
_ready: dict[str, list[tuple[str, list[float]]]] = {}  # sampler name -> complete groups to report
_inflight: list[tuple[Any, str, list[tuple[str, list[float]]]]] = []  # (ObjectRef, sampler, batch) sent
_last_flush = time.monotonic()
_samplers: dict[str, Any] = {}
_stats = {"calls": 0, "accepted": 0, "dropped": 0, "retries": 0, "dropped_ids": []}
_timer: threading.Thread | None = None
_stop = threading.Event()


def parse_label(label: Any) -> dict[str, Any]:
    """Label -> {"id", "answer", "cluster", "sampler", "n"}; a plain string is just the answer."""
    if isinstance(label, str) and label.startswith("{"):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            pass
    if not isinstance(label, dict):
        label = {"answer": "" if label is None else str(label)}
    return {
        "id": label.get("id"), "answer": str(label.get("answer", "")), "cluster": label.get("cluster"),
        "sampler": label.get("sampler") or None, "n": max(1, int(label.get("n") or 1)),
    }


def response_text(query: str, prompt: str) -> str:
    """The generated part of `query` (OpenRLHF passes decode(prompt tokens + response tokens))."""
    if query.startswith(prompt):
        return query[len(prompt) :]
    at = query.find(prompt)
    if at >= 0:
        return query[at + len(prompt) :]
    # Decoding did not reproduce the prompt verbatim; the prompt's length is still the best cut.
    return query[len(prompt) :]


def _get_sampler(name: str) -> Any:
    if name not in _samplers:
        import ray

        _samplers[name] = ray.get_actor(name, namespace=SAMPLER_NAMESPACE)
    return _samplers[name]


def _record(label: dict[str, Any], score: float) -> None:
    """Add one sample's score to its group (caller holds _lock); a full group becomes ready."""
    key = str(label["id"])
    sampler, group = _partial.setdefault(key, (label["sampler"], []))
    group.append(score)
    if len(group) >= label["n"]:
        del _partial[key]
        _ready.setdefault(sampler, []).append((key, group))


def _ray_up() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:  # noqa: BLE001 - no usable Ray in this process: nothing to report to
        return False


def _drop(name: str, batch: list[tuple[str, list[float]]], why: str) -> None:
    with _lock:
        _stats["dropped"] += len(batch)
        listed = _stats["dropped_ids"]
        listed.extend(i for i, _ in batch[: max(0, MAX_LISTED_IDS - len(listed))])
    log.error("sampler %r: %d reward group(s) NOT reported (%s): ids %s", name, len(batch), why,
              [i for i, _ in batch[:10]])


def _send(name: str, batch: list[tuple[str, list[float]]]) -> None:
    """One report call; its answer is checked later by `_collect` (the rollout thread never waits)."""
    if not batch:
        return
    try:
        ref = _get_sampler(name).report.remote([i for i, _ in batch], [s for _, s in batch])
    except Exception as e:  # noqa: BLE001 - the actor is gone or was never there: nobody can take these
        _samplers.pop(name, None)
        _drop(name, batch, f"cannot reach the sampler actor: {e!r}")
        return
    with _lock:
        _inflight.append((ref, name, batch))
        _stats["calls"] += 1


def refused_id(error: BaseException, batch: list[tuple[str, list[float]]]) -> str | None:
    """The id a sampler's refusal names, if it is one of `batch`'s ids."""
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the actor's own exception
    ids = {i for i, _ in batch}
    for m in _ID_IN_ERROR.finditer(str(cause)):
        try:
            got = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            continue
        got = got.decode(errors="replace") if isinstance(got, bytes) else str(got)
        if got in ids:
            return got
    return None


def _refused(name: str, batch: list[tuple[str, list[float]]], error: BaseException) -> None:
    """A report the sampler rejected as a whole: resend it without the id its error names, or in
    halves when it names none, so a bad id ends up alone in a report and only its group is lost."""
    reason = str(getattr(error, "cause", None) or error).strip().splitlines()[-1:]
    bad = refused_id(error, batch)
    if bad is not None:
        _drop(name, [g for g in batch if g[0] == bad], f"refused: {' '.join(reason)}")
        parts = [[g for g in batch if g[0] != bad]]
    elif len(batch) > 1:
        log.warning("sampler %r refused a report of %d groups without naming an id (%s); retrying in halves",
                    name, len(batch), " ".join(reason))
        parts = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    else:
        _drop(name, batch, f"refused: {' '.join(reason)}")
        parts = []
    for part in parts:
        if part:
            with _lock:
                _stats["retries"] += 1
            _send(name, part)


def _accepted(name: str, batch: list[tuple[str, list[float]]], result: Any) -> None:
    """Count a report's answer: an int (groups taken), or `{"accepted": n, "unknown": [ids],
    "invalid": [ids], ...}` from a sampler that skips the groups it cannot take instead of raising."""
    skipped: set[str] = set()
    if isinstance(result, dict):
        for kind in ("unknown", "invalid"):
            ids = {str(i) for i in result.get(kind) or []}
            if ids:
                _drop(name, [g for g in batch if g[0] in ids], f"{kind} to the sampler")
            skipped |= ids
    with _lock:
        _stats["accepted"] += sum(1 for g in batch if g[0] not in skipped)


def _collect(timeout: float = 0.0) -> int:
    """Check the answers of sent reports (waiting up to `timeout`); returns reports still in flight."""
    with _lock:
        pending = [r for r, _, _ in _inflight]
    if not pending:
        return 0
    import ray

    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
    done = set(ready)
    with _lock:  # the timer and a final flush may both collect: each answer is handled by one of them
        mine = [p for p in _inflight if p[0] in done]
        _inflight[:] = [p for p in _inflight if p[0] not in done]
    for ref, name, batch in mine:
        try:
            _accepted(name, batch, ray.get(ref))
        except ray.exceptions.RayActorError as e:  # the sampler died: retrying cannot help
            _samplers.pop(name, None)
            _drop(name, batch, f"sampler actor died: {e!r}")
        except Exception as e:  # noqa: BLE001 - any refusal: resent without the bad group, see _refused
            _refused(name, batch, e)
    with _lock:
        return len(_inflight)


def flush_reports(force: bool = True) -> int:
    """Send complete groups to their sampler, one call per sampler, if due (or `force`). Returns groups sent."""
    global _last_flush
    if not _ray_up():
        return 0  # kept for later: an actor process always has Ray; a bare import has nobody to tell
    with _lock:
        pending = sum(len(v) for v in _ready.values())
        due = force or pending >= FLUSH_GROUPS or time.monotonic() - _last_flush >= FLUSH_SECONDS
        if not pending or not due:
            return 0
        batches = dict(_ready)
        _ready.clear()
        _last_flush = time.monotonic()
    for name, batch in batches.items():
        _send(name, batch)
    return sum(len(b) for b in batches.values())


def final_flush(timeout: float = 60.0) -> dict[str, Any]:
    """Report everything now, incomplete groups too (no more samples will come), and wait up to
    `timeout` seconds for the sampler's answers, retrying refused reports. Returns `stats()`."""
    with _lock:
        for key, (sampler, group) in list(_partial.items()):
            log.warning("prompt %s: reporting an incomplete group (%d sample(s)) at the final flush", key, len(group))
            _ready.setdefault(sampler, []).append((key, group))
        _partial.clear()
    if not _ray_up():
        return stats()
    flush_reports(force=True)
    deadline = time.monotonic() + timeout
    while _collect(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            log.error("final flush: %d report(s) still unanswered after %.0f s", len(_inflight), timeout)
            break
    return stats()


def flush_in_actor(_actor: Any, timeout: float = 60.0) -> dict[str, Any]:
    """`engine.__ray_call__.remote(flush_in_actor)`: the final flush inside a rollout engine."""
    return final_flush(timeout)


def stats() -> dict[str, Any]:
    """Report calls made, groups the sampler accepted, groups dropped (the first ids listed), resends,
    groups waiting to be sent or still incomplete, reports awaiting an answer."""
    with _lock:
        return {
            **{k: v for k, v in _stats.items() if k != "dropped_ids"}, "dropped_ids": list(_stats["dropped_ids"]),
            "waiting": sum(len(v) for v in _ready.values()), "partial": len(_partial), "in_flight": len(_inflight),
        }


def _tick() -> None:
    while not _stop.wait(TICK_SECONDS):
        try:
            if _ray_up():
                _collect(0.0)
                flush_reports(force=False)
        except Exception:
            log.exception("reward report timer failed once; it keeps running")


def _at_exit() -> None:
    _stop.set()
    try:
        final_flush(timeout=10.0)
    except Exception:
        log.exception("final reward flush at exit failed")


def _start_timer() -> None:
    """The timer thread and the exit hook, started with the first reportable group (caller holds _lock)."""
    global _timer
    if _timer is None:
        _timer = threading.Thread(target=_tick, name="saerl-reward-flush", daemon=True)
        _timer.start()
        atexit.register(_at_exit)


def score_one(query: str, prompt: str, label: Any) -> float:
    info = parse_label(label)
    try:
        score = float(math_reward(response_text(query, prompt), info["answer"]))
    except Exception:
        log.exception("math_reward failed for prompt id %s; scoring 0", info["id"])
        score = 0.0
    if info["id"] is not None and info["sampler"]:
        with _lock:
            _record(info, score)
            _start_timer()
    return score


def reward_func(queries: list[str], prompts: list[str], labels: list[Any], **_: Any) -> dict[str, Any]:
    """OpenRLHF reward hook: 0/1 correctness per sample; `scores` drive DAPO dynamic filtering."""
    scores = []
    for query, prompt, label in zip(queries, prompts, labels):
        try:
            scores.append(score_one(query, prompt, label))
        except Exception:
            log.exception("reward_func failed on one sample; scoring 0")
            scores.append(0.0)
    try:
        flush_reports(force=False)
    except Exception:
        log.exception("flushing reward reports failed; the timer retries")
    r = torch.tensor(scores, dtype=torch.float32)
    return {"rewards": r, "scores": r.clone(), "extra_logs": {"saerl_correct": r.clone()}}


if __name__ != CANONICAL:
    # OpenRLHF execs this file under another module name; rebinding to the importable copy keeps one
    # report state per process, which the trainer's end-of-run flush (`flush_in_actor`) can reach.
    from saerl_ray.trainers.openrlhf_reward import (  # noqa: F401
        final_flush,
        flush_reports,
        reward_func,
        score_one,
        stats,
    )
