"""Device placement, device_map planning, token-budget batching and pretrained-SAE hook checks, on CPU.

Nothing here pretends to have CUDA: the decision functions take what the process holds as arguments,
the GPU code paths that need a device are run by benchmarks/gpu_check.sh on a GPU machine, and the
meta device stands in for "not the CPU" where a test must catch tensors created on the wrong device.
"""

import itertools
import json
import random

import numpy as np
import pytest
import torch
from testkit import tiny_model

from saerl_ray.core import device as D
from saerl_ray.core.config import ConfigError, UserError, load_config
from saerl_ray.core.lens import (
    Lens,
    encode_prompts,
    iter_residuals,
    length_buckets,
    load_lens_model,
    residuals,
)
from saerl_ray.core.models import load_model, load_tokenizer, model_config
from saerl_ray.stages import features, sae

# --- which device ----------------------------------------------------------------------------------


def test_select_device_uses_cuda_only_for_a_process_that_holds_gpus():
    assert D.select_device([], cuda_available=False) == "cpu"
    # A Ray worker that reserved no GPU stays on the CPU even where CUDA exists: the GPU is another actor's.
    assert D.select_device([], cuda_available=True) == "cpu"
    assert D.select_device([3], cuda_available=True) == "cuda:0"  # Ray renumbers: its GPUs are cuda:0..n-1
    with pytest.raises(RuntimeError, match=r"holds GPU\(s\) \[0, 1\] but torch .* has no CUDA"):
        D.select_device([0, 1], cuda_available=False)


# --- the NVIDIA driver torch's CUDA needs --------------------------------------------------------------


def test_driver_check_names_the_driver_found_and_the_one_needed():
    msg = D.driver_error("570.124.06", "13.0")  # a CUDA 12.8 driver under torch 2.13's CUDA 13.0
    assert msg and "\n" not in msg and "570.124.06" in msg and ">= 580" in msg and "CUDA 13.0" in msg
    assert D.driver_error("580.65.06", "13.0") is None
    assert D.driver_error("570.124.06", "12.8") is None  # CUDA 12.x runs on any driver >= 525.60.13
    assert D.driver_error("525.60.12", "12.8") and D.driver_error("525.60.13", "12.8") is None
    assert D.driver_error(None, "13.0") is None  # no NVIDIA driver: a CPU host, nothing to stop
    assert D.driver_error("470.1", None) is None  # a CPU build of torch never touches the driver
    with pytest.raises(ValueError, match="CUDA 14.0"):
        D.min_driver("14.0")


@pytest.mark.parametrize("text", [
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  Thu Feb 20 15:49:19 UTC 2025\nGCC version: gcc 12",
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  (dvs-builder@U16)  Thu Feb 20",
])
def test_driver_version_is_read_from_the_kernel_module(text):
    assert D.parse_driver_version(text) == "570.124.06"


