"""OpenRLHF 0.11.2 glue against the real OpenRLHF, in the optional CPU env (`make test-openrlhf`).

What runs for real: OpenRLHF's CLI parser + validation, `get_strategy`, `PPOTrainer.__init__`
(`prepare_datasets`, `PromptDataset` with a chat template, `strategy.setup_dataloader` ->
`StatefulDataLoader`), `SamplesGenerator.generate_samples` with DAPO dynamic filtering,
`SingleTurnAgentExecutor` loading our reward file by path, the CurriculumSampler Ray actor. What is
scripted: only vLLM's token generation (`ScriptedEngine` below; it needs a GPU in this code path).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit import commit_plan

from saerl_ray.core import storage
from saerl_ray.core.config import load_config
from saerl_ray.trainers import openrlhf_launch as launch

# Tests that import OpenRLHF run only in .venv-openrlhf; the rest run in the core env too.
needs_openrlhf = pytest.mark.openrlhf
# Set by `make test-openrlhf` and CI: a test here that cannot run is a failure, not a quiet skip.
REQUIRE = os.environ.get("SAERL_REQUIRE_OPENRLHF") == "1"

N_PROMPTS, BATCH, GROUP = 24, 4, 4


def write_plan(run_dir, shared_data):
    """A plan over real MATH-500 rows: 3 clusters of 8, cluster-first batches of 4."""
    rows = [json.loads(line) for line in (shared_data / "math500.jsonl").read_text().splitlines()[:N_PROMPTS]]
    table = pa.table({
        "position": pa.array(range(N_PROMPTS), pa.int64()),
        "batch": pa.array([i // BATCH for i in range(N_PROMPTS)], pa.int64()),
        "id": [hashlib.sha1(r["problem"].encode()).hexdigest()[:16] for r in rows],
        "prompt": [r["problem"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "source": ["math500"] * N_PROMPTS,
        "cluster": pa.array([i // 8 for i in range(N_PROMPTS)], pa.int32()),
        "difficulty_pred": pa.array([float(i % 8) for i in range(N_PROMPTS)], pa.float32()),
        "mixed": [False] * N_PROMPTS,
    })
    commit_plan(run_dir, table, "test-plan")
    return table


def make_cfg(tmp_path, policy_dir, algo="grpo", mode="static", steps=4, extra=(), run_dir=None, **train):
    return load_config(None, {
        "run_dir": run_dir or str(tmp_path / "run"), "model.name": str(policy_dir), "plan.batch_size": BATCH,
        "sampler.mode": mode, "train.backend": "openrlhf", "train.algo": algo, "train.steps": steps,
        "train.num_generations": GROUP, "train.max_new_tokens": 64, "train.extra_args": list(extra),
        **{f"train.{k}": v for k, v in train.items()},
    })


@pytest.fixture(scope="session")
def smollm2_dir():
    """conftest's fixture, but a missing model fails the run where SAERL_REQUIRE_OPENRLHF=1."""
    from saerl_ray.core.models import packaged_dir

    d = packaged_dir("smollm2")
    if not (d / "config.json").exists():
        why = "SmolLM2 not cached: run `saerl-ray models pull smollm2` (make test-openrlhf does)"
        if REQUIRE:
            pytest.fail(why + " [SAERL_REQUIRE_OPENRLHF=1]")
        pytest.skip(why)
    return d


@pytest.fixture
def reward_state(monkeypatch):
    """The reward file's process-wide report state, emptied, with size/time flushes off unless a test
    turns them on: what reaches the sampler is then exactly what the code under test sent."""
    from saerl_ray.trainers import openrlhf_reward as rf

    def clear():
        with rf._lock:
            rf._partial.clear()
            rf._ready.clear()
            rf._inflight.clear()
            rf._samplers.clear()
            rf._stats.update(calls=0, accepted=0, dropped=0, retries=0, dropped_ids=[])

    clear()
    monkeypatch.setattr(rf, "FLUSH_GROUPS", 10**9)
    monkeypatch.setattr(rf, "FLUSH_SECONDS", 10.0**9)
    yield rf
    clear()


