"""Train with OpenRLHF 0.11.2 on Ray, fed by the SaeRL curriculum (GPU clusters only).

    saerl-ray train --train.backend openrlhf -c configs/gsm8k_math500.yaml --train.algo dapo
    # or as a Ray job: jobs/submit_train_openrlhf.sh configs/gsm8k_math500.yaml

What it does, in order:
1. starts / joins Ray with the env vars OpenRLHF's driver would set, and creates (or restores
   from `<run_dir>/sampler/state.json`) the run's CurriculumSampler actor;
2. writes `<run_dir>/openrlhf/prompts.parquet` (through `storage`: run_dir may be an object store)
   from `plan/plan.parquet`: one row per plan position
   (row i = position i), columns `prompt`, `datasource` and `label`, a JSON string
   `{"id", "answer", "cluster", "sampler", "n"}`: the reward file runs inside OpenRLHF's vLLM actors,
   whose runtime_env we cannot extend, so the label is how it learns the sampler actor and group size;
3. maps RunConfig to OpenRLHF's dotted flags (GRPO or DAPO preset; `train.extra_args` appended last,
   untouched, so they win), replaces `openrlhf.trainer.ppo_trainer.PPOTrainer` with
   `ray.remote(SaerlPPOTrainer)` and runs OpenRLHF's own CLI module (`train_ppo_ray`) as `__main__`;
4. commits `<run_dir>/openrlhf/` as a stage (`_DONE.json`): a rerun with the same config is a no-op.
Files on a cluster whose nodes share only the run directory (saerl_ray.trainers.run_files): the trainer
actor fetches the prompt and held-out files from `<run_dir>/openrlhf/` onto its own node; DeepSpeed
checkpoints, the final model and TensorBoard logs go to a node-local scratch folder (`--ckpt.path`,
`--ckpt.output_dir`, `--logger.tensorboard_dir`) and are uploaded to `<run_dir>/openrlhf/{ckpt,model,
tensorboard}` by one process per node after every save (checkpoints) and at the end (model, logs);
`train.resume` downloads the last uploaded checkpoint onto every node before DeepSpeed looks for it.
`train.node_resource` adds that custom resource (1 per GPU) to every GPU bundle OpenRLHF reserves.
OpenRLHF is imported only inside `run` / `parse_flags`; building flags needs nothing but the config.

How `train.*` reaches OpenRLHF 0.11.2 (`check_config` refuses what has no faithful mapping, naming the field):
    steps             -> prompts per episode = steps x prompts_per_step (the curriculum loader's length)
    prompts_per_step  -> --rollout.batch_size (None: plan.batch_size); --train.batch_size = it x num_generations
    num_generations   -> --rollout.n_samples_per_prompt        max_new_tokens -> --rollout.max_new_tokens
    temperature       -> --rollout.temperature (> 0: a greedy group has no spread to normalise)
    learning_rate     -> --actor.adam.lr
    lr_scheduler      -> --actor.lr_scheduler constant|linear|cosine, --actor.lr_warmup_ratio 0 (as the TRL backend)
    kl_coef           -> --algo.kl.init_coef (GRPO: k3 KL loss; 0 builds no reference model). DAPO has no KL
                         term, so a DAPO run with kl_coef > 0 is refused rather than silently dropped.
    save_every        -> --ckpt.save_steps (0: -1, never)
    resume            -> --ckpt.load_enable; false also empties openrlhf/ (its checkpoints) first
    heldout_file/_every -> --eval.dataset <openrlhf/heldout.parquet> --eval.steps, greedy, 1 sample
    num_workers       -> GPUs: actor, reference and vLLM engines, colocated (hybrid engine)
    gradient_checkpointing -> --actor.gradient_checkpointing_enable (when true)
    trainable_layers  -> refused unless null (OpenRLHF updates every layer)
    use_gpu, cpus_per_worker: TRL/Ray Train placement only; OpenRLHF always places its own GPU actors.
"""

from __future__ import annotations

import json
import runpy
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pyarrow as pa

from saerl_ray.core import storage
from saerl_ray.core.config import ConfigError, RunConfig
from saerl_ray.trainers.common import (  # noqa: F401 (stage_fingerprint: part of this module's API)
    backend_stage,
    common_train_errors,
    join_ray,
    prompts_per_step,
    read_plan_in_order,
    stage_fingerprint,
)
from saerl_ray.trainers.run_files import node_scratch

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
REWARD_FILE = Path(__file__).with_name("openrlhf_reward.py")
# OpenRLHF's driver sets these in its own ray.init, which it skips when Ray is already up (ours).
OPENRLHF_ENV = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
# The async trainer builds its own loader in another actor; only the sync/hybrid trainer is patched.
# --ckpt.path / --ckpt.output_dir are the backend's own (node scratch, mirrored to the run dir): the
# trainer empties --ckpt.path on every node before it restores, which would wipe a user's folder.
UNSUPPORTED = ("--train.async_enable", "--data.prompt_dataset", "--data.label_key", "--ckpt.path",
               "--ckpt.output_dir")
