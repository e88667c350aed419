"""train stage: RL on the curriculum, with the backend named by `train.backend`.

    saerl-ray train --run-dir runs/m                                   # TRL GRPO under Ray Train (CPU / one node)
    saerl-ray train --run-dir runs/m --train.backend openrlhf          # OpenRLHF on a GPU Ray cluster
    saerl-ray train --run-dir runs/m --train.backend verl              # verl 0.9.1 on a GPU Ray cluster

All three backends pull prompts from the same named sampler actor and report rewards back to it; see
`saerl_ray.trainers.trl_backend`, `openrlhf_launch` and `verl_launch`. OpenRLHF and verl are imported
only when chosen: importing either pulls vLLM and flash-attn.
"""

from __future__ import annotations

from saerl_ray.core.config import RunConfig


def run(cfg: RunConfig) -> dict:
    if cfg.train.backend == "trl":
        from saerl_ray.trainers import trl_backend

        return trl_backend.run(cfg)
    if cfg.train.backend == "openrlhf":
        from saerl_ray.trainers import openrlhf_launch

        return openrlhf_launch.run(cfg)
    if cfg.train.backend == "verl":
        from saerl_ray.trainers import verl_launch

        return verl_launch.run(cfg)
    raise ValueError(f"unknown train.backend {cfg.train.backend!r} (trl | openrlhf | verl)")
