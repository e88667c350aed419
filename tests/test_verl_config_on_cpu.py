"""How `train.*` reaches verl, checked without verl (core env, part of `make test`).

The same overrides are composed with verl 0.9.1's own Hydra config and validated in
test_verl_on_cpu.py (`make test-verl`); here: the overrides we build, what we refuse, the dataset file
and the stage bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from saerl_ray.core.config import ConfigError, load_config
from saerl_ray.core.stage import Stage
from saerl_ray.trainers import verl_launch as launch

BATCH, GROUP = 4, 4
REPO = Path(__file__).resolve().parents[1]


def cfg_with(tmp_path, **fields):
    return load_config(None, {
        "run_dir": str(tmp_path / "run"), "model.name": str(tmp_path), "plan.batch_size": BATCH,
        "train.backend": "verl", "train.num_generations": GROUP, "train.steps": 3,
        **{k if "." in k or k in ("seed", "run_dir") else f"train.{k}": v for k, v in fields.items()},
    })


def overrides_of(tmp_path, **fields):
    return launch.build_overrides(cfg_with(tmp_path, **fields), tmp_path / "train.parquet", "policy", "actor-x")


def value(overrides, key):
    return launch.override_value(overrides, key, "<absent>")


def test_each_train_field_becomes_its_verl_override(tmp_path):
    o = overrides_of(tmp_path, lr_scheduler="cosine", kl_coef=0.02, temperature=0.6, prompts_per_step=8,
                     save_every=5, resume=True, learning_rate=2e-6, num_workers=2, max_new_tokens=96, seed=7)
    assert value(o, "actor_rollout_ref.actor.optim.lr_scheduler_type") == "cosine"
    assert float(value(o, "actor_rollout_ref.actor.optim.lr")) == 2e-6
    assert value(o, "actor_rollout_ref.actor.use_kl_loss") == "true"
    assert float(value(o, "actor_rollout_ref.actor.kl_loss_coef")) == 0.02
    assert value(o, "actor_rollout_ref.actor.kl_loss_type") == "low_var_kl"
    assert float(value(o, "actor_rollout_ref.rollout.temperature")) == 0.6
    assert value(o, "actor_rollout_ref.rollout.n") == str(GROUP)
    assert value(o, "data.train_batch_size") == "8" and value(o, "actor_rollout_ref.actor.ppo_mini_batch_size") == "8"
    assert value(o, "data.saerl.num_prompts") == str(3 * 8) and value(o, "data.saerl.actor") == "actor-x"
    assert value(o, "trainer.total_training_steps") == "3" and value(o, "trainer.total_epochs") == "1"
    assert value(o, "trainer.save_freq") == "5" and value(o, "trainer.resume_mode") == "auto"
    assert value(o, "trainer.n_gpus_per_node") == "2" and value(o, "data.max_response_length") == "96"
    assert value(o, "actor_rollout_ref.rollout.seed") == "7"
    assert value(o, "trainer.use_v1") == "false" and value(o, "data.shuffle") == "false"
    assert value(o, "data.dataloader_num_workers") == "0"
    assert value(o, "reward.custom_reward_function.path") == str(launch.REWARD_FILE)
    assert value(o, "trainer.test_freq") == "-1" and value(o, "data.val_max_samples") == "1"  # no held-out set

    assert value(o, "actor_rollout_ref.model.enable_gradient_checkpointing") == "true"
    assert value(overrides_of(tmp_path, gradient_checkpointing=False),
                 "actor_rollout_ref.model.enable_gradient_checkpointing") == "false"

    g = overrides_of(tmp_path, save_every=0, resume=False)
    assert value(g, "trainer.save_freq") == "-1" and value(g, "trainer.resume_mode") == "disable"
    assert value(g, "data.train_batch_size") == str(BATCH)  # prompts_per_step unset: one plan batch per step
    assert value(g, "actor_rollout_ref.actor.use_kl_loss") == "false"  # kl_coef 0: no reference model
    assert value(g, "actor_rollout_ref.actor.optim.lr_scheduler_type") == "constant"


def test_grpo_and_dapo_presets(tmp_path):
    grpo = overrides_of(tmp_path, algo="grpo")
    assert value(grpo, "algorithm.adv_estimator") == "grpo" and value(grpo, "reward.reward_manager.name") == "naive"
    assert value(grpo, "actor_rollout_ref.actor.clip_ratio_high") == "<absent>"  # verl's default 0.2
    dapo = overrides_of(tmp_path, algo="dapo", max_new_tokens=64)
    assert value(dapo, "algorithm.adv_estimator") == "grpo"
    assert value(dapo, "actor_rollout_ref.actor.clip_ratio_low") == "0.2"
    assert value(dapo, "actor_rollout_ref.actor.clip_ratio_high") == "0.28"
    assert value(dapo, "actor_rollout_ref.actor.loss_agg_mode") == "token-mean"
    assert value(dapo, "actor_rollout_ref.actor.use_kl_loss") == "false"
    assert value(dapo, "reward.reward_manager.name") == "dapo"
    assert value(dapo, "reward.reward_kwargs.overlong_buffer_cfg.len") == "16"
    assert value(dapo, "reward.reward_kwargs.max_resp_len") == "64"
    assert not any(o.startswith("algorithm.filter_groups") for o in dapo)  # legacy trainer: no dynamic sampling


def test_extra_args_are_hydra_overrides_that_come_last(tmp_path):
    o = overrides_of(tmp_path, temperature=0.6, extra_args=["actor_rollout_ref.rollout.temperature=0.9",
                                                            "+trainer.extra_key=1"])
    assert o[-2:] == ["actor_rollout_ref.rollout.temperature=0.9", "+trainer.extra_key=1"]
    assert value(o, "actor_rollout_ref.rollout.temperature") == "0.9"  # Hydra: the last override wins


@pytest.mark.parametrize("fields, named", [
    ({"algo": "dapo", "kl_coef": 0.01}, "train.kl_coef"),
    ({"kl_coef": -0.1}, "train.kl_coef"),
    ({"temperature": 0.0}, "train.temperature"),
    ({"lr_scheduler": "linear"}, "train.lr_scheduler"),
    ({"prompts_per_step": 0}, "train.prompts_per_step"),
    ({"save_every": -2}, "train.save_every"),
    ({"heldout_every": 5}, "train.heldout_every"),
    ({"steps": 0}, "train.steps"),
    ({"trainable_layers": 4}, "train.trainable_layers"),
    ({"num_workers": 0}, "train.num_workers"),
    ({"extra_args": ["--rollout.temperature", "0.9"]}, "train.extra_args"),  # an OpenRLHF flag, not an override
    ({"extra_args": ["data.shuffle=true"]}, "train.extra_args"),
    ({"extra_args": ["algorithm.filter_groups.enable=true"]}, "algorithm.filter_groups"),
    ({"extra_args": ["trainer.use_v1=true"]}, "trainer.use_v1"),
    ({"extra_args": ["+data.custom_cls.path=x.py"]}, "data.custom_cls"),
    ({"extra_args": ["data.dataloader_num_workers=4"]}, "data.dataloader_num_workers"),
    ({"extra_args": ["trainer.default_local_dir=/shared/ckpt"]}, "trainer.default_local_dir"),
    ({"node_resource": ""}, "train.node_resource"),
])
def test_values_verl_cannot_honour_are_refused_by_name(tmp_path, fields, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        overrides_of(tmp_path, **fields)


def test_a_refused_config_starts_nothing(tmp_path):
    cfg = cfg_with(tmp_path, lr_scheduler="linear")
    with pytest.raises(ConfigError, match="train.lr_scheduler"):
        launch.run(cfg)  # no plan exists either: the config error comes first, before Ray or files
    assert not (tmp_path / "run").exists()


def test_train_dispatches_to_the_verl_backend(tmp_path, monkeypatch):
    from saerl_ray.trainers import train

    seen = []
    monkeypatch.setattr(launch, "run", lambda cfg: seen.append(cfg.train.backend) or {"backend": "verl"})
    assert train.run(cfg_with(tmp_path)) == {"backend": "verl"} and seen == ["verl"]


def write_plan(run_dir, n=8):
    from saerl_ray.core import storage

    st = Stage(run_dir, "plan", "test-plan")
    tmp = st.begin(keep_partial=False)
    table = pa.table({
        "position": pa.array(range(n), pa.int64()), "batch": pa.array([i // BATCH for i in range(n)], pa.int64()),
        "id": [f"p{i}" for i in range(n)], "prompt": [f"What is {i}+{i}?" for i in range(n)],
        "answer": [str(2 * i) for i in range(n)], "source": ["gsm8k"] * n,
        "cluster": pa.array([i // 4 for i in range(n)], pa.int32()),
        "difficulty_pred": pa.array([float(i) for i in range(n)], pa.float32()), "mixed": [False] * n,
    })
    storage.write_parquet(table, storage.join(tmp, "plan.parquet"))
    st.commit({"rows": n})
    return table


def test_dataset_is_verls_rl_format_in_plan_order(tmp_path):
    cfg = cfg_with(tmp_path)
    plan = write_plan(cfg.run_dir)
    rows = pq.read_table(launch.write_dataset(cfg)).to_pylist()
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(rows)))  # row i = plan position i
    assert [r["extra_info"]["id"] for r in rows] == plan.column("id").to_pylist()
    assert [r["extra_info"]["cluster"] for r in rows] == plan.column("cluster").to_pylist()
    assert [r["reward_model"] for r in rows] == [{"style": "rule", "ground_truth": a} for a in plan.column("answer").to_pylist()]
    assert {r["data_source"] for r in rows} == {"gsm8k"} and {r["ability"] for r in rows} == {"math"}
    assert all(r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].startswith(p)
               for r, p in zip(rows, plan.column("prompt").to_pylist()))
    # the prompt section reaches verl's chat list: a system turn first, the bare problem without instruction
    styled = cfg_with(tmp_path, **{"prompt.system": "Be brief.", "prompt.instruction": ""})
    first = pq.read_table(launch.write_dataset(styled)).to_pylist()[0]["prompt"]
    assert first == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": plan.column("prompt")[0].as_py().strip()}]


def test_reward_function_scores_like_the_other_backends_and_never_raises():
    from saerl_ray.trainers.verl_reward import compute_score

    assert compute_score("gsm8k", "so it is \\boxed{4}", "4") == {"score": 1.0, "acc": 1.0}
    assert compute_score("gsm8k", "it is 5", "4") == {"score": 0.0, "acc": 0.0}
    assert compute_score(None, None, None)["acc"] == 0.0


def test_a_finished_stage_is_not_rerun_and_its_fingerprint_tracks_the_config(tmp_path):
    cfg = cfg_with(tmp_path)
    write_plan(cfg.run_dir)
    fp = launch.stage_fingerprint(cfg, str(tmp_path))
    st = Stage(cfg.run_dir, "verl", fp)
    st.begin(keep_partial=False)
    st.commit({"backend": "verl", "prompts": 12})
    assert launch.run(cfg) == {"backend": "verl", "prompts": 12}  # done: no Ray, sampler or verl import
    assert launch.stage_fingerprint(cfg_with(tmp_path, resume=False), str(tmp_path)) == fp  # how, not what
    for changed in ({"kl_coef": 0.01}, {"algo": "dapo"}, {"prompts_per_step": 8}, {"sampler.mode": "static"},
                    {"seed": 1}, {"extra_args": ["trainer.val_before_train=false"]}):
        assert launch.stage_fingerprint(cfg_with(tmp_path, **changed), str(tmp_path)) != fp, changed


def test_heldout_file_becomes_verls_validation_set(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"{k}+{k}?", "answer": str(2 * k)}) + "\n" for k in range(3)))
    cfg = cfg_with(tmp_path, heldout_file=str(heldout), heldout_every=4)
    o = launch.build_overrides(cfg, tmp_path / "train.parquet", "policy", "actor-x")
    path = launch.write_heldout_file(cfg)
    assert value(o, "data.val_files") == str(path) and value(o, "trainer.test_freq") == "4"
    assert value(o, "data.val_max_samples") == "<absent>" and value(o, "trainer.val_before_train") == "true"
    rows = pq.read_table(path).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["0", "2", "4"]


def test_object_store_run_dir_dataset_in_the_bucket_checkpoints_in_node_scratch(tmp_path, s3_run_dir, monkeypatch):
    """An s3:// run_dir is accepted (it was refused): the dataset files verl's TaskRunner fetches are in
    the bucket; verl's checkpoint folder is node-local scratch, mirrored to the bucket by the trainer."""
    from saerl_ray.core import storage

    monkeypatch.setenv("SAERL_SCRATCH", str(tmp_path / "scratch"))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = cfg_with(tmp_path, run_dir=s3_run_dir, heldout_file=str(heldout), heldout_every=2,
                   node_resource="saerl_train_gpu")
    write_plan(cfg.run_dir)
    dataset = launch.write_dataset(cfg)
    o = launch.build_overrides(cfg, dataset, "policy", "actor-x")
    out = f"{s3_run_dir}/verl"
    assert dataset == value(o, "data.train_files") == f"{out}/train.parquet"
    assert launch.write_heldout_file(cfg) == value(o, "data.val_files") == f"{out}/heldout.parquet"
    assert storage.read_parquet(dataset).num_rows == 8
    scratch = launch.scratch_dir(cfg)
    assert scratch.startswith(str(tmp_path / "scratch")) and value(o, "trainer.default_local_dir") == f"{scratch}/ckpt"
    assert value(o, "data.saerl.stage_dir") == out and value(o, "data.saerl.scratch") == scratch
    assert value(o, "data.saerl.node_resource") == "saerl_train_gpu"
    assert value(overrides_of(tmp_path), "data.saerl.node_resource") == "<absent>"


def test_submit_script_and_runtime_env():
    script = (REPO / "jobs" / "submit_train_verl.sh").read_text()
    assert "--train.backend verl" in script and "jobs/runtime_env_verl.yaml" in script
    env = yaml.safe_load((REPO / "jobs" / "runtime_env_verl.yaml").read_text())
    assert env["working_dir"] == "." and "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" not in env["env_vars"]
    assert {k: env["env_vars"][k] for k in launch.VERL_ENV} == launch.VERL_ENV
