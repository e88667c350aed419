"""Curriculum ablation with error bars: GRPO on CPU with SmolLM2, the SaeRL plan against a shuffled plan and
the same plan ordered by length, several seeds per arm.

    # the recorded run (resumable: rerun the same command to continue after an interruption):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curriculum_rl.py --out runs/bench_rl
    # statistics of whatever (arm, seed) runs are finished so far, without training:
    .venv/bin/python benchmarks/curriculum_rl.py --out runs/bench_rl --report-only
    # smoke version (minutes):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/curriculum_rl.py --out runs/bench_rl_quick --quick

Task (`--task`). `arithmetic` (default): the single calculations inside GSM8K-train's reference
solutions ("What is 48 / 2?", operands <= --max-operand), the real subset a 135M model partly solves on
CPU (whole GSM8K problems: 0-3%, so GRPO groups are all-wrong and nothing is learned). `gsm8k`: short
whole problems with a small integer answer; labels = the reference solution's step count.

Labels (`--labels`, arithmetic). The difficulty proxy is the signals stage's regression from SAE codes, fit
on `--n-labelled` training prompts. `likelihood` (default): each label is -log p(gold answer | prompt) under
the policy (answer_nll): exact, dense, one forward pass a prompt. `rollouts`: the label stage's k-sample
pass rates, as in the paper; at this policy's ~6% sampled pass rate most prompts are 0 of k and the proxy
kept no feature (k=8, 128 prompts), so the plan fell back to length and the saerl arm tested no SAE at all.
Either way the label stage also rolls out `--label-check` prompts (k=`--label-k`), and the JSON reports how
the likelihood and the proxy's out-of-fold predictions track those sampled pass rates (`difficulty_proxy`);
the run stops if the proxy keeps no SAE feature.

Arms (`--arms`): `saerl` (the plan: clusters, easy->hard by the SAE proxy, moderate mixing), `shuffled`
(the baseline), `length_difficulty` (the saerl plan with prompt length as difficulty: saerl minus it is the
proxy's own share), and the ablations `length`, `no_mix`. The rows are split once (`--split-seed`) into a
training pool and a held-out set; the upstream stages (ingest -> label -> sae -> features -> signals) run
once in `<out>/base`. Every (arm, seed) run copies them into `<out>/<arm>-s<seed>`, builds its own plan
(`plan.variant`, plan seed = seed) and trains with that seed (`saerl-ray train`, TRL backend, online
sampler); the stages' own markers make a finished run a no-op and an interrupted one resume from its
last checkpoint. Held-out greedy accuracy every `--eval-every` steps. Each finished (arm, seed) is kept
as JSON under --results with the protocol's hash: a later run of the same protocol reuses it.

What is reported, per arm over seeds (mean and 95% t-interval): final held-out accuracy, area under the
learning curve (mean accuracy over steps 0..steps, trapezoid), steps-to-target (target = the shuffled
arm's mean final accuracy; a run that never reaches it counts as steps + eval_every, and `reached`
says how many did); and the paired differences (same seed) saerl - shuffled, length_difficulty - shuffled
and saerl - length_difficulty of final accuracy and AUC. Also the median seconds per GRPO step. Last
stdout line: one JSON object; curves (mean and band per arm, thin lines per seed) in `<out>/curves.png`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks: difficulty_cost's statistics
ARMS = ["saerl", "shuffled", "length_difficulty", "length", "no_mix"]
UPSTREAM = ["ingest", "sae", "features", "signals"]


def easy_gsm8k(max_answer: int, max_chars: int) -> list[dict]:
    """GSM8K-train problems with a small non-negative integer answer and a short statement."""
    rows = []
    from saerl_ray.core.data import rows as data_rows

    for r in data_rows("gsm8k_train"):
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
    from saerl_ray.core.data import rows as data_rows

    for r in data_rows("gsm8k_train"):
        for a, op, b, c in CALC.findall(r["answer"]):
            if (a, op, b) not in seen and max(int(a), int(b)) <= max_operand:
                seen.add((a, op, b))
                rows.append({"question": f"What is {a} {op} {b}?", "answer": f"#### {c}"})
    return rows


def solution_steps(answer: str) -> int:
    """Calculator annotations (<<a*b=c>>) in GSM8K's reference solution: its count of arithmetic steps."""
    return max(1, answer.count("<<"))


