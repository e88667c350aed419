"""verl 0.9.1 glue against the real verl, in the optional CPU env (`make test-verl`).

What runs for real: verl's Hydra `ppo_trainer` config composed with our overrides and verl's
`validate_config`; verl's `create_rl_dataset` / `RLHFDataset` over the parquet the launcher writes
(tokenizer loaded by verl's `hf_tokenizer`); `RayPPOTrainer._create_dataloader` building its
`StatefulDataLoader` around our sampler; `DataProto` batches built the way `RayPPOTrainer.fit` builds
them (`from_single_dict`, `uid`, `_get_gen_batch`, `repeat(interleave=True)`, `union`, rewards from our
reward function as `reward_extra_infos`, `_balance_batch`-style reordering); `RayPPOTrainer._save_checkpoint`
/ `_load_checkpoint` writing and restoring `data.pt`; the CurriculumSampler Ray actor. What is not run:
anything that needs a GPU (FSDP workers, vLLM rollouts): their worker groups are stand-ins whose
checkpoint calls do nothing, and the actor update (`RayPPOTrainer._update_actor`) is recorded, not run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from testkit import commit_plan

from saerl_ray.core.config import ConfigError, load_config
from saerl_ray.trainers import verl_launch as launch

pytestmark = pytest.mark.verl

N_PROMPTS, BATCH, GROUP = 12, 4, 2  # 3 clusters of 4; one plan epoch = 3 steps


def make_cfg(tmp_path, policy, algo="grpo", mode="static", steps=3, extra=(), **train):
    return load_config(None, {
        "run_dir": str(tmp_path / "run"), "model.name": str(policy), "plan.batch_size": BATCH,
        "sampler.mode": mode, "train.backend": "verl", "train.algo": algo, "train.steps": steps,
        "train.num_generations": GROUP, "train.max_new_tokens": 64, "train.extra_args": list(extra),
        "train.save_every": 1, **{f"train.{k}": v for k, v in train.items()},
    })


def write_plan(run_dir):
    table = pa.table({
        "position": pa.array(range(N_PROMPTS), pa.int64()),
        "batch": pa.array([i // BATCH for i in range(N_PROMPTS)], pa.int64()),
        "id": [f"q{i:02d}" for i in range(N_PROMPTS)],
        "prompt": [f"What is {i} + {i}?" for i in range(N_PROMPTS)],
        "answer": [str(2 * i) for i in range(N_PROMPTS)],
        "source": ["gsm8k"] * N_PROMPTS,
        "cluster": pa.array([i // 4 for i in range(N_PROMPTS)], pa.int32()),
        "difficulty_pred": pa.array([float(i % 4) for i in range(N_PROMPTS)], pa.float32()),
        "mixed": [False] * N_PROMPTS,
    })
    commit_plan(run_dir, table, "test-plan")
    return table


@pytest.fixture
def run(tmp_path, tiny_model_dir, ray_cluster):
    """Plan + sampler actor + verl dataset + composed verl config, as `verl_launch.run` makes them."""

    def setup(algo="grpo", mode="static", steps=3, extra=()):
        from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

        cfg = make_cfg(tmp_path, tiny_model_dir, algo, mode, steps, extra)
        plan = write_plan(cfg.run_dir)
        sampler = get_or_create_sampler(cfg)
        name = actor_name(cfg.run_dir)
        dataset = launch.write_dataset(cfg)
        overrides = launch.build_overrides(cfg, dataset, str(tiny_model_dir), name)
        config = launch.compose(overrides)
        return SimpleNamespace(cfg=cfg, plan=plan, ids=plan.column("id").to_pylist(), sampler=sampler,
                               name=name, config=config, overrides=overrides)

    yield setup


def build_trainer(config):
    """verl's RayPPOTrainer (our subclass) with its real `_create_dataloader`, datasets from verl's
    `create_rl_dataset` and the sampler from `main_ppo_v0`'s (patched) `create_rl_sampler`, as
    `TaskRunner.run` builds them; GPU worker groups are stand-ins."""
    from verl.trainer import main_ppo_v0
    from verl.utils import hf_tokenizer
    from verl.utils.dataset.rl_dataset import collate_fn

    from saerl_ray.trainers.verl_trainer import SaerlRayPPOTrainer, curriculum_patches

    tokenizer = hf_tokenizer(config.actor_rollout_ref.model.path)
    train = main_ppo_v0.create_rl_dataset(config.data.train_files, config.data, tokenizer, None, is_train=True)
    val = main_ppo_v0.create_rl_dataset(config.data.val_files, config.data, tokenizer, None, is_train=False,
                                        max_samples=config.data.get("val_max_samples", -1))
    trainer = SaerlRayPPOTrainer.__new__(SaerlRayPPOTrainer)
    trainer.config, trainer.tokenizer, trainer.processor = config, tokenizer, None
    trainer.use_critic, trainer.global_steps = False, 0
    trainer.actor_rollout_wg = SimpleNamespace(save_checkpoint=lambda *a, **k: None,
                                               load_checkpoint=lambda *a, **k: None)
    with curriculum_patches():  # what SaerlTaskRunner.run does around verl's TaskRunner.run
        sampler = main_ppo_v0.create_rl_sampler(config.data, train)
    trainer._create_dataloader(train, val, collate_fn, sampler)
    return trainer


def batch_ids(batch_dict):
    return [info["id"] for info in batch_dict["extra_info"]]


def step_batch(trainer, batch_dict, correct):
    """The step's DataProto as RayPPOTrainer.fit builds it up to `_update_actor`; rollouts scripted
    (`correct(id, k)` says whether response k of a prompt is right), rewards from our reward function."""
    import torch
    from verl import DataProto

    from saerl_ray.trainers.verl_reward import compute_score

    batch = DataProto.from_single_dict(batch_dict)
    batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch.batch))], dtype=object)
    gen_batch = trainer._get_gen_batch(batch)
    gen_in = gen_batch.repeat(repeat_times=GROUP, interleave=True)
    n, length = len(gen_in), 8
    # What the rollout manager's generate_sequences returns: new tensors, the request's non-tensor fields.
    gen_out = DataProto.from_dict(
        tensors={"responses": torch.ones(n, length, dtype=torch.long),
                 "attention_mask": torch.ones(n, 2 * length, dtype=torch.long)},
        non_tensors=dict(gen_in.non_tensor_batch),
    )
    ids = [info["id"] for info in gen_out.non_tensor_batch["extra_info"]]
    answers = [rm["ground_truth"] for rm in gen_out.non_tensor_batch["reward_model"]]
    texts = [f"so \\boxed{{{a}}}" if correct(i, k % GROUP) else "no idea" for k, (i, a) in enumerate(zip(ids, answers))]
    batch = batch.repeat(repeat_times=GROUP, interleave=True)
    batch = batch.union(gen_out)
    scores = [compute_score("gsm8k", t, a) for t, a in zip(texts, answers)]
    reward = torch.zeros(n, length)
    reward[:, -1] = torch.tensor([s["score"] for s in scores])
    batch.batch["token_level_scores"] = reward
    batch.non_tensor_batch.update({k: np.array([s[k] for s in scores]) for k in ("score", "acc")})
    batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    # _balance_batch reorders rows across DP ranks; groups must survive any order.
    return batch.select_idxs(np.random.default_rng(0).permutation(n))


def count_calls(sampler):
    """Count the remote calls the sampler's client makes, by method."""
    calls: dict[str, int] = {}
    inner = sampler.client._call

    def counted(method, *args):
        calls[method] = calls.get(method, 0) + 1
        return inner(method, *args)

    sampler.client._call = counted
    return calls