@pytest.fixture
def run(tmp_path, smollm2_dir, shared_data, ray_cluster, monkeypatch):
    """Plan + sampler actor + prompt file + parsed OpenRLHF args, as `openrlhf_launch.run` makes them."""

    def setup(algo="grpo", mode="static", steps=4):
        from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

        cfg = make_cfg(tmp_path, smollm2_dir, algo, mode, steps)
        plan = write_plan(cfg.run_dir, shared_data)
        sampler = get_or_create_sampler(cfg)
        name = actor_name(cfg.run_dir)
        flags = launch.build_flags(cfg, storage.join(launch.out_dir(cfg), "prompts.parquet"), str(smollm2_dir))
        launch.write_prompt_file(cfg, name, GROUP)
        args = launch.parse_flags(flags)
        for k, v in launch.trainer_env(name, steps * BATCH).items():
            monkeypatch.setenv(k, v)
        return SimpleNamespace(cfg=cfg, plan=plan, sampler=sampler, name=name, args=args)

    yield setup


def make_trainer(args):
    """The undecorated subclass, constructed in-process exactly as the Ray actor would be."""
    from openrlhf.utils import get_strategy

    from saerl_ray.trainers.openrlhf_trainer import SaerlPPOTrainer

    return SaerlPPOTrainer(
        args.actor.model_name_or_path, get_strategy(args), None, None, None, None, None,
        do_sample=True, max_len=args.data.max_len, max_new_tokens=args.rollout.max_new_tokens,
        temperature=1.0, top_p=1.0,
    )


def reported(sampler, expected: int, timeout: float = 30.0) -> int:
    """Groups the sampler has received; reports are fire-and-forget from another handle, so wait."""
    import time

    import ray

    deadline = time.time() + timeout
    while True:
        got = ray.get(sampler.stats.remote())["reported"]
        if got >= expected or time.time() > deadline:
            return got
        time.sleep(0.2)


def label_ids(labels):
    return [json.loads(lb)["id"] for lb in labels]


@needs_openrlhf
def test_grpo_and_dapo_flags_pass_openrlhfs_parser(tmp_path, smollm2_dir):
    for algo in ("grpo", "dapo"):
        cfg = make_cfg(tmp_path, smollm2_dir, algo, extra=["--vllm.gpu_memory_utilization", "0.7"])
        args = launch.parse_flags(launch.build_flags(cfg, tmp_path / "p.parquet", str(smollm2_dir)))
        assert args.algo.advantage.estimator == "group_norm"
        assert args.rollout.n_samples_per_prompt == GROUP and args.rollout.batch_size == BATCH
        assert args.train.batch_size == BATCH * GROUP and args.data.dataloader_num_workers == 0
        assert args.reward.remote_url == [str(launch.REWARD_FILE)]
        assert args.vllm.gpu_memory_utilization == 0.7  # extra_args come last and win
        assert args.ckpt.path.startswith(launch.scratch_dir(cfg))  # node-local; mirrored to the run dir
        if algo == "grpo":
            assert args.algo.kl.use_loss and args.algo.kl.estimator == "k3"
        else:
            assert args.algo.dynamic_filtering_enable and list(args.algo.dynamic_filtering_range) == [0, 1]
            assert list(args.actor.eps_clip_low_high) == [0.2, 0.28]
            assert args.actor.loss_agg_mode == "token-mean" and args.reward.overlong_buffer_len == 16
    bad = make_cfg(tmp_path, smollm2_dir, extra=["--advantage_estimator", "group_norm"])  # pre-0.10.2 dialect
    with pytest.raises(SystemExit):
        launch.parse_flags(launch.build_flags(bad, tmp_path / "p.parquet", str(smollm2_dir)))