def answer_nll(pairs: list[tuple[str, str]], args) -> list[float]:
    """Each problem's difficulty for the policy: -log p(gold answer | prompt), the answer's tokens as the
    first tokens of the policy's reply to the prompt it is trained on. Exact and dense where sampled pass
    rates of a policy that solves ~6% are mostly 0 of k; one forward pass per prompt (a rollout label
    costs k generations). How well it tracks sampled pass rates is measured (`--label-check`)."""
    import torch

    from saerl_ray.core.models import load_for_generation, load_tokenizer
    from saerl_ray.stages.evaluate import render_prompts

    tok = load_tokenizer(args.model)
    model = load_for_generation(args.model, dtype="float32").eval()
    out = []
    for question, gold in pairs:
        prompt = render_prompts(tok, [question], instruction=args.instruction, system=args.system)[0]
        p = tok(prompt, return_tensors="pt")["input_ids"]
        a = tok(gold, add_special_tokens=False, return_tensors="pt")["input_ids"]
        x = torch.cat([p, a], 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, p.shape[1] - 1 : -1].float(), -1)
        out.append(round(-float(logp.gather(1, a[0][:, None]).sum()), 5))
    return out


def cached_answer_nll(out: Path, rows: list[dict], args) -> list[float]:
    """answer_nll of the rows, kept in `<out>/answer_nll.json` per (model, prompt style): a resumed run
    loads no model and runs no forward pass for labels it already has."""
    path = out / "answer_nll.json"
    key = {"model": args.model, "system": args.system, "instruction": args.instruction}
    cache = json.loads(path.read_text()) if path.exists() else {}
    known = cache.get("labels", {}) if cache.get("key") == key else {}
    pairs = [(r["question"], r["answer"].rsplit("####", 1)[1].strip()) for r in rows]
    missing = [p for p in pairs if p[0] not in known]
    if missing:
        known |= dict(zip((q for q, _ in missing), answer_nll(missing, args)))
        path.write_text(json.dumps({"key": key, "labels": known}) + "\n")
    return [known[q] for q, _ in pairs]


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
    random.Random(args.split_seed).shuffle(rows)
    train, heldout = rows[:n_train], rows[n_train : n_train + n_heldout]
    labelled = train[: args.n_labelled]  # the labelled subset the difficulty proxy learns from
    if args.task == "gsm8k":
        for r in labelled:
            r["difficulty"] = solution_steps(r["answer"])
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "arithmetic" and args.labels == "likelihood":
        for r, nll in zip(labelled, cached_answer_nll(out, labelled, args)):
            r["difficulty"] = nll
    train_file, heldout_file = out / "task_train.jsonl", out / "task_heldout.jsonl"
    write_if_changed(train_file, "".join(json.dumps(r) + "\n" for r in train))
    write_if_changed(heldout_file, "".join(
        json.dumps({"prompt": r["question"], "answer": r["answer"].rsplit("####", 1)[1].strip()}) + "\n" for r in heldout))
    return train_file, heldout_file


