"""TRL GRPO / DAPO under Ray Train, fed batch by batch by the curriculum sampler actor.

    saerl-ray train --run-dir runs/m --train.backend trl --train.steps 20 --train.num_workers 2
    saerl-ray train --run-dir runs/m --train.algo dapo --train.policy runs/m/label_model

How the curriculum reaches TRL (1.16) without being reshuffled:
- `SamplerStream` replaces TRL's RepeatSampler: on every optimisation step rank 0 takes the next plan
  batch from the sampler (`next_batch`), broadcasts it to the other Ray Train workers, and each rank
  keeps its contiguous slice of the prompts-repeated-`num_generations`-times list, which is exactly
  the layout TRL's advantage computation expects (gathered in rank order, grouped by `num_generations`).
  Nothing is shuffled and no worker sees another's prompts; the sampler is asked once per step.
- `CurriculumReward` grades every completion with `math_reward`, gathers (id, reward) from all ranks,
  and rank 0 reports whole groups back (`sampler.report(ids, rewards)`): that is the online loop.
  Rank 0 talks to the sampler through a `SamplerClient`, which rides out the actor's death (a batch
  whose reply died with it is served again; a retried report is counted once).
- Checkpoints: HF `Trainer` saves every `train.save_every` steps; the sampler's cursor at the last
  batch trained (plus its full state, for a sampler that lost its history) is written into the same
  checkpoint folder, then committed to the sampler, and Ray's `RayTrainReportCallback` reports the
  folder to Ray Train. A rerun of an interrupted run resumes model, optimizer and sampler from the
  latest one: the batches served after that checkpoint are served again, and only those
  (docs/sampler_api.md, "Recovery").
- Per-step metrics (TRL's loss / reward / KL / lengths + the clusters and predicted difficulties that
  were served) go to `<run_dir>/train/metrics.jsonl`; the final policy to `<run_dir>/train/model/`.

GRPO = TRL `loss_type="grpo"`, symmetric clip 0.2. DAPO = `loss_type="dapo"` (token-level loss over
the global batch), clip-higher `epsilon_high=0.28`, truncated completions masked, no KL. DAPO's
dynamic sampling (refilling all-correct / all-wrong groups) is not available inside TRL's loop; the
online sampler postpones / retires such prompts instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, fingerprint
from saerl_ray.core.reward import format_messages, math_reward, prompt_style
from saerl_ray.core.stage import Stage, marker_of
from saerl_ray.trainers.common import read_heldout

SAMPLER_STATE = "sampler_state.json"
log = logging.getLogger("saerl_ray.trainers.trl_backend")


# ---------------------------------------------------------------- pure helpers (unit-tested)


def algo_settings(algo: str, kl_coef: float) -> dict[str, Any]:
    """GRPOConfig fields that make TRL's trainer GRPO or DAPO."""
    if algo == "grpo":
        return dict(loss_type="grpo", epsilon=0.2, beta=kl_coef, scale_rewards="group")
    if algo == "dapo":
        return dict(
            loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
            mask_truncated_completions=True,
        )
    raise ValueError(f"train.algo {algo!r} is not supported by the TRL backend (grpo | dapo)")


def train_precision(use_gpu: bool, cpu_dtype: str, bf16_supported: bool) -> tuple[str, bool]:
    """(dtype the policy is loaded in, GRPOConfig.bf16) for a worker's placement. On a CUDA GPU that
    has bf16 (Ampere and later): fp32 master weights with bf16 autocast (`bf16=True`), the tensor-core
    rate for the matmuls. Not bf16 weights: AdamW steps of ~lr=1e-6 on N(0, 0.02) weights change only
    ~2% of them once rounded to bf16's 8-bit mantissa, so most updates would be lost. On the CPU:
    `model.dtype` (fp32 by default) and no bf16 flag, as before. A GPU without bf16 trains in fp32
    (fp16 would need loss scaling GRPO's tiny ratios do not survive)."""
    if use_gpu and bf16_supported:
        return "float32", True
    return (cpu_dtype if not use_gpu else "float32"), False


def step_layout(prompts_per_step: int, num_generations: int, num_workers: int) -> int:
    """Completions per worker per step; the global batch must split evenly over the workers."""
    total = prompts_per_step * num_generations
    if prompts_per_step < 1 or total % num_workers:
        raise ValueError(
            f"train: prompts_per_step ({prompts_per_step}) x num_generations ({num_generations}) = {total} "
            f"completions must split evenly over num_workers ({num_workers})"
        )
    return total // num_workers


