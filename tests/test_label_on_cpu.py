import pyarrow.parquet as pq
import pytest

import saerl_ray.stages.label as label
from saerl_ray.core.config import load_config
from saerl_ray.pipeline import call_stage


def _cfg(run_dir, model_dir, shared_data, **extra):
    return load_config(None, {
        "run_dir": str(run_dir),
        "model.name": str(model_dir),
        "ingest.inputs": [
            {"path": str(shared_data / "gsm8k_train.jsonl"), "preset": "gsm8k", "limit": 30},
            {"path": str(shared_data / "math500.jsonl"), "preset": "math", "split": "test", "limit": 10},
        ],
        "label.n_prompts": 7,
        "label.k": 3,
        "label.batch_size": 3,
        "label.max_new_tokens": 4,
        **extra,
    })


def test_label_writes_pass_rates_for_a_seeded_train_subset(tmp_path, tiny_model_dir, shared_data):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data)
    call_stage("ingest", cfg)
    summary = call_stage("label", cfg)
    prompts = pq.read_table(tmp_path / "run/ingest/prompts.parquet").to_pylist()
    train_ids = {p["id"] for p in prompts if p["split"] == "train"}
    table = pq.read_table(tmp_path / "run/label/pass_rates.parquet")
    assert table.column_names == ["id", "pass_rate", "k", "correct"]
    rows = table.to_pylist()
    assert len(rows) == 7 == summary["rows"] and len({r["id"] for r in rows}) == 7
    assert {r["id"] for r in rows} <= train_ids  # only the configured split
    for r in rows:
        assert r["k"] == 3 and 0 <= r["correct"] <= 3 and r["pass_rate"] == r["correct"] / 3
    assert not (tmp_path / "run/label/chunks").exists()
    # Same seed -> same subset; another seed -> another subset.
    again = label.choose_subset(pq.read_table(tmp_path / "run/ingest/prompts.parquet"), "train", 7, cfg.seed)
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    other = label.choose_subset(pq.read_table(tmp_path / "run/ingest/prompts.parquet"), "train", 7, cfg.seed + 1)
    assert [r["id"] for r in other] != [r["id"] for r in rows]


def test_label_resumes_from_finished_chunks_after_a_crash(tmp_path, tiny_model_dir, shared_data, monkeypatch):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data)
    call_stage("ingest", cfg)
    real_chunk = label.label_chunk
    calls = []

    def crash_on_second(sampler, rows, *args):
        calls.append([r["id"] for r in rows])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_chunk(sampler, rows, *args)

    monkeypatch.setattr(label, "label_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        call_stage("label", cfg)
    assert len(list((tmp_path / "run/label/chunks").glob("*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(label, "label_chunk", lambda *a: (calls.append([r["id"] for r in a[1]]), real_chunk(*a))[1])
    call_stage("label", cfg)
    assert len(calls) == 2  # chunks 1 and 2 only; chunk 0 was kept from the crashed run
    ids = pq.read_table(tmp_path / "run/label/pass_rates.parquet").column("id").to_pylist()
    assert ids[3:] == calls[0] + calls[1] and len(ids) == 7


def test_label_without_gradable_prompts_names_the_split(tmp_path, tiny_model_dir, shared_data):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data, **{"label.split": "validation"})
    call_stage("ingest", cfg)
    with pytest.raises(ValueError, match="no prompts of split 'validation'"):
        call_stage("label", cfg)


def test_vllm_gets_bf16_the_memory_fraction_and_the_held_gpus():
    from saerl_ray.core.device import Placement

    one = label.vllm_engine_args("/m", "float32", False, Placement("cuda:0", 1), 0.7)
    # model.dtype's float32 default is the CPU dtype: on a GPU vLLM generates in bf16.
    assert one == {"model": "/m", "dtype": "bfloat16", "trust_remote_code": False,
                   "gpu_memory_utilization": 0.7, "tensor_parallel_size": 1}
    four = label.vllm_engine_args("/m", "float16", True, Placement("cuda:0", 4), 0.85)
    # Another half-precision dtype is kept; four held GPUs are one tensor-parallel engine whose workers
    # are subprocesses on them (vLLM's Ray backend would wait for GPUs this actor already holds).
    assert four["dtype"] == "float16" and four["tensor_parallel_size"] == 4
    assert four["distributed_executor_backend"] == "mp" and four["trust_remote_code"] is True
    with pytest.raises(ValueError, match="vLLM needs a GPU.*--label.num_gpus"):
        label.vllm_engine_args("/m", "float32", False, Placement("cpu", 0), 0.85)


def test_gpu_memory_utilization_is_a_fraction(tmp_path, tiny_model_dir, shared_data):
    from saerl_ray.core.config import ConfigError

    assert _cfg(tmp_path, tiny_model_dir, shared_data).label.gpu_memory_utilization == 0.85
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            _cfg(tmp_path, tiny_model_dir, shared_data, **{"label.gpu_memory_utilization": bad})


def test_label_gpus_are_reserved_by_a_ray_actor_killed_afterwards(tmp_path, tiny_model_dir, shared_data,
                                                                  ray_cluster, monkeypatch):
    """label.num_gpus=2: the sampler runs in a Ray actor asking for 2 GPUs (so Ray co-places no other GPU
    actor there) and is killed when labelling ends. This machine has no GPU: the actor runs with the
    GPU request swapped for 0, which exercises the same code path (HF generate, no vLLM here)."""
    import ray

    cfg = _cfg(tmp_path / "run", tiny_model_dir, shared_data, **{"label.num_gpus": 2})
    call_stage("ingest", cfg)
    assert label.sampler_actor_options(2)["num_gpus"] == 2
    requested, actors = [], []
    real_options, real_init = label.sampler_actor_options, label.RemoteSampler.__init__

    def no_gpu(num_gpus):
        requested.append(real_options(num_gpus))
        return {**real_options(num_gpus), "num_gpus": 0, "num_cpus": 0.5}

    def record(self, *a):
        real_init(self, *a)
        actors.append(self.actor)

    monkeypatch.setattr(label, "sampler_actor_options", no_gpu)
    monkeypatch.setattr(label.RemoteSampler, "__init__", record)
    summary = call_stage("label", cfg)
    assert [r["num_gpus"] for r in requested] == [2] and summary["backend"] == "hf" and summary["rows"] == 7
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].get_backend.remote())  # killed: its GPUs are free for the next stage
