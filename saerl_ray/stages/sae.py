"""sae stage: a sparse autoencoder on the lens's residual stream (train with sae-lens, or load one).

    saerl-ray sae -c configs/gsm8k_math500.yaml                  # source=train (default)
    saerl-ray sae -c cfg.yaml --sae.source disk --sae.path /some/saved_sae
    saerl-ray sae -c cfg.yaml --sae.source pretrained --sae.release R --sae.sae_id ID   # warm hub cache only

Writes `<run_dir>/sae/`: the sae-lens inference folder (`SAE.load_from_disk` reads it), `lens.json`
(model, layer, hook_name, d_in, d_sae, k, chat_template, dtype) and `summary.json` (held-out
explained variance, MSE, L0, dead-latent fraction).

Training is one sequential optimiser loop fed by a generator of lens activations, and on CPU one
process using every core is the fastest layout (the features stage is where Ray's parallelism pays).
It runs in the driver process by default; with `sae.num_gpus: N` it runs in a Ray task that reserves
N GPUs and whose worker process exits when the task ends (`max_calls=1`), so the GPUs, the CUDA
context and the allocator's cache are all free before the features actors ask for GPUs. In the
driver, the lens, the SAE and the activation buffers are dropped and the CUDA cache emptied when the
stage returns (the driver's CUDA context itself stays until it exits). Token activations are never materialised: prompt batches
stream through the truncated model into sae-lens's shuffle buffer (`mixing_buffer`) and on into
`SAETrainer`. Activation scale is normalised by sae-lens (`expected_average_only_in`) and folded
into the saved weights, so the saved SAE takes raw activations.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, fingerprint
from saerl_ray.core.device import batch_limits, current_placement
from saerl_ray.core.lens import Lens, encode_prompts, iter_residuals, load_lens_model
from saerl_ray.core.models import load_tokenizer
from saerl_ray.core.stage import Stage, marker_of

LENS_FILE = "lens.json"


def lens_of(cfg: RunConfig) -> Lens:
    return Lens(model=cfg.model.name, layer=cfg.sae.layer, chat_template=cfg.model.chat_template,
                dtype=cfg.sae.lens_dtype, trust_remote_code=cfg.model.trust_remote_code)


def read_lens(sae_dir: str | Path) -> tuple[Lens, dict]:
    """The lens a committed SAE was built for, plus the whole lens.json record."""
    path = storage.join(sae_dir, LENS_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} missing: run `saerl-ray sae` first")
    record = storage.read_json(path)
    return Lens.from_json(record), record


def load_sae(sae_dir: str | Path, device: str = "cpu", dtype: str | None = None):
    """The inference SAE on `device`; `dtype` None keeps the saved dtype (float32 for ours)."""
    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAE.load_from_disk(str(sae_dir), device=device, dtype=dtype).eval()


def train_prompts(prompts_path: str, split: str, holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the ingested prompts of `split`, shuffled by `seed`."""
    table = storage.read_parquet(prompts_path, columns=["prompt", "split"])
    texts = [t for t, s in zip(table.column("prompt").to_pylist(), table.column("split").to_pylist()) if s == split]
    if len(texts) < 2:
        raise ValueError(
            f"{prompts_path}: {len(texts)} prompts with split={split!r}; the SAE needs training prompts "
            f"(set sae.split, or sae.source=disk/pretrained)"
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    n_hold = min(holdout, len(texts) // 5)
    return [texts[i] for i in order[n_hold:]], [texts[i] for i in order[:n_hold]]


def token_activations(model, tok, lens: Lens, texts: list[str], prompt_batch: int | None, max_tokens: int,
                      seed: int, epochs: bool = True, max_tokens_per_batch: int | None = None,
                      device: str | None = None) -> Iterator[torch.Tensor]:
    """Float32 (n, d_model) activations of pooled tokens on `device`, one tensor per forward batch (at
    most `prompt_batch` prompts and `max_tokens_per_batch` padded tokens); with `epochs`, cycles over
    the prompts in a fresh order each pass (the trainer decides when to stop)."""
    rng = np.random.default_rng(seed)
    # Chunks of several forward batches give the length bucketing something to sort; without a prompt
    # cap (GPU), a budget's worth of 64-token prompts stands in for a batch.
    chunk = 8 * (prompt_batch or max(1, (max_tokens_per_batch or 0) // 64))
    while True:
        order = rng.permutation(len(texts)) if epochs else np.arange(len(texts))
        for start in range(0, len(order), chunk):
            enc = encode_prompts(tok, [texts[i] for i in order[start : start + chunk]],
                                 lens.chat_template, max_tokens)
            for _, acts, mask in iter_residuals(model, lens.layer, enc, prompt_batch, tok.pad_token_id,
                                                max_tokens_per_batch, device):
                if mask.any():
                    yield acts[mask].float()
        if not epochs:
            return


def repeat_each(stream: Iterator[torch.Tensor], times: int) -> Iterator[torch.Tensor]:
    """Serve every activation chunk `times` times; the shuffle buffer scatters the copies."""
    for x in stream:
        for _ in range(times):
            yield x


def batches(stream: Iterator[torch.Tensor], buffer_tokens: int, batch_size: int) -> Iterator[torch.Tensor]:
    from sae_lens.training.mixing_buffer import mixing_buffer

    return mixing_buffer(max(buffer_tokens, batch_size), batch_size, stream)


def peek_tokens(stream: Iterator[torch.Tensor], n: int) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The first >= n activations of a stream, and the stream with them put back in front."""
    head: list[torch.Tensor] = []
    while sum(len(x) for x in head) < n:
        try:
            head.append(next(stream))
        except StopIteration:
            break
    if not head:
        raise ValueError("the activation stream is empty: no prompt has a pooled token")
    return torch.cat(head), itertools.chain(head, stream)


@torch.no_grad()
def init_decoder_bias(sae, sample: torch.Tensor) -> None:
    """b_dec := activation mean, in the trainer's scaled units (sqrt(d_in) / mean norm, as sae-lens's
    `expected_average_only_in` estimates it). Residual streams carry a large constant offset; from
    a zero bias TopK spends its k latents on that offset and most latents die."""
    scale = sample.shape[1] ** 0.5 / sample.norm(dim=-1).mean()
    sae.b_dec.copy_(sample.mean(0) * scale)


@torch.inference_mode()
def evaluate(sae, acts: Iterator[torch.Tensor]) -> dict:
    """Held-out reconstruction metrics of an inference SAE on raw activations."""
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.bool, device=sae.W_enc.device)
    n = 0
    sq_err = sum_x = sum_x2 = l0 = 0.0
    for x in acts:
        codes = sae.encode(x)
        err = (sae.decode(codes) - x).double()
        sq_err += float((err**2).sum())
        sum_x = sum_x + x.double().sum(0)
        sum_x2 += float((x.double() ** 2).sum())
        l0 += float((codes > 0).sum())
        fired |= (codes > 0).any(0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no held-out tokens to evaluate the SAE on")
    total_var = sum_x2 - float((sum_x**2).sum()) / n
    return {
        "explained_variance": 1.0 - sq_err / total_var,
        "mse": sq_err / (n * sae.cfg.d_in),
        "l0": l0 / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "holdout_tokens": n,
    }


def train_sae(cfg: RunConfig, out: Path) -> dict:
    """Stream activations through sae-lens's SAETrainer; save the inference SAE into `out`."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    s = cfg.sae
    lens = lens_of(cfg)
    train_texts, held_texts = train_prompts(storage.join(cfg.run_dir, "ingest", "prompts.parquet"), s.split,
                                            s.holdout_prompts, cfg.seed)
    # The driver's GPUs when it has any (`ray job submit --entrypoint-num-gpus`), else its CPU.
    placement = current_placement()
    device = placement.device
    rows, budget = batch_limits(placement, s.prompt_batch_size, s.max_tokens_per_batch)
    tok, model = load_tokenizer(lens.model, lens.trust_remote_code), load_lens_model(lens, placement)
    d_in = int(model.config.hidden_size)
    torch.manual_seed(cfg.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=s.expansion * d_in, k=s.k, normalize_activations="expected_average_only_in",
        # Saved into cfg.json: a copy of this SAE used by another run is checked against its layer.
        metadata=SAEMetadata(hook_name=lens.hook_name, model_name=lens.model),
    ))
    steps = max(1, s.training_tokens // s.batch_size_tokens)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * s.batch_size_tokens, train_batch_size_samples=s.batch_size_tokens,
        lr=s.lr, lr_end=s.lr / 10, lr_scheduler_name="cosineannealing", lr_warm_up_steps=min(50, steps // 10),
        # On GPU: float32 weights and optimizer, bf16 autocast matmuls.
        device=device, autocast=placement.is_cuda, logger=LoggingConfig(log_to_wandb=False),
        # Scale estimate: a few batches suffice for one scalar (sae-lens default is 1000 batches).
        n_batches_for_norm_estimate=max(1, min(10, steps // 10)),
        dead_feature_window=max(10, steps // 4), feature_sampling_window=max(10, steps // 4),
    )
    stream = token_activations(model, tok, lens, train_texts, rows, s.max_tokens_per_prompt, cfg.seed,
                               max_tokens_per_batch=budget, device=device)
    # A buffer bigger than a quarter of the run would only delay the first step.
    buffer = min(s.buffer_tokens, max(s.batch_size_tokens, trainer_cfg.total_training_samples // 4))
    sample, stream = peek_tokens(stream, min(buffer, 4 * s.batch_size_tokens))
    init_decoder_bias(sae, sample)
    provider = batches(repeat_each(stream, s.reuse), buffer, s.batch_size_tokens)
    trained = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()
    trained.save_inference_model(out)
    inference_sae = load_sae(out, device=device)
    held = token_activations(model, tok, lens, held_texts, rows, s.max_tokens_per_prompt,
                             cfg.seed, epochs=False, max_tokens_per_batch=budget, device=device)
    metrics = evaluate(inference_sae, tqdm(held, desc="sae held-out", leave=False))
    metrics.update(tokens=trainer_cfg.total_training_samples, train_prompts=len(train_texts),
                   holdout_prompts=len(held_texts), lens_compute_dtype=str(model.dtype).removeprefix("torch."))
    return metrics


def fetch_sae(cfg: RunConfig, out: Path) -> dict:
    """source=pretrained / disk: copy an existing SAE into the stage folder."""
    from sae_lens import SAE

    s = cfg.sae
    if s.source == "disk":
        if not storage.exists(storage.join(s.path, "cfg.json")):
            raise FileNotFoundError(f"sae.path={s.path}: no cfg.json (expected a `save_inference_model` folder)")
        storage.copy_tree(s.path, out)
        return {"source": "disk", "path": s.path}
    try:
        with hub_cache(s.hf_cache):
            sae = SAE.from_pretrained(s.release, s.sae_id, device="cpu")
    except Exception as e:  # the hub client raises many types; all mean "not available offline"
        where = f"sae.hf_cache={s.hf_cache}" if s.hf_cache else "the Hugging Face cache (HF_HUB_CACHE / HF_HOME)"
        raise RuntimeError(
            f"cannot load pretrained SAE release={s.release!r} sae_id={s.sae_id!r} from {where}: {e}. "
            "Put the release there once (a machine with network: SAE.from_pretrained), or save it with "
            "`save_model` and use sae.source=disk."
        ) from e
    sae.save_model(out)
    return {"source": "pretrained", "release": s.release, "sae_id": s.sae_id}


@contextlib.contextmanager
def hub_cache(path: str | None):
    """Point huggingface_hub at the cache folder `path` (e.g. shared storage) for the calls inside.
    sae-lens's release loaders call hf_hub_download without a cache_dir, and huggingface_hub reads
    HF_HUB_CACHE from the environment only once, at import."""
    if not path:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(path)
    try:
        yield
    finally:
        constants.HF_HUB_CACHE = previous


# Hook names that denote the residual stream, as (pattern, offset from the number to our block index):
# TransformerLens names (sae-lens releases: Gemma Scope, Llama Scope, ...) and HF module names (ours,
# and the hf_hook_name sae-lens records beside the TransformerLens one). resid_pre of block N is the
# output of block N-1.
_RESIDUAL_HOOKS = (
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 0),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), -1),
    (re.compile(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)(?:\.output)?"), 0),
)


def sae_hook(sae_cfg: dict) -> tuple[str | None, int | None]:
    """(hook name, decoder block whose output it reads) from an SAE's cfg.json: `hook_name` at the top
    (older sae-lens) or under `metadata` (sae-lens 6), else `hf_hook_name`; (None, None) when the SAE
    names no hook. A hook that is not the residual stream after a block is an error: the lens reads
    nothing else."""
    meta = sae_cfg.get("metadata") or {}
    hook = next((h for h in (meta.get("hook_name"), sae_cfg.get("hook_name"), meta.get("hf_hook_name"),
                             sae_cfg.get("hf_hook_name")) if h), None)
    if hook is None:
        return None, None
    for pattern, offset in _RESIDUAL_HOOKS:
        m = pattern.fullmatch(hook)
        if m and int(m.group(1)) + offset >= 0:
            return hook, int(m.group(1)) + offset
    raise ValueError(f"the SAE reads hook {hook!r}, which is not the residual stream after a decoder block; "
                     "the lens reads `blocks.N.hook_resid_post` (HF `model.layers.N` output) only")


def check_lens(lens: Lens, sae_dir: Path) -> dict:
    """lens.json record; fails when the SAE's input width does not match the model's residual width, or
    the hook layer in the SAE's own config is not sae.layer."""
    from transformers import AutoConfig

    from saerl_ray.core.models import resolve

    sae_cfg = json.loads((sae_dir / "cfg.json").read_text())
    hook, layer = sae_hook(sae_cfg)
    if layer is not None and layer != lens.layer:
        raise ValueError(f"{sae_dir}/cfg.json: the SAE reads hook {hook!r} (the residual stream after decoder "
                         f"block {layer}) but sae.layer={lens.layer}; set --sae.layer {layer}, or use an SAE "
                         f"trained at layer {lens.layer}")
    hidden = AutoConfig.from_pretrained(resolve(lens.model), trust_remote_code=lens.trust_remote_code).hidden_size
    if int(sae_cfg["d_in"]) != int(hidden):
        raise ValueError(f"{sae_dir}/cfg.json: d_in={sae_cfg['d_in']} but model {lens.model} has hidden size {hidden}")
    return {**lens.to_json(), "d_in": int(sae_cfg["d_in"]), "d_sae": int(sae_cfg["d_sae"]), "k": sae_cfg.get("k"),
            "sae_hook_name": hook}


def cuda_was_used() -> bool:
    """Whether this process initialised CUDA (so it may hold cached GPU memory)."""
    return torch.cuda.is_initialized()


def release_gpu_memory() -> None:
    """Return the caching allocator's blocks to the GPU once the stage's tensors are unreachable. On
    the normal path reference counting has already freed the lens and the SAEs when `build` returns
    (tests/test_sae_on_cpu.py); gc first anyway, since a block a reference cycle (a traceback, a
    suspended generator) still holds cannot be released."""
    gc.collect()
    if cuda_was_used():
        torch.cuda.empty_cache()


def gpu_task_options(num_gpus: int) -> dict:
    """`ray.remote` options of the task that trains the SAE on `num_gpus` GPUs. max_calls=1: the worker
    process exits after the task, taking its CUDA context and cache with it; it must be given to
    `ray.remote` itself (Ray drops max_calls from `.options()`, and only sets it for a function
    declared with num_gpus)."""
    return {"num_gpus": num_gpus, "num_cpus": 1, "max_calls": 1}


def sae_stage(cfg: RunConfig) -> Stage:
    upstream = [marker_of(cfg.run_dir, "ingest")] if cfg.sae.source == "train" else []
    return Stage(cfg.run_dir, "sae", fingerprint(cfg.sae, cfg.model, cfg.seed, *upstream))


def run(cfg: RunConfig) -> dict:
    st = sae_stage(cfg)
    if st.done():  # checked here, so a finished stage never waits for a GPU node
        return st.summary()
    if cfg.sae.source == "train" and cfg.sae.num_gpus > 0:
        import ray

        from saerl_ray.core.ray_init import init_ray

        init_ray(cfg.ray)
        task = ray.remote(**gpu_task_options(cfg.sae.num_gpus))(build)
        # The task's working directory is the raylet's, not ours: it gets the run_dir resolved here.
        return ray.get(task.remote(cfg.model_copy(update={"run_dir": storage.resolve(cfg.run_dir)})))
    try:
        return build(cfg)
    finally:
        release_gpu_memory()


def build(cfg: RunConfig) -> dict:
    """Train or fetch the SAE and commit the stage (in the driver, or in the GPU task)."""
    st = sae_stage(cfg)
    out = st.begin(keep_partial=False)
    lens = lens_of(cfg)
    # sae-lens saves to and loads from local folders: build there, then copy to an object store.
    with tempfile.TemporaryDirectory(prefix="saerl-sae-") as scratch:
        local = Path(scratch) if storage.is_uri(out) else Path(out)
        summary = train_sae(cfg, local) if cfg.sae.source == "train" else fetch_sae(cfg, local)
        record = check_lens(lens, local)
        (local / LENS_FILE).write_text(json.dumps(record, indent=2))
        if storage.is_uri(out):
            storage.copy_tree(local, out)
    summary.update(source=cfg.sae.source, **{k: record[k] for k in ("layer", "d_in", "d_sae", "k")})
    st.commit(summary)
    metrics = ", ".join(f"{k}={summary[k]:.3g}" for k in ("explained_variance", "l0", "dead_fraction") if k in summary)
    print(f"[sae] {cfg.sae.source}: layer {lens.layer}, d_sae {record['d_sae']}" + (f", {metrics}" if metrics else ""))
    return summary
