"""What every trainer backend shares: the train stage's fingerprint and Stage, the plan read in position
order, the `train.*` checks, joining Ray with the backend's env vars, and the held-out rows.

    from saerl_ray.trainers.common import backend_stage, read_plan_in_order
    st, policy, done = backend_stage(cfg, "openrlhf")
"""

from __future__ import annotations

import os

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, content_of, fingerprint


def prompts_per_step(cfg: RunConfig) -> int:
    return cfg.train.prompts_per_step or cfg.plan.batch_size


def stage_fingerprint(cfg: RunConfig, policy: str) -> str:
    """What decides a rerun: the train section (backend included; not `resume`, which says how, not
    what), the prompt text, the sampler's rules, the policy, the seed, the plan it reads and the
    resolved step size."""
    from saerl_ray.core.stage import marker_of

    train = content_of(cfg.train, exclude={"resume"})  # and the PLACEMENT fields: a resume keeps its checkpoints
    return fingerprint(train, cfg.prompt, cfg.sampler, cfg.seed, policy, prompts_per_step(cfg), marker_of(cfg.run_dir, "plan"))


def backend_stage(cfg: RunConfig, name: str):
    """(the backend's Stage under `<run_dir>/<name>`, the resolved policy path, and the summary of a
    run of this config that already finished, else None: then there is nothing to do)."""
    from saerl_ray.core.models import resolve
    from saerl_ray.core.stage import Stage

    policy = str(resolve(cfg.train.policy or cfg.model.name))
    st = Stage(cfg.run_dir, name, stage_fingerprint(cfg, policy))
    if not st.done():
        return st, policy, None
    print(f"[saerl-ray] {name}: {st.out} is done for this config; nothing to do", flush=True)
    return st, policy, st.summary()


def join_ray(cfg: RunConfig, env: dict[str, str]) -> None:
    """The backend's env vars (values already set win) go into os.environ before Ray starts, so a local
    cluster started here inherits them; under a job they come from its runtime_env. Then init_ray:
    the configured cluster, or a private local one, never a stale one."""
    from saerl_ray.core.ray_init import init_ray

    os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
    init_ray(cfg.ray)


def common_train_errors(cfg: RunConfig, backend: str) -> list[str]:
    """The `train.*` checks every GPU backend shares, each error naming its field. Any run_dir that
    `storage` reaches is fine: trainer-side processes fetch their inputs and upload their checkpoints
    through it (saerl_ray.trainers.run_files)."""
    t, errors = cfg.train, []
    if t.prompts_per_step is not None and t.prompts_per_step < 1:
        errors.append(f"train.prompts_per_step must be >= 1 (or null for plan.batch_size), got {t.prompts_per_step}")
    if not t.temperature > 0:
        errors.append(f"train.temperature must be > 0 with the {backend} backend, got {t.temperature}: "
                      "greedy groups are identical, so every group-normalised advantage is 0")
    if t.kl_coef < 0:
        errors.append(f"train.kl_coef must be >= 0, got {t.kl_coef}")
    elif t.algo == "dapo" and t.kl_coef > 0:
        errors.append(f"train.kl_coef={t.kl_coef} with train.algo=dapo: DAPO has no KL term; "
                      "set train.kl_coef: 0 or use train.algo: grpo")
    if t.save_every < 0:
        errors.append(f"train.save_every must be >= 0 (0 = no checkpoints), got {t.save_every}")
    if t.heldout_every < 0:
        errors.append(f"train.heldout_every must be >= 0, got {t.heldout_every}")
    elif t.heldout_every and not t.heldout_file:
        errors.append(f"train.heldout_every={t.heldout_every} needs train.heldout_file")
    if t.steps < 1:
        errors.append(f"train.steps must be >= 1, got {t.steps}")
    if t.trainable_layers is not None:
        errors.append(f"train.trainable_layers={t.trainable_layers}: partial updates are a TRL-backend option; "
                      f"{backend} trains every layer (set it to null)")
    if t.node_resource is not None and not t.node_resource.strip():
        errors.append("train.node_resource is empty: give the custom resource the training node types "
                      "advertise (e.g. saerl_train_gpu) or null")
    return errors


def read_plan_in_order(cfg: RunConfig, columns: list[str]):
    """The plan with row i = position i (the sampler serves positions, the backend's dataset is indexed by
    them), read through `storage`: a local run_dir or an object store alike."""
    plan_path = storage.join(storage.resolve(cfg.run_dir), "plan", "plan.parquet")
    if not storage.exists(plan_path):
        raise FileNotFoundError(f"{plan_path} not found: run `saerl-ray plan` first")
    plan = storage.read_parquet(plan_path, columns=["position", *columns])
    pos = plan.column("position").to_pylist()
    if pos != list(range(len(pos))):
        raise ValueError(f"{plan_path}: column 'position' must be 0..{len(pos) - 1} in row order")
    return plan


def read_heldout(path: str | None) -> list[dict]:
    """Held-out rows {prompt, answer} from a jsonl file (${SAERL_DATA} expanded; plain or .gz); errors
    name the file and line."""
    if not path:
        return []
    from saerl_ray.core.data import expand

    path = expand(path)
    rows = []
    for i, row in storage.iter_jsonl(path):
        if not isinstance(row, dict) or not row.get("prompt") or not str(row.get("answer", "")).strip():
            raise ValueError(f"{path} line {i}: need non-empty 'prompt' and 'answer'")
        rows.append({"prompt": row["prompt"], "answer": str(row["answer"])})
    return rows