@needs_openrlhf
def test_trainer_loader_serves_curriculum_order_and_resumes(run):
    from openrlhf.trainer.ppo_utils.samples_generator import _collect_prompt_batch
    from torchdata.stateful_dataloader import StatefulDataLoader

    r = run(mode="static", steps=5)
    trainer = make_trainer(r.args)
    loader = trainer.prompts_dataloader
    assert isinstance(loader, StatefulDataLoader) and loader is trainer.samples_generator.prompts_dataloader
    assert len(loader) == 5 * BATCH and trainer.get_max_steps() == 5
    plan_ids = r.plan.column("id").to_pylist()

    def rounds(it, n):
        out = []
        for _ in range(n):
            trainer.curriculum.begin_round()
            _, labels, _, _ = _collect_prompt_batch(it, BATCH)
            out.append(label_ids(labels))
        return out

    it = iter(loader)
    first = rounds(it, 2)
    assert sum(first, []) == plan_ids[: 2 * BATCH]  # plan order, no shuffle
    state = json.loads(json.dumps(loader.state_dict()))  # what OpenRLHF checkpoints; JSON-clean
    later = rounds(it, 2)
    assert sum(later, []) == plan_ids[2 * BATCH : 4 * BATCH]

    # Resume: a fresh trainer (the actor ran ahead meanwhile) restores the checkpointed position.
    resumed = make_trainer(r.args)
    resumed.prompts_dataloader.load_state_dict(state)
    trainer = resumed
    assert rounds(iter(resumed.prompts_dataloader), 2) == later
    # The episode ends after train.steps rounds: one more round, then the loader is exhausted.
    it = iter(resumed.prompts_dataloader)
    trainer.curriculum.begin_round()
    _, labels, _, exhausted = _collect_prompt_batch(it, BATCH)
    assert label_ids(labels) == plan_ids[4 * BATCH : 5 * BATCH] and not exhausted
    trainer.curriculum.begin_round()
    assert _collect_prompt_batch(it, BATCH)[3] is True


class ScriptedEngine:
    """Stands in for OpenRLHF's RolloutRayActor without vLLM: the real SingleTurnAgentExecutor runs
    our reward file; only the completion text is scripted (cluster 0 always right, others half)."""

    def __init__(self, executor, tokenizer):
        self.executor, self.tokenizer = executor, tokenizer
        self.calls = 0
        self.get_num_unfinished_requests = self._remote(lambda: 0)
        self.wake_up = self._remote(lambda *a, **k: None)
        self.sleep = self._remote(lambda *a, **k: None)
        self.generate_responses = self._remote(self._generate_responses)
        # Ray's built-in actor method: fn(actor instance, *args). The executor lives in this process.
        self.ray_calls = 0
        self.__ray_call__ = self._remote(self._ray_call)

    def _ray_call(self, fn, *args, **kwargs):
        self.ray_calls += 1
        return fn(self, *args, **kwargs)

    @staticmethod
    def _remote(fn):
        import ray

        return SimpleNamespace(remote=lambda *a, **k: ray.put(fn(*a, **k)))

    def _generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1, images=None):
        info = json.loads(label)
        self.script = [
            f" The answer is \\boxed{{{info['answer']}}}." if info["cluster"] == 0 or k % 2 == 0 else " I give up."
            for k in range(num_samples)
        ]
        tasks = [self.executor.execute(prompt, label, sampling_params, max_length, hf_tokenizer, self) for _ in range(num_samples)]

        async def gather():
            return await asyncio.gather(*tasks)

        return asyncio.run(gather())

    async def generate(self, prompt_token_ids, params, multi_modal_data=None):
        text = self.script.pop(0)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)])


@needs_openrlhf
def test_dapo_rejected_groups_get_same_cluster_replacements_and_rewards_reach_sampler(run):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    r = run(algo="dapo", mode="online", steps=2)
    trainer = make_trainer(r.args)
    executor = SingleTurnAgentExecutor(remote_rm_url=r.args.reward.remote_url)
    gen = trainer.samples_generator
    gen.vllm_engines = [ScriptedEngine(executor, trainer.tokenizer)]
    cluster_of = dict(zip(r.plan.column("id").to_pylist(), r.plan.column("cluster").to_pylist()))

    samples, pass_rate, consumed, _ = gen.generate_samples(**trainer.generate_kwargs)
    executor.reward_func.__globals__["flush_reports"]()  # the file OpenRLHF loaded, not our import

    kept = sorted({json.loads(s.labels[0])["id"] for s in samples})
    # Cluster 0 is all-correct -> every group filtered; each rejection pulled a cluster-0
    # replacement until cluster 0 ran dry, then the next prompts (cluster 1) filled the batch.
    assert kept and all(cluster_of[i] == 1 for i in kept)
    assert len(samples) == len(kept) * GROUP
    assert trainer.curriculum.replacements == consumed - BATCH > 0
    # OpenRLHF 0.11.2 divides accepted *samples* by consumed *prompts* (so it can exceed 100).
    assert pass_rate == pytest.approx(100 * len(samples) / consumed)
    assert all(s.scores is not None for s in samples)
    assert reported(r.sampler, consumed) == consumed  # every dispatched group's scores reached the actor