def base_overrides(args, out: Path, train_file: Path, heldout_file: Path) -> dict:
    rollouts = args.task == "arithmetic" and args.labels == "rollouts"
    labels = {
        "label.n_prompts": args.n_labelled if rollouts else args.label_check, "label.k": args.label_k,
        "label.temperature": args.label_temperature, "label.max_new_tokens": args.label_new_tokens,
        "label.batch_size": 8,
    } if args.task == "arithmetic" else {}
    if rollouts:
        labels["signals.difficulty.label_file"] = str(out / "base" / "label" / "pass_rates.parquet")
    return {
        **labels,
        "run_dir": str(out / "base"),
        "seed": args.split_seed,
        "model.name": args.model,
        "ingest.inputs": [{"path": str(train_file), "preset": "gsm8k", "split": "train",
                           "columns": {"difficulty": "difficulty"}}],
        "sae.layer": args.sae_layer,
        "sae.training_tokens": args.sae_tokens,
        "signals.cluster.k": args.clusters,
        "signals.difficulty.label_column": "difficulty",  # solution steps on the labelled subset
        "signals.difficulty.n_labelled": None,
        # The pool is GSM8K's own calculations, curated: it is its own clean reference (the default, whole
        # GSM8K/MATH problems, would read one-line sums as off-distribution).
        "signals.quality.reference": [],
        # The lens alone, as every committed run was trained on: the one-line sums need no surprisal filter.
        "features.surprisal": False,
        "plan.batch_size": args.prompts_per_step,
        "train.steps": args.steps,
        "train.prompts_per_step": args.prompts_per_step,
        "train.num_generations": args.num_generations,
        "train.max_new_tokens": args.max_new_tokens,
        "train.learning_rate": args.lr,
        "train.trainable_layers": args.trainable_layers,
        "train.gradient_checkpointing": args.gradient_checkpointing,
        "train.num_workers": 1,
        "train.cpus_per_worker": args.cpus,
        "train.save_every": args.save_every,
        "train.heldout_file": str(heldout_file),
        "train.heldout_every": args.eval_every,
        "prompt.system": args.system,
        "prompt.instruction": args.instruction,
    }


# Bump when code outside the arguments changes what a run measures (constants below, the train stage).
PROTOCOL_VERSION = 2
PROTOCOL_ARGS = ["cpus", "task", "max_operand", "max_answer", "max_chars", "model", "split_seed", "steps", "eval_every",
                 "prompts_per_step", "num_generations", "max_new_tokens", "labels", "label_check", "label_new_tokens",
                 "label_k", "label_temperature", "trainable_layers",
                 "gradient_checkpointing", "lr", "n_train", "n_heldout", "n_labelled", "sae_layer", "sae_tokens",
                 "clusters", "system", "instruction"]


def protocol(args) -> tuple[dict, str]:
    """Everything that shapes a run's result, and its short hash: results of other protocols never mix."""
    import hashlib

    p = {k: getattr(args, k) for k in PROTOCOL_ARGS} | {"version": PROTOCOL_VERSION}
    return p, hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]


def result_path(results: Path, arm: str, seed: int, tag: str) -> Path:
    return results / f"{arm}-s{seed}-{tag}.json"


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target and step > 0), None)


def auc(curve: list[tuple[int, float]]) -> float:
    """Mean held-out accuracy over the run: the trapezoid area under the curve divided by its span."""
    import numpy as np

    xs, ys = [s for s, _ in curve], [a for _, a in curve]
    span = xs[-1] - xs[0]
    return float(np.trapezoid(ys, xs) / span) if span > 0 else ys[-1]