STAGE = "openrlhf"
# train.lr_scheduler -> the transformers scheduler name OpenRLHF passes to get_scheduler.
LR_SCHEDULERS = {"constant": "constant", "linear": "linear", "cosine": "cosine"}
# The trainer actor writes its end-of-run reward flush counts here (read into the stage summary).
REPORTS_FILE = "reward_reports.json"


def out_dir(cfg: RunConfig) -> str:
    """`<run_dir>/openrlhf`: an absolute local path (other processes have other working dirs) or a URI."""
    return storage.join(storage.resolve(cfg.run_dir), STAGE)


def scratch_dir(cfg: RunConfig) -> str:
    """The node-local folder DeepSpeed and OpenRLHF write into (same path string on every node)."""
    return node_scratch(cfg.run_dir, STAGE)


def write_prompt_file(cfg: RunConfig, sampler_actor: str, group_size: int) -> str:
    """Plan -> OpenRLHF prompt dataset, row i = plan position i (the sampler yields positions)."""
    plan = read_plan_in_order(cfg, ["id", "prompt", "answer", "source", "cluster"])
    labels = [
        json.dumps({"id": i, "answer": a, "cluster": int(c), "sampler": sampler_actor, "n": group_size})
        for i, a, c in zip(plan.column("id").to_pylist(), plan.column("answer").to_pylist(), plan.column("cluster").to_pylist())
    ]
    table = pa.table({
        "prompt": [user_text(p, cfg) for p in plan.column("prompt").to_pylist()],
        "label": labels,
        "datasource": plan.column("source"),
    })
    path = storage.join(out_dir(cfg), "prompts.parquet")
    storage.write_parquet(table, path)
    return path


def algo_flags(algo: str, max_new_tokens: int, kl_coef: float = 0.0) -> list[str]:
    """GRPO / DAPO presets in OpenRLHF 0.11's dotted dialect (its `openrlhf.cli.train_ppo_ray` flags)."""
    if algo == "grpo":
        return [
            "--algo.advantage.estimator", "group_norm",
            # GRPO's KL as a k3 loss term; its weight is train.kl_coef (0: no reference model is built).
            "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", repr(float(kl_coef)),
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
            # DAPO drops the KL term, so no reference model is built (check_config refuses kl_coef > 0).
            "--algo.kl.init_coef", "0",
        ]
    raise ConfigError(f"train.algo must be grpo or dapo, got {algo!r}")



def user_text(problem: str, cfg: RunConfig) -> str:
    """The user turn OpenRLHF's chat template wraps: the problem and `prompt.instruction`."""
    from saerl_ray.core.reward import format_messages

    return format_messages(problem, cfg.prompt.instruction)[-1]["content"]


def check_config(cfg: RunConfig) -> None:
    """Refuse `train.*` values the OpenRLHF backend cannot honour; each error names its field."""
    t = cfg.train
    errors = []
    for flag in UNSUPPORTED:
        if flag in t.extra_args:
            errors.append(f"train.extra_args: {flag} is not supported with the curriculum trainer")
    if cfg.prompt.system is not None:
        errors.append("prompt.system: the OpenRLHF backend writes its prompt column as text (one user turn); "
                      "set it to null")
    if t.lr_scheduler not in LR_SCHEDULERS:
        errors.append(f"train.lr_scheduler={t.lr_scheduler!r} has no OpenRLHF mapping ({sorted(LR_SCHEDULERS)})")
    errors += common_train_errors(cfg, "OpenRLHF")
    if errors:
        raise ConfigError("; ".join(errors))


def write_heldout_file(cfg: RunConfig) -> str | None:
    """`train.heldout_file` as OpenRLHF's eval dataset: same prompt/label columns as the training file;
    labels carry no sampler, so the reward file scores them without reporting."""
    t = cfg.train
    if not (t.heldout_file and t.heldout_every):
        return None
    from saerl_ray.trainers.common import read_heldout

    rows = read_heldout(t.heldout_file)
    if not rows:
        raise ConfigError(f"train.heldout_file {t.heldout_file}: no rows")
    table = pa.table({
        "prompt": [user_text(r["prompt"], cfg) for r in rows],
        "label": [json.dumps({"answer": r["answer"]}) for r in rows],
        "datasource": ["heldout"] * len(rows),
    })
    path = storage.join(out_dir(cfg), "heldout.parquet")
    storage.write_parquet(table, path)
    return path


