"""Curriculum ablation: GRPO on CPU with SmolLM2, the SaeRL plan against shuffled / length / no-mix plans.

    # the recorded run (~1 h on 2 cores: labels 4 min, SAE 4 min, ~9 min per arm):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curriculum_rl.py --out runs/bench_rl
    # smoke version (minutes):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curriculum_rl.py --out runs/bench_rl_quick --quick

Task (`--task`). `arithmetic` (default): the single calculations inside GSM8K-train's reference
solutions ("What is 48 / 2?", operands <= --max-operand), the real subset a 135M model partly solves on
CPU (greedy ~6%; whole GSM8K problems: 0-3%, so GRPO groups are all-wrong and nothing is learned).
Its difficulty labels are the policy's own pass rates on `--n-labelled` prompts (the `label` stage,
k=8), as in the paper. `gsm8k`: short whole problems with a small integer answer; labels = the
reference solution's step count on the labelled subset. Either way the rows are split once (seeded)
into a training pool and a held-out set, the proxy predicts the unlabelled rows, and the upstream
stages (ingest -> [label] -> sae -> features -> signals) run once in `<out>/base`; every arm copies
them, builds its own plan (`plan.variant`) and trains with the same seed, steps and hyperparameters
(`saerl-ray train`, TRL backend, online sampler). Held-out greedy accuracy every `--eval-every` steps.

Baseline = the `shuffled` arm. Target = its final held-out accuracy; steps-to-target = first evaluated
step at which an arm reaches it. Printed: per-arm curves, final accuracy, steps-to-target, and the
ratio saerl / shuffled steps (the paper reports ~0.8). Last stdout line: one JSON object. A PNG of the
curves goes to `<out>/curves.png`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ARMS = ["saerl", "shuffled", "length", "no_mix"]
UPSTREAM = ["ingest", "sae", "features", "signals"]


def easy_gsm8k(max_answer: int, max_chars: int) -> list[dict]:
    """GSM8K-train problems with a small non-negative integer answer and a short statement."""
    rows = []
    for line in (DATA / "gsm8k_train.jsonl").read_text().splitlines():
        r = json.loads(line)
        gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        if re.fullmatch(r"\d+", gold) and int(gold) <= max_answer and len(r["question"]) <= max_chars:
            rows.append({"question": r["question"], "answer": r["answer"]})
    return rows


CALC = re.compile(r"<<(\d+)\s*([-+*/])\s*(\d+)=(\d+)>>")


def gsm8k_arithmetic(max_operand: int) -> list[dict]:
    """The single calculations inside GSM8K-train's reference solutions (`<<48/2=24>>`) as questions
    ("What is 48 / 2?"), both operands <= max_operand, deduplicated: real arithmetic a 135M model
    partly solves, where it solves almost no full GSM8K problem."""
    rows, seen = [], set()
    for line in (DATA / "gsm8k_train.jsonl").read_text().splitlines():
        for a, op, b, c in CALC.findall(json.loads(line)["answer"]):
            if (a, op, b) not in seen and max(int(a), int(b)) <= max_operand:
                seen.add((a, op, b))
                rows.append({"question": f"What is {a} {op} {b}?", "answer": f"#### {c}"})
    return rows


def solution_steps(answer: str) -> int:
    """Calculator annotations (<<a*b=c>>) in GSM8K's reference solution: its count of arithmetic steps."""
    return max(1, answer.count("<<"))