def stats(actor):
    import ray

    return ray.get(actor.stats.remote())


def test_overrides_compose_with_verls_hydra_config_and_pass_its_validation(tmp_path, tiny_model_dir, ray_cluster):
    ds = tmp_path / "train.parquet"
    for algo in ("grpo", "dapo"):
        cfg = make_cfg(tmp_path, tiny_model_dir, algo, extra=["actor_rollout_ref.rollout.gpu_memory_utilization=0.7"])
        c = launch.compose(launch.build_overrides(cfg, ds, str(tiny_model_dir), "actor-x"))
        launch.validate(c)  # verl's validate_config, as main_ppo.main runs it
        assert c.algorithm.adv_estimator == "grpo" and c.trainer.use_v1 is False
        assert c.data.train_batch_size == BATCH and c.actor_rollout_ref.actor.ppo_mini_batch_size == BATCH
        assert c.actor_rollout_ref.rollout.n == GROUP and c.data.shuffle is False
        assert c.data.dataloader_num_workers == 0 and c.data.saerl.actor == "actor-x"
        assert c.data.saerl.num_prompts == 3 * BATCH and c.trainer.total_training_steps == 3
        assert c.reward.custom_reward_function.path == str(launch.REWARD_FILE)
        assert c.actor_rollout_ref.rollout.gpu_memory_utilization == 0.7  # extra_args come last and win
        assert c.trainer.default_local_dir == str(Path(launch.scratch_dir(cfg)) / "ckpt")  # node-local, mirrored
        if algo == "grpo":
            assert c.actor_rollout_ref.actor.use_kl_loss is False and c.reward.reward_manager.name == "naive"
        else:
            a = c.actor_rollout_ref.actor
            assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.28, "token-mean")
            assert a.use_kl_loss is False and c.reward.reward_manager.name == "dapo"
            buf = c.reward.reward_kwargs.overlong_buffer_cfg
            assert buf.enable and buf.len == 16 and c.reward.reward_kwargs.max_resp_len == 64
            assert c.algorithm.filter_groups.enable is False
    # A key verl's config does not have is refused by Hydra, and reported as a config error naming it.
    bad = make_cfg(tmp_path, tiny_model_dir, extra=["actor_rollout_ref.actor.no_such_knob=1"])
    with pytest.raises(ConfigError, match="no_such_knob"):
        launch.compose(launch.build_overrides(bad, ds, str(tiny_model_dir), "actor-x"))
    kl = make_cfg(tmp_path, tiny_model_dir, kl_coef=0.05)
    c = launch.compose(launch.build_overrides(kl, ds, str(tiny_model_dir), "actor-x"))
    from verl.trainer.ppo.utils import need_reference_policy

    assert c.actor_rollout_ref.actor.kl_loss_coef == 0.05 and need_reference_policy(c)