def mean_ci95(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and the 95% Student-t interval over seeds (None with fewer than two values)."""
    import numpy as np
    from scipy import stats

    a = np.asarray(values, dtype=float)
    m = float(a.mean())
    if len(a) < 2:
        return m, None
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return m, [m - half, m + half]


def step_seconds(metrics_path: Path) -> float | None:
    """Median of TRL's own `step_time` over the steps after the first (held-out evaluations excluded)."""
    if not metrics_path.exists():
        return None
    times = [float(json.loads(x)["step_time"]) for x in metrics_path.read_text().splitlines() if '"step_time"' in x]
    return statistics.median(times[1:] or times) if times else None


def run_one(arm: str, seed: int, out: Path, overrides: dict, upstream: list[str]) -> dict:
    """One (arm, seed) run: upstream outputs copied from base, then plan + train (each a resumable stage)."""
    from saerl_ray.core.config import load_config
    from saerl_ray.pipeline import run_pipeline

    run_dir = out / f"{arm}-s{seed}"
    for stage in upstream:  # same upstream outputs (and markers) for every run
        base_marker = (out / "base" / stage / "_DONE.json").read_text()
        done = run_dir / stage / "_DONE.json"
        if not done.exists() or done.read_text() != base_marker:  # absent, or left by an older base
            shutil.rmtree(run_dir / stage, ignore_errors=True)
            shutil.copytree(out / "base" / stage, run_dir / stage)
    cfg = load_config(None, {**overrides, "run_dir": str(run_dir), "plan.variant": arm, "seed": seed})
    marker = run_dir / "plan" / "_DONE.json"
    before = marker.read_text() if marker.exists() else None
    run_pipeline(cfg, ["plan"])
    if marker.read_text() != before:  # a new plan: the sampler state and checkpoints of the old one are void
        shutil.rmtree(run_dir / "sampler", ignore_errors=True)
        shutil.rmtree(run_dir / "train", ignore_errors=True)
    run_pipeline(cfg, ["train"])
    r = finished(run_dir)
    if r is None:
        raise RuntimeError(f"{run_dir}: the train stage finished without a held-out curve")
    return r


def finished(run_dir: Path) -> dict | None:
    """A finished run's curve and cost, read back from its train stage (None when unfinished)."""
    if not (run_dir / "train" / "_DONE.json").exists():
        return None
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    curve = [tuple(x) for x in summary.get("heldout_curve", [])]
    if not curve:
        return None
    return {"curve": curve, "mean_pass_rate": summary.get("mean_pass_rate"), "seconds": summary.get("seconds"),
            "step_seconds": step_seconds(run_dir / "train" / "metrics.jsonl")}


def summarise(runs: dict[str, dict[int, dict]], steps: int, eval_every: int) -> dict:
    """Per-arm means and intervals, and the paired saerl - shuffled differences, over the seeds every
    arm finished (a seed some arm lacks is left out, so the arms are compared on the same seeds)."""
    seeds = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    if not seeds or "shuffled" not in runs:
        return {"seeds": 0}
    target = mean_ci95([runs["shuffled"][s]["curve"][-1][1] for s in seeds])[0]
    censor = steps + eval_every
    arms = {}
    for arm, by_seed in runs.items():
        finals = [by_seed[s]["curve"][-1][1] for s in seeds]
        aucs = [auc(by_seed[s]["curve"]) for s in seeds]
        stt = [steps_to_target(by_seed[s]["curve"], target) for s in seeds]
        fm, fci = mean_ci95(finals)
        am, aci = mean_ci95(aucs)
        sm, sci = mean_ci95([censor if x is None else x for x in stt])
        start = mean_ci95([by_seed[s]["curve"][0][1] for s in seeds])[0]
        arms[arm] = {
            "final_accuracy_mean": fm, "final_accuracy_ci95": fci, "auc_mean": am, "auc_ci95": aci,
            "steps_to_target_mean": sm, "steps_to_target_ci95": sci, "reached": sum(x is not None for x in stt),
            "start_accuracy": start, "final_accuracy": finals, "auc": aucs, "steps_to_target": stt,
        }
    line = {"seeds": len(seeds), "seed_list": seeds, "baseline": "shuffled", "target_accuracy": target,
            "steps_to_target_censored_at": censor, "arms": arms}
    for a, b in PAIRS:
        if a in runs and b in runs:
            line.setdefault("paired", {})[f"{a} - {b}"] = paired(runs[a], runs[b], seeds)
    return line


# What the paired differences separate: the method against no order; ordering by length alone against no
# order; and the SAE proxy's own share (the same plan, its difficulty from the proxy or from length).
PAIRS = [("saerl", "shuffled"), ("length_difficulty", "shuffled"), ("saerl", "length_difficulty")]


def paired(a: dict[int, dict], b: dict[int, dict], seeds: list[int]) -> dict:
    """a - b per seed (same seed: same plan seed and training seed) of final accuracy and AUC, with the t-interval."""
    out = {}
    for key, fn in (("final_accuracy", lambda c: c[-1][1]), ("auc", auc)):
        diffs = [fn(a[s]["curve"]) - fn(b[s]["curve"]) for s in seeds]
        m, ci = mean_ci95(diffs)
        out[key] = {"mean": m, "ci95": ci, "per_seed": diffs}
    return out


def plot(runs: dict[str, dict[int, dict]], path: Path, target: float | None) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, by_seed) in enumerate(runs.items()):
        colour = f"C{i}"
        curves = [c["curve"] for c in by_seed.values()]
        for c in curves:
            ax.plot([s for s, _ in c], [a for _, a in c], color=colour, alpha=0.25, linewidth=0.8)
        xs = [s for s, _ in curves[0]]
        same = [c for c in curves if [s for s, _ in c] == xs]
        ys = np.array([[a for _, a in c] for c in same])
        mean = ys.mean(0)
        ax.plot(xs, mean, color=colour, marker="o", label=f"{arm} (mean of {len(same)})")
        if len(same) > 1:
            from scipy import stats

            half = stats.t.ppf(0.975, len(same) - 1) * ys.std(0, ddof=1) / np.sqrt(len(same))  # as the table
            ax.fill_between(xs, mean - half, mean + half, color=colour, alpha=0.15)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label="target (shuffled mean final)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt(r: dict) -> str:
    """A spearman_ci result as `0.412 [0.301, 0.515]`."""
    return "n/a" if r["spearman"] is None else f"{r['spearman']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def reused_proxy(path: Path, upstream: dict | None, quick: bool) -> dict | None:
    """The recorded proxy_quality of the same base stages (None: compute it); one that kept no feature
    stops the run as a fresh one would."""
    proxy = json.loads(path.read_text()) if path.exists() else {}
    if not proxy or proxy.get("upstream") != upstream:
        return None
    if not proxy["features_kept"] and not quick:
        sys.exit(proxy["reason"])
    return proxy


