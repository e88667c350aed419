import json
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from testkit import commit_plan, tiny_model

from saerl_ray.core.config import load_config
from saerl_ray.trainers import trl_backend as tb


def test_step_layout_splits_whole_global_batches_over_workers():
    assert tb.step_layout(2, 4, 2) == 4
    assert tb.step_layout(3, 4, 2) == 6
    with pytest.raises(ValueError, match="must split evenly over num_workers"):
        tb.step_layout(3, 3, 2)


def test_local_slices_cover_the_step_once_with_groups_in_order():
    batch = [{"id": f"p{i}"} for i in range(3)]
    slices = [tb.local_slice(batch, 4, r, 2) for r in range(2)]
    merged = [row["id"] for s in slices for row in s]
    # Gathered in rank order, the ranks rebuild exactly the RepeatSampler layout TRL groups by.
    assert merged == ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4
    assert len(slices[0]) == len(slices[1]) == 6


def test_rewards_are_grouped_per_prompt_for_the_sampler():
    ids, groups = tb.group_rewards(["b", "b", "a", "a"], [1.0, 0.0, 0.0, 0.0])
    assert ids == ["b", "a"] and groups == [[1.0, 0.0], [0.0, 0.0]]
    s = tb.served_summary([("b", 2, 0.5, 1.0), ("b", 2, 0.5, 0.0), ("a", 0, 0.1, 0.0), ("a", 0, 0.1, 0.0)])
    assert s["served_ids"] == ["b", "a"] and s["served_clusters"] == {"0": 1, "2": 1}
    assert s["pass_rate"] == 0.25 and s["solved_groups"] == 1
    assert s["served_difficulty_mean"] == pytest.approx(0.3)


def test_algo_settings_are_valid_trl_configs(tmp_path):
    from trl import GRPOConfig

    dapo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                      num_generations=4, **tb.algo_settings("dapo", 0.0))
    assert dapo.loss_type == "dapo" and dapo.epsilon_high == 0.28 and dapo.mask_truncated_completions
    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                      num_generations=4, **tb.algo_settings("grpo", 0.04))
    assert grpo.loss_type == "grpo" and grpo.beta == 0.04
    with pytest.raises(ValueError, match="not supported"):
        tb.algo_settings("ppo", 0.0)


