"""OpenRLHF 0.11.2's PPOTrainer with its prompt loader replaced by the SaeRL curriculum.

OpenRLHF builds a shuffling prompt loader with no sampler option. `SaerlPPOTrainer` subclasses the
undecorated trainer (`PPOTrainer.__ray_actor_class__`; Ray forbids subclassing the actor class) and,
after the stock `__init__`, swaps in a loader over the same `PromptDataset` (built by OpenRLHF from
the plan file the launcher writes, one row per plan position) whose `CurriculumPromptSampler` asks
the run's CurriculumSampler actor for positions in curriculum order. Importing this module imports
OpenRLHF (vLLM, DeepSpeed, flash-attn): only `openrlhf_launch.run` and the openrlhf tests do.

    from saerl_ray.trainers.openrlhf_trainer import SaerlPPOTrainer  # in the OpenRLHF env only
    openrlhf.trainer.ppo_trainer.PPOTrainer = ray.remote(SaerlPPOTrainer)

DAPO dynamic filtering: for every rejected group `SamplesGenerator._generate_vllm` pulls exactly one
more prompt from the same loader iterator, right after turning that group's responses into
experiences. The trainer marks each `generate_samples` call as a new round; pulls beyond the round's
`rollout.batch_size` are therefore replacements, and the last processed response's label names the
rejected prompt, so the sampler serves a same-cluster replacement (`replacement(cluster, 1)`).

Reward reports: the reward file batches them inside each vLLM engine; at the end of `fit()` the
trainer runs its final flush in every engine (`__ray_call__`) and waits, so the last groups of the
run reach the sampler before the launcher reads its stats, and writes the counts to
SAERL_REPORTS_FILE for the stage summary.

Files (launched with SAERL_STAGE_DIR / SAERL_SCRATCH_DIR; saerl_ray.trainers.run_files): before the
stock `__init__` builds its datasets, the trainer fetches `--data.prompt_dataset` and `--eval.dataset`
(files in the run directory) onto its own node. Right after, it resets `--ckpt.path` on every node of
the policy actors (and its own), then downloads the checkpoint that the run directory's
`ckpt/_actor/latest` names when `--ckpt.load_enable` is set: `PolicyModelActor.init_model_from_pretrained`
(which loads it) runs only after this constructor. DeepSpeed writes each rank's shards on its own node
(`_actor/<tag>/`; rank 0 also the module states, `latest` and the HF copy `<tag>_hf` with
`--ckpt.save_hf`), so after every save one policy actor per node pushes its node's part of `<tag>`,
then the trainer publishes `latest` (rank 0 wrote it on its node: pushed from there) and prunes stored
checkpoints to `--ckpt.max_num`, as DeepSpeed's rotation does locally.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer
from torch.utils.data import Sampler

from saerl_ray.sampler.actor import SAMPLER_NAMESPACE
from saerl_ray.trainers import run_files

# Seconds an engine may spend sending its last reports and retrying refused ones.
FINAL_FLUSH_SECONDS = 120.0

log = logging.getLogger("saerl_ray.openrlhf_trainer")


def label_cluster(label: Any) -> int | None:
    """Cluster id carried in a launcher-written JSON label, or None."""
    if isinstance(label, str) and label.startswith("{"):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            return None
    if isinstance(label, dict) and label.get("cluster") is not None:
        return int(label["cluster"])
    return None


class CurriculumPromptSampler(Sampler[int]):
    """Yields plan positions (= PromptDataset indices) fetched from the CurriculumSampler actor.

    One remote call per round (`next_batch(round_size)`), one per DAPO replacement. `__len__` is the
    number of main prompts per episode, so OpenRLHF's step arithmetic stays consistent. The state
    saved by OpenRLHF's checkpoint (`StatefulDataLoader` stores it) carries the actor's cursor, so a
    resume serves again exactly what the actor served after that checkpoint (docs/sampler_api.md).
    """

    def __init__(self, actor: Any, num_prompts: int, round_size: int):
        if num_prompts < 1 or round_size < 1:
            raise ValueError(f"num_prompts ({num_prompts}) and round_size ({round_size}) must be >= 1")
        self.actor = actor
        self.num_prompts = num_prompts
        self.round_size = round_size
        self.served = 0  # main prompts served in the current episode
        self.replacements = 0
        self.buffer: list[int] = []  # fetched, not yet yielded
        self.round_left: int | None = None  # None: no trainer rounds, every pull is a main pull
        self.last_label: Any = None

    def __len__(self) -> int:
        return self.num_prompts

    # --- called by the trainer ---
    def begin_round(self) -> None:
        self.round_left = self.round_size

    def saw_response(self, label: Any) -> None:
        self.last_label = label

    # --- iteration ---
    def __iter__(self) -> Iterator[int]:
        # A generator: nothing is fetched until the loader asks, so the extra iter() calls that
        # StatefulDataLoader makes on construction and on load_state_dict cost nothing.
        while True:
            if self.round_left == 0:
                pos = self._replacement()
            elif self.served >= self.num_prompts:
                break
            else:
                pos = self._main()
            if pos is None:
                break
            yield pos
        self.served = 0  # the next iter() is a new episode

    def _main(self) -> int | None:
        if not self.buffer:
            n = min(self.round_size, self.num_prompts - self.served)
            self.buffer = [int(d["position"]) for d in ray.get(self.actor.next_batch.remote(n))]
            if not self.buffer:
                return None
        self.served += 1
        if self.round_left is not None:
            self.round_left -= 1
        return self.buffer.pop(0)

    def _replacement(self) -> int | None:
        cluster = label_cluster(self.last_label)
        got = ray.get(self.actor.replacement.remote(cluster, 1)) if cluster is not None else []
        if not got:  # cluster exhausted or unknown: the next prompt in curriculum order
            got = ray.get(self.actor.next_batch.remote(1))
        self.replacements += 1
        return int(got[0]["position"]) if got else None

    # --- checkpointing (torchdata Stateful protocol) ---
    def state_dict(self) -> dict[str, Any]:
        # fit() asks for this every step and keeps it only at a checkpoint, so it must be cheap: the
        # actor's cursor (its history id + the last serving call), not its state. The state itself is
        # durable in <run_dir>/sampler, which is what the cursor refers to.
        return {
            "served": self.served,
            "buffer": list(self.buffer),
            "replacements": self.replacements,
            "sampler": ray.get(self.actor.cursor.remote()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = int(state["served"])
        self.buffer = [int(p) for p in state["buffer"]]
        self.replacements = int(state.get("replacements", 0))
        self.round_left = None
        # The actor serves again, first and in order, what it served after this checkpoint.
        if state.get("sampler") is not None:
            ray.get(self.actor.resume.remote({"cursor": state["sampler"]}))
        elif state.get("actor") is not None:  # checkpoints written before cursors carried the full state
            ray.get(self.actor.resume.remote(state["actor"]))


def flush_engine_reports(engines: Any, timeout: float = FINAL_FLUSH_SECONDS) -> dict[str, Any]:
    """Run the reward file's final flush inside every rollout engine; summed counts over engines."""
    from saerl_ray.trainers.openrlhf_reward import flush_in_actor

    engines = list(engines or [])
    total: dict[str, Any] = {"engines": len(engines), "failed_engines": 0, "dropped_ids": []}
    refs = []
    for engine in engines:  # all engines flush at once; then wait for each
        try:
            refs.append(engine.__ray_call__.remote(flush_in_actor, timeout))
        except Exception:
            log.exception("could not ask a rollout engine for its final reward flush")
            total["failed_engines"] += 1
    for ref in refs:
        try:
            got = ray.get(ref, timeout=timeout + 30)
        except Exception:
            # Its unsent groups are lost with it; say so instead of failing a finished training run.
            log.exception("final reward flush failed in one rollout engine")
            total["failed_engines"] += 1
            continue
        for k, v in got.items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
        total["dropped_ids"] += got.get("dropped_ids", [])
    if total.get("dropped") or total.get("in_flight") or total["failed_engines"]:
        log.error("reward reports incomplete at the end of training: %s", total)
    return total


