"""Train with OpenRLHF 0.11.2 on Ray, fed by the SaeRL curriculum (GPU clusters only).

    saerl-ray train --backend openrlhf -c configs/gsm8k_math500.yaml --train.algo dapo
    # or as a Ray job: jobs/submit_train_openrlhf.sh configs/gsm8k_math500.yaml

What it does, in order:
1. starts / joins Ray with the env vars OpenRLHF's driver would set, and creates (or restores
   from `<run_dir>/sampler/state.json`) the run's CurriculumSampler actor;
2. writes `<run_dir>/openrlhf/prompts.parquet` from `plan/plan.parquet`: one row per plan position
   (row i = position i), columns `prompt`, `datasource` and `label`, a JSON string
   `{"id", "answer", "cluster", "sampler", "n"}`: the reward file runs inside OpenRLHF's vLLM actors,
   whose runtime_env we cannot extend, so the label is how it learns the sampler actor and group size;
3. maps RunConfig to OpenRLHF's dotted flags (GRPO or DAPO preset; `train.extra_args` appended last,
   untouched, so they win), replaces `openrlhf.trainer.ppo_trainer.PPOTrainer` with
   `ray.remote(SaerlPPOTrainer)` and runs OpenRLHF's own CLI module (`train_ppo_ray`) as `__main__`.
OpenRLHF is imported only inside `run` / `parse_flags`; building flags needs nothing but the config.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from saerl_ray.config import RunConfig

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
REWARD_FILE = Path(__file__).with_name("openrlhf_reward.py")
SAMPLER_NAMESPACE = "saerl"
# Appended to every training prompt: the reward reads the last \boxed{} answer.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# OpenRLHF's driver sets these in its own ray.init, which it skips when Ray is already up (ours).
OPENRLHF_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
# The async trainer builds its own loader in another actor; only the sync/hybrid trainer is patched.
UNSUPPORTED = ("--train.async_enable", "--data.prompt_dataset", "--data.label_key")


def out_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "openrlhf"


def write_prompt_file(cfg: RunConfig, sampler_actor: str, group_size: int) -> Path:
    """Plan -> OpenRLHF prompt dataset, row i = plan position i (the sampler yields positions)."""
    plan_path = Path(cfg.run_dir) / "plan" / "plan.parquet"
    if not plan_path.exists():
        raise FileNotFoundError(f"{plan_path} not found: run `saerl-ray plan` first")
    plan = pq.read_table(plan_path, columns=["position", "id", "prompt", "answer", "source", "cluster"])
    pos = plan.column("position").to_pylist()
    if pos != list(range(len(pos))):
        raise ValueError(f"{plan_path}: column 'position' must be 0..{len(pos) - 1} in row order")
    labels = [
        json.dumps({"id": i, "answer": a, "cluster": int(c), "sampler": sampler_actor, "n": group_size})
        for i, a, c in zip(plan.column("id").to_pylist(), plan.column("answer").to_pylist(), plan.column("cluster").to_pylist())
    ]
    table = pa.table({
        "prompt": [f"{p}\n{INSTRUCTION}" for p in plan.column("prompt").to_pylist()],
        "label": labels,
        "datasource": plan.column("source"),
    })
    path = out_dir(cfg) / "prompts.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def algo_flags(algo: str, max_new_tokens: int) -> list[str]:
    """GRPO / DAPO presets in OpenRLHF 0.11's dotted dialect (see anchors.md §1.6)."""
    if algo == "grpo":
        return [
            "--algo.advantage.estimator", "group_norm",
            "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", "1e-3",
        ]
    if algo == "dapo":
        return [
            "--algo.advantage.estimator", "group_norm",
            "--actor.eps_clip_low_high", "0.2", "0.28",
            "--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0", "1",
            # DAPO's soft overlong punishment over the last quarter of the response budget.
            "--reward.overlong_buffer_len", str(max(1, max_new_tokens // 4)),
            "--reward.overlong_penalty_factor", "1.0",
            "--actor.loss_agg_mode", "token-mean",
            # DAPO drops the KL term, so no reference model is built.
            "--algo.kl.init_coef", "0",
        ]
    raise ValueError(f"train.algo must be grpo or dapo, got {algo!r}")


def build_flags(cfg: RunConfig, prompt_file: Path, policy: str) -> list[str]:
    """RunConfig -> OpenRLHF CLI flags; `train.extra_args` last so any of them can be overridden."""
    for flag in UNSUPPORTED:
        if flag in cfg.train.extra_args:
            raise ValueError(f"train.extra_args: {flag} is not supported with the curriculum trainer")
    t, out = cfg.train, out_dir(cfg)
    gpus = max(1, t.num_workers)
    rollout = cfg.plan.batch_size
    flags = [
        "--actor.model_name_or_path", policy,
        "--data.prompt_dataset", str(prompt_file),
        # Prompts go through the policy's chat template, as the Instruct/Math policies were tuned.
        "--data.input_key", "prompt", "--data.label_key", "label", "--data.apply_chat_template",
        "--data.dataloader_num_workers", "0",
        # Prompt budget on top of the response budget.
        "--data.max_len", str(t.max_new_tokens + 1024),
        "--rollout.max_new_tokens", str(t.max_new_tokens),
        "--rollout.batch_size", str(rollout),
        "--rollout.n_samples_per_prompt", str(t.num_generations),
        # One policy update per rollout batch (on-policy GRPO/DAPO).
        "--train.batch_size", str(rollout * t.num_generations),
        "--train.max_epochs", "1", "--train.num_episodes", "1",
        "--train.seed", str(cfg.seed),
        "--actor.adam.lr", str(t.learning_rate),
        # Hybrid engine: vLLM and DeepSpeed share every GPU and sleep in turn.
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", str(gpus),
        "--ref.num_nodes", "1", "--ref.num_gpus_per_node", str(gpus),
        "--vllm.num_engines", str(gpus), "--vllm.tensor_parallel_size", "1",
        "--vllm.gpu_memory_utilization", "0.5",
        "--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep",
        "--actor.gradient_checkpointing_enable",
        "--reward.remote_url", str(REWARD_FILE),
        "--ckpt.output_dir", str(out / "model"),
        "--ckpt.path", str(out / "ckpt"),
        "--ckpt.save_steps", str(cfg.sampler.checkpoint_every), "--ckpt.load_enable",
        "--logger.tensorboard_dir", str(out / "tensorboard"),
    ]
    return flags + algo_flags(t.algo, t.max_new_tokens) + list(t.extra_args)


def flag_value(flags: list[str], name: str, default: str) -> str:
    """Last value given for `name` (argparse semantics: the last occurrence wins)."""
    value = default
    for i, f in enumerate(flags[:-1]):
        if f == name:
            value = flags[i + 1]
    return value


def trainer_env(sampler_actor: str, main_prompts: int) -> dict[str, str]:
    """Env vars for the trainer actor (given via `.options(runtime_env=...)` when it is created)."""
    return {"SAERL_SAMPLER_ACTOR": sampler_actor, "SAERL_NUM_PROMPTS": str(main_prompts)}


def actor_name(handle: Any) -> str:
    """The registered name of a named actor handle (namespace "saerl")."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != SAMPLER_NAMESPACE:
            continue
        if ray.get_actor(entry["name"], namespace=SAMPLER_NAMESPACE)._actor_id == handle._actor_id:
            return entry["name"]
    raise RuntimeError("the CurriculumSampler actor has no name in namespace 'saerl'")


class _Parsed(Exception):
    def __init__(self, parsed: Any):
        super().__init__("parsed")
        self.parsed = parsed


def parse_flags(flags: list[str]) -> Any:
    """Parse and validate flags with OpenRLHF's real CLI (its parser lives under `__main__`).

    Runs the CLI module up to the first line of `train(args)` after `get_strategy` would be
    called, i.e. after every validation assert, and returns the hierarchical args namespace.
    argparse errors surface as SystemExit(2), failed validations as AssertionError.
    """
    import openrlhf.utils

    def stop(args: Any) -> None:
        raise _Parsed(args)

    # train() calls ray.init when Ray is down, then get_strategy(args): stop there, before any work.
    with mock.patch.object(sys, "argv", [CLI_MODULE, *flags]), \
         mock.patch("ray.is_initialized", return_value=True), \
         mock.patch.object(openrlhf.utils, "get_strategy", stop):
        try:
            runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)
        except _Parsed as done:
            return done.parsed
    raise RuntimeError(f"{CLI_MODULE} returned without reaching train(args)")


def install_trainer(env: dict[str, str]) -> None:
    """Make OpenRLHF's CLI build our trainer: it imports PPOTrainer from this module at call time."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import ray

    from saerl_ray.integrations.openrlhf_trainer import SaerlPPOTrainer

    ppo_trainer.PPOTrainer = ray.remote(SaerlPPOTrainer).options(runtime_env={"env_vars": env})


def run(cfg: RunConfig) -> dict:
    """`saerl-ray train --backend openrlhf`: start the sampler, write prompts, run OpenRLHF."""
    import ray

    from saerl_ray.models import resolve
    from saerl_ray.sampler import get_or_create_sampler

    # A job's runtime_env and this driver's ray.init both set env_vars; let the driver's win.
    os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    if not ray.is_initialized():
        env = {k: os.environ.get(k, v) for k, v in OPENRLHF_ENV.items()}
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})
    sampler = get_or_create_sampler(cfg)
    name = actor_name(sampler)
    policy = str(resolve(cfg.train.policy or cfg.model.name))
    flags = build_flags(cfg, out_dir(cfg) / "prompts.parquet", policy)
    group = int(flag_value(flags, "--rollout.n_samples_per_prompt", "1"))
    write_prompt_file(cfg, name, group)
    main_prompts = cfg.train.steps * int(flag_value(flags, "--rollout.batch_size", str(cfg.plan.batch_size)))
    install_trainer(trainer_env(name, main_prompts))
    print(f"[saerl-ray] openrlhf: {cfg.train.algo} on {policy}, {main_prompts} prompts, flags: {' '.join(flags)}", flush=True)
    with mock.patch.object(sys, "argv", [CLI_MODULE, *flags]):
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)
    stats = ray.get(sampler.stats.remote())
    ray.get(sampler.checkpoint.remote())
    summary = {"backend": "openrlhf", "algo": cfg.train.algo, "prompts": main_prompts, "sampler": stats,
               "model_dir": str(out_dir(cfg) / "model")}
    (out_dir(cfg) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[saerl-ray] openrlhf: done, model in {summary['model_dir']}", flush=True)
    return summary