def test_a_gpu_stage_on_an_old_driver_stops_before_choosing_a_device(monkeypatch):
    # On such a driver torch.cuda reports no GPU at all: without the check the stage would quietly run
    # on the CPU (a driver process) or blame the torch build (a GPU actor).
    monkeypatch.setattr(D, "installed_driver", lambda: "570.124.06")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match=r"NVIDIA driver 570\.124\.06 .* needs driver >= 580"):
        D.current_placement()  # a UserError: the CLI prints it as one line, no traceback
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: CPU work is not blocked
    assert D.current_placement() == D.Placement("cpu", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(D, "installed_driver", lambda: "580.65.06")
    assert D.current_placement() == D.Placement("cpu", 0)  # new enough; this machine has no GPU


def test_this_process_and_a_zero_gpu_ray_worker_get_the_cpu(ray_cluster):
    here = D.current_placement()
    assert here.is_cuda == torch.cuda.is_available() and (here.n_gpus > 0) == here.is_cuda
    # Inside a Ray worker the answer comes from ray.get_gpu_ids(), not from the node's devices.
    ids, placement = ray_cluster.get([ray_cluster.remote(num_cpus=0.25)(D.held_gpu_ids).remote(),
                                      ray_cluster.remote(num_cpus=0.25)(D.current_placement).remote()])
    assert ids == [] and placement == D.Placement("cpu", 0)


def test_batch_limits_keep_the_cpu_default_and_use_a_token_budget_on_gpu():
    cpu, gpu = D.Placement("cpu"), D.Placement("cuda:0", 1)
    assert D.batch_limits(cpu, 32, None) == (32, None)  # the measured CPU behaviour: prompts per forward
    assert D.batch_limits(cpu, 32, 2048) == (32, 2048)
    assert D.batch_limits(gpu, 32, None) == (None, D.GPU_TOKENS_PER_BATCH)  # no prompt count on a GPU
    assert D.batch_limits(gpu, 32, 4096) == (None, 4096)
    assert D.generation_dtype("float32", gpu) == "bfloat16" and D.generation_dtype("float32", cpu) == "float32"
    assert D.generation_dtype("float16", gpu) == "float16"


def test_auto_token_budget_fits_memory_but_never_below_one_long_prompt():
    per_token = 4 * 131072 * 2  # CODE_COPIES x a 131k-latent SAE in bf16
    assert D.auto_tokens_per_batch(80 * 2**30, 1024, 512) == D.GPU_TOKENS_PER_BATCH  # plenty: the cap
    b = D.auto_tokens_per_batch(20 * 2**30, per_token, 512)
    assert 512 <= b < D.GPU_TOKENS_PER_BATCH and b * per_token <= 10 * 2**30
    assert D.auto_tokens_per_batch(2**20, per_token, 512) == 512  # nearly full GPU: one prompt at a time


def test_feature_and_sae_budgets_must_hold_the_longest_prompt():
    with pytest.raises(ConfigError, match="features.max_tokens_per_batch=256 is below features.max_tokens=512"):
        load_config(None, {"features.max_tokens_per_batch": 256})
    with pytest.raises(ConfigError, match="sae.max_tokens_per_batch=100 is below sae.max_tokens_per_prompt=256"):
        load_config(None, {"sae.max_tokens_per_batch": 100})
    assert load_config(None, {"features.max_tokens_per_batch": 4096}).features.max_tokens_per_batch == 4096


# --- token-budget batching --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cap", [None, 7])
def test_token_budget_buckets_hold_every_row_once_within_budget(seed, cap):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, size=int(rng.integers(1, 200)))
    lengths[0] = 300  # longer than the budget: alone in its batch
    budget = 256
    buckets = length_buckets(lengths, cap, budget)
    flat = np.concatenate(buckets)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every row exactly once
    assert (np.diff(lengths[flat]) >= 0).all()  # length-sorted, so padding stays small
    for b in buckets:
        padded = len(b) * int(lengths[b].max())
        assert padded <= budget or len(b) == 1
        assert cap is None or len(b) <= cap
    # Greedy packing: a batch was closed only because the next row would not fit.
    for b, nxt in zip(buckets, buckets[1:]):
        assert len(b) == cap or (len(b) + 1) * int(lengths[nxt[0]]) > budget


def test_without_a_budget_buckets_are_the_old_fixed_prompt_count():
    lengths = np.random.default_rng(0).integers(1, 200, size=101)
    order = np.argsort(lengths, kind="stable")
    old = [order[i:i + 32] for i in range(0, len(order), 32)]
    got = length_buckets(lengths, 32)
    assert len(got) == len(old) and all(np.array_equal(a, b) for a, b in zip(got, old))
    with pytest.raises(ValueError, match="needs batch_size or max_tokens_per_batch"):
        length_buckets(lengths, None)


def test_iter_residuals_under_a_token_budget_matches_each_prompt_alone(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    texts = ["x" * n for n in (9, 2, 40, 4, 11, 25, 3, 17)]
    enc = encode_prompts(tok, texts, False, 64)
    model = load_lens_model(Lens(str(tiny_model_dir), 1))
    budget = 64
    seen, forwards = [], 0
    for rows, acts, mask in iter_residuals(model, 1, enc, None, tok.pad_token_id, max_tokens_per_batch=budget,
                                           device="cpu"):
        assert acts.shape[0] * acts.shape[1] <= budget or len(rows) == 1
        forwards += 1
        for j, i in enumerate(rows):
            alone = residuals(model, 1, torch.from_numpy(enc.ids[i])[None], None)[0]
            torch.testing.assert_close(acts[j, :len(enc.ids[i])], alone, atol=1e-5, rtol=1e-5)
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(texts)))
    assert forwards < len(texts)  # short prompts shared forwards