@needs_openrlhf
def test_reward_file_scores_real_answers_through_openrlhf_executor(run):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    r = run(mode="online")
    ids, answers = r.plan.column("id").to_pylist()[:2], r.plan.column("answer").to_pylist()[:2]
    executor = SingleTurnAgentExecutor(remote_rm_url=str(launch.REWARD_FILE))
    prompts, queries, labels = [], [], []
    for k, (i, a) in enumerate(zip(ids, answers)):
        label = json.dumps({"id": i, "answer": a, "cluster": 0, "sampler": r.name, "n": 2})
        for correct in (True, False):
            prompts.append(f"Problem {k}?")
            queries.append(f"Problem {k}? So we get \\boxed{{{a}}}." if correct else f"Problem {k}? It is 1234567.")
            labels.append(label)
    out = asyncio.run(executor._fetch_rewards_via_func(queries, prompts, labels))
    assert [float(o["scores"][0]) for o in out] == [1.0, 0.0, 1.0, 0.0]
    assert all(set(o) == {"rewards", "scores", "extra_logs"} for o in out)
    # A malformed label is logged and scored 0, never raised (OpenRLHF would swallow it silently).
    bad = asyncio.run(executor._fetch_rewards_via_func(["x \\boxed{2}"], ["x"], ['{"id": 1, "n": "two"}']))
    assert float(bad[0]["scores"][0]) == 0.0
    executor.reward_func.__globals__["flush_reports"]()  # (a timed flush may already have sent them)
    assert reported(r.sampler, 2) == 2


@needs_openrlhf
def test_install_trainer_builds_the_ray_actor_with_our_loader(run):
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import ray
    from openrlhf.utils import get_strategy

    r = run(mode="static", steps=3)
    original = ppo_trainer.PPOTrainer
    try:
        launch.install_trainer(launch.trainer_env(r.name, 3 * BATCH))
        actor = ppo_trainer.PPOTrainer.remote(
            r.args.actor.model_name_or_path, get_strategy(r.args), None, None, None, None, None,
            do_sample=True, max_len=r.args.data.max_len, max_new_tokens=64, temperature=1.0, top_p=1.0,
        )
        # OpenRLHF's CLI asks the trainer actor for max_steps before building the models.
        assert ray.get(actor.get_max_steps.remote()) == 3
        ray.kill(actor)
    finally:
        ppo_trainer.PPOTrainer = original


@needs_openrlhf
def test_train_fields_reach_openrlhfs_parsed_args(tmp_path, smollm2_dir):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = make_cfg(tmp_path, smollm2_dir, lr_scheduler="linear", kl_coef=0.05, temperature=0.7,
                   prompts_per_step=6, save_every=3, resume=False, learning_rate=3e-6,
                   heldout_file=str(heldout), heldout_every=2)
    a = launch.parse_flags(launch.build_flags(cfg, tmp_path / "p.parquet", str(smollm2_dir)))
    assert a.actor.lr_scheduler == "linear" and a.actor.lr_warmup_ratio == 0 and a.actor.adam.lr == 3e-6
    assert a.algo.kl.init_coef == 0.05 and a.algo.kl.use_loss and a.algo.kl.estimator == "k3"
    assert a.rollout.temperature == 0.7
    assert a.rollout.batch_size == 6 and a.train.batch_size == 6 * GROUP  # prompts_per_step, not plan.batch_size
    assert a.ckpt.save_steps == 3 and a.ckpt.load_enable is False
    assert a.eval.dataset == storage.join(launch.out_dir(cfg), "heldout.parquet") and a.eval.steps == 2
    assert a.eval.temperature == 0 and a.eval.n_samples_per_prompt == 1

    # Defaults: flat LR, no KL (so no reference model), resume on, no checkpoints when save_every is 0.
    d = launch.parse_flags(launch.build_flags(make_cfg(tmp_path, smollm2_dir, save_every=0), tmp_path / "p", "x"))
    assert d.actor.lr_scheduler == "constant" and d.algo.kl.init_coef == 0.0 and d.rollout.temperature == 1.0
    assert d.rollout.batch_size == BATCH and d.ckpt.load_enable is True and d.ckpt.save_steps == -1
    assert d.eval.dataset is None