def local_slice(batch: list[dict], num_generations: int, rank: int, world: int) -> list[dict]:
    """This rank's part of a step: prompts repeated `num_generations` times, cut in `world` contiguous slices."""
    repeated = [row for row in batch for _ in range(num_generations)]
    per_rank = len(repeated) // world
    return repeated[rank * per_rank : (rank + 1) * per_rank]


def freeze_below(model, trainable_layers: int | None) -> None:
    """Leave only the top `trainable_layers` decoder blocks and the final norm trainable (None: all).
    The frozen bottom still runs forward, but autograd keeps none of its activations and the tied
    embedding/LM-head matrix (a third of a 135M model) gets no gradient."""
    from saerl_ray.core.device import decoder_layers

    if trainable_layers is None:
        return
    layers = decoder_layers(model)
    if not 1 <= trainable_layers <= len(layers):
        raise ValueError(f"train.trainable_layers={trainable_layers}: the policy has {len(layers)} decoder layers")
    model.requires_grad_(False)
    keep = list(layers[len(layers) - trainable_layers:])
    norm = getattr(getattr(model, "model", model), "norm", None)
    for module in keep + ([norm] if norm is not None else []):
        module.requires_grad_(True)


def to_example(row: dict, style: dict | None = None) -> dict:
    """A sampler row as a TRL conversational example (`style`: `reward.prompt_style`); extra columns
    reach the reward function."""
    missing = [k for k in ("id", "prompt", "answer") if not row.get(k)]
    if missing:
        raise ValueError(f"sampler served a row without {missing} (id={row.get('id')!r}); plan rows need a gold answer")
    return {
        "prompt": format_messages(row["prompt"], **(style or {})),
        "id": row["id"],
        "answer": row["answer"],
        "cluster": int(row.get("cluster", -1)),
        "difficulty_pred": float(row.get("difficulty_pred", float("nan"))),
        "position": int(row.get("position", -1)),
        "seq": int(row.get("seq", -1)),  # the sampler call that served it: what a checkpoint's cursor names
    }


def group_rewards(ids: list[str], rewards: list[float]) -> tuple[list[str], list[list[float]]]:
    """Per-completion rewards -> one group per prompt, in first-seen order (the sampler's report shape)."""
    groups: dict[str, list[float]] = {}
    for i, r in zip(ids, rewards):
        groups.setdefault(i, []).append(float(r))
    return list(groups), list(groups.values())


def served_summary(records: list[tuple[str, int, float, float]]) -> dict[str, Any]:
    """What one step trained on: clusters, predicted difficulty, pass rate (records: id, cluster, diff, reward)."""
    ids, rewards = group_rewards([r[0] for r in records], [r[3] for r in records])
    first = {}
    for r in records:
        first.setdefault(r[0], r)
    diffs = [first[i][2] for i in ids]
    return {
        "served_ids": ids,
        "served_clusters": dict(sorted(Counter(str(first[i][1]) for i in ids).items())),
        "served_difficulty_mean": sum(diffs) / len(diffs) if diffs else None,
        "served_difficulty_max": max(diffs) if diffs else None,
        "pass_rate": sum(sum(g) for g in rewards) / max(1, sum(len(g) for g in rewards)),
        "solved_groups": sum(1 for g in rewards if max(g) > 0),
    }


def heldout_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64,
                     style: dict | None = None) -> float:
    """Greedy accuracy of the current policy on held-out rows (the accuracy curve of a run)."""
    from saerl_ray.stages.evaluate import generate, render_prompts

    was_training = model.training
    model.eval()
    try:
        prompts = render_prompts(tokenizer, [r["prompt"] for r in rows], **(style or {}))
        completions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="held-out")
    finally:
        model.train(was_training)
    return sum(math_reward(c[0], r["answer"]) for c, r in zip(completions, rows)) / max(1, len(rows))