def test_task_runner_swaps_in_the_curriculum_sampler_and_trainer_only_while_it_runs(run, monkeypatch):
    from verl.trainer import main_ppo_v0

    from saerl_ray.trainers.verl_sampler import (
        CurriculumDataSampler,
        create_curriculum_sampler,
    )
    from saerl_ray.trainers.verl_trainer import SaerlRayPPOTrainer, SaerlTaskRunner

    r = run()
    seen = {}

    def fake_run(self, config):  # verl's TaskRunner.run up to the trainer's construction
        seen["sampler_fn"], seen["trainer_cls"] = main_ppo_v0.create_rl_sampler, main_ppo_v0.RayPPOTrainer
        seen["sampler"] = main_ppo_v0.create_rl_sampler(config.data, list(range(N_PROMPTS)))

    monkeypatch.setattr(main_ppo_v0.TaskRunner.__ray_actor_class__, "run", fake_run)
    original = main_ppo_v0.create_rl_sampler, main_ppo_v0.RayPPOTrainer
    SaerlTaskRunner().run(r.config)
    assert seen["sampler_fn"] is create_curriculum_sampler and seen["trainer_cls"] is SaerlRayPPOTrainer
    assert isinstance(seen["sampler"], CurriculumDataSampler) and len(seen["sampler"]) == 3 * BATCH
    assert (main_ppo_v0.create_rl_sampler, main_ppo_v0.RayPPOTrainer) == original  # restored afterwards
    # Without data.saerl the drop-in is verl's own sampler.
    from omegaconf import OmegaConf
    from torch.utils.data import SequentialSampler

    plain = OmegaConf.create({"shuffle": False, "seed": None})
    assert isinstance(create_curriculum_sampler(plain, list(range(3))), SequentialSampler)


