"""train stage: RL on the curriculum, with the backend named by `train.backend`.

    saerl-ray train --run-dir runs/m                                   # TRL GRPO under Ray Train (CPU / one node)
    saerl-ray train --run-dir runs/m --train.backend openrlhf          # OpenRLHF on a GPU Ray cluster
    saerl-ray train --run-dir runs/m --train.backend verl              # verl 0.9.1 on a GPU Ray cluster

Both backends pull prompts from the same named sampler actor and report rewards back to it; see
`saerl_ray.trl_backend` and `saerl_ray.integrations.openrlhf_launch`. The OpenRLHF side is imported
only when chosen: importing it pulls vllm and flash-attn.
"""

from __future__ import annotations

import os

from saerl_ray.config import RunConfig, fingerprint


def run(cfg: RunConfig) -> dict:
    if cfg.train.backend == "trl":
        from saerl_ray import trl_backend

        return trl_backend.run(cfg)
    if cfg.train.backend == "openrlhf":
        from saerl_ray.integrations import openrlhf_launch

        return openrlhf_launch.run(cfg)
    if cfg.train.backend == "verl":
        from saerl_ray.integrations import verl_launch

        return verl_launch.run(cfg)
    raise ValueError(f"unknown train.backend {cfg.train.backend!r} (trl | openrlhf | verl)")


# ---------------------------------------------------------------- shared by the GPU backends (OpenRLHF, verl)


def prompts_per_step(cfg: RunConfig) -> int:
    return cfg.train.prompts_per_step or cfg.plan.batch_size


def stage_fingerprint(cfg: RunConfig, policy: str) -> str:
    """What decides a rerun: the train section (backend included; not `resume`, which says how, not
    what), the sampler's rules, the policy, the seed, the plan it reads and the resolved step size."""
    from saerl_ray.stage import marker_of

    train = cfg.train.model_dump(mode="json", exclude={"resume"})
    return fingerprint(train, cfg.sampler, cfg.seed, policy, prompts_per_step(cfg), marker_of(cfg.run_dir, "plan"))


def backend_stage(cfg: RunConfig, name: str):
    """(the backend's Stage under `<run_dir>/<name>`, the resolved policy path)."""
    from saerl_ray.models import resolve
    from saerl_ray.stage import Stage

    policy = str(resolve(cfg.train.policy or cfg.model.name))
    return Stage(cfg.run_dir, name, stage_fingerprint(cfg, policy)), policy


def join_ray(cfg: RunConfig, env: dict[str, str]) -> None:
    """The backend's env vars (values already set win) go into os.environ before Ray starts, so a local
    cluster started here inherits them; under a job they come from its runtime_env. Then init_ray:
    the configured cluster, or a private local one, never a stale one."""
    from saerl_ray.ray_init import init_ray

    os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
    init_ray(cfg.ray)
