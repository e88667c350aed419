"""Train with verl 0.9.1 on Ray, fed by the SaeRL curriculum (GPU clusters only).

    saerl-ray train -c configs/gsm8k_math500.yaml --train.backend verl --train.algo dapo
    # or as a Ray job: jobs/submit_train_verl.sh configs/gsm8k_math500.yaml

What it does, in order:
1. starts / joins Ray and creates (or restores from `<run_dir>/sampler/`) the run's CurriculumSampler actor;
2. writes `<run_dir>/verl/train.parquet` from `plan/plan.parquet` in verl's RL dataset format, one row
   per plan position (row i = position i): `prompt` (chat messages), `data_source`, `ability`,
   `reward_model` = {"style": "rule", "ground_truth": answer}, `extra_info` = {"index": position,
   "id", "cluster", "split"};
3. maps RunConfig to Hydra overrides of verl's own `ppo_trainer` config (GRPO or DAPO preset;
   `train.extra_args` are Hydra overrides appended last, so they win, except the keys the curriculum
   depends on, which are refused), composes it with verl's Hydra config, runs verl's `validate_config`
   and then `verl.trainer.main_ppo.run_ppo(config, task_runner_class=ray.remote(SaerlTaskRunner))`
   (`verl_trainer.py`: the curriculum sampler and the reward hook, inside verl's TaskRunner actor);
4. commits `<run_dir>/verl/` as a stage (`_DONE.json`): a rerun with the same config is a no-op.
Files on a cluster whose nodes share only the run directory (saerl_ray.trainers.run_files): the dataset
files are written to `<run_dir>/verl/` through `storage` and fetched by verl's TaskRunner actor onto its
own node; `trainer.default_local_dir` is a node-local scratch folder whose checkpoints are uploaded to
`<run_dir>/verl/ckpt/` after every save and downloaded onto every node on resume (`verl_trainer.py`).
`train.node_resource` becomes every resource pool's `accelerator_type` (verl's own custom-resource hook).
verl is imported only inside `compose` / `run`; building overrides needs nothing but the config.

How `train.*` reaches verl 0.9.1 (`check_config` refuses what has no faithful mapping, naming the field):
    steps             -> trainer.total_training_steps; the sampler's loader epoch is steps x prompts_per_step
                         prompts (trainer.total_epochs=1), so len(train_dataloader) == steps
    prompts_per_step  -> data.train_batch_size = actor.ppo_mini_batch_size (one on-policy update per step);
                         None: plan.batch_size
    num_generations   -> actor_rollout_ref.rollout.n        max_new_tokens -> data.max_response_length
    temperature       -> actor_rollout_ref.rollout.temperature (> 0)
    learning_rate     -> actor_rollout_ref.actor.optim.lr, no warmup
    lr_scheduler      -> actor.optim.lr_scheduler_type constant|cosine ("linear" has no verl scheduler: refused)
    kl_coef           -> GRPO: actor.use_kl_loss (kl_coef > 0), kl_loss_coef, kl_loss_type=low_var_kl (k3);
                         0 builds no reference model. DAPO has no KL term: kl_coef > 0 is refused.
    save_every        -> trainer.save_freq (0: -1, never)
    resume            -> trainer.resume_mode auto | disable (false also empties verl/ first)
    heldout_file/_every -> data.val_files <verl/heldout.parquet>, trainer.test_freq (verl's greedy val_kwargs)
    num_workers       -> trainer.n_gpus_per_node (one node; FSDP actor + vLLM rollout, hybrid engine)
    gradient_checkpointing -> actor_rollout_ref.model.enable_gradient_checkpointing
    trainable_layers  -> refused unless null (verl updates every layer)
    use_gpu, cpus_per_worker: TRL/Ray Train placement only; verl places its own GPU workers.
Presets: GRPO = algorithm.adv_estimator=grpo, group-std normalisation, verl's default clip (0.2) and
token-mean loss. DAPO = grpo advantages, clip-higher (clip_ratio_low 0.2 / clip_ratio_high 0.28),
token-mean loss, no KL, the `dapo` reward manager with an overlong buffer of max_new_tokens/4.
DAPO's dynamic sampling (`algorithm.filter_groups`) exists in verl 0.9.1 only in the V1 trainer's
replay buffer, not in the legacy trainer this backend drives, so it is off and a `filter_groups`
override is refused (docs/trainers.md, "Training with verl").
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from saerl_ray.core import storage
from saerl_ray.core.config import ConfigError, RunConfig
from saerl_ray.sampler.actor import SAMPLER_NAMESPACE
from saerl_ray.trainers.common import (  # noqa: F401 (stage_fingerprint: part of this module's API)
    backend_stage,
    common_train_errors,
    join_ray,
    prompts_per_step,
    read_plan_in_order,
    stage_fingerprint,
)
from saerl_ray.trainers.run_files import node_scratch

STAGE = "verl"
VERL_VERSION = "0.9.1"
REWARD_FILE = Path(__file__).with_name("verl_reward.py")
# train.lr_scheduler -> verl's optim.lr_scheduler_type (verl/workers/config/optimizer.py: constant | cosine).
LR_SCHEDULERS = {"constant": "constant", "cosine": "cosine"}
# What verl's run_ppo puts in its own ray.init runtime_env (verl/trainer/constants_ppo.py); it skips that
# when Ray is already up (ours). Under a job they come from jobs/runtime_env_verl.yaml.
VERL_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "VLLM_LOGGING_LEVEL": "WARN",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_DISABLE_COMPILE_CACHE": "1"}
# Prompt budget on top of the response budget (as the OpenRLHF backend's --data.max_len).
MAX_PROMPT_TOKENS = 1024
# Override keys the curriculum depends on: a `train.extra_args` entry setting one (or a key below one)
# is refused, naming it. The values say why.
PROTECTED = {
    "data.train_files": "the plan's dataset (row i = plan position i) is the only training set",
    "data.shuffle": "the curriculum sampler decides the order",
    "data.dataloader_num_workers": "worker prefetch reorders the curriculum; it must stay 0",
    "data.gen_batch_size": "the sampler serves one train_batch_size batch per step",
    "data.custom_cls": "the dataset must be verl's RLHFDataset over the plan file",
    "data.filter_overlong_prompts": "dropping rows would break row i = plan position i",
    "data.train_max_samples": "dropping rows would break row i = plan position i",
    "data.saerl": "set by the launcher",
    "trainer.default_local_dir": "a node-local scratch folder the backend mirrors to <run_dir>/verl/ckpt",
    "trainer.use_v1": "the curriculum plugs into verl's legacy RayPPOTrainer (trainer.use_v1=false)",
    "trainer.v1": "the V1 trainer is not used",
    "trainer.total_epochs": "one loader epoch is the whole run (train.steps)",
    "trainer.total_training_steps": "set it with train.steps",
    "trainer.critic_warmup": "steps without an actor update would not report their rewards to the sampler",
    "algorithm.filter_groups": "DAPO dynamic sampling exists only in verl's V1 trainer, which this backend does not drive",
    "reward.custom_reward_function": "the sampler reads the reward function's 0/1 `acc`",
}
# train.extra_args entries: Hydra overrides `key=value`, `+key=value`, `++key=value` or `~key`.
_OVERRIDE = re.compile(r"^(\+\+|\+|~)?([A-Za-z_][\w.@/-]*)(=.*)?$", re.S)


def out_dir(cfg: RunConfig) -> str:
    """`<run_dir>/verl`: an absolute local path (other processes have other working dirs) or a URI."""
    return storage.join(storage.resolve(cfg.run_dir), STAGE)


def scratch_dir(cfg: RunConfig) -> str:
    """The node-local folder verl checkpoints into (same path string on every node)."""
    return node_scratch(cfg.run_dir, STAGE)



def override_key(arg: str) -> str | None:
    m = _OVERRIDE.match(arg)
    if not m or (m.group(1) != "~" and m.group(3) is None):
        return None
    return m.group(2)


def check_config(cfg: RunConfig) -> None:
    """Refuse `train.*` values the verl backend cannot honour; each error names its field."""
    t = cfg.train
    errors = []
    for arg in t.extra_args:
        key = override_key(arg)
        if key is None:
            errors.append(f"train.extra_args: {arg!r} is not a Hydra override (key=value, +key=value, ~key); "
                          "the verl backend passes overrides of verl's ppo_trainer config, not CLI flags")
            continue
        for protected, why in PROTECTED.items():
            if key == protected or key.startswith(protected + "."):
                errors.append(f"train.extra_args: {arg!r} sets {protected}, which the curriculum backend fixes: {why}")
    if t.lr_scheduler not in LR_SCHEDULERS:
        errors.append(f"train.lr_scheduler={t.lr_scheduler!r} has no verl mapping (verl {VERL_VERSION} "
                      f"optim.lr_scheduler_type is one of {sorted(LR_SCHEDULERS)})")
    if t.num_workers < 1:
        errors.append(f"train.num_workers must be >= 1 (GPUs), got {t.num_workers}")
    if t.algo == "dapo" and t.max_new_tokens < 2:
        errors.append(f"train.max_new_tokens={t.max_new_tokens} leaves no room for DAPO's overlong buffer")
    errors += common_train_errors(cfg, "verl")
    if errors:
        raise ConfigError("; ".join(errors))


def algo_overrides(algo: str, max_new_tokens: int, kl_coef: float = 0.0) -> list[str]:
    """GRPO / DAPO presets as overrides of verl 0.9.1's ppo_trainer config."""
    common = ["algorithm.adv_estimator=grpo", "algorithm.norm_adv_by_std_in_grpo=true",
              "algorithm.use_kl_in_reward=false"]
    if algo == "grpo":
        return common + [
            # GRPO's KL as a k3 (low_var_kl) loss term; 0 builds no reference model.
            f"actor_rollout_ref.actor.use_kl_loss={'true' if kl_coef > 0 else 'false'}",
            f"actor_rollout_ref.actor.kl_loss_coef={float(kl_coef)!r}",
            "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
            "reward.reward_manager.name=naive",
        ]
    if algo == "dapo":
        buffer = max(1, max_new_tokens // 4)
        return common + [
            "actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.28",
            "actor_rollout_ref.actor.loss_agg_mode=token-mean",
            "actor_rollout_ref.actor.use_kl_loss=false", "actor_rollout_ref.actor.kl_loss_coef=0.0",
            # DAPO's soft overlong punishment over the last quarter of the response budget.
            "reward.reward_manager.name=dapo",
            "+reward.reward_kwargs.overlong_buffer_cfg.enable=true",
            f"+reward.reward_kwargs.overlong_buffer_cfg.len={buffer}",
            "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
            "+reward.reward_kwargs.overlong_buffer_cfg.log=false",
            f"+reward.reward_kwargs.max_resp_len={max_new_tokens}",
        ]
    raise ConfigError(f"train.algo must be grpo or dapo, got {algo!r}")


def build_overrides(cfg: RunConfig, dataset: str | Path, policy: str, sampler_actor: str) -> list[str]:
    """RunConfig -> Hydra overrides of verl's ppo_trainer config; `train.extra_args` last (they win)."""
    check_config(cfg)
    t, out = cfg.train, out_dir(cfg)
    step = prompts_per_step(cfg)
    heldout = bool(t.heldout_file and t.heldout_every)
    micro = max(1, min(4, step))
    overrides = [
        # The curriculum: verl's RLHFDataset over the plan file, in the sampler actor's order.
        f"data.train_files={dataset}",
        f"data.val_files={storage.join(out, 'heldout.parquet') if heldout else dataset}",
        *([] if heldout else ["data.val_max_samples=1"]),  # verl requires a val set; one row, never run
        "data.prompt_key=prompt", "data.shuffle=false", "data.dataloader_num_workers=0",
        "data.filter_overlong_prompts=false",
        f"data.max_prompt_length={MAX_PROMPT_TOKENS}", f"data.max_response_length={t.max_new_tokens}",
        f"data.train_batch_size={step}",
        f"+data.saerl.actor={sampler_actor}", f"+data.saerl.namespace={SAMPLER_NAMESPACE}",
        f"+data.saerl.num_prompts={t.steps * step}",
        # Where the TaskRunner fetches the dataset from and the checkpoints go (verl_trainer.py).
        f"+data.saerl.stage_dir={out}", f"+data.saerl.scratch={scratch_dir(cfg)}",
        *([f"+data.saerl.node_resource={t.node_resource}"] if t.node_resource else []),
        f"actor_rollout_ref.model.path={policy}",
        f"actor_rollout_ref.actor.optim.lr={float(t.learning_rate)!r}",
        f"actor_rollout_ref.actor.optim.lr_scheduler_type={LR_SCHEDULERS[t.lr_scheduler]}",
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
        # One policy update per rollout batch (on-policy GRPO/DAPO).
        f"actor_rollout_ref.actor.ppo_mini_batch_size={step}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={str(t.gradient_checkpointing).lower()}",
        # Hybrid engine: the FSDP actor and vLLM share every GPU and sleep in turn.
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
        f"actor_rollout_ref.rollout.n={t.num_generations}",
        f"actor_rollout_ref.rollout.temperature={float(t.temperature)!r}",
        f"actor_rollout_ref.rollout.seed={cfg.seed}", f"actor_rollout_ref.actor.data_loader_seed={cfg.seed}",
        f"reward.custom_reward_function.path={REWARD_FILE}", "reward.custom_reward_function.name=compute_score",
        "trainer.use_v1=false", "trainer.total_epochs=1", f"trainer.total_training_steps={t.steps}",
        f"trainer.save_freq={t.save_every or -1}",
        f"trainer.resume_mode={'auto' if t.resume else 'disable'}",
        f"trainer.default_local_dir={Path(scratch_dir(cfg)) / 'ckpt'}",
        "trainer.nnodes=1", f"trainer.n_gpus_per_node={t.num_workers}",
        "trainer.logger=[console]", "trainer.project_name=saerl",
        f"trainer.experiment_name={Path(str(cfg.run_dir)).name or 'run'}-{t.algo}",
        f"trainer.val_before_train={'true' if heldout else 'false'}",
        f"trainer.test_freq={t.heldout_every if heldout else -1}",
    ]
    return overrides + algo_overrides(t.algo, t.max_new_tokens, t.kl_coef) + list(t.extra_args)


def config_dir() -> Path:
    """verl's Hydra config folder (what `@hydra.main(config_path="config")` in main_ppo.py reads)."""
    import verl

    return Path(verl.__file__).parent / "trainer" / "config"


def compose(overrides: list[str]) -> Any:
    """verl's `ppo_trainer` config with our overrides, composed by Hydra as `main_ppo.main` would get it.
    A bad override (unknown key, wrong type) is a ConfigError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            return hydra_compose(config_name="ppo_trainer", overrides=list(overrides))
    except Exception as e:  # hydra's ConfigCompositionException, OmegaConf's ConfigKeyError / ValidationError
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"verl {VERL_VERSION} refused the overrides (train.extra_args come last): {e}") from e


def validate(config: Any) -> None:
    """verl's own pre-run checks, exactly as `verl.trainer.main_ppo.main` runs them."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def _chat(prompt: str, cfg: RunConfig) -> list[dict[str, str]]:
    from saerl_ray.core.reward import format_messages, prompt_style

    return format_messages(prompt, **prompt_style(cfg.prompt))


def write_dataset(cfg: RunConfig) -> str:
    """Plan -> verl RL parquet, row i = plan position i (the sampler yields positions)."""
    plan = read_plan_in_order(cfg, ["id", "prompt", "answer", "source", "cluster"])
    pos = range(plan.num_rows)
    ids, answers = plan.column("id").to_pylist(), plan.column("answer").to_pylist()
    clusters = plan.column("cluster").to_pylist()
    table = pa.table({
        "prompt": [_chat(p, cfg) for p in plan.column("prompt").to_pylist()],
        "data_source": [str(s) for s in plan.column("source").to_pylist()],
        "ability": ["math"] * len(pos),
        "reward_model": [{"style": "rule", "ground_truth": str(a)} for a in answers],
        "extra_info": [{"index": p, "id": str(i), "cluster": int(c), "split": "train"}
                       for p, i, c in zip(pos, ids, clusters)],
    })
    path = storage.join(out_dir(cfg), "train.parquet")
    storage.write_parquet(table, path)
    return path


def write_heldout_file(cfg: RunConfig) -> str | None:
    """`train.heldout_file` as verl's validation set (same columns; ids `heldout-<k>`, never reported)."""
    t = cfg.train
    if not (t.heldout_file and t.heldout_every):
        return None
    from saerl_ray.trainers.common import read_heldout

    rows = read_heldout(t.heldout_file)
    if not rows:
        raise ConfigError(f"train.heldout_file {t.heldout_file}: no rows")
    table = pa.table({
        "prompt": [_chat(r["prompt"], cfg) for r in rows],
        "data_source": ["heldout"] * len(rows),
        "ability": ["math"] * len(rows),
        "reward_model": [{"style": "rule", "ground_truth": str(r["answer"])} for r in rows],
        "extra_info": [{"index": k, "id": f"heldout-{k}", "cluster": -1, "split": "test"} for k in range(len(rows))],
    })
    path = storage.join(out_dir(cfg), "heldout.parquet")
    storage.write_parquet(table, path)
    return path


def override_value(overrides: list[str], key: str, default: str) -> str:
    """Last value given for `key` (Hydra: the last override of a key wins)."""
    value = default
    for o in overrides:
        k, _, v = o.lstrip("+").partition("=")
        if k == key:
            value = v
    return value


def run(cfg: RunConfig) -> dict:
    """`saerl-ray train --train.backend verl`: start the sampler, write the dataset, run verl."""
    import ray

    from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

    t0 = time.time()
    check_config(cfg)  # before Ray, the sampler or any file: a bad field costs nothing
    st, policy, done = backend_stage(cfg, STAGE)
    if done is not None:
        return done
    st.begin(keep_partial=cfg.train.resume)  # an interrupted run keeps its checkpoints when resuming
    join_ray(cfg, VERL_ENV)
    sampler = get_or_create_sampler(cfg)
    name = actor_name(cfg.run_dir)
    dataset = write_dataset(cfg)
    write_heldout_file(cfg)
    overrides = build_overrides(cfg, dataset, policy, name)
    config = compose(overrides)
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    from saerl_ray.trainers.verl_trainer import SaerlTaskRunner

    auto_set_device(config)
    validate(config)
    step = prompts_per_step(cfg)
    print(f"[saerl-ray] verl: {cfg.train.algo} on {policy}, {cfg.train.steps} steps x {step} prompts, "
          f"overrides: {' '.join(overrides)}", flush=True)
    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(SaerlTaskRunner))
    stats = ray.get(sampler.stats.remote())
    ray.get(sampler.checkpoint.remote())
    summary = {"backend": "verl", "verl": VERL_VERSION, "algo": cfg.train.algo, "steps": cfg.train.steps,
               "prompts_per_step": step, "prompts": cfg.train.steps * step, "policy": policy, "sampler": stats,
               "checkpoints": storage.join(out_dir(cfg), "ckpt"), "overrides": overrides, "seconds": time.time() - t0}
    st.commit(summary)
    print(f"[saerl-ray] verl: done, checkpoints in {summary['checkpoints']}", flush=True)
    return summary