def test_verls_loader_serves_the_actors_order_one_call_per_step(run):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from saerl_ray.trainers.verl_sampler import CurriculumDataSampler

    r = run(mode="static", steps=3)
    trainer = build_trainer(r.config)
    loader = trainer.train_dataloader
    assert isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, CurriculumDataSampler)
    assert len(loader) == 3 and trainer.total_training_steps == 3  # len(train_dataloader) == train.steps
    calls = count_calls(loader.sampler)
    served = [batch_ids(b) for b in loader]
    assert sum(served, []) == r.ids  # static mode: the plan itself, no shuffle
    assert calls == {"next_batch": 3}  # one remote call per step, none per prompt
    assert [len(b) for b in served] == [BATCH] * 3


def test_update_reports_each_steps_groups_from_a_real_dataproto_in_one_call(run, monkeypatch):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    r = run(mode="online", steps=3)
    trainer = build_trainer(r.config)
    updated = []
    monkeypatch.setattr(RayPPOTrainer, "_update_actor", lambda self, batch: updated.append(len(batch)) or "out")
    cluster_of = dict(zip(r.ids, r.plan.column("cluster").to_pylist()))
    calls = count_calls(trainer.train_dataloader.sampler)
    right = lambda i, k: cluster_of[i] == 0 or k == 0  # cluster 0 always right, others half  # noqa: E731
    steps = 0
    for batch_dict in trainer.train_dataloader:
        batch = step_batch(trainer, batch_dict, right)
        assert trainer._update_actor(batch) == "out"  # verl's update still runs, after the report
        steps += 1
        assert stats(r.sampler)["reported"] == steps * BATCH  # this step's groups are at the actor already
    assert updated == [BATCH * GROUP] * 3 and steps == 3
    assert calls == {"next_batch": 3, "report": 3}  # one report per step
    s = stats(r.sampler)
    assert s["reported"] == N_PROMPTS and s["invalid"] == 0 and s["unknown"] == 0
    pass_rates = {int(c): v for c, v in s["pass_rates"].items()}  # the groups' 0/1 scores arrived intact
    assert pass_rates[0] == pytest.approx(1.0) and pass_rates[1] == pytest.approx(0.5) == pass_rates[2]
    rep = trainer.train_dataloader.sampler.reports
    assert (rep["calls"], rep["groups"], rep["accepted"], rep["dropped"]) == (3, N_PROMPTS, N_PROMPTS, 0)


def test_group_rewards_read_from_the_batch(run):
    """Groups are keyed by uid whatever the row order; `acc` wins over DAPO-penalised scores."""
    r = run(mode="static", steps=1)
    trainer = build_trainer(r.config)
    batch_dict = next(iter(trainer.train_dataloader))
    first = batch_ids(batch_dict)[0]
    batch = step_batch(trainer, batch_dict, lambda i, k: i == first and k == 1)
    batch.batch["token_level_scores"][:, -1] -= 0.5  # an overlong penalty: scores leave [0, 1]
    ids, groups = trainer.train_dataloader.sampler.groups_of(batch)
    assert sorted(ids) == sorted(batch_ids(batch_dict)) and all(len(g) == GROUP for g in groups)
    assert dict(zip(ids, map(sorted, groups)))[first] == [0.0, 1.0]
    assert all(g == [0.0, 0.0] for i, g in zip(ids, groups) if i != first)