def test_served_row_without_answer_is_named():
    with pytest.raises(ValueError, match=r"without \['answer'\] \(id='abc'\)"):
        tb.to_example({"id": "abc", "prompt": "1+1?", "answer": ""})
    ex = tb.to_example({"id": "abc", "prompt": "1+1?", "answer": "2", "cluster": 3, "difficulty_pred": 0.5})
    assert ex["prompt"][0]["role"] == "user" and "\\boxed{}" in ex["prompt"][0]["content"]
    short = tb.to_example({"id": "abc", "prompt": "1+1?", "answer": "2"}, {"instruction": "", "system": "Be brief."})
    assert short["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]


def write_plan(run_dir, shared_data, n=12, batch_size=2):
    """A small real plan per docs/run_dir.md: GSM8K-train rows, cluster-first batches."""
    rows = [json.loads(line) for line in (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[:n]]
    table = pa.table({
        "position": pa.array(range(n), pa.int64()),
        "batch": pa.array([i // batch_size for i in range(n)], pa.int64()),
        "id": [f"{i:016x}" for i in range(n)],
        "prompt": [r["question"] for r in rows],
        "answer": [r["answer"].rsplit("####", 1)[1].strip() for r in rows],
        "source": ["gsm8k_train"] * n,
        "cluster": pa.array([(i // batch_size) % 3 for i in range(n)], pa.int32()),
        "difficulty_pred": pa.array([i / n for i in range(n)], pa.float32()),
        "mixed": [False] * n,
    })
    commit_plan(run_dir, table)
    return table


def test_grpo_two_steps_on_two_ray_train_workers_reports_to_the_sampler(
    tmp_path, tiny_model_dir, shared_data, ray_cluster
):
    import ray

    from saerl_ray.sampler.actor import get_or_create_sampler

    run_dir = tmp_path / "run"
    plan = write_plan(run_dir, shared_data)
    cfg = load_config(None, {
        "run_dir": str(run_dir), "model.name": str(tiny_model_dir), "plan.batch_size": 2,
        "sampler.mode": "static",
        "train.steps": 2, "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.num_generations": 4,
        # Frozen bottom under DDP with gradient checkpointing on (the default): the callback unhooks the
        # embeddings on the real Trainer (what that does to the backward pass: the unit tests below).
        "train.max_new_tokens": 8, "train.save_every": 1, "train.trainable_layers": 1,
    })
    summary = tb.run(cfg)
    lines = [json.loads(x) for x in (run_dir / "train/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    # Static mode: plan order exactly, one plan batch per step, no prompt on two workers.
    ids = plan.column("id").to_pylist()
    assert [x["served_ids"] for x in lines] == [ids[0:2], ids[2:4]]
    assert all("loss" in x and "reward" in x and "served_clusters" in x for x in lines)
    stats = ray.get(get_or_create_sampler(cfg).stats.remote())
    assert stats["reported"] == 4
    assert summary["sampler"]["reported"] == 4
    assert (run_dir / "train/model/config.json").exists()
    assert (run_dir / "train/_DONE.json").exists()


def test_frozen_bottom_gets_no_backward_pass_under_gradient_checkpointing():
    model = tiny_model(num_layers=4).train()
    tb.freeze_below(model, 1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the Trainer does
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).requires_grad))
    x = torch.randint(0, 250, (2, 6))
    model(x).logits.sum().backward()
    assert seen[-1]  # HF's hook: the frozen block's output is in the autograd graph
    model.zero_grad()
    _, callback_cls = tb._trainer_classes()
    begin = SimpleNamespace(gradient_checkpointing=True), SimpleNamespace(global_step=1), None  # args, state, control
    callback_cls(None, "unused", 1, [], 0, {}, frozen_bottom=False).on_train_begin(*begin, model=model)
    model(x).logits.sum().backward()
    assert seen[-1]  # every layer trained: the hook stays
    model.zero_grad()
    callback_cls(None, "unused", 1, [], 0, {}, frozen_bottom=True).on_train_begin(*begin, model=model)
    model(x).logits.sum().backward()
    assert not seen[-1]
    top = model.model.layers[3].mlp.down_proj.weight
    assert top.grad is not None and top.grad.abs().sum() > 0  # the trained block still learns


def test_freeze_below_leaves_only_the_top_layers_and_final_norm_trainable():
    model = tiny_model(num_layers=4)
    total = sum(p.numel() for p in model.parameters())
    tb.freeze_below(model, None)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total
    tb.freeze_below(model, 2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for name in trainable)
    assert any(name.startswith("model.layers.2.") for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < total
    with pytest.raises(ValueError, match="has 4 decoder layers"):
        tb.freeze_below(model, 5)


@pytest.mark.slow
def test_resume_continues_model_and_sampler_from_the_last_checkpoint(tmp_path, tiny_model_dir, shared_data, ray_cluster):
    import ray

    from saerl_ray.sampler.actor import get_or_create_sampler

    run_dir = tmp_path / "run"
    plan = write_plan(run_dir, shared_data)
    over = {
        "run_dir": str(run_dir), "model.name": str(tiny_model_dir), "plan.batch_size": 2, "sampler.mode": "static",
        "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.max_new_tokens": 8, "train.save_every": 1,
    }
    out = tmp_path / "train_out"
    out.mkdir()
    sampler = get_or_create_sampler(load_config(None, over))
    tb.fit(load_config(None, {**over, "train.steps": 2}), sampler, out, str(tiny_model_dir), 2, tmp_path / "scratch")
    # The sampler runs ahead of the last checkpoint; resuming must rewind it to the checkpoint's state.
    ray.get(sampler.next_batch.remote(2))
    tb.fit(load_config(None, {**over, "train.steps": 3}), sampler, out, str(tiny_model_dir), 2, tmp_path / "scratch")
    lines = [x for x in tb.read_metrics(out / "metrics.jsonl") if "loss" in x]
    ids = plan.column("id").to_pylist()
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert lines[2]["served_ids"] == ids[4:6]


@pytest.mark.slow
def test_grpo_on_smollm2_from_a_real_plan(tmp_path, smollm2_dir, shared_data, ray_cluster, monkeypatch):
    run_dir = tmp_path / "run"
    write_plan(run_dir, shared_data, n=16, batch_size=2)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                               for a, b in [(2, 3), (4, 1), (6, 2), (5, 4)]))
    cfg = load_config(None, {
        "run_dir": str(run_dir), "model.name": str(smollm2_dir), "plan.batch_size": 2,
        "train.steps": 3, "train.num_workers": 1, "train.cpus_per_worker": 1, "train.num_generations": 4,
        "train.max_new_tokens": 24, "train.learning_rate": 1e-5, "train.heldout_file": "heldout.jsonl",
        "train.heldout_every": 3,
    })
    monkeypatch.chdir(tmp_path)  # a relative held-out path must reach the workers (their cwd differs)
    summary = tb.run(cfg)
    lines = [x for x in tb.read_metrics(run_dir / "train/metrics.jsonl") if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(len(x["served_ids"]) == 2 for x in lines)
    assert summary["sampler"]["reported"] == 6
    assert [s for s, _ in summary["heldout_curve"]] == [0, 3]
    assert (run_dir / "train/model/model.safetensors").exists()


def test_precision_is_bf16_on_a_cuda_placement_and_unchanged_on_cpu():
    # bf16 autocast over fp32 master weights: pure bf16 weights would round most small AdamW steps away.
    assert tb.train_precision(use_gpu=True, cpu_dtype="float32", bf16_supported=True) == ("float32", True)
    assert tb.train_precision(use_gpu=False, cpu_dtype="float32", bf16_supported=True) == ("float32", False)
    assert tb.train_precision(use_gpu=False, cpu_dtype="bfloat16", bf16_supported=False) == ("bfloat16", False)
    # A GPU without bf16 (pre-Ampere) trains in fp32, not in the CPU dtype nor in unscaled fp16.
    assert tb.train_precision(use_gpu=True, cpu_dtype="float16", bf16_supported=False) == ("float32", False)


def test_heldout_rows_travel_with_the_worker_config_not_as_a_driver_path(tmp_path, monkeypatch):
    """A Ray Train worker on another node cannot open the driver's held-out file: `fit` reads it and ships
    the rows; the worker never gets the path to open."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "train.heldout_file": str(heldout),
                             "train.heldout_every": 1})
    seen = {}

    class FakeTrainer:
        def __init__(self, loop, train_loop_config, **_):
            seen.update(train_loop_config)

        def fit(self):
            return SimpleNamespace(error=None)

    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    tb.fit(cfg, sampler=None, out_dir=str(tmp_path / "out"), policy="p", prompts_per_step=2, scratch=tmp_path / "s")
    heldout.unlink()  # the driver's file is gone by the time a worker would look
    assert seen["heldout"] == [{"prompt": "1+1?", "answer": "2"}]