def proxy_quality(out: Path, overrides: dict, args, strict: bool = True) -> dict:
    """What ordered the saerl arm: the signals stage's difficulty fit in `<out>/base` (features kept, its
    holdout Spearman), and every labelled prompt's out-of-fold prediction by the same estimator (5 folds)
    against its label, with a bootstrap interval, prompt length alone beside it; with likelihood labels,
    the label and the out-of-fold prediction against the label stage's sampled pass rates too.
    Exits (`strict`) when the fit kept no feature: the saerl arm would then not test the SAE proxy."""
    import numpy as np
    import pandas as pd
    from difficulty_cost import spearman_ci

    from saerl_ray.core import storage
    from saerl_ray.core.config import load_config, signal_codes
    from saerl_ray.core.featureio import code_columns, keep_columns, load_features
    from saerl_ray.signal_models import difficulty as dif

    base = out / "base"
    fit = json.loads((base / "signals" / "difficulty.json").read_text())
    kept = 0 if fit.get("fallback") else fit["metrics"].get("nonzero_coef", 0)
    if not kept:
        why = (f"the difficulty proxy kept no SAE feature ({fit.get('reason') or 'length term only'}): the saerl arm "
               "would not test the SAE proxy; label more prompts (--n-labelled), more samples (--label-k) or tokens")
        if strict:
            sys.exit(why)
        print(f"[bench] WARNING {why}", flush=True)
        return {"features_kept": 0, "reason": why}
    cfg = load_config(None, overrides)
    prompts = storage.read_parquet(str(base / "ingest" / "prompts.parquet"),
                                   columns=["id", "prompt", "answer", "n_chars", "difficulty"]).to_pandas().set_index("id")
    rollouts = dif.read_pass_rates(base / "label" / "pass_rates.parquet").set_index("id")["pass_rate"]
    if cfg.signals.difficulty.label_file:  # the proxy learnt 1 - pass rate
        y = 1.0 - rollouts
    else:  # the proxy learnt the likelihood label (answer_nll)
        y = prompts["difficulty"].dropna().astype(float)
    ids = y.index.tolist()
    n_chars = prompts["n_chars"].loc[ids].to_numpy(float)
    _, X, _ = load_features(base, order=ids)
    X = keep_columns(X, code_columns(base, signal_codes(cfg, "difficulty")))
    dc = cfg.signals.difficulty
    oof = dif.out_of_fold(X, y.to_numpy(), dc, seed=args.split_seed, use_ray=False,
                          n_chars=n_chars if dc.length_covariate else None)
    m = fit["metrics"]
    line = {
        "label_source": "pass rate" if cfg.signals.difficulty.label_file else "answer nll", "labelled": len(ids),
        "features_kept": kept, "length_term": bool(fit.get("length")), "estimator": dc.estimator,
        "signals_holdout": m.get("holdout"),
        "oof": spearman_ci(oof, y.to_numpy()), "length_only": spearman_ci(np.log(n_chars), y.to_numpy()),
        "rollouts": {"prompts": len(rollouts), "k": cfg.label.k, "mean_pass_rate": float(rollouts.mean()),
                     "all_wrong": int((rollouts == 0).sum())},
    }
    if not cfg.signals.difficulty.label_file:  # both against the sampled pass rates of the checked prompts
        checked = rollouts.index.tolist()
        hard = 1.0 - rollouts.to_numpy()
        nll = answer_nll([(prompts.at[i, "prompt"], str(prompts.at[i, "answer"])) for i in checked], args)
        # the proxy's prediction for a prompt it never fit on: out-of-fold if labelled, else the shipped one
        shipped = storage.read_parquet(str(base / "signals" / "assignments.parquet"),
                                       columns=["id", "difficulty_pred"]).to_pandas().set_index("id")["difficulty_pred"]
        unseen = pd.Series(oof, index=ids).reindex(checked).fillna(shipped.loc[checked])
        line["rollouts"] |= {"label_vs_pass_rate": spearman_ci(nll, hard),
                             "proxy_vs_pass_rate": spearman_ci(unseen.to_numpy(), hard),
                             "length_vs_pass_rate": spearman_ci(prompts["n_chars"].loc[checked], hard)}
    return line


