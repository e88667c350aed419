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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from verl.trainer import main_ppo_v0
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from saerl_ray.trainers.verl_sampler import create_curriculum_sampler


class SaerlRayPPOTrainer(RayPPOTrainer):
    """RayPPOTrainer whose per-step batch reaches the curriculum sampler before the actor update."""

    def _update_actor(self, batch: Any) -> Any:
        self.report_to_curriculum(batch)
        return super()._update_actor(batch)

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
        with curriculum_patches():
            return super().run(config)
