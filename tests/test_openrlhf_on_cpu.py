"""OpenRLHF 0.11.2 glue against the real OpenRLHF, in the optional CPU env (`make test-openrlhf`).

What runs for real: OpenRLHF's CLI parser + validation, `get_strategy`, `PPOTrainer.__init__`
(`prepare_datasets`, `PromptDataset` with a chat template, `strategy.setup_dataloader` ->
`StatefulDataLoader`), `SamplesGenerator.generate_samples` with DAPO dynamic filtering,
`SingleTurnAgentExecutor` loading our reward file by path, the CurriculumSampler Ray actor. What is
scripted: only vLLM's token generation (`ScriptedEngine` below; it needs a GPU in this code path).
"""

from __future__ import annotations

from pathlib import Path

import asyncio
import hashlib
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saerl_ray.config import load_config
from saerl_ray.integrations import openrlhf_launch as launch
from saerl_ray.stage import Stage

# Tests that import OpenRLHF run only in .venv-openrlhf; the rest run in the core env too.
needs_openrlhf = pytest.mark.openrlhf

N_PROMPTS, BATCH, GROUP = 24, 4, 4


def write_plan(run_dir, shared_data):
    """A plan over real MATH-500 rows: 3 clusters of 8, cluster-first batches of 4."""
    rows = [json.loads(line) for line in (shared_data / "math500.jsonl").read_text().splitlines()[:N_PROMPTS]]
    st = Stage(run_dir, "plan", "test-plan")
    tmp = Path(st.begin(keep_partial=False))
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
    pq.write_table(table, tmp / "plan.parquet")
    st.commit({"rows": N_PROMPTS})
    return table


def make_cfg(tmp_path, policy_dir, algo="grpo", mode="static", steps=4, extra=()):
    return load_config(None, {
        "run_dir": str(tmp_path / "run"), "model.name": str(policy_dir), "plan.batch_size": BATCH,
        "sampler.mode": mode, "train.backend": "openrlhf", "train.algo": algo, "train.steps": steps,
        "train.num_generations": GROUP, "train.max_new_tokens": 64, "train.extra_args": list(extra),
    })


@pytest.fixture
def run(tmp_path, smollm2_dir, shared_data, ray_cluster, monkeypatch):
    """Plan + sampler actor + prompt file + parsed OpenRLHF args, as `openrlhf_launch.run` makes them."""

    def setup(algo="grpo", mode="static", steps=4):
        from saerl_ray.sampler import get_or_create_sampler

        cfg = make_cfg(tmp_path, smollm2_dir, algo, mode, steps)
        plan = write_plan(cfg.run_dir, shared_data)
        sampler = get_or_create_sampler(cfg)
        name = launch.actor_name(sampler)
        flags = launch.build_flags(cfg, launch.out_dir(cfg) / "prompts.parquet", str(smollm2_dir))
        launch.write_prompt_file(cfg, name, GROUP)
        args = launch.parse_flags(flags)
        for k, v in launch.trainer_env(name, steps * BATCH).items():
            monkeypatch.setenv(k, v)
        return SimpleNamespace(cfg=cfg, plan=plan, sampler=sampler, name=name, args=args)

    yield setup


def make_trainer(args):
    """The undecorated subclass, constructed in-process exactly as the Ray actor would be."""
    from openrlhf.utils import get_strategy

    from saerl_ray.integrations.openrlhf_trainer import SaerlPPOTrainer

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
        assert args.ckpt.path.startswith(str(tmp_path / "run" / "openrlhf"))
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


def test_reward_func_scores_groups_and_never_raises():
    from saerl_ray.integrations import openrlhf_reward as rf

    label = json.dumps({"id": "p1", "answer": "\\frac{1}{2}", "cluster": 0, "sampler": "s", "n": 2})
    out = rf.reward_func(["Q? so \\boxed{0.5}", "Q? it is 7"], ["Q?", "Q?"], [label, label])
    assert out["scores"].tolist() == [1.0, 0.0] and out["rewards"].tolist() == [1.0, 0.0]
    assert "p1" not in rf._partial  # the group of 2 is complete and queued for its sampler
    assert ("p1", [1.0, 0.0]) in rf._ready.get("s", [])
    rf._ready.clear()
    # Plain-string labels (eval sets) are answers; garbage labels score 0 instead of raising.
    assert rf.reward_func(["Q? \\boxed{3}"], ["Q?"], ["3"])["scores"].tolist() == [1.0]
    assert rf.reward_func(["Q? \\boxed{3}"], ["Q?"], ['{"id": 1, "n": "x"}'])["scores"].tolist() == [0.0]
    assert rf.response_text("PROMPT answer", "PROMPT") == " answer"