@needs_openrlhf
def test_fit_flushes_every_engines_last_reports_even_when_training_fails(run, reward_state, monkeypatch, tmp_path):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    r = run(algo="grpo", mode="online", steps=2)
    reports_file = tmp_path / "reports.json"
    monkeypatch.setenv("SAERL_REPORTS_FILE", str(reports_file))
    trainer = make_trainer(r.args)
    executor = SingleTurnAgentExecutor(remote_rm_url=r.args.reward.remote_url)
    assert executor.reward_func is reward_state.reward_func  # OpenRLHF's by-path load shares one state
    engine = ScriptedEngine(executor, trainer.tokenizer)
    gen = trainer.samples_generator
    gen.vllm_engines = trainer.vllm_engines = [engine]
    # fit(): the first rollout batch is generated and scored for real, then train_step fails (no
    # DeepSpeed actors on CPU). Size/time flushes are off, so only fit()'s final flush can report.
    with pytest.raises(Exception):  # noqa: B017 - whichever error a model-less train_step hits
        trainer.fit()
    assert engine.ray_calls == 1
    assert reported(r.sampler, BATCH, timeout=0) == BATCH
    assert trainer.reward_reports["accepted"] == BATCH and trainer.reward_reports["dropped"] == 0
    assert json.loads(reports_file.read_text())["accepted"] == BATCH


@needs_openrlhf
def test_run_commits_an_openrlhf_stage_and_reruns_only_on_a_new_config(tmp_path, shared_data, ray_cluster, monkeypatch):
    """launch.run end to end except OpenRLHF's GPU training (its CLI module is not executed; the
    flags it would get are parsed by its real parser afterwards)."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    cfg = make_cfg(tmp_path, tmp_path, steps=3)
    write_plan(cfg.run_dir, shared_data)
    argv = []
    monkeypatch.setattr(launch.runpy, "run_module", lambda *a, **k: argv.append(list(launch.sys.argv[1:])))
    monkeypatch.setattr(ppo_trainer, "PPOTrainer", ppo_trainer.PPOTrainer)  # install_trainer replaces it
    summary = launch.run(cfg)
    out = tmp_path / "run" / "openrlhf"
    marker = json.loads((out / "_DONE.json").read_text())
    assert marker["fingerprint"] == launch.stage_fingerprint(cfg, str(tmp_path)) and marker["stage"] == "openrlhf"
    assert summary["prompts"] == 3 * BATCH and (out / "prompts.parquet").exists()
    assert json.loads((out / "summary.json").read_text())["prompts"] == 3 * BATCH
    assert len(argv) == 1
    monkeypatch.undo()
    args = launch.parse_flags(argv[0])
    assert args.data.prompt_dataset == str(out / "prompts.parquet")
    assert args.ckpt.path == str(Path(launch.scratch_dir(cfg)) / "ckpt")

    monkeypatch.setattr(launch.runpy, "run_module", lambda *a, **k: argv.append(list(launch.sys.argv[1:])))
    monkeypatch.setattr(ppo_trainer, "PPOTrainer", ppo_trainer.PPOTrainer)
    assert launch.run(cfg)["prompts"] == 3 * BATCH and len(argv) == 1  # same config: the stage is done
    launch.run(make_cfg(tmp_path, tmp_path, steps=3, resume=False))  # resume says how, not what: still done
    assert len(argv) == 1
    launch.run(make_cfg(tmp_path, tmp_path, steps=3, kl_coef=0.01))  # a new KL weight trains again
    assert len(argv) == 2 and launch.flag_value(argv[1], "--algo.kl.init_coef", "") == "0.01"


class SavingGroup:
    """Stands in for OpenRLHF's RayActorGroup of policy actors: real Ray actors (on this one-node
    cluster) whose `save_checkpoint` writes what DeepSpeed's rank 0 writes into `--ckpt.path`."""

    def __init__(self, ckpt_path):
        import ray

        @ray.remote(num_cpus=0)
        class Rank:
            def save_checkpoint(self, tag, **_):
                base = Path(ckpt_path) / "_actor"
                (base / tag).mkdir(parents=True, exist_ok=True)
                (base / tag / "mp_rank_00_model_states.pt").write_bytes(tag.encode())
                (base / "latest").write_text(tag)

        self._actor_handlers = [Rank.remote()]

    def async_run_method(self, method_name, **kwargs):
        return [getattr(a, method_name).remote(**kwargs) for a in self._actor_handlers]


