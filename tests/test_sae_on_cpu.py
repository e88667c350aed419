"""sae stage on a tiny random model: a real sae-lens TopK SAE trained on streamed lens activations."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saerl_ray.core.config import load_config
from saerl_ray.core.stage import Stage
from saerl_ray.stages import sae


def _ingest(run_dir, shared_data, n=40, split="train"):
    rows = [json.loads(line) for line in open(shared_data / "math500.jsonl")][:n]
    st = Stage(run_dir, "ingest", f"test-ingest-{split}")
    tmp = Path(st.begin())
    pq.write_table(pa.table({
        "id": [f"{i:016x}" for i in range(n)], "prompt": [r["problem"] for r in rows], "split": [split] * n,
    }), tmp / "prompts.parquet")
    st.commit({"rows": n})


def _config(run_dir, model_dir, **extra):
    return load_config(None, {
        "run_dir": str(run_dir), "model.name": str(model_dir), "sae.layer": 1, "sae.expansion": 4,
        "sae.k": 8, "sae.training_tokens": 8192, "sae.batch_size_tokens": 512, "sae.buffer_tokens": 2048,
        "sae.holdout_prompts": 8, **extra,
    })


def test_sae_stage_trains_a_loadable_sae_with_held_out_metrics(tmp_path, tiny_model_dir, shared_data):
    from sae_lens import SAE

    run_dir = tmp_path / "run"
    _ingest(run_dir, shared_data)
    cfg = _config(run_dir, tiny_model_dir)
    summary = sae.run(cfg)
    loaded = SAE.load_from_disk(str(run_dir / "sae"))
    assert (loaded.cfg.d_in, loaded.cfg.d_sae) == (64, 256)
    lens = json.loads((run_dir / "sae/lens.json").read_text())
    assert lens["layer"] == 1 and lens["hook_name"] == "model.layers.1" and lens["d_sae"] == 256
    assert lens["model"] == str(tiny_model_dir) and lens["k"] == 8 and lens["chat_template"] is False
    # The SAE's own cfg.json names its hook, so a copy of it used at another layer is refused.
    assert lens["sae_hook_name"] == "model.layers.1"
    # TopK: at most k latents per token; the SAE reconstructs better than the mean does.
    assert 0 < summary["l0"] <= 8
    assert 0 < summary["explained_variance"] <= 1 and summary["mse"] > 0
    assert 0 <= summary["dead_fraction"] < 1 and summary["holdout_tokens"] > 0
    assert summary["train_prompts"] + summary["holdout_prompts"] == 40
    # Same config: no-op. Changed config: recomputed.
    marker = (run_dir / "sae/_DONE.json").read_text()
    assert sae.run(cfg) == summary and (run_dir / "sae/_DONE.json").read_text() == marker
    sae.run(_config(run_dir, tiny_model_dir, **{"sae.k": 4}))
    assert json.loads((run_dir / "sae/lens.json").read_text())["k"] == 4


def test_disk_source_copies_a_saved_sae(tmp_path, tiny_model_dir):
    from sae_lens import TopKSAE, TopKSAEConfig

    src = tmp_path / "saved"
    TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=4)).save_model(src)
    summary = sae.run(_config(tmp_path / "run", tiny_model_dir, **{"sae.source": "disk", "sae.path": str(src)}))
    assert summary["d_sae"] == 128 and sae.load_sae(tmp_path / "run/sae").cfg.d_sae == 128


def test_disk_source_with_wrong_width_is_a_clear_error(tmp_path, tiny_model_dir):
    from sae_lens import TopKSAE, TopKSAEConfig

    src = tmp_path / "saved"
    TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4)).save_model(src)
    with pytest.raises(ValueError, match="d_in=32 but model .* has hidden size 64"):
        sae.run(_config(tmp_path / "run", tiny_model_dir, **{"sae.source": "disk", "sae.path": str(src)}))
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        sae.run(_config(tmp_path / "run2", tiny_model_dir, **{"sae.source": "disk", "sae.path": str(tmp_path)}))


def test_training_needs_prompts_of_the_training_split(tmp_path, tiny_model_dir, shared_data):
    _ingest(tmp_path / "run", shared_data, n=10, split="test")
    with pytest.raises(ValueError, match=r"prompts.parquet: 0 prompts with split='train'"):
        sae.run(_config(tmp_path / "run", tiny_model_dir))


def test_held_out_prompts_are_disjoint_from_training_prompts(tmp_path, shared_data):
    _ingest(tmp_path / "run", shared_data, n=40)
    train, held = sae.train_prompts(tmp_path / "run/ingest/prompts.parquet", "train", 8, seed=0)
    assert len(held) == 8 and len(train) == 32 and not set(train) & set(held)
    assert sae.train_prompts(tmp_path / "run/ingest/prompts.parquet", "train", 8, seed=0) == (train, held)


def test_decoder_bias_starts_at_the_activation_mean_in_scaled_units():
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    x = torch.randn(1000, 16) + 5.0
    s = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    sae.init_decoder_bias(s, x)
    scale = 16**0.5 / x.norm(dim=-1).mean()
    torch.testing.assert_close(s.b_dec.detach(), x.mean(0) * scale)


def test_peek_tokens_puts_the_sample_back_in_front():
    chunks = [torch.full((3, 2), float(i)) for i in range(5)]
    sample, stream = sae.peek_tokens(iter(chunks), 5)
    assert sample.shape == (6, 2)
    assert torch.equal(torch.cat(list(stream)), torch.cat(chunks))


def test_evaluate_scores_perfect_and_mean_reconstructions():
    from sae_lens import TopKSAE, TopKSAEConfig

    s = TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=8, apply_b_dec_to_input=False))
    with torch.no_grad():
        s.W_enc.copy_(torch.cat([torch.eye(4), -torch.eye(4)], 1))
        s.W_dec.copy_(torch.cat([torch.eye(4), -torch.eye(4)], 0))
        s.b_enc.zero_(), s.b_dec.zero_()
    x = torch.randn(200, 4)
    m = sae.evaluate(s, iter([x[:100], x[100:]]))
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5) and m["holdout_tokens"] == 200
    assert np.isclose(m["mse"], 0, atol=1e-10)


def test_driver_stage_drops_lens_and_sae_then_empties_the_cuda_cache(tmp_path, tiny_model_dir, shared_data,
                                                                     monkeypatch):
    """An 8-GPU SAE stage in the driver must hand its GPU memory back before the features actors start:
    by the time the cache is emptied, nothing may still reference the lens or either SAE."""
    import gc
    import weakref

    _ingest(tmp_path / "run", shared_data)
    refs, at_release = {}, []
    real_lens, real_bias, real_load = sae.load_lens_model, sae.init_decoder_bias, sae.load_sae

    def lens(*a, **k):
        model = real_lens(*a, **k)
        refs["lens"] = weakref.ref(model)
        return model

    def bias(s, sample):
        refs["training_sae"] = weakref.ref(s)
        return real_bias(s, sample)

    def load(*a, **k):
        s = real_load(*a, **k)
        refs["inference_sae"] = weakref.ref(s)
        return s

    monkeypatch.setattr(sae, "load_lens_model", lens)
    monkeypatch.setattr(sae, "init_decoder_bias", bias)
    monkeypatch.setattr(sae, "load_sae", load)
    monkeypatch.setattr(sae, "cuda_was_used", lambda: True)  # as after a run on CUDA
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: at_release.append({k: r() is None for k, r in refs.items()}))
    gc.disable()  # only the stage's own collection may break the trainer's reference cycles
    try:
        sae.run(_config(tmp_path / "run", tiny_model_dir))
    finally:
        gc.enable()
    assert at_release == [{"lens": True, "training_sae": True, "inference_sae": True}]


def test_gpu_sae_training_runs_in_a_task_whose_process_exits():
    """sae.num_gpus > 0: a Ray task reserves the GPUs, and its worker exits afterwards (max_calls=1), so
    the CUDA context and cache go with it. Ray keeps max_calls only when given to ray.remote itself."""
    import ray

    task = ray.remote(**sae.gpu_task_options(8))(sae.build)
    assert task._default_options["num_gpus"] == 8 and task._default_options["max_calls"] == 1
    assert sae.gpu_task_options(1)["num_gpus"] == 1


def test_sae_num_gpus_dispatches_training_to_the_gpu_task_but_not_a_finished_stage(tmp_path, tiny_model_dir,
                                                                                   shared_data, monkeypatch):
    import ray

    _ingest(tmp_path / "run", shared_data)
    cfg = _config(tmp_path / "run", tiny_model_dir, **{"sae.num_gpus": 2})
    launched = []

    def fake_remote(**options):
        def wrap(fn):
            class Task:
                @staticmethod
                def remote(c):
                    launched.append(options)
                    return fn(c)  # run it here: this machine has no GPU to reserve

            return Task

        return wrap

    monkeypatch.setattr(ray, "remote", fake_remote)
    monkeypatch.setattr(ray, "get", lambda x: x)
    monkeypatch.setattr("saerl_ray.core.ray_init.init_ray", lambda *_: None)
    summary = sae.run(cfg)
    assert launched == [sae.gpu_task_options(2)] and summary["d_sae"] == 256
    assert sae.run(cfg) == summary and len(launched) == 1  # done: no task, no GPU node woken
