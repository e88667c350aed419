"""Feature-extraction throughput vs number of Ray workers: SmolLM2-135M truncated to the hook layer,
real MATH-500 prompts, forward only. Baseline (same run): 1 worker x 1 thread. Candidate: 2 workers
x 1 thread (what an actor pool of 2 does on 2 cores). Also 1 worker x 2 threads for reference.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/actor_scaling.py --prompts 160 --layer 12

Each worker loads the truncated model once and runs its contiguous shard (length-sorted batches), which
is the steady state of a Ray Data actor pool over a fixed dataset. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import ray


@ray.remote(num_cpus=1)
def forward_shard(model: str, layer: int, prompts: list[str], threads: int, batch: int, max_tokens: int) -> dict:
    import torch

    from saerl_ray.core.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(model)
    net = load_model(model, num_layers=layer)
    enc = sorted((tok(p, truncation=True, max_length=max_tokens)["input_ids"] for p in prompts), key=len)
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(enc), batch):
            chunk = enc[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tok.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(chunk):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            net.model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
    params = sum(p.numel() for n, p in net.named_parameters() if "embed" not in n)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "params_to_hook": params}


def run(model: str, layer: int, prompts: list[str], workers: int, threads: int, batch: int, max_tokens: int) -> dict:
    shards = [prompts[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    parts = ray.get([forward_shard.remote(model, layer, s, threads, batch, max_tokens) for s in shards])
    wall = time.perf_counter() - t0
    tokens = sum(p["tokens"] for p in parts)
    busy = max(p["seconds"] for p in parts)  # forward time of the slowest worker (excludes model load)
    return {"workers": workers, "threads": threads, "tokens": tokens, "forward_s": round(busy, 2),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / busy, 1),
            "params_to_hook": parts[0]["params_to_hook"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    from saerl_ray.core.data import rows

    prompts = [r["problem"] for r in rows("math500")[: a.prompts]]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    args = (a.model, a.layer, prompts)
    run(*args, 1, 1, a.batch, a.max_tokens)  # warm-up: page in weights, import torch in a worker
    base = run(*args, 1, 1, a.batch, a.max_tokens)
    two = run(*args, 2, 1, a.batch, a.max_tokens)
    threads2 = run(*args, 1, 2, a.batch, a.max_tokens)
    ray.shutdown()
    flops_per_token = 2 * base["params_to_hook"]
    for r in (base, two, threads2):
        print(f"{r['workers']} worker(s) x {r['threads']} thread(s): {r['tokens_per_s']:8.0f} tokens/s "
              f"({r['tokens']} tokens, forward {r['forward_s']} s, wall {r['wall_s']} s)")
    ratio = two["tokens_per_s"] / base["tokens_per_s"]
    print(f"2 workers vs baseline 1 worker: {ratio:.2f}x; forward FLOPs/token to layer {a.layer}: {flops_per_token / 1e6:.0f} M; "
          f"achieved {two['tokens_per_s'] * flops_per_token / 1e9:.1f} GFLOP/s with 2 workers")
    print(json.dumps({"baseline_1x1_tokens_per_s": base["tokens_per_s"], "workers2_tokens_per_s": two["tokens_per_s"],
                      "threads2_tokens_per_s": threads2["tokens_per_s"], "ratio_2_workers_vs_1": round(ratio, 2),
                      "tokens_per_prompt": round(base["tokens"] / len(prompts), 1),
                      "flops_per_token_to_hook": flops_per_token, "layer": a.layer, "prompts": len(prompts)}))


if __name__ == "__main__":
    main()