def curriculum_loader(strategy: Any, dataset: Any, sampler: CurriculumPromptSampler) -> Any:
    """OpenRLHF's own loader factory, unshuffled, in-process (prefetching workers would reorder)."""
    return strategy.setup_dataloader(dataset, 1, True, False, dataset.collate_fn, sampler=sampler, num_workers=0)


def num_main_prompts(args: Any, plan_rows: int) -> int:
    """Prompts per episode: SAERL_NUM_PROMPTS (set by the launcher from train.steps) or the plan."""
    n = int(os.environ.get("SAERL_NUM_PROMPTS", "0") or 0)
    return n if n > 0 else plan_rows


class SaerlPPOTrainer(PPOTrainer.__ray_actor_class__):
    """PPOTrainer whose prompts come from the CurriculumSampler actor in curriculum order."""

    def __init__(self, pretrain: str, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.files = run_files.OpenRLHFFiles.from_env(strategy.args)
        if self.files is not None:
            self.files.fetch_inputs(strategy.args)
        super().__init__(pretrain, strategy, *args, **kwargs)
        if self.files is not None:
            self.files.restore(run_files.actor_handles(self.actor_model_group), bool(strategy.args.ckpt.load_enable))
        name = os.environ.get("SAERL_SAMPLER_ACTOR")
        if not name:
            raise RuntimeError("SAERL_SAMPLER_ACTOR is not set: launch through saerl_ray.trainers.openrlhf_launch")
        if strategy.args.data.dataloader_num_workers:
            raise ValueError("--data.dataloader_num_workers must be 0: worker prefetch reorders the curriculum")
        actor = ray.get_actor(name, namespace=SAMPLER_NAMESPACE)
        dataset = self.prompts_dataloader.dataset  # OpenRLHF's PromptDataset over the plan file
        self.curriculum = CurriculumPromptSampler(
            actor, num_main_prompts(strategy.args, len(dataset)), strategy.args.rollout.batch_size
        )
        self.prompts_dataloader = curriculum_loader(strategy, dataset, self.curriculum)
        self.samples_generator.prompts_dataloader = self.prompts_dataloader
        self._watch_generator(self.samples_generator)
        args = strategy.args
        self.max_steps = (
            len(self.curriculum) * args.rollout.n_samples_per_prompt // args.train.batch_size
            * args.train.num_episodes * args.train.max_epochs
        )

    def save_logs_and_checkpoints(self, global_step: int, logs_dict: Any = None, client_states: Any = None) -> None:
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if self.files is not None and global_step % self.args.ckpt.save_steps == 0:
            self.files.upload(run_files.actor_handles(self.actor_model_group), f"global_step{global_step}", self.args.ckpt.max_num)
            self.files.upload_logs(self.args.logger.tensorboard_dir)

    def save_best_checkpoint(self, eval_metrics: Any, global_step: int, client_states: Any = None) -> None:
        best = self.best_eval_metric_value
        super().save_best_checkpoint(eval_metrics, global_step, client_states)
        if self.files is not None and self.best_eval_metric_value != best:  # a new best was saved
            self.files.upload(run_files.actor_handles(self.actor_model_group), f"best_global_step{global_step}", None)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        try:
            return super().fit(*args, **kwargs)
        finally:
            # Even a failed run reports the groups it scored: the sampler's state is checkpointed after.
            # Nothing here may raise over fit()'s own outcome.
            try:
                self.reward_reports = flush_engine_reports(self.vllm_engines)
                path = os.environ.get("SAERL_REPORTS_FILE")
                if path:
                    from saerl_ray.core import storage

                    storage.write_json(path, self.reward_reports)
            except Exception:
                log.exception("final reward flush failed")
            try:
                if self.files is not None:
                    self.files.upload_logs(self.args.logger.tensorboard_dir)
            except Exception:
                log.exception("TensorBoard logs could not be uploaded to the run directory")

    def _watch_generator(self, gen: Any) -> None:
        """Mark rounds and remember the last response's label (see the module docstring)."""
        generate_samples = gen.generate_samples
        to_experience = gen._process_response_into_experience
        curriculum = self.curriculum

        def generate_samples_in_round(**kwargs: Any) -> Any:
            curriculum.begin_round()
            return generate_samples(**kwargs)

        def to_experience_seen(response: dict, **kwargs: Any) -> Any:
            curriculum.saw_response(response.get("label"))
            return to_experience(response, **kwargs)

        gen.generate_samples = generate_samples_in_round
        gen._process_response_into_experience = to_experience_seen