# --- device_map planning ------------------------------------------------------------------------------


def test_split_contiguous_is_the_most_balanced_contiguous_split():
    """Against brute force over every set of cut points: the heaviest device as light as possible,
    then the lightest as heavy as possible."""
    rng = random.Random(0)
    for _ in range(200):
        m, n = rng.randint(1, 9), rng.randint(1, 5)
        sizes = [rng.randint(1, 20) for _ in range(m)]
        got = D.split_contiguous(sizes, n)
        assert len(got) == m and got == sorted(got) and got[0] == 0
        if m <= n:
            assert got == list(range(m))
            continue
        assert sorted(set(got)) == list(range(n))  # no GPU left empty
        loads = [sum(s for s, d in zip(sizes, got) if d == k) for k in range(n)]
        best = min((max(ls), -min(ls)) for cuts in itertools.combinations(range(1, m), n - 1)
                   for b in [(0, *cuts, m)] for ls in [[sum(sizes[b[k]:b[k + 1]]) for k in range(n)]])
        assert (max(loads), -min(loads)) == best, (sizes, n, got)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_device_map_covers_every_kept_layer_balanced_within_one_layer(n):
    model = D.meta_model(model_config_for_tiny(num_layers=7))  # layers 0..6: a hook at layer 6
    plan = D.plan_device_map(model, n)
    layers = [f"model.layers.{i}" for i in range(7)]
    assert set(layers) <= set(plan) and plan["model.embed_tokens"] == 0
    assert [plan[k] for k in layers] == sorted(plan[k] for k in layers)  # contiguous runs, in order
    assert set(plan.values()) == set(range(n))
    # Every parameter is under exactly one key (transformers needs full coverage).
    for name, _ in model.named_parameters():
        assert sum(name.startswith(k + ".") for k in plan) == 1, name
    loads = D.device_loads(model, plan)
    layer_bytes = max(size for _, size, is_layer in D.module_sizes(model) if is_layer)
    assert sum(loads.values()) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert max(loads.values()) - min(loads.values()) <= layer_bytes


def model_config_for_tiny(num_layers):
    return tiny_model(num_layers=num_layers).config


def test_a_planned_device_map_loads_the_truncated_model(tiny_model_dir):
    """transformers accepts the plan's keys: the same plan with every device replaced by the CPU loads
    a model whose hook output equals the plain load's."""
    config = model_config(str(tiny_model_dir), num_layers=3)
    plan = D.plan_device_map(D.meta_model(config), 2)
    assert set(plan.values()) == {0, 1}
    split = load_model(str(tiny_model_dir), num_layers=3, device_map={k: "cpu" for k in plan}, config=config)
    plain = load_model(str(tiny_model_dir), num_layers=3)
    ids = torch.tensor([[256, 72, 105, 32, 116, 104, 101, 114, 101]])
    torch.testing.assert_close(residuals(split, 2, ids, None), residuals(plain, 2, ids, None))
    assert D.model_device_map(D.Placement("cpu"), config) is None  # CPU: the plain load, unchanged
    assert D.model_device_map(D.Placement("cuda:0", 1), config) == {"": 0}
    assert D.model_device_map(D.Placement("cuda:0", 2), config) == plan


def _real_shape(family, **kw):
    from transformers import LlamaConfig, Qwen2Config

    return (LlamaConfig if family == "llama" else Qwen2Config)(**kw)


