"""verl reward function (`reward.custom_reward_function.path=<this file>`, `name=compute_score`).

verl 0.9.1's reward managers (naive, dapo) call `compute_score(data_source=, solution_str=,
ground_truth=, extra_info=, ...)` once per response, with `ground_truth` read from the row's
`reward_model.ground_truth` (the parquet `verl_launch.write_dataset` writes). The score is the same
math-verify reward the TRL and OpenRLHF backends use (`saerl_ray.core.reward.math_reward`), returned as a
dict: verl adds every key to the batch's `non_tensor_batch`, so `acc` (the 0/1 correctness, before
DAPO's overlong penalty is added to `score`) is what the curriculum sampler's `update` reports.
It never raises: a malformed answer scores 0.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("saerl_ray.verl_reward")


def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                  extra_info: Any = None, **_: Any) -> dict[str, float]:
    from saerl_ray.core.reward import math_reward

    try:
        r = float(math_reward(str(solution_str or ""), "" if ground_truth is None else str(ground_truth)))
    except Exception:  # noqa: BLE001 - a reward must not kill a rollout worker
        log.exception("math_reward failed (data_source=%r); scoring 0", data_source)
        r = 0.0
    return {"score": r, "acc": r}