@needs_openrlhf
def test_trainer_reads_its_inputs_and_mirrors_checkpoints_with_an_s3_run_dir(
        tmp_path, smollm2_dir, shared_data, ray_cluster, s3_run_dir, monkeypatch):
    """run_dir on S3 (refused before): the trainer builds OpenRLHF's PromptDataset from the bucket's prompt
    file, each save is uploaded to <run_dir>/openrlhf/ckpt with DeepSpeed's `latest` pointer, and a
    resuming trainer gets that checkpoint back into its node-local --ckpt.path before anything loads it."""
    from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

    monkeypatch.setenv("SAERL_SCRATCH", str(tmp_path / "scratch"))
    cfg = make_cfg(tmp_path, smollm2_dir, steps=2, run_dir=s3_run_dir, save_every=2)
    plan = write_plan(cfg.run_dir, shared_data)
    sampler = get_or_create_sampler(cfg)  # noqa: F841 (held: the trainer looks it up by name)
    name, out = actor_name(cfg.run_dir), launch.out_dir(cfg)
    args = launch.parse_flags(launch.build_flags(cfg, launch.write_prompt_file(cfg, name, GROUP), str(smollm2_dir)))
    prompts = args.data.prompt_dataset
    assert prompts == f"{s3_run_dir}/openrlhf/prompts.parquet"
    for k, v in launch.trainer_env(name, 2 * BATCH, stage_dir=out, scratch=launch.scratch_dir(cfg)).items():
        monkeypatch.setenv(k, v)
    trainer = make_trainer(args)
    assert label_ids(trainer.prompts_dataloader.dataset.labels) == plan.column("id").to_pylist()

    trainer.actor_model_group = SavingGroup(args.ckpt.path)
    trainer.save_logs_and_checkpoints(2, {}, {"global_step": 2})
    assert storage.read_text(f"{out}/ckpt/_actor/latest") == "global_step2"
    assert storage.read_bytes(f"{out}/ckpt/_actor/global_step2/mp_rank_00_model_states.pt") == b"global_step2"

    import shutil

    shutil.rmtree(launch.scratch_dir(cfg))  # a fresh node: nothing local
    args.ckpt.load_enable, args.data.prompt_dataset = True, prompts  # (the first trainer pointed it at its copy)
    make_trainer(args)
    assert (Path(args.ckpt.path) / "_actor" / "latest").read_text() == "global_step2"


# --- core env (no OpenRLHF needed): the launcher's flag mapping and prompt file, the reward file ---


def test_presets_and_extra_args_order(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "dapo", extra=["--actor.eps_clip_low_high", "0.1", "0.3"])
    flags = launch.build_flags(cfg, tmp_path / "p.parquet", "policy")
    assert flags[-3:] == ["--actor.eps_clip_low_high", "0.1", "0.3"]  # user flags last: they win
    assert "--algo.dynamic_filtering_enable" in flags and launch.flag_value(flags, "--reward.overlong_buffer_len", "") == "16"
    grpo = launch.build_flags(make_cfg(tmp_path, tmp_path, "grpo"), tmp_path / "p.parquet", "policy")
    assert "--algo.dynamic_filtering_enable" not in grpo and "--algo.kl.use_loss" in grpo
    assert launch.flag_value(grpo, "--train.batch_size", "") == str(BATCH * GROUP)
    with pytest.raises(ValueError, match="async_enable"):
        launch.build_flags(make_cfg(tmp_path, tmp_path, extra=["--train.async_enable"]), tmp_path / "p", "policy")


def test_prompt_file_is_in_plan_order_with_json_labels(tmp_path, shared_data):
    cfg = make_cfg(tmp_path, tmp_path)
    plan = write_plan(cfg.run_dir, shared_data)
    rows = pq.read_table(launch.write_prompt_file(cfg, "saerl-sampler-x", GROUP)).to_pylist()
    labels = [json.loads(r["label"]) for r in rows]
    assert [lb["id"] for lb in labels] == plan.column("id").to_pylist()
    assert [lb["cluster"] for lb in labels] == plan.column("cluster").to_pylist()
    assert {lb["sampler"] for lb in labels} == {"saerl-sampler-x"} and {lb["n"] for lb in labels} == {GROUP}
    assert all(r["prompt"].startswith(p) for r, p in zip(rows, plan.column("prompt").to_pylist()))