def build_flags(cfg: RunConfig, prompt_file: str | Path, policy: str) -> list[str]:
    """RunConfig -> OpenRLHF CLI flags; `train.extra_args` last so any of them can be overridden.
    Inputs are `<run_dir>/openrlhf/*` (the trainer actor fetches them); outputs go to node-local scratch."""
    check_config(cfg)
    t, out, scratch = cfg.train, out_dir(cfg), Path(scratch_dir(cfg))
    gpus = max(1, t.num_workers)
    rollout = prompts_per_step(cfg)
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
        "--rollout.temperature", repr(float(t.temperature)),
        # One policy update per rollout batch (on-policy GRPO/DAPO).
        "--train.batch_size", str(rollout * t.num_generations),
        "--train.max_epochs", "1", "--train.num_episodes", "1",
        "--train.seed", str(cfg.seed),
        "--actor.adam.lr", repr(float(t.learning_rate)),
        "--actor.lr_scheduler", LR_SCHEDULERS[t.lr_scheduler], "--actor.lr_warmup_ratio", "0",
        # Hybrid engine: vLLM and DeepSpeed share every GPU and sleep in turn.
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", str(gpus),
        "--ref.num_nodes", "1", "--ref.num_gpus_per_node", str(gpus),
        "--vllm.num_engines", str(gpus), "--vllm.tensor_parallel_size", "1",
        "--vllm.gpu_memory_utilization", "0.5",
        "--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep",
        *(["--actor.gradient_checkpointing_enable"] if t.gradient_checkpointing else []),
        "--reward.remote_url", str(REWARD_FILE),
        "--ckpt.output_dir", str(scratch / "model"),
        "--ckpt.path", str(scratch / "ckpt"),
        # OpenRLHF: -1 = never (0 would be a modulo by zero).
        "--ckpt.save_steps", str(t.save_every or -1),
        *(["--ckpt.load_enable"] if t.resume else []),
        "--logger.tensorboard_dir", str(scratch / "tensorboard"),
    ]
    if t.heldout_file and t.heldout_every:
        # Greedy, one sample per prompt: the same held-out accuracy the TRL backend logs.
        flags += ["--eval.dataset", storage.join(out, "heldout.parquet"), "--eval.steps", str(t.heldout_every),
                  "--eval.temperature", "0", "--eval.n_samples_per_prompt", "1"]
    return flags + algo_flags(t.algo, t.max_new_tokens, t.kl_coef) + list(t.extra_args)


def flag_value(flags: list[str], name: str, default: str) -> str:
    """Last value given for `name` (argparse semantics: the last occurrence wins)."""
    value = default
    for i, f in enumerate(flags[:-1]):
        if f == name:
            value = flags[i + 1]
    return value


def trainer_env(sampler_actor: str, main_prompts: int, reports_file: str | Path | None = None,
                stage_dir: str | None = None, scratch: str | None = None) -> dict[str, str]:
    """Env vars for the trainer actor (given via `.options(runtime_env=...)` when it is created):
    the sampler, the episode length, where the reward-report counts go, and the stage folder in the run
    directory / node-local scratch folder its file transfers use (absent: no transfers, local files)."""
    env = {"SAERL_SAMPLER_ACTOR": sampler_actor, "SAERL_NUM_PROMPTS": str(main_prompts)}
    if reports_file is not None:
        env["SAERL_REPORTS_FILE"] = str(reports_file)
    if stage_dir is not None and scratch is not None:
        env["SAERL_STAGE_DIR"], env["SAERL_SCRATCH_DIR"] = str(stage_dir), str(scratch)
    return env


def with_node_resource(bundles: list[dict], resource: str | None) -> list[dict]:
    """Placement-group bundles with `resource` added to each GPU bundle, one unit per GPU it holds:
    only node types advertising that resource can host them (None: unchanged)."""
    if not resource:
        return [dict(b) for b in bundles]
    return [{**b, resource: float(b["GPU"])} if b.get("GPU") else dict(b) for b in bundles]


