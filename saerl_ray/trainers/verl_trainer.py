"""verl 0.9.1's legacy PPO trainer fed by the SaeRL curriculum (imports verl: the verl env only).

verl 0.9.1 has no config-named dataloader sampler and no `AbstractCurriculumSampler.update` hook
(those were in earlier releases' `verl/experimental/dataset/sampler.py`; 0.9.1's
`create_rl_sampler` builds only RandomSampler / SequentialSampler). What it does have:
- `run_ppo(config, task_runner_class)` (verl/trainer/main_ppo.py), documented "for recipe to change
  TaskRunner": the launcher passes `ray.remote(SaerlTaskRunner)`;
- the legacy `TaskRunner.run` (verl/trainer/main_ppo_v0.py, selected by `trainer.use_v1=false`)
  builds the sampler with `create_rl_sampler(config.data, train_dataset)` and the trainer with
  `RayPPOTrainer(..., train_sampler=...)`, both looked up in main_ppo_v0's module namespace.
`SaerlTaskRunner.run` swaps those two names, inside the TaskRunner actor's own process, for
`create_curriculum_sampler` and `SaerlRayPPOTrainer`, then runs verl's `run` unchanged.

`SaerlRayPPOTrainer._update_actor(batch)` is called by `RayPPOTrainer.fit` once per step, on every
step including the last, with the step's full `DataProto` (responses, `token_level_scores`, `uid`,
the reward function's `acc`, the dataset's `extra_info`): it hands the batch to the sampler's
`update` (one `report` call per step) before verl's actor update. (verl's own per-step hook,
`train_dataset.on_batch_end(batch)`, is skipped on the last step, so the last step's groups would
never reach the sampler.) verl's `_save_checkpoint` / `_load_checkpoint` save and restore
`train_dataloader.state_dict()` (`data.pt`), which holds the sampler's cursor.

Files (settings `data.saerl.stage_dir` / `scratch`, set by the launcher; saerl_ray.trainers.run_files):
`SaerlTaskRunner.run` fetches `data.train_files` / `data.val_files` (files in the run directory) onto its
own node before verl's `create_rl_dataset` opens them. `trainer.default_local_dir` is node-local: in
`_save_checkpoint` every FSDP rank writes its shards of `global_step_<n>/actor` on its own node and the
trainer writes `data.pt` and `latest_checkpointed_iteration.txt` on its node; afterwards one worker per
node (and the trainer's node) pushes `global_step_<n>/`, then the trainer publishes the tracker file and
prunes stored steps to `trainer.max_actor_ckpt_to_keep`. `_load_checkpoint` first resets every node's
folder to the stored step the tracker names (the trainer's node: `data.pt` and the tracker only).
`data.saerl.node_resource` becomes every resource pool's `accelerator_type`: verl 0.9.1's
`RayResourcePool` then asks each GPU bundle for 1e-4 of that custom resource, which only the training
node types advertise (its only custom-resource hook; `ResourcePoolManager` never sets it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from verl.trainer import main_ppo_v0
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from saerl_ray.trainers.run_files import VerlFiles, saerl_settings
from saerl_ray.trainers.verl_sampler import create_curriculum_sampler


def worker_handles(trainer: Any) -> list:
    handles = []
    for name in ("actor_rollout_wg", "critic_wg"):
        group = getattr(trainer, name, None)
        handles += list(getattr(group, "workers", None) or [])
    return handles


def pools_on_node_type(manager: Any, resource: str | None) -> Any:
    """`manager` (verl's ResourcePoolManager) whose pools, once created, ask for `resource` on their GPU bundles."""
    if not resource:
        return manager
    create = manager.create_resource_pool

    def create_on_node_type() -> None:
        create()
        for pool in manager.resource_pool_dict.values():
            pool.accelerator_type = resource

    manager.create_resource_pool = create_on_node_type
    return manager


class SaerlRayPPOTrainer(RayPPOTrainer):
    """RayPPOTrainer whose per-step batch reaches the curriculum sampler before the actor update."""

    def _update_actor(self, batch: Any) -> Any:
        self.report_to_curriculum(batch)
        return super()._update_actor(batch)

    def _save_checkpoint(self) -> Any:
        out = super()._save_checkpoint()
        files = VerlFiles.of(self.config)
        if files is not None:
            files.upload(worker_handles(self), self.global_steps, self.config.trainer.get("max_actor_ckpt_to_keep"))
        return out

    def _load_checkpoint(self) -> Any:
        files = VerlFiles.of(self.config)
        if files is not None:
            files.restore(worker_handles(self), self.config.trainer.resume_mode != "disable")
        return super()._load_checkpoint()

    def report_to_curriculum(self, batch: Any) -> Any:
        sampler = getattr(self.train_dataloader, "sampler", None)
        if hasattr(sampler, "update"):
            return sampler.update(batch)
        return None


@contextmanager
def curriculum_patches() -> Iterator[None]:
    """While open, main_ppo_v0's `TaskRunner.run` builds the curriculum sampler and our trainer."""
    with mock.patch.object(main_ppo_v0, "create_rl_sampler", create_curriculum_sampler), \
         mock.patch.object(main_ppo_v0, "RayPPOTrainer", SaerlRayPPOTrainer):
        yield


class SaerlTaskRunner(main_ppo_v0.TaskRunner.__ray_actor_class__):
    """verl's legacy TaskRunner with the curriculum sampler and trainer swapped in (see module doc)."""

    def run(self, config: Any) -> Any:
        files = VerlFiles.of(config)
        if files is not None:
            files.fetch_inputs(config)
        with curriculum_patches():
            return super().run(config)

    def init_resource_pool_mgr(self, config: Any) -> Any:
        return pools_on_node_type(super().init_resource_pool_mgr(config), saerl_settings(config).get("node_resource"))
