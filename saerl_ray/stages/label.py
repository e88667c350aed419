"""label stage: pass rates of the policy on a small labelled subset -> the difficulty proxy's labels.

    saerl-ray label --run-dir runs/m --label.n_prompts 256 --label.k 8
    # then: --signals.difficulty.label_file runs/m/label/pass_rates.parquet

Samples k completions per prompt for a seeded random subset of `ingest/prompts.parquet` (rows of
`label.split` with a gold answer), grades each with `math_reward`, and writes
`<run_dir>/label/pass_rates.parquet` (id, pass_rate, k, correct). This is the expensive labelling the
paper avoids doing for the whole set: only this subset is rolled out; the difficulty proxy predicts
the rest.

Generation: with `label.num_gpus` > 0 (by default when the Ray cluster has a free GPU, or this machine one)
the sampler runs in a Ray actor that reserves those GPUs, so Ray places no other GPU actor on them;
inside it vLLM (one `LLM.generate` with `n=k`) in bfloat16 unless model.dtype asks for float16, with
`label.gpu_memory_utilization` of each GPU, tensor-parallel over the GPUs it holds (HF generate when
vLLM is not installed). The actor is killed when labelling ends, freeing the GPUs. With 0, batched HF
`generate` with `num_return_sequences=k` runs in the driver process, on the GPUs it can see, else its
CPU. Work is committed per chunk of `label.batch_size` prompts into `label/chunks/`, so a killed run
resumes where it stopped; each chunk has its own
seed, so a resumed run produces the same labels as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pyarrow as pa
import torch

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, fingerprint
from saerl_ray.core.device import Placement, current_placement, generation_dtype
from saerl_ray.core.reward import math_reward, prompt_style
from saerl_ray.core.stage import Stage, marker_of

SCHEMA = pa.schema([("id", pa.string()), ("pass_rate", pa.float64()), ("k", pa.int32()), ("correct", pa.int32())])


def choose_subset(prompts: pa.Table, split: str, n: int, seed: int) -> list[dict]:
    """A seeded random subset of `n` rows of `split` that have a gold answer, in file order."""
    rows = [r for r in prompts.select(["id", "prompt", "answer", "split"]).to_pylist() if r["split"] == split]
    gradable = [r for r in rows if (r["answer"] or "").strip()]
    if not gradable:
        raise ValueError(
            f"label: no prompts of split {split!r} with a gold answer in ingest/prompts.parquet "
            f"({len(rows)} rows of that split; check --label.split)"
        )
    n = min(n, len(gradable))
    picked = np.sort(np.random.default_rng(seed).choice(len(gradable), size=n, replace=False))
    return [gradable[i] for i in picked]


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_engine_args(model_path: str, dtype: str, trust_remote_code: bool, placement: Placement,
                     gpu_memory_utilization: float) -> dict:
    """Keyword arguments of `vllm.LLM` for the GPUs `placement` holds."""
    if not placement.is_cuda:
        raise ValueError("label: vLLM needs a GPU but this process holds none; set --label.num_gpus 1 (or 0 for "
                         "HF generate on the CPU)")
    args = {
        "model": model_path,
        # model.dtype defaults to float32, the CPU dtype; vLLM would otherwise run fp32 on the GPU.
        "dtype": generation_dtype(dtype, placement),
        "trust_remote_code": trust_remote_code,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": placement.n_gpus,
    }
    if placement.n_gpus > 1:
        # vLLM's workers as subprocesses on the actor's GPUs: its Ray backend would ask Ray for the GPUs
        # this actor already holds, and wait for them forever.
        args["distributed_executor_backend"] = "mp"
    return args


class HFSampler:
    """k sampled completions per prompt with HF `generate` (CPU, or the GPUs this process holds)."""

    def __init__(self, model_name: str, dtype: str, trust_remote_code: bool, style: dict | None = None):
        from saerl_ray.core.models import load_for_generation, load_tokenizer

        self.style = style or {}  # reward.prompt_style: the prompts the policy is trained on
        self.tok = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        # bf16 on the process's GPU(s) when it holds any (vLLM absent), `dtype` on CPU.
        self.model = load_for_generation(model_name, dtype=dtype, trust_remote_code=trust_remote_code)

    def __call__(self, problems: list[str], k: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        from saerl_ray.stages.evaluate import generate, render_prompts

        torch.manual_seed(seed)
        prompts = render_prompts(self.tok, problems, **self.style)
        return generate(
            self.model, self.tok, prompts, max_new_tokens, batch_size=len(prompts),
            num_return_sequences=k, temperature=temperature, desc="label chunk",
        )


class VLLMSampler:
    """k sampled completions per prompt with vLLM (GPU nodes; `n=k` shares the prompt's KV cache)."""

    def __init__(self, model_name: str, dtype: str, trust_remote_code: bool, style: dict | None = None,
                 gpu_memory_utilization: float = 0.85):
        from vllm import LLM

        from saerl_ray.core.models import load_tokenizer, resolve

        self.style = style or {}
        self.tok = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        self.llm = LLM(**vllm_engine_args(resolve(model_name), dtype, trust_remote_code, current_placement(),
                                          gpu_memory_utilization))

    def __call__(self, problems: list[str], k: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        from saerl_ray.stages.evaluate import render_prompts

        params = SamplingParams(n=k, temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        outputs = self.llm.generate(render_prompts(self.tok, problems, **self.style), params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outputs]


class LabelWorker:
    """The sampler inside a Ray actor that holds the GPUs it generates on (see `sampler_actor_options`)."""

    def __init__(self, model_name: str, dtype: str, trust_remote_code: bool, style: dict,
                 gpu_memory_utilization: float):
        self.backend = "vllm" if has_vllm() else "hf"
        if self.backend == "vllm":
            self.sampler = VLLMSampler(model_name, dtype, trust_remote_code, style, gpu_memory_utilization)
        else:
            self.sampler = HFSampler(model_name, dtype, trust_remote_code, style)

    def get_backend(self) -> str:
        return self.backend

    def sample(self, problems: list[str], k: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        return self.sampler(problems, k, temperature, max_new_tokens, seed)


def sampler_actor_options(num_gpus: int) -> dict:
    """The labelling actor reserves its GPUs from Ray, so Ray places no other GPU actor on them."""
    return {"num_gpus": num_gpus, "num_cpus": 1, "max_restarts": 0}


class RemoteSampler:
    """A sampler whose calls run in a LabelWorker actor; `close` kills it, freeing its GPUs."""

    def __init__(self, cfg: RunConfig, model_name: str, num_gpus: int):
        import ray

        self.actor = ray.remote(LabelWorker).options(**sampler_actor_options(num_gpus)).remote(
            model_name, cfg.model.dtype, cfg.model.trust_remote_code, prompt_style(cfg.prompt),
            cfg.label.gpu_memory_utilization)
        self.backend = ray.get(self.actor.get_backend.remote())

    def __call__(self, problems: list[str], k: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
        import ray

        return ray.get(self.actor.sample.remote(problems, k, temperature, max_new_tokens, seed))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def available_gpus(cfg: RunConfig) -> int:
    """GPUs a label actor could reserve now: the Ray cluster's free ones when one is configured or joined
    (a driver that holds the only GPU leaves none, so labelling runs here instead of waiting forever),
    else this machine's."""
    import ray

    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        from saerl_ray.core.ray_init import init_ray

        init_ray(cfg.ray)
        return int(ray.available_resources().get("GPU", 0))
    return torch.cuda.device_count()  # a local cluster started for the actor will advertise these


def open_sampler(cfg: RunConfig, model_name: str, num_gpus: int):
    """(sampler, backend): a GPU actor's, or HF generate in this process when num_gpus is 0."""
    if num_gpus == 0:
        return HFSampler(model_name, cfg.model.dtype, cfg.model.trust_remote_code, prompt_style(cfg.prompt)), "hf"
    from saerl_ray.core.ray_init import init_ray

    init_ray(cfg.ray)
    sampler = RemoteSampler(cfg, model_name, num_gpus)
    return sampler, sampler.backend


def label_chunk(sampler, rows: list[dict], k: int, temperature: float, max_new_tokens: int, seed: int) -> pa.Table:
    completions = sampler([r["prompt"] for r in rows], k, temperature, max_new_tokens, seed)
    correct = [int(sum(math_reward(c, r["answer"]) for c in comps)) for r, comps in zip(rows, completions)]
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "pass_rate": [c / k for c in correct],
            "k": [k] * len(rows),
            "correct": correct,
        },
        schema=SCHEMA,
    )


def run(cfg: RunConfig) -> dict:
    from tqdm.auto import tqdm

    lc = cfg.label
    model_name = lc.model or cfg.train.policy or cfg.model.name
    # label.num_gpus / gpu_memory_utilization are PLACEMENT fields: a run whose memory headroom was lowered
    # after an out-of-memory error keeps its chunks.
    fp = fingerprint(lc, cfg.model, cfg.prompt, model_name, cfg.seed, marker_of(cfg.run_dir, "ingest"))
    st = Stage(cfg.run_dir, "label", fp)
    if st.done():
        return st.summary()
    if lc.k < 1 or lc.n_prompts < 1 or lc.batch_size < 1:
        raise ValueError(f"label: k, n_prompts and batch_size must be >= 1 (got {lc.k}, {lc.n_prompts}, {lc.batch_size})")
    rows = choose_subset(storage.read_parquet(storage.join(cfg.run_dir, "ingest", "prompts.parquet")), lc.split, lc.n_prompts, cfg.seed)
    chunks_dir = storage.join(st.begin(), "chunks")
    t0 = time.time()
    starts = list(range(0, len(rows), lc.batch_size))
    have = set(storage.list_dir(chunks_dir))
    todo = [s for s in starts if f"chunk-{s // lc.batch_size:05d}.parquet" not in have]
    backend = "resumed"  # every chunk was written by an earlier, interrupted run
    if todo:
        num_gpus = lc.num_gpus if lc.num_gpus is not None else int(available_gpus(cfg) > 0)
        sampler, backend = open_sampler(cfg, model_name, num_gpus)
        try:
            bar = tqdm(total=len(rows), initial=len(rows) - sum(min(lc.batch_size, len(rows) - s) for s in todo),
                       desc=f"label k={lc.k}", unit="prompt")
            for s in todo:
                i = s // lc.batch_size
                table = label_chunk(sampler, rows[s : s + lc.batch_size], lc.k, lc.temperature, lc.max_new_tokens,
                                    cfg.seed * 100_003 + i)
                # Atomic write: a chunk file exists only when complete.
                storage.write_parquet(table, storage.join(chunks_dir, f"chunk-{i:05d}.parquet"))
                bar.update(table.num_rows)
            bar.close()
        finally:
            if hasattr(sampler, "close"):
                sampler.close()
    table = pa.concat_tables([storage.read_parquet(storage.join(chunks_dir, f"chunk-{s // lc.batch_size:05d}.parquet"))
                              for s in starts])
    storage.write_parquet(table, storage.join(st.out, "pass_rates.parquet"))
    storage.delete(chunks_dir)
    rates = np.asarray(table.column("pass_rate").to_numpy(), dtype=float)
    summary = {
        "rows": table.num_rows, "k": lc.k, "model": model_name, "backend": backend,
        "mean_pass_rate": float(rates.mean()), "all_correct": int((rates == 1).sum()),
        "all_wrong": int((rates == 0).sum()), "seconds": time.time() - t0,
    }
    st.commit(summary)
    print(
        f"[label] {summary['rows']} prompts x k={lc.k}: mean pass rate {summary['mean_pass_rate']:.3f} "
        f"({summary['all_wrong']} all-wrong, {summary['all_correct']} all-correct) with {backend} in {summary['seconds']:.0f}s"
    )
    return summary