LLAMA2_7B = dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
QWEN25_32B = dict(family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA3_70B = dict(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)


@pytest.mark.parametrize("shape,params", [(LLAMA2_7B, 6_738_415_616), (QWEN25_32B, 32_763_876_352),
                                          (LLAMA3_70B, 70_553_706_496)])
def test_parameter_count_of_real_shapes_matches_the_published_totals(shape, params):
    """The byte counts behind docs/gpu.md: the meta model of each published config has its published size."""
    model = D.meta_model(_real_shape(**shape))
    assert sum(size for _, size, _ in D.module_sizes(model)) == params * 4  # float32 meta weights


def test_a_70b_lens_cut_at_layer_40_splits_over_4_gpus():
    cfg = _real_shape(**{**LLAMA3_70B, "num_hidden_layers": 41})
    model = D.meta_model(cfg)
    plan = D.plan_device_map(model, 4)
    loads = D.device_loads(model, plan)
    layer = max(size for _, size, is_layer in D.module_sizes(model) if is_layer)
    assert plan["model.embed_tokens"] == 0 and plan["model.layers.40"] == 3
    assert max(loads.values()) - min(loads.values()) <= layer
    assert max(loads.values()) <= sum(loads.values()) / 4 + layer


# --- the features path honours the budget and the device ---------------------------------------------


def test_pooling_runs_where_its_inputs_are():
    """The meta device stands for any accelerator: a CPU-made tensor mixed into the pooling raises
    ("Tensor on device cpu is not on the expected device meta")."""
    codes = torch.rand(2, 5, 7, device="meta")
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    for how in ("mean", "sum", "max", "binary"):
        assert features.pool(codes, mask, how).device.type == "meta"
    for name in features.CODES:
        assert features.code_of(name, codes, mask, codes[:, 0]).device.type == "meta"
    from saerl_ray.core.lens import drop_massive

    assert drop_massive(codes, mask).device.type == "meta"


def _disk_sae(tmp_path, model_dir, hook=None, layer=1, run="run"):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    src = tmp_path / f"saved-{run}"
    meta = SAEMetadata(hook_name=hook) if hook else SAEMetadata()
    torch.manual_seed(0)
    s = TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8, metadata=meta))
    with torch.no_grad():
        s.W_enc.normal_()
    s.save_model(src)
    # float32 lens: batch-independence is then exact up to float rounding (bf16 sums differ with batch shape).
    cfg = load_config(None, {"run_dir": str(tmp_path / run), "model.name": str(model_dir), "sae.layer": layer,
                             "sae.source": "disk", "sae.path": str(src), "sae.lens_dtype": "float32"})
    return cfg, sae.run(cfg)


def test_featurizer_codes_do_not_depend_on_how_prompts_are_batched(tmp_path, tiny_model_dir, shared_data):
    _disk_sae(tmp_path, tiny_model_dir)
    sae_dir = str(tmp_path / "run" / "sae")
    lines = (shared_data / "math500.jsonl").read_text().splitlines()
    texts = [json.loads(line)["problem"] for line in lines[:12]]
    codes = ("pooled", "last", "mean", "halves")
    default = features.Featurizer(sae_dir, "max", 16, 128, 32, codes)
    assert default.device == "cpu" and (default.max_rows, default.max_batch_tokens) == (32, None)
    budgeted = features.Featurizer(sae_dir, "max", 16, 128, 32, codes, max_tokens_per_batch=256)
    one = features.Featurizer(sae_dir, "max", 16, 128, 1, codes)
    a, b, c = default.encode(texts), budgeted.encode(texts), one.encode(texts)
    for x in (b, c):  # same prompt -> same code, in input order, whatever shared its forward
        assert x.n_tokens.tolist() == a.n_tokens.tolist() and x.l0.tolist() == a.l0.tolist()
        for i in range(len(texts)):
            assert x.idx[i].tolist() == a.idx[i].tolist(), i
            np.testing.assert_allclose(x.val[i], a.val[i], rtol=1e-4, atol=1e-5)


# --- pretrained SAEs: the hook layer comes from the SAE's own config ----------------------------------


