"""How `train.*` reaches OpenRLHF, checked without OpenRLHF (core env, part of `make test`).

The same mapping is checked through OpenRLHF 0.11.2's own parser in test_openrlhf_on_cpu.py
(`make test-openrlhf`); here: the flags we build, what we refuse, and the stage bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from saerl_ray.core.config import ConfigError, load_config
from saerl_ray.core.stage import Stage
from saerl_ray.trainers import openrlhf_launch as launch
from saerl_ray.trainers.openrlhf_reward import parse_label

BATCH, GROUP = 4, 4


def cfg_with(tmp_path, **fields):
    return load_config(None, {
        "run_dir": str(tmp_path / "run"), "model.name": str(tmp_path), "plan.batch_size": BATCH,
        "train.backend": "openrlhf", "train.num_generations": GROUP, "train.steps": 3,
        **{k if "." in k or k in ("seed", "run_dir") else f"train.{k}": v for k, v in fields.items()},
    })


def flags_of(tmp_path, **fields):
    return launch.build_flags(cfg_with(tmp_path, **fields), tmp_path / "p.parquet", "policy")


def value(flags, name):
    return launch.flag_value(flags, name, "<absent>")


def test_each_train_field_becomes_its_openrlhf_flag(tmp_path):
    f = flags_of(tmp_path, lr_scheduler="cosine", kl_coef=0.02, temperature=0.6, prompts_per_step=8,
                 save_every=5, resume=True, learning_rate=2e-6)
    assert value(f, "--actor.lr_scheduler") == "cosine" and value(f, "--actor.lr_warmup_ratio") == "0"
    assert float(value(f, "--algo.kl.init_coef")) == 0.02 and "--algo.kl.use_loss" in f
    assert float(value(f, "--rollout.temperature")) == 0.6
    assert value(f, "--rollout.batch_size") == "8" and value(f, "--train.batch_size") == str(8 * GROUP)
    assert value(f, "--ckpt.save_steps") == "5" and "--ckpt.load_enable" in f
    assert float(value(f, "--actor.adam.lr")) == 2e-6
    assert value(f, "--eval.dataset") == "<absent>"  # no held-out file: no eval

    g = flags_of(tmp_path, lr_scheduler="linear", save_every=0, resume=False)
    assert value(g, "--actor.lr_scheduler") == "linear"
    assert "--actor.gradient_checkpointing_enable" in f
    assert "--actor.gradient_checkpointing_enable" not in flags_of(tmp_path, gradient_checkpointing=False)
    assert value(g, "--ckpt.save_steps") == "-1" and "--ckpt.load_enable" not in g  # never; start fresh
    assert value(g, "--rollout.batch_size") == str(BATCH)  # prompts_per_step unset: one plan batch per step
    assert float(value(g, "--algo.kl.init_coef")) == 0.0  # the config's default, not a hard-coded 1e-3


def test_extra_args_still_win_over_mapped_fields(tmp_path):
    f = flags_of(tmp_path, temperature=0.6, extra_args=["--rollout.temperature", "0.9"])
    assert value(f, "--rollout.temperature") == "0.9"  # argparse: the last occurrence wins


@pytest.mark.parametrize("fields, named", [
    ({"algo": "dapo", "kl_coef": 0.01}, "train.kl_coef"),
    ({"kl_coef": -0.1}, "train.kl_coef"),
    ({"temperature": 0.0}, "train.temperature"),
    ({"prompts_per_step": 0}, "train.prompts_per_step"),
    ({"save_every": -2}, "train.save_every"),
    ({"heldout_every": 5}, "train.heldout_every"),
    ({"steps": 0}, "train.steps"),
    ({"prompt.system": "Be brief."}, "prompt.system"),
    ({"trainable_layers": 4}, "train.trainable_layers"),
    ({"extra_args": ["--train.async_enable"]}, "train.extra_args"),
    ({"extra_args": ["--ckpt.path", "/nfs/ckpts"]}, "train.extra_args"),  # the trainer empties it per node
    ({"node_resource": " "}, "train.node_resource"),
])
def test_values_openrlhf_cannot_honour_are_refused_by_name(tmp_path, fields, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        flags_of(tmp_path, **fields)


def test_dapo_runs_without_kl_and_grpo_kl_follows_the_config(tmp_path):
    assert float(value(flags_of(tmp_path, algo="dapo"), "--algo.kl.init_coef")) == 0.0
    assert float(value(flags_of(tmp_path, algo="grpo", kl_coef=1e-3), "--algo.kl.init_coef")) == 1e-3


def test_a_refused_config_starts_nothing(tmp_path):
    cfg = cfg_with(tmp_path, algo="dapo", kl_coef=0.1)
    with pytest.raises(ConfigError, match="train.kl_coef"):
        launch.run(cfg)  # no plan exists either: the config error comes first, before Ray or files
    assert not (tmp_path / "run").exists()


def commit_plan(run_dir, fp="plan-a"):
    st = Stage(run_dir, "plan", fp)
    st.begin(keep_partial=False)
    st.commit({"rows": 0})


def test_a_finished_stage_is_not_rerun_and_its_fingerprint_tracks_the_config(tmp_path):
    cfg = cfg_with(tmp_path)
    commit_plan(cfg.run_dir)
    fp = launch.stage_fingerprint(cfg, str(tmp_path))
    st = Stage(cfg.run_dir, "openrlhf", fp)
    st.begin(keep_partial=False)
    st.commit({"backend": "openrlhf", "prompts": 12})
    # Done for this config: run() returns the committed summary without Ray, a sampler or a plan file.
    assert launch.run(cfg) == {"backend": "openrlhf", "prompts": 12}
    assert launch.stage_fingerprint(cfg_with(tmp_path, resume=False), str(tmp_path)) == fp  # how, not what
    for changed in ({"kl_coef": 0.01}, {"temperature": 0.5}, {"prompts_per_step": 8}, {"save_every": 3},
                    {"lr_scheduler": "linear"}, {"sampler.mode": "static"}, {"seed": 1}):
        assert launch.stage_fingerprint(cfg_with(tmp_path, **changed), str(tmp_path)) != fp, changed
    assert launch.stage_fingerprint(cfg, "other-policy") != fp
    commit_plan(cfg.run_dir, "plan-b")  # a new plan retrains
    assert launch.stage_fingerprint(cfg, str(tmp_path)) != fp


def test_heldout_file_becomes_an_eval_set_the_reward_file_does_not_report(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"{k}+{k}?", "answer": str(2 * k)}) + "\n" for k in range(3)))
    cfg = cfg_with(tmp_path, heldout_file=str(heldout), heldout_every=4)
    f = launch.build_flags(cfg, tmp_path / "p.parquet", "policy")
    path = launch.write_heldout_file(cfg)
    assert value(f, "--eval.dataset") == str(path) and value(f, "--eval.steps") == "4"
    assert value(f, "--eval.temperature") == "0" and value(f, "--eval.n_samples_per_prompt") == "1"
    rows = pq.read_table(path).to_pylist()
    assert [r["prompt"].split("\n")[0] for r in rows] == ["0+0?", "1+1?", "2+2?"]
    assert all(r["prompt"].endswith("\\boxed{}.") for r in rows)  # the default instruction line
    bare = pq.read_table(launch.write_heldout_file(cfg_with(tmp_path, heldout_file=str(heldout), heldout_every=4,
                                                            **{"prompt.instruction": ""}))).to_pylist()
    assert [r["prompt"] for r in bare] == ["0+0?", "1+1?", "2+2?"]  # prompt.instruction reaches OpenRLHF's text
    labels = [parse_label(r["label"]) for r in rows]
    assert [lb["answer"] for lb in labels] == ["0", "2", "4"] and all(lb["sampler"] is None for lb in labels)
    assert str(Path(path).parent) == launch.out_dir(cfg)


def test_object_store_run_dir_inputs_in_the_bucket_outputs_in_node_scratch(tmp_path, s3_run_dir, monkeypatch):
    """An s3:// run_dir is accepted (it was refused): the prompt/held-out files the trainer actor fetches
    are in the bucket, and every path DeepSpeed/OpenRLHF writes with file I/O is node-local scratch."""
    monkeypatch.setenv("SAERL_SCRATCH", str(tmp_path / "scratch"))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = cfg_with(tmp_path, run_dir=s3_run_dir, heldout_file=str(heldout), heldout_every=2)
    out = launch.out_dir(cfg)
    assert out == f"{s3_run_dir}/openrlhf"
    f = launch.build_flags(cfg, f"{out}/prompts.parquet", "policy")
    scratch = launch.scratch_dir(cfg)
    assert scratch.startswith(str(tmp_path / "scratch"))
    assert value(f, "--data.prompt_dataset") == f"{out}/prompts.parquet"
    assert value(f, "--eval.dataset") == launch.write_heldout_file(cfg) == f"{out}/heldout.parquet"
    for flag in ("--ckpt.path", "--ckpt.output_dir", "--logger.tensorboard_dir"):
        assert value(f, flag).startswith(scratch + "/"), flag
    from saerl_ray.core import storage

    assert storage.read_parquet(f"{out}/heldout.parquet").column("datasource").to_pylist() == ["heldout"]


def test_node_resource_goes_on_every_gpu_bundle_one_unit_per_gpu():
    bundles = [{"GPU": 1, "CPU": 1}, {"GPU": 2, "CPU": 1}, {"CPU": 4}]
    assert launch.with_node_resource(bundles, "saerl_train_gpu") == [
        {"GPU": 1, "CPU": 1, "saerl_train_gpu": 1.0}, {"GPU": 2, "CPU": 1, "saerl_train_gpu": 2.0}, {"CPU": 4}]
    assert launch.with_node_resource(bundles, None) == bundles
    assert bundles[0] == {"GPU": 1, "CPU": 1}  # the caller's list is not modified


def test_node_resource_reaches_placement_groups_ray_creates(ray_cluster):
    """The wrapper the launcher installs around OpenRLHF's CLI: a PACK group of GPU bundles asks for the
    custom resource, so on a cluster without it the group stays pending instead of landing anywhere."""
    import importlib
    import sys
    import types

    import ray

    pg_module = importlib.import_module("ray.util.placement_group")

    # OpenRLHF's modules that import `placement_group` by name; stand-ins where OpenRLHF is absent.
    fakes = {}
    for name in ("openrlhf", "openrlhf.trainer", "openrlhf.trainer.ray", "openrlhf.trainer.ray.launcher",
                 "openrlhf.trainer.ray.vllm_engine"):
        if name not in sys.modules:
            fakes[name] = sys.modules[name] = types.ModuleType(name)
    original = pg_module.placement_group
    try:
        with launch.node_typed_placement_groups("saerl_train_gpu"):
            pg = pg_module.placement_group([{"CPU": 0.01}, {"CPU": 0.01, "GPU": 1}], strategy="PACK")
        assert pg_module.placement_group is original  # restored on exit
        ready, _ = ray.wait([pg.ready()], timeout=2)
        assert not ready  # no node advertises saerl_train_gpu (nor a GPU) on this CPU cluster
        spec = ray.util.placement_group_table(pg)
        assert spec["bundles"][1] == {"CPU": 0.01, "GPU": 1.0, "saerl_train_gpu": 1.0}
        assert spec["bundles"][0] == {"CPU": 0.01}
        ray.util.remove_placement_group(pg)
    finally:
        for name in fakes:
            sys.modules.pop(name, None)


def test_placement_fields_do_not_change_the_stage_fingerprint(tmp_path, monkeypatch):
    """A resumed run that adds train.node_resource (as the cluster docs say) must keep its stage: another
    fingerprint would make Stage.begin delete the stored checkpoints."""
    from saerl_ray.core import stage
    from saerl_ray.trainers.common import stage_fingerprint

    monkeypatch.setattr(stage, "marker_of", lambda run_dir, name: f"{name}-marker")

    base = stage_fingerprint(cfg_with(tmp_path), "policy")
    assert stage_fingerprint(cfg_with(tmp_path, node_resource="saerl_train_gpu"), "policy") == base
    assert stage_fingerprint(cfg_with(tmp_path, resume=False), "policy") == base
    assert stage_fingerprint(cfg_with(tmp_path, steps=7), "policy") != base
