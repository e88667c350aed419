"""The curriculum as verl's training-data sampler (verl 0.9.1, legacy `RayPPOTrainer`).

verl builds its train loader as `StatefulDataLoader(dataset, batch_size=data.train_batch_size,
sampler=create_rl_sampler(data_config, dataset), drop_last=True, num_workers=data.dataloader_num_workers)`
(verl/trainer/ppo/ray_trainer.py `_create_dataloader`, verl/trainer/main_ppo_v0.py `TaskRunner.run`).
`CurriculumDataSampler(data_source, data_config)` takes verl's own sampler-constructor arguments and
yields dataset indices (= plan positions: `verl_launch.write_dataset` writes row i = plan position i)
in the order the run's CurriculumSampler actor serves them: one `next_batch(train_batch_size)` remote
call per training step, never one per prompt.

`update(batch)` is called once per step by `verl_trainer.SaerlRayPPOTrainer` with the step's
`DataProto` (rollouts repeated `rollout.n` times, rewards computed): rows are grouped by
`non_tensor_batch["uid"]` (one uid per prompt, shared by its n responses), the prompt is named by
`non_tensor_batch["extra_info"][k]["id"]` (the plan id the dataset row carries), and each response's
reward is `acc` (our reward function's 0/1 correctness) when the batch has it, else the sum of
`token_level_scores` clipped to [0, 1]. All groups of the step go to the actor in one `report` call.

Checkpoints: verl saves `train_dataloader.state_dict()` with every checkpoint (`data.pt`) and restores
it on resume; torchdata keeps this sampler's `state_dict()` in it. That state is the actor's cursor
(which serving call the loader had received), so `load_state_dict` asks the actor to serve again,
first and in order, whatever it served after that checkpoint (docs/sampler_api.md, "Recovery").

Settings come from the composed Hydra config, under `data.saerl` (added by the launcher):
`actor` (the sampler actor's name), `namespace`, `num_prompts` (prompts per loader epoch: steps x
train_batch_size, so verl's `len(train_dataloader)` is `train.steps`).

No verl import here: the sampler duck-types `DataProto` (`.batch`, `.non_tensor_batch`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from saerl_ray.sampler.actor import SAMPLER_NAMESPACE, SamplerClient

log = logging.getLogger("saerl_ray.verl_sampler")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.get(key)` for an OmegaConf DictConfig or a plain dict."""
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


