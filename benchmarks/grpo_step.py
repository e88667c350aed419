"""Seconds per GRPO step of the TRL backend on CPU (SmolLM2-135M): the settings `curriculum_rl.py` used
before (baseline) against each cheaper setting, in the same run, on the same plan.

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_step.py            # ~12 min on 2 cores
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_step.py --steps 2 --variants baseline after

Every variant trains `--steps` steps of 4 prompts x 8 generations (`saerl-ray train`, one Ray Train worker
with 2 CPUs, no checkpoints, no held-out curve) on a static plan of GSM8K-train's calculations; the
seconds per step are TRL's own `step_time` (generation, reward, loss, backward, optimizer), the median
over the steps after the first. Variants, each adding one change to the one before:
- `baseline`: 40 new tokens, every layer trained, TRL's default gradient checkpointing, the default
  prompt (chat template's system turn + the step-by-step instruction: 58 prompt tokens);
- `no_grad_ckpt`: `train.gradient_checkpointing: false`;
- `top4`: `train.trainable_layers: 4`;
- `tok16`: `train.max_new_tokens: 16`;
- `after`: `prompt.instruction: ""` (40 prompt tokens): the protocol of `curriculum_rl.py`.
Last stdout line: one JSON object with each variant's seconds and its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # testkit: the test helpers

VARIANTS = {
    "baseline": {"train.max_new_tokens": 40, "train.trainable_layers": None, "train.gradient_checkpointing": True},
    "no_grad_ckpt": {"train.gradient_checkpointing": False},
    "top4": {"train.trainable_layers": 4},
    "tok16": {"train.max_new_tokens": 16},
    "after": {"prompt.instruction": ""},
}


def write_plan(run_dir: Path, n: int) -> None:
    """A static plan of n real calculations (the plan stage's file and marker, nothing upstream)."""
    import pyarrow as pa
    from curriculum_rl import gsm8k_arithmetic
    from testkit import commit_plan

    from saerl_ray.stages.plan import PLAN_SCHEMA

    rows = gsm8k_arithmetic(100)[:n]
    table = pa.table({
        "position": list(range(n)), "batch": [i // 4 for i in range(n)], "id": [f"calc-{i}" for i in range(n)],
        "prompt": [r["question"] for r in rows], "answer": [r["answer"].split("####")[1].strip() for r in rows],
        "source": ["gsm8k_calc"] * n, "cluster": [0] * n, "difficulty_pred": [0.0] * n, "mixed": [False] * n,
    }, schema=PLAN_SCHEMA)
    commit_plan(run_dir, table, "grpo-step-bench")


def step_seconds(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [float(x["step_time"]) for x in lines if "step_time" in x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if args.variants[0] != "baseline":
        sys.exit("the baseline comes first: every ratio is against it")

    from saerl_ray.core.config import load_config
    from saerl_ray.pipeline import run_pipeline

    results, settings = {}, {}
    with tempfile.TemporaryDirectory(prefix="saerl-grpo-step-") as tmp:
        for name in VARIANTS:  # cumulative: each variant adds its change to the ones before it
            settings |= VARIANTS[name]
            if name not in args.variants:
                continue
            run_dir = Path(tmp) / name
            write_plan(run_dir, 4 * args.steps)
            cfg = load_config(None, {
                "run_dir": str(run_dir), "seed": 0, "plan.batch_size": 4, "sampler.mode": "static",
                "train.steps": args.steps, "train.prompts_per_step": 4, "train.num_generations": 8,
                "train.learning_rate": 5e-5, "train.num_workers": 1, "train.cpus_per_worker": 2,
                "train.save_every": 0, **settings,
            })
            run_pipeline(cfg, ["train"])
            times = step_seconds(run_dir)
            results[name] = statistics.median(times[1:] or times)
            print(f"[grpo_step] {name}: {results[name]:.1f} s/step (steps {[round(t, 1) for t in times]})", flush=True)
    base = results["baseline"]
    for name, sec in results.items():
        print(f"{name:>13}: {sec:6.1f} s/step  {base / sec:4.2f}x vs baseline")
    print(json.dumps({"baseline": "baseline", "seconds_per_step": results,
                      "speedup_vs_baseline": {k: base / v for k, v in results.items()}, "steps": args.steps}))


if __name__ == "__main__":
    main()