def write_if_changed(path: Path, text: str) -> None:
    """A rerun must not touch an identical task file: ingest keys on its mtime, and a new mtime
    would redo every upstream stage (the labels alone take minutes)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_task(out: Path, args) -> tuple[Path, Path]:
    if args.task == "arithmetic":
        rows = gsm8k_arithmetic(args.max_operand)
    else:
        rows = easy_gsm8k(args.max_answer, args.max_chars)
    n_train, n_heldout = args.n_train, args.n_heldout
    if len(rows) < n_train + n_heldout:
        sys.exit(f"only {len(rows)} GSM8K rows match; lower --n-train/--n-heldout or loosen the task filter")
    random.Random(args.seed).shuffle(rows)
    train, heldout = rows[:n_train], rows[n_train : n_train + n_heldout]
    if args.task == "gsm8k":  # arithmetic: labels are the policy's pass rates (the label stage)
        for r in train[: args.n_labelled]:  # the small labelled subset the difficulty proxy learns from
            r["difficulty"] = solution_steps(r["answer"])
    out.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file = out / "task_train.jsonl", out / "task_heldout.jsonl"
    write_if_changed(train_file, "".join(json.dumps(r) + "\n" for r in train))
    write_if_changed(heldout_file, "".join(
        json.dumps({"prompt": r["question"], "answer": r["answer"].rsplit("####", 1)[1].strip()}) + "\n" for r in heldout))
    return train_file, heldout_file


def base_overrides(args, out: Path, train_file: Path, heldout_file: Path) -> dict:
    labels = {
        "label.n_prompts": args.n_labelled, "label.k": 8,
        "label.max_new_tokens": args.max_new_tokens, "label.batch_size": 8,
        "signals.difficulty.label_file": str(out / "base" / "label" / "pass_rates.parquet"),
    } if args.task == "arithmetic" else {}
    return {
        **labels,
        "run_dir": str(out / "base"),
        "seed": args.seed,
        "model.name": args.model,
        "ingest.inputs": [{"path": str(train_file), "preset": "gsm8k", "split": "train",
                           "columns": {"difficulty": "difficulty"}}],
        "sae.layer": args.sae_layer,
        "sae.training_tokens": args.sae_tokens,
        "signals.cluster.k": args.clusters,
        "signals.difficulty.label_column": "difficulty",  # solution steps on the labelled subset
        "signals.difficulty.n_labelled": None,
        "plan.batch_size": args.prompts_per_step,
        "train.steps": args.steps,
        "train.prompts_per_step": args.prompts_per_step,
        "train.num_generations": args.num_generations,
        "train.max_new_tokens": args.max_new_tokens,
        "train.learning_rate": args.lr,
        "train.num_workers": 1,
        "train.cpus_per_worker": args.cpus,
        "train.save_every": max(args.steps, 1),
        "train.heldout_file": str(heldout_file),
        "train.heldout_every": args.eval_every,
    }


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target and step > 0), None)


def plot(curves: dict[str, list], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curve in curves.items():
        ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", label=arm)
    ax.axhline(target, color="grey", linestyle=":", label="target (shuffled final)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--task", choices=["arithmetic", "gsm8k"], default="arithmetic",
                   help="arithmetic: GSM8K's own calculations (learnable by 135M on CPU); gsm8k: whole problems")
    p.add_argument("--max-operand", type=int, default=100, help="arithmetic task: largest operand")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-heldout", type=int, default=64)
    p.add_argument("--n-labelled", type=int, default=128,
                   help="training prompts whose reference-solution step count labels the difficulty proxy")
    p.add_argument("--max-answer", type=int, default=20)
    p.add_argument("--max-chars", type=int, default=220)
    p.add_argument("--sae-layer", type=int, default=12)
    p.add_argument("--sae-tokens", type=int, default=300_000)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--cpus", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps on a small pool: checks the wiring, not the claim")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.n_train, args.n_heldout = 4, 2, 48, 8
        args.max_new_tokens, args.sae_tokens, args.prompts_per_step, args.n_labelled = 32, 50_000, 2, 24
    if "shuffled" not in args.arms:
        sys.exit("the shuffled arm is the baseline: keep it in --arms")

    from saerl_ray.pipeline import run_pipeline
    from saerl_ray.config import load_config

    out = Path(args.out).resolve()
    train_file, heldout_file = write_task(out, args)
    overrides = base_overrides(args, out, train_file, heldout_file)
    t0 = time.time()
    upstream = UPSTREAM if args.task == "gsm8k" else ["ingest", "label", "sae", "features", "signals"]
    run_pipeline(load_config(None, overrides), upstream)
    results: dict[str, dict] = {}
    for arm in args.arms:
        arm_dir = out / arm
        for stage in upstream:  # same upstream outputs (and markers) for every arm
            base_marker = (out / "base" / stage / "_DONE.json").read_text()
            done = arm_dir / stage / "_DONE.json"
            if not done.exists() or done.read_text() != base_marker:  # absent, or left by an older base
                shutil.rmtree(arm_dir / stage, ignore_errors=True)
                shutil.copytree(out / "base" / stage, arm_dir / stage)
        cfg = load_config(None, {**overrides, "run_dir": str(arm_dir), "plan.variant": arm})
        t = time.time()
        summary = run_pipeline(cfg, ["plan", "train"])["train"]
        results[arm] = {
            "curve": [tuple(x) for x in summary["heldout_curve"]],
            "mean_pass_rate": summary["mean_pass_rate"],
            "seconds": time.time() - t,
        }
        print(f"[bench] {arm}: curve {results[arm]['curve']}", flush=True)
    target = results["shuffled"]["curve"][-1][1]
    for arm, r in results.items():
        r["final_accuracy"] = r["curve"][-1][1]
        r["steps_to_target"] = steps_to_target(r["curve"], target)
        print(f"{arm:>9}: final {r['final_accuracy']:.3f}  steps-to-target {r['steps_to_target']}  "
              f"train pass rate {r['mean_pass_rate']:.3f}  ({r['seconds']:.0f}s)")
    plot({a: r["curve"] for a, r in results.items()}, out / "curves.png", target)
    base_steps = results["shuffled"]["steps_to_target"]
    saerl_steps = results.get("saerl", {}).get("steps_to_target")
    ratio = saerl_steps / base_steps if saerl_steps and base_steps else None
    line = {
        "baseline": "shuffled",
        "target_accuracy": target,
        "steps_to_target": {a: r["steps_to_target"] for a, r in results.items()},
        "final_accuracy": {a: r["final_accuracy"] for a, r in results.items()},
        "ratio_saerl_vs_shuffled_steps": ratio,
        "final_accuracy_gain_saerl_vs_shuffled": (
            results["saerl"]["final_accuracy"] - target if "saerl" in results else None
        ),
        "steps": args.steps, "eval_every": args.eval_every, "n_train": args.n_train, "n_heldout": args.n_heldout,
        "task": args.task, "seed": args.seed, "curves": {a: r["curve"] for a, r in results.items()},
        "seconds": time.time() - t0, "png": str(out / "curves.png"),
    }
    print(f"saerl/shuffled steps-to-target ratio: {ratio}")
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