def test_reward_func_scores_groups_and_never_raises(reward_state):
    rf = reward_state
    label = json.dumps({"id": "p1", "answer": "\\frac{1}{2}", "cluster": 0, "sampler": "s", "n": 2})
    out = rf.reward_func(["Q? so \\boxed{0.5}", "Q? it is 7"], ["Q?", "Q?"], [label, label])
    assert out["scores"].tolist() == [1.0, 0.0] and out["rewards"].tolist() == [1.0, 0.0]
    assert "p1" not in rf._partial  # the group of 2 is complete and queued for its sampler
    assert ("p1", [1.0, 0.0]) in rf._ready.get("s", [])
    rf._ready.clear()
    # Plain-string labels (eval sets) are answers; garbage labels score 0 instead of raising.
    assert rf.reward_func(["Q? \\boxed{3}"], ["Q?"], ["3"])["scores"].tolist() == [1.0]
    assert rf.reward_func(["Q? \\boxed{3}"], ["Q?"], ['{"id": 1, "n": "x"}'])["scores"].tolist() == [0.0]
    assert rf.reward_func(["Q? \\boxed{3}"], ["Q?"], ['{"answer": "3"}'])["scores"].tolist() == [1.0]
    assert not rf._ready and not rf._partial  # none of those names a sampler: nothing to report
    assert rf.response_text("PROMPT answer", "PROMPT") == " answer"


# --- reward reports against the real CurriculumSampler actor (core env: no OpenRLHF import) ---


@pytest.fixture
def sampler_run(tmp_path, shared_data, ray_cluster):
    """A plan and its CurriculumSampler actor; labels as the launcher writes them."""
    from saerl_ray.sampler.actor import actor_name, get_or_create_sampler

    cfg = make_cfg(tmp_path, tmp_path, mode="online")
    plan = write_plan(cfg.run_dir, shared_data)
    sampler = get_or_create_sampler(cfg)
    name = actor_name(cfg.run_dir)

    def label(i, n=1):
        return json.dumps({"id": i, "answer": "7", "cluster": 0, "sampler": name, "n": n})

    return SimpleNamespace(sampler=sampler, name=name, ids=plan.column("id").to_pylist(), label=label)


def sampler_reported(sampler) -> int:
    import ray

    return ray.get(sampler.stats.remote())["reported"]


def test_last_groups_reach_the_sampler_through_the_final_flush(sampler_run, reward_state):
    rf, s = reward_state, sampler_run
    for i in s.ids[:3]:  # three complete groups of two
        rf.reward_func(["Q \\boxed{7}", "Q 8"], ["Q", "Q"], [s.label(i, n=2)] * 2)
    rf.reward_func(["Q \\boxed{7}"], ["Q"], [s.label(s.ids[3], n=2)])  # one of its two samples only
    time.sleep(3 * rf.TICK_SECONDS)  # the timer runs, but no size or time flush is due
    assert sampler_reported(s.sampler) == 0
    assert rf.stats()["waiting"] == 3 and rf.stats()["partial"] == 1
    out = rf.final_flush(timeout=60)
    # The end of the run: the complete groups and the incomplete one, answered before it returns.
    assert sampler_reported(s.sampler) == 4
    assert (out["accepted"], out["dropped"], out["in_flight"], out["waiting"], out["partial"]) == (4, 0, 0, 0, 0)


def test_timer_sends_an_idle_engines_groups(sampler_run, reward_state, monkeypatch):
    rf, s = reward_state, sampler_run
    rf.reward_func(["Q \\boxed{7}", "Q 8"], ["Q", "Q"], [s.label(s.ids[0], n=2)] * 2)
    assert rf.stats()["waiting"] == 1  # reward_func itself sent nothing: no flush was due
    # No reward_func call follows (the engine went idle); only the timer thread can send it now.
    monkeypatch.setattr(rf, "FLUSH_SECONDS", 0.2)
    deadline = time.time() + 30
    while sampler_reported(s.sampler) < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert sampler_reported(s.sampler) == 1 and rf.stats()["waiting"] == 0


