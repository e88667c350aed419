"""Feature extraction: our `features` stage vs a naive single-process HF loop, same prompts, same SAE.

    .venv/bin/python benchmarks/extract.py                      # 1,000 prompts, trains a small SAE first
    .venv/bin/python benchmarks/extract.py --n 200 --sae-dir runs/x/sae

Baseline ("naive"): one process, full SmolLM2 forward with output_hidden_states=True in fp32, the
same batch size, prompts in input order (no length bucketing), hidden_states[layer+1] -> same SAE
-> same masked mean pooling and top-k. Ours: the features stage (Ray Data actor pool, model cut at
the hook layer, length bucketing, lens dtype from the SAE's lens.json), actor start-up included.
flop_bound_fraction = our useful FLOP/s (2 x params of blocks 0..layer x real tokens) / this
machine's measured matmul FLOP/s in the lens dtype on all its cores. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saerl_ray.core.config import load_config
from saerl_ray.core.featureio import code_columns, load_features
from saerl_ray.core.lens import encode_prompts, pad_right
from saerl_ray.core.models import DTYPES, load_model, load_tokenizer
from saerl_ray.core.stage import Stage
from saerl_ray.stages import features, sae


def real_prompts(n: int) -> list[str]:
    from saerl_ray.core.data import rows

    gsm = [r["question"] for r in rows("gsm8k_train")][: n - n // 2]
    math = [r["problem"] for r in rows("math500")][: n // 2]
    return gsm + math


def write_ingest(run_dir: Path, texts: list[str]) -> None:
    st = Stage(run_dir, "ingest", f"bench-{len(texts)}")
    tmp = Path(st.begin(keep_partial=False))
    pq.write_table(pa.table({"id": [f"{i:016x}" for i in range(len(texts))], "prompt": texts,
                             "split": ["train"] * len(texts)}), tmp / "prompts.parquet")
    st.commit({"rows": len(texts)})


def matmul_flops(dtype: torch.dtype, threads: int, size: int = 2048, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * size**3 / (time.perf_counter() - t)


def params_up_to(model, layer: int) -> int:
    blocks = model.model.layers[: layer + 1]
    return sum(p.numel() for blk in blocks for p in blk.parameters())


@torch.inference_mode()
def naive(texts: list[str], sae_dir: Path, cfg, threads: int) -> tuple[float, np.ndarray, int, int]:
    """(seconds, dense pooled codes, real tokens, params up to the hook layer)."""
    torch.set_num_threads(threads)
    lens, _ = sae.read_lens(sae_dir)
    tok, model = load_tokenizer(lens.model), load_model(lens.model, dtype="float32")
    the_sae = sae.load_sae(sae_dir)
    f = cfg.features
    t = time.perf_counter()
    enc = encode_prompts(tok, texts, lens.chat_template, f.max_tokens)
    out = []
    for s in range(0, len(texts), f.batch_size):
        rows = range(s, min(s + f.batch_size, len(texts)))
        ids, att = pad_right([enc.ids[i] for i in rows], tok.pad_token_id)
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[lens.layer + 1]
        mask = torch.zeros_like(att, dtype=torch.bool)
        for j, i in enumerate(rows):
            mask[j, : len(enc.keep[i])] = torch.from_numpy(enc.keep[i])
        out.append(features.pool(the_sae.encode(hs), mask, f.pooling))
    secs = time.perf_counter() - t
    tokens = int(enc.lengths().sum())
    return secs, torch.cat(out).numpy(), tokens, params_up_to(model, lens.layer)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sae-dir", help="a committed `sae` stage dir (with lens.json); default: train a small one")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the naive loop (= cores)")
    p.add_argument("--keep", help="keep the run dir here instead of a temp dir")
    args = p.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_extract_"))
    run_dir = work / "run"
    texts = real_prompts(args.n)
    write_ingest(run_dir, texts)
    cfg = load_config(None, {"run_dir": str(run_dir), "model.name": args.model, "ray.num_cpus": args.threads,
                             "features.block_rows": 128, "sae.training_tokens": 40_000,
                             "features.surprisal": False})  # the codes alone, what the naive loop computes
    if args.sae_dir:
        shutil.copytree(args.sae_dir, run_dir / "sae", dirs_exist_ok=True)
    else:
        sae.run(cfg)
    sae_dir = run_dir / "sae"
    lens, record = sae.read_lens(sae_dir)

    t = time.perf_counter()
    summary = features.run(cfg)
    ours_s = time.perf_counter() - t
    _, X, _ = load_features(run_dir)
    X = X[:, code_columns(run_dir, ["pooled"])]  # compared: the pooled code (the other codes aside)

    naive_s, dense, tokens, n_params = naive(texts, sae_dir, cfg, args.threads)
    # Naive codes cut to the same top-k, so both sides are the stored representation.
    k = cfg.features.top_k
    cut = np.zeros_like(dense)
    top = np.argsort(-dense, axis=1)[:, :k]
    np.put_along_axis(cut, top, np.take_along_axis(dense, top, 1), 1)
    cos = cosines(X.toarray(), cut)

    peak = matmul_flops(DTYPES[lens.dtype], args.threads)
    ours_pps, naive_pps = len(texts) / ours_s, len(texts) / naive_s
    flop_rate = 2 * n_params * tokens / ours_s
    print(f"ours  ({lens.dtype}, layer {lens.layer}, Ray actors): {ours_s:7.1f} s  {ours_pps:6.1f} prompts/s")
    print(f"naive (float32, full model, 1 process):    {naive_s:7.1f} s  {naive_pps:6.1f} prompts/s")
    print(f"ratio {ours_pps / naive_pps:.2f}x; code cosine ours vs naive: mean {cos.mean():.4f} min {cos.min():.4f}")
    print(json.dumps({
        "ours_prompts_per_s": ours_pps, "naive_prompts_per_s": naive_pps, "ratio": ours_pps / naive_pps,
        "flop_bound_fraction": flop_rate / peak, "ours_gflops": flop_rate / 1e9, "peak_gflops": peak / 1e9,
        "peak_dtype": lens.dtype, "prompts": len(texts), "tokens": tokens, "layer": lens.layer,
        "d_sae": int(record["d_sae"]), "code_cosine_mean": float(cos.mean()), "code_cosine_min": float(cos.min()),
        "stage_prompts_per_s": summary["prompts_per_s"], "num_actors": cfg.features.num_actors,
        "load_avg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