# ---------------------------------------------------------------- the pieces TRL calls


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (a no-op without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SamplerStream(torch.utils.data.IterableDataset):
    """One item per optimisation step: this rank's list of examples, taken in plan order from the sampler."""

    def __init__(self, sampler, prompts_per_step: int, num_generations: int, rank: int, world: int,
                 style: dict | None = None):
        self.sampler = sampler  # a SamplerClient on rank 0, None elsewhere
        self.style = style
        self.prompts_per_step = prompts_per_step
        self.num_generations = num_generations
        self.rank, self.world = rank, world

    def _next_batch(self) -> list[dict]:
        batch = self.sampler.next_batch(self.prompts_per_step) if self.rank == 0 else None
        batch = _broadcast(batch)
        if not batch:
            raise RuntimeError("the curriculum sampler returned an empty batch (plan exhausted?)")
        if len(batch) != self.prompts_per_step:
            raise RuntimeError(f"sampler served {len(batch)} prompts, expected {self.prompts_per_step}")
        return [to_example(r, self.style) for r in batch]

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield local_slice(self._next_batch(), self.num_generations, self.rank, self.world)


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


class CurriculumReward:
    """TRL reward function: math_reward per completion; rank 0 reports whole groups to the sampler."""

    def __init__(self, sampler, rank: int):
        self.__name__ = "math_reward"  # TRL names the logged reward column after this
        self.sampler = sampler  # a SamplerClient on rank 0, None elsewhere
        self.rank = rank
        self.last_served: dict[str, Any] = {}
        self.last_seq: int | None = None  # sampler call of the batch the current step trains on

    def __call__(self, prompts, completions, id, answer, cluster, difficulty_pred, seq=None, **_: Any) -> list[float]:
        from accelerate.utils import gather_object

        rewards = [math_reward(_completion_text(c), a) for c, a in zip(completions, answer)]
        seq = seq or [-1] * len(rewards)
        records = gather_object(list(zip(id, cluster, difficulty_pred, rewards, seq)))
        if self.rank == 0:
            ids, groups = group_rewards([r[0] for r in records], [r[3] for r in records])
            got = self.sampler.report(ids, groups)
            if got["unknown"] or got["invalid"]:
                log.warning("sampler skipped reward groups: unknown ids %s, invalid groups %s",
                            got["unknown"][:5], got["invalid"][:5])
            self.last_served = served_summary(records)
            self.last_seq = max(r[4] for r in records)
        return rewards


def _trainer_classes():
    """Built lazily: importing trl / transformers.Trainer costs seconds the CLI should not pay upfront."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class CurriculumGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose training batches come from the sampler stream, never from a shuffled sampler."""

        def __init__(self, *args, stream: SamplerStream, **kwargs):
            self.stream = stream
            super().__init__(*args, **kwargs)

        def get_train_dataloader(self):
            # batch_size=None: each stream item already is this rank's generation batch.
            return torch.utils.data.DataLoader(self.stream, batch_size=None, collate_fn=_as_list, num_workers=0)

    class CurriculumCallback(TrainerCallback):
        """Rank 0: per-step metrics line; sampler state saved into every checkpoint folder."""

        def __init__(self, reward: CurriculumReward, metrics_path: str, rank: int, heldout: list[dict], heldout_every: int,
                     style: dict, frozen_bottom: bool):
            self.reward, self.metrics_path, self.rank, self.style = reward, metrics_path, rank, style
            self.frozen_bottom = frozen_bottom
            self.heldout, self.heldout_every = heldout, heldout_every
            self.t0 = time.time()
            # Object stores cannot append: the whole (small) file is rewritten per line, after a resume too.
            self.text = storage.read_text(metrics_path) if rank == 0 and storage.exists(metrics_path) else ""

        def _append(self, line: dict) -> None:
            self.text += json.dumps(line, default=float) + "\n"
            storage.write_text(self.metrics_path, self.text)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.rank != 0 or not logs or "loss" not in logs:
                return
            self._append({"step": state.global_step, "time": time.time() - self.t0, **logs, **self.reward.last_served})

        def _heldout(self, args, state, model, processing_class) -> None:
            every = self.heldout_every
            if self.rank != 0 or not self.heldout or not every or state.global_step % every:
                return
            acc = heldout_accuracy(model, processing_class, self.heldout, args.max_completion_length, style=self.style)
            self._append({"step": state.global_step, "heldout_accuracy": acc, "heldout_n": len(self.heldout)})

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            # The Trainer turned checkpointing on just before this call, and HF's gradient_checkpointing_enable
            # hooked the embeddings' output to require grad (for reentrant checkpointing). With the bottom
            # frozen that would run the backward pass through every frozen block; TRL checkpoints
            # non-reentrantly, which needs no such hook.
            if self.frozen_bottom and args.gradient_checkpointing:
                model.disable_input_require_grads()
            if state.global_step == 0:  # the curve starts at the untrained policy
                self._heldout(args, state, model, processing_class)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            self._heldout(args, state, model, processing_class)

        def on_save(self, args, state, control, **kwargs):
            if self.rank != 0:
                return
            import ray

            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            client = self.reward.sampler
            # The cursor names the batch this step trained on, not the newest one served: a batch
            # fetched ahead of the checkpoint was never trained on and must come back on resume.
            seq = self.reward.last_seq
            blob = client.checkpoint_blob(client.cursor(seq) if seq is not None and seq >= 0 else None)
            (ckpt / SAMPLER_STATE).write_text(json.dumps(blob))
            client.commit(blob["cursor"])
            ray.get(client.actor.checkpoint.remote())

    return CurriculumGRPOTrainer, CurriculumCallback


# ---------------------------------------------------------------- Ray Train worker


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (torch.distributed is already set up by TorchTrainer)."""
    import ray
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from trl import GRPOConfig

    from saerl_ray.core.models import load_model, load_tokenizer
    from saerl_ray.sampler.actor import (
        SamplerClient,  # imports ray: the module itself must not (gpu_check)
    )

    cfg = RunConfig.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Only rank 0 talks to the sampler: one next_batch and one report per step, whatever the world size.
    sampler = SamplerClient(cfg, actor=config["sampler"], run_dir=config["run_dir"]) if rank == 0 else None

    policy = config["policy"]
    tok = load_tokenizer(policy, trust_remote_code=cfg.model.trust_remote_code)
    tok.padding_side = "left"
    bf16_ok = bool(tc.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    dtype, bf16 = train_precision(tc.use_gpu, cfg.model.dtype, bf16_ok)
    model = load_model(policy, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    freeze_below(model, tc.trainable_layers)

    prompts_per_step = config["prompts_per_step"]
    per_device = step_layout(prompts_per_step, tc.num_generations, world)
    args = GRPOConfig(
        output_dir=config["scratch_dir"],
        max_steps=tc.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=tc.num_generations,
        max_completion_length=tc.max_new_tokens,
        temperature=tc.temperature,
        learning_rate=tc.learning_rate,
        shuffle_dataset=False,
        ignore_data_skip=True,  # on resume the sampler restores its own position; never replay the stream
        use_cpu=not tc.use_gpu,
        bf16=bf16,
        save_strategy="steps",
        save_steps=tc.save_every,
        logging_steps=1,
        report_to=[],
        seed=cfg.seed,
        dataloader_num_workers=0,
        gradient_checkpointing=tc.gradient_checkpointing,
        disable_tqdm=rank != 0,
        lr_scheduler_type=tc.lr_scheduler,
        **algo_settings(tc.algo, tc.kl_coef),
    )
    reward = CurriculumReward(sampler, rank)
    trainer_cls, callback_cls = _trainer_classes()
    style = prompt_style(cfg.prompt)
    stream = SamplerStream(sampler, prompts_per_step, tc.num_generations, rank, world, style)
    placeholder = _placeholder_dataset()
    trainer = trainer_cls(
        model=model,
        processing_class=tok,
        reward_funcs=[reward],
        args=args,
        train_dataset=placeholder,
        stream=stream,
        callbacks=[
            callback_cls(reward, config["metrics_path"], rank, config["heldout"], tc.heldout_every, style,
                         tc.trainable_layers is not None),
            RayTrainReportCallback(),
        ],
    )
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = Path(checkpoint.to_directory()) / RayTrainReportCallback.CHECKPOINT_NAME
        resume = str(local)
        if rank == 0 and (local / SAMPLER_STATE).exists():
            sampler.resume(json.loads((local / SAMPLER_STATE).read_text()))
    trainer.train(resume_from_checkpoint=resume)
    if rank == 0:
        local_model = Path(config["scratch_dir"]) / "final-model"
        trainer.save_model(str(local_model))
        tok.save_pretrained(str(local_model))
        storage.copy_tree(local_model, config["model_dir"])
        ray.get(sampler.actor.checkpoint.remote())


def _placeholder_dataset():
    # GRPOTrainer's constructor insists on a datasets object; batches come from SamplerStream instead
    # (see CurriculumGRPOTrainer.get_train_dataloader). An empty iterable one never gets read.
    from datasets import IterableDataset

    return IterableDataset.from_generator(_no_rows)


def _no_rows() -> Iterator[dict]:
    yield from ()


# ---------------------------------------------------------------- driver


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl lines; after a resume, a step logged twice keeps its last line."""
    if not storage.exists(path):
        return []
    latest: dict[tuple, dict] = {}
    for _, x in storage.iter_jsonl(path):
        latest[(x["step"], "heldout_accuracy" in x)] = x
    return sorted(latest.values(), key=lambda x: (x["step"], "loss" in x))


def fit(cfg: RunConfig, sampler, out_dir: str, policy: str, prompts_per_step: int, scratch: Path) -> None:
    """Run `train_loop_per_worker` on `train.num_workers` Ray Train workers; outputs land in `out_dir`
    (a local path or an object-store URI; `scratch` is each worker node's local HF output dir).

    Ray Train keeps its checkpoints under `out_dir/ray`: a rerun with the same `out_dir` resumes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    config = {
        "cfg": cfg.model_dump(mode="json"),
        # Read here and shipped with the config: a worker on another node cannot open the driver's file.
        "heldout": read_heldout(tc.heldout_file),
        "sampler": sampler,
        "run_dir": storage.resolve(cfg.run_dir),  # for a sampler the worker has to bring back (another cwd)
        "policy": policy,
        "prompts_per_step": prompts_per_step,
        "scratch_dir": str(scratch),
        "metrics_path": storage.join(out_dir, "metrics.jsonl"),
        "model_dir": storage.join(out_dir, "model"),
    }
    ray_fs, ray_path = storage.filesystem(storage.join(out_dir, "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="grpo", storage_path=ray_path, storage_filesystem=ray_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"TRL training failed: {result.error}") from result.error


def run(cfg: RunConfig) -> dict:
    """`saerl-ray train` with the TRL backend: a Ray Train TorchTrainer of `train.num_workers` workers."""
    import ray

    from saerl_ray.core.models import resolve
    from saerl_ray.core.ray_init import init_ray
    from saerl_ray.sampler.actor import get_or_create_sampler

    tc = cfg.train
    policy = resolve(tc.policy or cfg.model.name)
    fp = fingerprint(tc, cfg.sampler, cfg.model, cfg.prompt, cfg.seed, policy, marker_of(cfg.run_dir, "plan"))
    st = Stage(cfg.run_dir, "train", fp)
    if st.done():
        return st.summary()
    from saerl_ray.trainers.common import prompts_per_step as step_prompts

    prompts_per_step = step_prompts(cfg)
    step_layout(prompts_per_step, tc.num_generations, tc.num_workers)  # fail before starting anything
    algo_settings(tc.algo, tc.kl_coef)
    tmp = st.begin(keep_partial=tc.resume)
    init_ray(cfg.ray)
    sampler = get_or_create_sampler(cfg)
    t0 = time.time()
    scratch = Path(tempfile.gettempdir()) / f"saerl-trl-{fp}"
    fit(cfg, sampler, tmp, policy, prompts_per_step, scratch=scratch)
    # HF's local checkpoint copies; Ray Train already holds the ones that matter under train/ray.
    shutil.rmtree(scratch, ignore_errors=True)
    lines = read_metrics(storage.join(tmp, "metrics.jsonl"))
    steps = [x for x in lines if "loss" in x]
    curve = [(x["step"], x["heldout_accuracy"]) for x in lines if "heldout_accuracy" in x]
    stats = ray.get(sampler.stats.remote())
    summary = {
        "backend": "trl", "algo": tc.algo, "steps": tc.steps, "policy": policy,
        "num_workers": tc.num_workers, "prompts_per_step": prompts_per_step,
        "final_reward": steps[-1].get("reward") if steps else None,
        "mean_pass_rate": sum(x.get("pass_rate", 0) for x in steps) / len(steps) if steps else None,
        "heldout_curve": curve,
        "sampler": stats, "seconds": time.time() - t0,
    }
    st.commit(summary)
    print(
        f"[train] trl/{tc.algo}: {tc.steps} steps x {prompts_per_step} prompts x {tc.num_generations} generations "
        f"on {tc.num_workers} worker(s), mean pass rate {summary['mean_pass_rate']} in {summary['seconds']:.0f}s"
    )
    return summary