def test_unknown_ids_lose_only_their_own_groups(sampler_run, reward_state, caplog):
    rf, s = reward_state, sampler_run
    ids = [s.ids[0], "not-in-plan-1", s.ids[1], s.ids[2], "not-in-plan-2", s.ids[3]]
    rf.reward_func(["Q \\boxed{7}"] * len(ids), ["Q"] * len(ids), [s.label(i) for i in ids])
    with caplog.at_level("ERROR", logger="saerl_ray.openrlhf_reward"):
        out = rf.final_flush(timeout=60)
    # One report of six groups: the four known ones reach the sampler, the unknown two are named.
    assert sampler_reported(s.sampler) == 4
    assert out["accepted"] == 4 and out["dropped"] == 2
    assert sorted(out["dropped_ids"]) == ["not-in-plan-1", "not-in-plan-2"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("not-in-plan-1" in m for m in errors) and any("not-in-plan-2" in m for m in errors)


def test_whole_batch_refusals_are_retried_without_the_named_id(reward_state, ray_cluster):
    """A sampler that raises on the first unknown id (the report() contract before issue 15)."""
    import ray

    @ray.remote
    class Strict:
        def __init__(self):
            self.taken = []

        def report(self, ids, rewards):
            for i in ids:
                if i.startswith("bad"):
                    raise ValueError(f"report: id {i!r} is not in the plan")
            self.taken += ids
            return len(ids)

        def taken_ids(self):
            return self.taken

    rf = reward_state
    name = f"strict-{os.getpid()}-{time.time_ns()}"
    actor = Strict.options(name=name, namespace=rf.SAMPLER_NAMESPACE).remote()
    ids = ["a", "bad'1", "b", "c", "bad2", "d"]  # a quote inside an id survives the repr round trip
    labels = [json.dumps({"id": i, "answer": "1", "sampler": name, "n": 1}) for i in ids]
    rf.reward_func(["\\boxed{1}"] * len(ids), [""] * len(ids), labels)
    out = rf.final_flush(timeout=60)
    assert ray.get(actor.taken_ids.remote()) == ["a", "b", "c", "d"]
    assert (out["accepted"], out["dropped"], out["retries"]) == (4, 2, 2)
    assert sorted(out["dropped_ids"]) == ["bad'1", "bad2"]
    ray.kill(actor)


def test_refusal_without_an_id_is_isolated_by_halving(reward_state, ray_cluster):
    """A refusal that names no id (any other report() failure) is narrowed down by splitting."""
    import ray

    @ray.remote
    class Picky:
        def __init__(self):
            self.taken = []

        def report(self, ids, rewards):
            if "poison" in ids:
                raise RuntimeError("report refused")
            self.taken += ids
            return len(ids)

        def taken_ids(self):
            return self.taken

    rf = reward_state
    name = f"picky-{os.getpid()}-{time.time_ns()}"
    actor = Picky.options(name=name, namespace=rf.SAMPLER_NAMESPACE).remote()
    ids = [f"p{k}" for k in range(6)] + ["poison"] + ["p6"]
    labels = [json.dumps({"id": i, "answer": "1", "sampler": name, "n": 1}) for i in ids]
    rf.reward_func(["\\boxed{1}"] * len(ids), [""] * len(ids), labels)
    out = rf.final_flush(timeout=60)
    assert sorted(ray.get(actor.taken_ids.remote())) == sorted(i for i in ids if i != "poison")
    assert out["accepted"] == 7 and out["dropped_ids"] == ["poison"] and out["retries"] > 0
    ray.kill(actor)


def test_report_answering_unknown_ids_is_counted_not_raised(reward_state, ray_cluster):
    """report() answering {"accepted", "unknown", "invalid"}: skipped groups are counted, nothing is resent."""
    import ray

    @ray.remote
    class Lenient:
        def report(self, ids, rewards):
            unknown = [i for i in ids if i.startswith("x")]
            invalid = [i for i in ids if i.startswith("v")]
            return {"accepted": len(ids) - len(unknown) - len(invalid), "unknown": unknown, "invalid": invalid}

    rf = reward_state
    name = f"lenient-{os.getpid()}-{time.time_ns()}"
    actor = Lenient.options(name=name, namespace=rf.SAMPLER_NAMESPACE).remote()
    ids = ["a", "x1", "b", "v1"]
    rf.reward_func(["\\boxed{1}"] * 4, [""] * 4, [json.dumps({"id": i, "answer": "1", "sampler": name}) for i in ids])
    out = rf.final_flush(timeout=60)
    assert (out["accepted"], out["dropped"], sorted(out["dropped_ids"]), out["retries"], out["calls"]) == (
        2, 2, ["v1", "x1"], 0, 1)
    ray.kill(actor)