def upstream_of(out: Path, upstream: list[str]) -> dict[str, str] | None:
    """The base's stage fingerprints (None before it exists, e.g. --report-only in a fresh clone)."""
    try:
        return {s: json.loads((out / "base" / s / "_DONE.json").read_text())["fingerprint"] for s in upstream}
    except FileNotFoundError:
        return None


def collect(results: Path, arms: list[str], seeds: list[int], tag: str,
            upstream: dict[str, str] | None = None) -> dict[str, dict[int, dict]]:
    """Finished runs of this protocol; with `upstream`, only those trained on the same base stages."""
    runs: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            path = result_path(results, arm, seed, tag)
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            if upstream is not None and r.get("upstream") != upstream:
                print(f"[bench] {path.name}: trained on another base (its upstream fingerprints differ); left out")
                continue
            runs.setdefault(arm, {})[seed] = r
    return runs


def print_table(line: dict) -> None:
    def ci(x):
        return "n/a" if x is None else f"[{x[0]:.3f}, {x[1]:.3f}]"

    print(f"{line['seeds']} seed(s) {line.get('seed_list')}; target (shuffled mean final) {line.get('target_accuracy')}")
    for arm, a in line.get("arms", {}).items():
        print(f"{arm:>9}: start {a['start_accuracy']:.3f}  final {a['final_accuracy_mean']:.3f} {ci(a['final_accuracy_ci95'])}  "
              f"AUC {a['auc_mean']:.3f} {ci(a['auc_ci95'])}  steps-to-target {a['steps_to_target_mean']:.1f} "
              f"{ci(a['steps_to_target_ci95'])} (reached {a['reached']}/{line['seeds']})")
    for pair, by_key in line.get("paired", {}).items():
        for key, d in by_key.items():
            print(f"{pair}, {key}: {d['mean']:+.3f} {ci(d['ci95'])}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--task", choices=["arithmetic", "gsm8k"], default="arithmetic",
                   help="arithmetic: GSM8K's own calculations (learnable by 135M on CPU); gsm8k: whole problems")
    p.add_argument("--max-operand", type=int, default=100, help="arithmetic task: largest operand")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--arms", nargs="+", default=["saerl", "shuffled", "length_difficulty"], choices=ARMS,
                   help="length_difficulty: the saerl plan with length as difficulty (what the SAE proxy adds)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--split-seed", type=int, default=0, help="train/held-out split and upstream stages (shared by all runs)")
    p.add_argument("--steps", type=int, default=50,
                   help="50 x 8 prompts = one epoch of the 400-prompt pool: a curriculum is only tested if it is traversed")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint cadence: what an interrupted run resumes from")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--labels", choices=["likelihood", "rollouts"], default="likelihood",
                   help="arithmetic task: the proxy's labels. likelihood: -log p(gold answer) under the policy on "
                        "every --n-labelled prompt (answer_nll); rollouts: the label stage's k-sample pass rates "
                        "(at k=8 on 128 prompts, 87 all-wrong: the proxy kept no feature)")
    p.add_argument("--label-check", type=int, default=32,
                   help="likelihood labels: prompts also labelled by rollouts (label stage, --label-k) to measure "
                        "how well the likelihood tracks sampled pass rates")
    p.add_argument("--label-new-tokens", type=int, default=16, help="label stage budget (the answers are one number)")
    p.add_argument("--label-k", type=int, default=16, help="label stage samples per prompt")
    p.add_argument("--label-temperature", type=float, default=1.0, help="label.temperature (the trainer's own)")
    p.add_argument("--trainable-layers", type=int, default=4, help="train.trainable_layers (0: all layers)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's default; off here: a 135M policy on CPU has memory to spare and it costs compute")
    p.add_argument("--lr", type=float, default=5e-5, help="Adam on the top --trainable-layers blocks only")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-heldout", type=int, default=256)
    p.add_argument("--n-labelled", type=int, default=200,
                   help="training prompts whose pass rate (arithmetic) or step count (gsm8k) labels the proxy")
    p.add_argument("--max-answer", type=int, default=20)
    p.add_argument("--max-chars", type=int, default=220)
    p.add_argument("--sae-layer", type=int, default=12)
    p.add_argument("--sae-tokens", type=int, default=200_000)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--cpus", type=float, default=2.0)
    p.add_argument("--system", default=None, help="prompt.system (null: the chat template's default)")
    p.add_argument("--instruction", default="",
                   help="prompt.instruction; none by default: at 16 new tokens the step-by-step instruction "
                        "costs 18 prompt tokens and accuracy (greedy 0.094 vs 0.125 on 96 problems)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "curriculum_rl"),
                   help="one JSON per finished (arm, seed), kept in the repo: the record a later sitting resumes from")
    p.add_argument("--report-only", action="store_true", help="statistics of the finished runs; trains nothing")
    p.add_argument("--quick", action="store_true", help="a few steps on a small pool: checks the wiring, not the claim")
    args = p.parse_args(argv)
    if args.quick:
        args.results = str(Path(args.out) / "results")  # a smoke run never lands in the recorded results
        args.steps, args.eval_every, args.save_every, args.n_train, args.n_heldout = 4, 2, 2, 48, 8
        args.max_new_tokens, args.sae_tokens, args.prompts_per_step, args.n_labelled = 12, 50_000, 2, 24
        args.label_new_tokens, args.label_check = 12, 8
        args.num_generations, args.seeds = 4, args.seeds[:2]
    args.trainable_layers = args.trainable_layers or None
    if args.task == "arithmetic" and args.labels == "likelihood" and args.label_check < 1:
        sys.exit("--label-check must be >= 1: the likelihood labels are checked against sampled pass rates")
    if "shuffled" not in args.arms:
        sys.exit("the shuffled arm is the baseline: keep it in --arms")
    if args.eval_every < 1 or args.steps % args.eval_every:
        sys.exit(f"--eval-every ({args.eval_every}) must divide --steps ({args.steps}): the curve must end at the last step")

    out = Path(args.out).resolve()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    proto, tag = protocol(args)
    t0 = time.time()
    upstream = UPSTREAM if args.task == "gsm8k" else ["ingest", "label", "sae", "features", "signals"]
    if not args.report_only:
        from saerl_ray.core.config import load_config
        from saerl_ray.pipeline import run_pipeline

        train_file, heldout_file = write_task(out, args)
        overrides = base_overrides(args, out, train_file, heldout_file)
        run_pipeline(load_config(None, overrides), upstream)
        if args.task == "arithmetic":
            proxy = reused_proxy(results / f"proxy-{tag}.json", upstream_of(out, upstream), args.quick)
            if proxy is None:
                proxy = proxy_quality(out, overrides, args, strict=not args.quick)
                proxy["upstream"] = upstream_of(out, upstream)
                (results / f"proxy-{tag}.json").write_text(json.dumps(proxy, indent=1) + "\n")
            if proxy["features_kept"]:
                print(f"[bench] difficulty proxy: {proxy['features_kept']} features kept, out-of-fold Spearman "
                      f"{fmt(proxy['oof'])} on {proxy['labelled']} labelled prompts (length alone "
                      f"{fmt(proxy['length_only'])})", flush=True)
        for seed in args.seeds:  # seed-major: the arms of one seed finish together (the paired difference)
            for arm in args.arms:
                path = result_path(results, arm, seed, tag)
                if path.exists() and json.loads(path.read_text()).get("upstream") == upstream_of(out, upstream):
                    continue
                r = run_one(arm, seed, out, overrides, upstream)
                r |= {"arm": arm, "seed": seed, "protocol": proto, "tag": tag, "upstream": upstream_of(out, upstream)}
                path.write_text(json.dumps(r, indent=1) + "\n")
                print(f"[bench] {arm} seed {seed}: curve {r['curve']}  step {r['step_seconds']}s -> {path}", flush=True)
    runs = collect(results, args.arms, args.seeds, tag, upstream_of(out, upstream))
    line = summarise(runs, args.steps, args.eval_every)
    if (results / f"proxy-{tag}.json").exists():
        line["difficulty_proxy"] = json.loads((results / f"proxy-{tag}.json").read_text())
    if line["seeds"]:
        plot({a: {s: runs[a][s] for s in line["seed_list"]} for a in runs}, out / "curves.png", line["target_accuracy"])
        line["png"] = str(out / "curves.png")
        print_table(line)
    step_s = sorted(r["step_seconds"] for by_seed in runs.values() for r in by_seed.values() if r.get("step_seconds"))
    line.update({
        "step_seconds_median": statistics.median(step_s) if step_s else None,
        "task": args.task, "steps": args.steps, "eval_every": args.eval_every, "n_train": args.n_train,
        "n_heldout": args.n_heldout, "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
        "trainable_layers": args.trainable_layers, "lr": args.lr, "seconds": time.time() - t0,
        "protocol_tag": tag, "results": str(results),
    })
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