@contextmanager
def node_typed_placement_groups(resource: str | None) -> Iterator[None]:
    """While open, every placement group OpenRLHF's CLI, actor groups and vLLM engines create asks for
    `resource` on its GPU bundles. They import `placement_group` by name, so each module's binding is
    patched (the CLI module is run afresh by runpy and picks up the patched `ray.util` one)."""
    if not resource:
        yield
        return
    import importlib

    # `ray.util.placement_group` the attribute is the function; the module is what the CLI imports from.
    pg_module = importlib.import_module("ray.util.placement_group")
    original = pg_module.placement_group

    def placement_group(bundles, *args, **kwargs):
        return original(with_node_resource(list(bundles), resource), *args, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(pg_module, "placement_group", placement_group))
        for name in ("openrlhf.trainer.ray.launcher", "openrlhf.trainer.ray.vllm_engine"):
            module = importlib.import_module(name)
            if hasattr(module, "placement_group"):
                stack.enter_context(mock.patch.object(module, "placement_group", placement_group))
        yield


@contextmanager
def model_upload(local_model: str, remote_model: str) -> Iterator[None]:
    """While open, the CLI's final `actor_model.async_save_model()` (rank 0 writes the HF model into its
    node-local `--ckpt.output_dir`) is followed by an upload of that folder from rank 0's own process."""
    import ray
    from openrlhf.trainer.ray.launcher import RayActorGroup

    from saerl_ray.trainers.run_files import _call

    original = RayActorGroup.async_save_model

    def save_then_upload(group: Any) -> list:
        ray.get(original(group))
        rank0 = group._actor_handlers[0]
        return [rank0.__ray_call__.remote(_call, storage.sync_tree, local_model, remote_model)]

    with mock.patch.object(RayActorGroup, "async_save_model", save_then_upload):
        yield


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

    from saerl_ray.trainers.openrlhf_trainer import SaerlPPOTrainer

    ppo_trainer.PPOTrainer = ray.remote(SaerlPPOTrainer).options(runtime_env={"env_vars": env})


def run(cfg: RunConfig) -> dict:
    """`saerl-ray train --train.backend openrlhf`: start the sampler, write prompts, run OpenRLHF."""
    import time

    import ray

    from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

    t0 = time.time()
    check_config(cfg)  # before Ray, the sampler or any file: a bad field costs nothing
    st, policy, done = backend_stage(cfg, STAGE)
    if done is not None:
        return done
    # An interrupted run with the same config keeps its checkpoints when train.resume is on.
    out = st.begin(keep_partial=cfg.train.resume)
    # OpenRLHF's own ray.init (skipped: Ray is up) would set these as a runtime_env. Under a job they come
    # from jobs/runtime_env_gpu.yaml; a runtime_env here would replace the job's, working_dir included,
    # and Ray then garbage-collects the driver's own working dir under it.
    join_ray(cfg, OPENRLHF_ENV)
    sampler = get_or_create_sampler(cfg)
    name = actor_name(cfg.run_dir)
    flags = build_flags(cfg, storage.join(out, "prompts.parquet"), policy)
    group = int(flag_value(flags, "--rollout.n_samples_per_prompt", "1"))
    write_prompt_file(cfg, name, group)
    write_heldout_file(cfg)
    step_prompts = int(flag_value(flags, "--rollout.batch_size", str(prompts_per_step(cfg))))
    main_prompts = cfg.train.steps * step_prompts
    reports_file = storage.join(out, REPORTS_FILE)
    storage.delete(reports_file)
    scratch = scratch_dir(cfg)
    install_trainer(trainer_env(name, main_prompts, reports_file, stage_dir=out, scratch=scratch))
    print(f"[saerl-ray] openrlhf: {cfg.train.algo} on {policy}, {main_prompts} prompts, flags: {' '.join(flags)}", flush=True)
    local_model = flag_value(flags, "--ckpt.output_dir", str(Path(scratch) / "model"))
    with mock.patch.object(sys, "argv", [CLI_MODULE, *flags]), \
         node_typed_placement_groups(cfg.train.node_resource), \
         model_upload(local_model, storage.join(out, "model")):
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)
    stats = ray.get(sampler.stats.remote())
    ray.get(sampler.checkpoint.remote())
    reports = storage.read_json(reports_file) if storage.exists(reports_file) else None
    if reports is None or reports.get("dropped"):
        print(f"[saerl-ray] openrlhf: WARNING reward reports to the sampler incomplete: {reports}", flush=True)
    summary = {"backend": "openrlhf", "algo": cfg.train.algo, "steps": cfg.train.steps,
               "prompts_per_step": step_prompts, "prompts": main_prompts, "policy": policy, "sampler": stats,
               "reward_reports": reports, "model_dir": storage.join(out, "model"), "flags": flags,
               "seconds": time.time() - t0}
    st.commit(summary)
    print(f"[saerl-ray] openrlhf: done, model in {summary['model_dir']}", flush=True)
    return summary
