"""OpenRLHF reward file (`--reward.remote_url <this file>`): scores math answers and reports them
to the run's CurriculumSampler actor so the curriculum can rebalance online.

OpenRLHF 0.11 loads this file by path inside every vLLM rollout actor and calls
`reward_func(queries, prompts, labels)` once per sample, in a worker thread. It swallows any
exception we raise (the sample silently gets reward None), so nothing here raises: errors are logged.

Labels are JSON strings `{"id", "answer", "cluster", "sampler", "n"}` written by `openrlhf_launch`:
`sampler` names the CurriculumSampler actor (namespace "saerl"), `n` is the group size
(`--rollout.n_samples_per_prompt`); a group's scores are reported once all n have arrived.
A plain-string label is treated as the gold answer and scored without reporting (eval sets).

    python -c "from saerl_ray.integrations.openrlhf_reward import reward_func; \
print(reward_func(['Q: 1+1? A: \\\\boxed{2}'], ['Q: 1+1? A:'], ['{\"id\": \"a\", \"answer\": \"2\"}']))"
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import torch

from saerl_ray.reward import math_reward

log = logging.getLogger("saerl_ray.openrlhf_reward")

SAMPLER_NAMESPACE = "saerl"
# Flush reports once this many prompt groups are complete, or this long after the last flush:
# one remote call per group would flood the sampler actor at rollout speed.
FLUSH_GROUPS = 8
FLUSH_SECONDS = 2.0

_lock = threading.Lock()
_partial: dict[str, list[float]] = {}  # prompt id -> scores seen so far in its group
_ready: dict[str, list[tuple[str, list[float]]]] = {}  # sampler name -> complete groups to report
_last_flush = time.monotonic()
_samplers: dict[str, Any] = {}


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
    key = str(label["id"])
    group = _partial.setdefault(key, [])
    group.append(score)
    if len(group) >= label["n"]:
        _ready.setdefault(label["sampler"], []).append((key, _partial.pop(key)))


def flush_reports(force: bool = True) -> int:
    """Send complete groups to their sampler, one call per sampler. Returns groups sent."""
    global _last_flush
    with _lock:
        pending = sum(len(v) for v in _ready.values())
        due = force or pending >= FLUSH_GROUPS or time.monotonic() - _last_flush >= FLUSH_SECONDS
        if not pending or not due:
            return 0
        batches = dict(_ready)
        _ready.clear()
        _last_flush = time.monotonic()
    sent = 0
    for name, batch in batches.items():
        try:
            # Fire and forget: the rollout thread must not wait on the sampler.
            _get_sampler(name).report.remote([i for i, _ in batch], [s for _, s in batch])
            sent += len(batch)
        except Exception:
            log.exception("reporting %d groups to sampler %r failed; they are dropped", len(batch), name)
    return sent


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
    flush_reports(force=False)
    r = torch.tensor(scores, dtype=torch.float32)
    return {"rewards": r, "scores": r.clone(), "extra_logs": {"saerl_correct": r.clone()}}