@pytest.mark.parametrize("hook,layer", [
    ("blocks.12.hook_resid_post", 12), ("blocks.12.hook_resid_pre", 11), ("model.layers.12", 12),
    ("layers.3", 3), ("model.language_model.layers.5", 5),
])
def test_sae_hook_reads_the_residual_layer(hook, layer):
    assert sae.sae_hook({"metadata": {"hook_name": hook}}) == (hook, layer)
    assert sae.sae_hook({"hook_name": hook}) == (hook, layer)  # sae-lens < 6 kept it at the top
    assert sae.sae_hook({"d_in": 4}) == (None, None)
    with pytest.raises(ValueError, match="'blocks.12.hook_mlp_out', which is not the residual stream"):
        sae.sae_hook({"metadata": {"hook_name": "blocks.12.hook_mlp_out"}})
    with pytest.raises(ValueError, match="not the residual stream"):
        sae.sae_hook({"metadata": {"hook_name": "blocks.0.hook_resid_pre"}})  # the embeddings


def test_disk_sae_with_another_hook_layer_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"reads hook 'blocks\.3\.hook_resid_post' \(the residual stream after "
                                         r"decoder block 3\) but sae\.layer=1; set --sae\.layer 3"):
        _disk_sae(tmp_path, tiny_model_dir, hook="blocks.3.hook_resid_post", layer=1)
    _, summary = _disk_sae(tmp_path, tiny_model_dir, hook="blocks.3.hook_resid_post", layer=3, run="ok")
    lens = json.loads((tmp_path / "ok" / "sae" / "lens.json").read_text())
    assert summary["layer"] == 3 and lens["sae_hook_name"] == "blocks.3.hook_resid_post"


def _hub_cache_with_sae(root, repo, folder, hook):
    """An HF hub cache folder (the layout huggingface_hub writes) holding one sae-lens SAE, as a copy
    on shared storage would: refs/main -> snapshots/<commit>/<folder>/{cfg.json, sae_weights.safetensors}."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    TopKSAE(TopKSAEConfig(d_in=64, d_sae=96, k=4, metadata=SAEMetadata(hook_name=hook))).save_model(
        repo_dir / "snapshots" / commit / folder)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_pretrained_sae_loads_offline_from_a_shared_hf_cache_and_checks_its_layer(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = _hub_cache_with_sae(tmp_path / "shared" / "hub", "saerl-test/tiny-saes", "l1", "blocks.1.hook_resid_post")
    _hub_cache_with_sae(cache, "saerl-test/tiny-saes", "l2", "blocks.2.hook_resid_post")
    base = {"model.name": str(tiny_model_dir), "sae.source": "pretrained", "sae.release": "saerl-test/tiny-saes"}
    cfg = load_config(None, {**base, "run_dir": str(tmp_path / "a"), "sae.sae_id": "l1", "sae.layer": 1,
                             "sae.hf_cache": str(cache)})
    summary = sae.run(cfg)
    assert summary["d_sae"] == 96 and summary["layer"] == 1
    assert constants.HF_HUB_CACHE != str(cache)  # the redirect ends with the call
    with pytest.raises(ValueError, match=r"'blocks\.2\.hook_resid_post' .* but sae\.layer=1"):
        sae.run(load_config(None, {**base, "run_dir": str(tmp_path / "b"), "sae.sae_id": "l2", "sae.layer": 1,
                                   "sae.hf_cache": str(cache)}))
    with pytest.raises(RuntimeError, match="from the Hugging Face cache"):  # not in the default cache
        sae.run(load_config(None, {**base, "run_dir": str(tmp_path / "c"), "sae.sae_id": "l1", "sae.layer": 1}))


def test_auto_lens_dtype_is_bf16_only_where_the_hardware_computes_it(monkeypatch, tmp_path):
    """bf16 emulated on an AVX2-only CPU is ~40x slower than fp32: `auto` must not pick it there."""
    import torch
    from testkit import save_tiny_model

    from saerl_ray.core.lens import Lens, compute_dtype, load_lens_model

    assert compute_dtype("auto", D.Placement("cuda:0", 1)) == "bfloat16"
    assert compute_dtype("float32", D.Placement("cuda:0", 1)) == "float32"
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert compute_dtype("auto") == str(want).removeprefix("torch.")
        model = load_lens_model(Lens(model=str(save_tiny_model(tmp_path / "tiny")), layer=1, dtype="auto"))
        assert model.dtype == want