class CurriculumDataSampler(Sampler[int]):
    """Dataset indices in the CurriculumSampler actor's order; rewards back through `update(batch)`."""

    def __init__(self, data_source: Any, data_config: Any, actor: Any = None):
        settings = _get(data_config, "saerl", {})
        if actor is None:
            import ray

            name = _get(settings, "actor")
            if not name:
                raise ValueError("data.saerl.actor is not set: launch through saerl_ray.trainers.verl_launch")
            actor = ray.get_actor(name, namespace=_get(settings, "namespace", SAMPLER_NAMESPACE))
        if int(_get(data_config, "dataloader_num_workers", 0)):
            raise ValueError("data.dataloader_num_workers must be 0: worker prefetch reorders the curriculum")
        self.data_source = data_source
        self.batch_size = int(_get(data_config, "gen_batch_size", 0) or _get(data_config, "train_batch_size"))
        self.num_prompts = int(_get(settings, "num_prompts", 0) or len(data_source))
        if self.batch_size < 1 or self.num_prompts < 1:
            raise ValueError(f"batch size ({self.batch_size}) and prompts per epoch ({self.num_prompts}) must be >= 1")
        self.client = SamplerClient(actor=actor)
        self.served = 0  # prompts yielded in the current loader epoch
        self.buffer: list[int] = []  # fetched, not yet yielded
        self.reports: dict[str, Any] = {"calls": 0, "groups": 0, "accepted": 0, "dropped": 0, "dropped_ids": []}

    def __len__(self) -> int:
        return self.num_prompts

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing is fetched until the loader asks, so the iter() calls StatefulDataLoader
        # makes on construction and on load_state_dict cost no actor call.
        while self.served < self.num_prompts:
            if not self.buffer:
                n = min(self.batch_size, self.num_prompts - self.served)
                rows = self.client.next_batch(n)
                if not rows:
                    break  # every prompt retired
                self.buffer = [int(r["position"]) for r in rows]
                if max(self.buffer) >= len(self.data_source):
                    raise IndexError(f"sampler served position {max(self.buffer)} but the dataset has "
                                     f"{len(self.data_source)} rows: the dataset is not this plan's")
            self.served += 1
            yield self.buffer.pop(0)
        self.served = 0  # the next iter() is a new loader epoch

    # --- rewards ---
    def update(self, batch: Any) -> dict[str, Any]:
        """Report the step's per-prompt reward groups to the actor, in one call. Never raises: a
        failed report is logged and counted (training goes on; the curriculum misses one step)."""
        try:
            ids, groups = self.groups_of(batch)
        except Exception:  # noqa: BLE001
            log.exception("could not read reward groups from the batch")
            self.reports["dropped"] += 1
            return {"accepted": 0, "error": "unreadable batch"}
        if not ids:
            return {"accepted": 0}
        try:
            out = self.client.report(ids, groups)
        except Exception as e:  # noqa: BLE001
            log.exception("report of %d groups to the curriculum sampler failed", len(ids))
            self.reports["dropped"] += len(ids)
            return {"accepted": 0, "error": repr(e)}
        skipped = list(out.get("unknown", [])) + list(out.get("invalid", []))
        self.reports["calls"] += 1
        self.reports["groups"] += len(ids)
        self.reports["accepted"] += int(out.get("accepted", 0))
        self.reports["dropped"] += len(skipped)
        self.reports["dropped_ids"] = (self.reports["dropped_ids"] + skipped)[:100]
        if skipped:
            log.error("curriculum sampler skipped %d reward groups: %s", len(skipped), skipped[:10])
        return out

    @staticmethod
    def groups_of(batch: Any) -> tuple[list[str], list[list[float]]]:
        """(prompt ids, reward groups) of a verl step batch, one group per `uid`, in first-seen order."""
        nt = batch.non_tensor_batch
        uids = nt["uid"]
        extra = nt.get("extra_info")
        if "acc" in nt:
            values = np.asarray(nt["acc"], dtype=np.float64).reshape(-1)
        else:
            values = batch.batch["token_level_scores"].sum(-1).float().cpu().numpy().astype(np.float64)
        values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
        groups: OrderedDict[Any, list[float]] = OrderedDict()
        ids: dict[Any, str] = {}
        for k, uid in enumerate(uids):
            info = extra[k] if extra is not None else None
            pid = info.get("id") if isinstance(info, dict) else None
            if pid is None:
                raise KeyError(f"row {k} (uid {uid}) has no extra_info.id: the dataset is not the launcher's")
            if ids.setdefault(uid, pid) != pid:
                raise ValueError(f"uid {uid} spans two prompts ({ids[uid]!r}, {pid!r})")
            groups.setdefault(uid, []).append(float(values[k]))
        return [ids[u] for u in groups], list(groups.values())

    # --- checkpointing (torchdata Stateful protocol; StatefulDataLoader saves it in verl's data.pt) ---
    def state_dict(self) -> dict[str, Any]:
        # The client's cursor is local (the last batch it received): no remote call.
        return {"served": self.served, "buffer": list(self.buffer), "sampler": self.client.cursor(),
                "reports": dict(self.reports)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = int(state["served"])
        self.buffer = [int(p) for p in state["buffer"]]
        if state.get("reports"):
            self.reports = dict(state["reports"])
        # The actor serves again, first and in order, what it served after this checkpoint.
        if state.get("sampler") is not None:
            self.client.resume({"cursor": state["sampler"]})


def create_curriculum_sampler(data_config: Any, dataset: Any) -> Any:
    """Drop-in for `verl.trainer.ppo.utils.create_rl_sampler(data_config, dataset)`: the curriculum
    sampler when the config carries `data.saerl`, verl's own sampler otherwise."""
    if _get(data_config, "saerl"):
        return CurriculumDataSampler(dataset, data_config)
    from verl.trainer.ppo.utils import create_rl_sampler

    return create_rl_sampler(data_config, dataset)