def test_resume_after_a_restart_serves_nothing_twice_and_loses_nothing(run, tmp_path, monkeypatch):
    """verl's own checkpoint code: `_save_checkpoint` after step 1 writes data.pt; the trainer then
    fetches step 2's batch and dies; a new trainer (new loader, new sampler client; the actor ran
    ahead) `_load_checkpoint`s and trains steps 2 and 3 on exactly the rest of the epoch."""
    import torch

    # Node-local scratch, as with an object-store run_dir (a local one is written in place otherwise).
    monkeypatch.setenv("SAERL_SCRATCH", str(tmp_path / "node-scratch"))
    r = run(mode="online", steps=3)
    trainer = build_trainer(r.config)
    it = iter(trainer.train_dataloader)
    committed = batch_ids(next(it))
    trainer.global_steps = 1
    trainer._save_checkpoint()
    ckpt = Path(r.config.trainer.default_local_dir)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
    state = torch.load(ckpt / "global_step_1" / "data.pt", weights_only=False)
    assert state  # the loader state verl saved holds the sampler's cursor
    lost_step = batch_ids(next(it))  # step 2 fetched, never checkpointed: the trainer dies here
    del trainer, it
    stored = Path(r.cfg.run_dir) / "verl" / "ckpt"  # the save was mirrored to the run directory
    assert (stored / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (stored / "global_step_1" / "data.pt").read_bytes() == (ckpt / "global_step_1" / "data.pt").read_bytes()
    shutil.rmtree(ckpt)  # the resumed trainer runs on a fresh node: nothing of the run is local there

    resumed = build_trainer(r.config)
    calls = count_calls(resumed.train_dataloader.sampler)
    resumed._load_checkpoint()
    assert resumed.global_steps == 1 and (ckpt / "global_step_1" / "data.pt").exists()
    rest = [batch_ids(b) for b in resumed.train_dataloader]
    assert rest[0] == lost_step  # the batch the dead trainer never trained on comes back first
    epoch = committed + sum(rest, [])
    assert sorted(epoch) == sorted(r.ids) and len(epoch) == N_PROMPTS  # nothing twice, nothing lost
    assert len(rest) == 2 and calls == {"resume": 1, "next_batch": 2}  # no fast-forward through the actor
    s = stats(r.sampler)
    assert s["served"] == N_PROMPTS and s["reserved"] == BATCH and s["redo"] == 0


def test_run_composes_validates_and_hands_verls_run_ppo_our_task_runner(tmp_path, tiny_model_dir, ray_cluster,
                                                                       monkeypatch):
    """launch.run end to end except verl's GPU training (run_ppo is recorded, not executed)."""
    import verl.trainer.main_ppo as main_ppo

    from saerl_ray.trainers.verl_trainer import SaerlTaskRunner

    cfg = make_cfg(tmp_path, tiny_model_dir, "dapo", steps=2)
    write_plan(cfg.run_dir)
    got = []
    monkeypatch.setattr(main_ppo, "run_ppo", lambda config, task_runner_class: got.append((config, task_runner_class)))
    summary = launch.run(cfg)
    (config, runner), = got
    assert runner.__ray_actor_class__ is SaerlTaskRunner
    assert config.data.train_files == str(tmp_path / "run" / "verl" / "train.parquet")
    assert config.actor_rollout_ref.actor.clip_ratio_high == 0.28 and config.data.saerl.num_prompts == 2 * BATCH
    assert summary["backend"] == "verl" and summary["prompts"] == 2 * BATCH
    assert (tmp_path / "run" / "verl" / "_DONE.json").exists()
    assert launch.run(cfg)["prompts"] == 2 * BATCH and len(got) == 1  # same config: the stage is done
    for k in launch.VERL_ENV:
        assert k in os.environ


def test_node_resource_becomes_every_pools_accelerator_type(ray_cluster, monkeypatch):
    """verl's own ResourcePoolManager: after our wrapper, each pool it creates carries the custom resource
    that RayResourcePool.get_placement_groups adds to every GPU bundle."""
    from verl.single_controller.ray.base import ResourcePoolManager

    from saerl_ray.trainers.verl_trainer import pools_on_node_type

    monkeypatch.setattr(ResourcePoolManager, "_check_resource_available", lambda self: None)  # no GPUs here
    manager = pools_on_node_type(ResourcePoolManager({"global_pool": [2], "reward_pool": [1]}, {}), "saerl_train_gpu")
    manager.create_resource_pool()
    assert {n: p.accelerator_type for n, p in manager.resource_pool_dict.items()} == {
        "global_pool": "saerl_train_gpu", "reward_pool": "saerl_train_gpu"}
    plain = pools_on_node_type(ResourcePoolManager({"global_pool": [2]}, {}), None)
    plain.create_resource_pool()
    assert plain.resource_pool_dict["global_pool"].accelerator_type is None
