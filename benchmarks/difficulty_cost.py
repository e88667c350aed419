"""The difficulty-cost benchmark: an SAE difficulty proxy against rollout pass rates, cost and ordering quality.

    # the recorded run (~45 min on a 2-core CPU shared with two other jobs; reads runs/gsm8k_math500 from
    # `make run`, never writes it; rollouts cached in runs/bench_difficulty_cost/cache, so a rerun resumes):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/difficulty_cost.py
    # smoke version (minutes):
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/difficulty_cost.py --quick

The paper's efficiency claim: an SAE difficulty curriculum in ~30 min against > 17 H100-hours for a
rollout-based one. Here both routes are priced for the same prompts (the main run's 7,973) in seconds per
prompt, both measured in this one process on this machine:

- rollout route: the `label` stage's code path (`label.label_chunk` with `HFSampler`: HF generate, k
  samples per prompt at `label.temperature`, `label.max_new_tokens`, `label.batch_size` prompts per call,
  graded by `math_reward`) on every prompt. Timed on `--n-cost-gsm8k` GSM8K and `--n-cost-math` MATH-500
  prompts of the main run; seconds per prompt = the two sources' rates weighted by the main run's mix.
- SAE route: the features stage's encoder (`features.Featurizer`, in-process, the main run's SAE and
  settings) on every prompt + the rollout route on `label.n_prompts` prompts (the labelled subset) + the
  proxy's fit (`difficulty.fit_config`, the shipped estimator) + its prediction for every prompt.
  Model loads are excluded from both (fixed costs, reported apart). The SAE's training is not counted:
  the pipeline trains it for clusters and quality anyway (the main run's time is in benchmarks/RESULTS.md).

Features batches and label chunks run interleaved, so the load on a shared machine hits both alike; the
ratio is what carries over. Totals at the main run's size and, linearly, at 103k prompts (DeepMath-103K's
size, the paper's pool; its prompts are longer, so this is the GSM8K/MATH mix scaled, not a DeepMath run).

Ordering quality on held-out prompts, Spearman with a 95% bootstrap interval over prompts:
- (a) MATH-500 level as reference. The SAE proxy is fit on the levels of `label.n_prompts` MATH-500
  prompts (the shipped config's label source) and scored on the other ones, all of them and the subset
  that was also rolled out; the rollout route's 1 - pass rate (k samples) on that subset. SmolLM2-135M
  solves almost no MATH-500 problem, so its pass rates are mostly 0 (ties; undefined when all are).
- (b) GSM8K-train's single calculations ("What is 48 / 2?"), which SmolLM2 partly solves. Reference: 1 -
  pass rate from `--ref-k` samples per held-out prompt, drawn apart from the route's k. The SAE route: the
  proxy fit on k-sample pass rates of `--task-labelled` other calculations (the paper's route) predicts the
  held-out ones; the rollout route: 1 - its k-sample pass rate. Generation capped at `--task-new-tokens`.
  Both (a) and (b) also score the prompt length (log characters) as a free baseline.

Rollout results are cached as JSON in `<out>/cache/` keyed by their settings, so an interrupted run
resumes; the cost timings come from the phase that produced them (`cached` in the JSON names reused
phases). Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks: curriculum_rl's task
DEEPMATH_PROMPTS = 103_000
PAPER = {"sae_minutes": 30, "rollout_h100_hours": 17, "ratio": 17 * 60 / 30}  # "more than 17 H100-hours"


# ---------------------------------------------------------------- cost arithmetic
def route_costs(features_s: float, rollout_s: float, fit_s: float, predict_s: float, n_labelled: int,
                n_prompts: int) -> dict:
    """Seconds for `n_prompts` prompts by each route, from measured per-prompt seconds.
    SAE: features on every prompt + rollouts on the labelled subset + one fit + prediction per prompt;
    rollout: rollouts on every prompt."""
    n_lab = min(n_labelled, n_prompts)
    sae = {"features_s": features_s * n_prompts, "label_subset_s": rollout_s * n_lab, "fit_s": fit_s,
           "predict_s": predict_s * n_prompts}
    sae_total = sum(sae.values())
    rollout_total = rollout_s * n_prompts
    return {"prompts": n_prompts, "n_labelled": n_lab, "sae_route_s": sae_total, "sae_route_parts_s": sae,
            "rollout_route_s": rollout_total,
            "ratio_rollout_over_sae": rollout_total / sae_total if sae_total > 0 else None}


def mix_rate(seconds: dict[str, float], prompts: dict[str, int], weights: dict[str, int]) -> float:
    """Seconds per prompt of a pool whose sources come in `weights` proportions, from each source's
    measured seconds / prompts."""
    total = sum(weights.values())
    return sum(seconds[s] / prompts[s] * w / total for s, w in weights.items())


# ---------------------------------------------------------------- statistics
def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # a constant side: no order to compare
    return float(spearmanr(a, b).statistic)


def spearman_ci(pred: np.ndarray, ref: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman(pred, ref) with a 95% percentile bootstrap over prompts (resamples with a constant side
    are skipped and counted)."""
    pred, ref = np.asarray(pred, float), np.asarray(ref, float)
    rho = _spearman(pred, ref)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if rho is not None else 0):
        i = rng.integers(0, len(pred), len(pred))
        r = _spearman(pred[i], ref[i])
        if r is not None:
            boots.append(r)
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    return {"spearman": rho, "ci95": ci, "n": int(len(pred)), "boot_undefined": n_boot - len(boots) if rho is not None else None}


def paired_diff_ci(a: np.ndarray, b: np.ndarray, ref: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman(a, ref) - Spearman(b, ref) on the same prompts, 95% paired bootstrap (a constant side's
    Spearman counts as 0: no order)."""
    a, b, ref = (np.asarray(x, float) for x in (a, b, ref))
    s = lambda x, i: _spearman(x[i], ref[i]) or 0.0  # noqa: E731
    idx = np.arange(len(ref))
    if np.ptp(ref) == 0:
        return {"diff": None, "ci95": None, "n": int(len(ref))}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(ref), len(ref))
        if np.ptp(ref[i]) > 0:
            boots.append(s(a, i) - s(b, i))
    return {"diff": s(a, idx) - s(b, idx), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n": int(len(ref))}


# ---------------------------------------------------------------- data
def gsm8k_calculations(max_operand: int) -> list[dict]:
    """The task of benchmarks/curriculum_rl.py (GSM8K-train's single calculations, "What is 48 / 2?",
    operands <= max_operand) as rows with an id, the prompt and the bare answer."""
    from curriculum_rl import gsm8k_arithmetic

    out = []
    for r in gsm8k_arithmetic(max_operand):
        prompt = r["question"]
        out.append({"id": hashlib.sha1(prompt.encode()).hexdigest()[:16], "prompt": prompt,
                    "answer": r["answer"].rsplit("####", 1)[1].strip()})
    return out


def n_chars(rows: list[dict]) -> np.ndarray:
    return np.asarray([len(r["prompt"]) for r in rows], float)


# ---------------------------------------------------------------- measured work
def chunks(rows: list, size: int) -> list[list]:
    return [rows[s : s + size] for s in range(0, len(rows), size)]


def rollouts(sampler, rows: list[dict], k: int, temperature: float, max_new_tokens: int, batch_size: int,
             seed: int, desc: str = "rollouts") -> dict:
    """The label stage's path (`label.label_chunk`) over `rows`: correct counts (row order) and seconds."""
    from tqdm.auto import tqdm

    from saerl_ray.stages.label import label_chunk

    correct, secs = [], 0.0
    for i, chunk in enumerate(tqdm(chunks(rows, batch_size), desc=desc, unit="chunk")):
        t = time.perf_counter()
        table = label_chunk(sampler, chunk, k, temperature, max_new_tokens, seed * 100_003 + i)
        secs += time.perf_counter() - t
        correct += table.column("correct").to_pylist()
    return {"ids": [r["id"] for r in rows], "correct": correct, "k": k, "seconds": secs}


def interleave(a: list, b: list) -> list:
    """a and b merged with b's items spread evenly between a's (each keeps its order)."""
    if not a:
        return list(b)
    after = [int((m + 0.5) * len(a) / len(b)) for m in range(len(b))]  # b[m] follows a[after[m]]
    out = []
    for j, x in enumerate(a):
        out += [x] + [y for y, at in zip(b, after) if at == j]
    return out


def interleaved_cost(sampler, featurize: Callable, label_rows: dict[str, list[dict]], feature_texts: list[str],
                     k: int, temperature: float, max_new_tokens: int, batch_size: int, feature_block: int,
                     seed: int) -> dict:
    """Label chunks (per source) and features blocks, alternated so the machine's load hits both alike.
    Returns per source the rollout seconds, prompts and correct counts, and the features seconds/prompts."""
    from tqdm.auto import tqdm

    from saerl_ray.stages.label import label_chunk

    label_jobs = [(src, i, c) for src, rows in label_rows.items() for i, c in enumerate(chunks(rows, batch_size))]
    feat_jobs = chunks(feature_texts, feature_block)
    slots = interleave([("label", j) for j in label_jobs], [("features", b) for b in feat_jobs])
    out = {"label": {s: {"seconds": 0.0, "prompts": 0, "ids": [], "correct": []} for s in label_rows},
           "features": {"seconds": 0.0, "prompts": 0, "l0_mean": None}}
    for kind, job in tqdm(slots, desc="cost (interleaved)", unit="job"):
        t = time.perf_counter()
        if kind == "label":
            src, i, rows = job
            table = label_chunk(sampler, rows, k, temperature, max_new_tokens, seed * 100_003 + i)
            rec = out["label"][src]
            rec["seconds"] += time.perf_counter() - t
            rec["prompts"] += len(rows)
            rec["ids"] += [r["id"] for r in rows]
            rec["correct"] += table.column("correct").to_pylist()
        else:
            X = featurize(job)
            out["features"]["seconds"] += time.perf_counter() - t
            out["features"]["prompts"] += X.shape[0]
    return out


def fit_and_predict(X_fit: sp.csr_matrix, y_fit: np.ndarray, chars_fit: np.ndarray, dc, seed: int,
                    X_all: sp.csr_matrix | None = None, chars_all: np.ndarray | None = None):
    """The shipped estimator (`difficulty.fit_config`) on the labelled rows: (model, metrics, fit seconds,
    prediction seconds per prompt over X_all)."""
    from saerl_ray.signal_models import difficulty as dif

    t = time.perf_counter()
    model, metrics = dif.fit_config(X_fit, y_fit, dc, seed, use_ray=False, n_chars=chars_fit)
    fit_s = time.perf_counter() - t
    predict_s = None
    if X_all is not None:
        t = time.perf_counter()
        dif.predict(model, X_all, chars_all if dc.length_covariate else None)
        predict_s = (time.perf_counter() - t) / X_all.shape[0]
    return model, metrics, fit_s, predict_s


def predict(model: dict, X: sp.csr_matrix, chars: np.ndarray) -> np.ndarray:
    from saerl_ray.signal_models import difficulty as dif

    return dif.predict(model, X, chars if model.get("length") else None)


# ---------------------------------------------------------------- cache
def cached(out: Path | None, name: str, key: dict, fn: Callable[[], dict], reused: list[str]) -> dict:
    """fn()'s JSON-able result, stored in <out>/cache/<name>.json with its settings; reused when they match."""
    if out is None:
        return fn()
    path = out / "cache" / f"{name}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            reused.append(name)
            return rec["value"]
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    tmp.replace(path)
    return value


# ---------------------------------------------------------------- the benchmark
def benchmark(*, prompts: pd.DataFrame, codes_of: Callable[[list[str]], sp.csr_matrix], featurize: Callable,
              sampler, cfg, args, out: Path | None = None) -> dict:
    """Everything but the loads: `prompts` = the main run's ingest table; `codes_of(ids)` its stored codes
    (the difficulty's columns); `featurize(texts)` new codes with the same encoder; `sampler` the label
    stage's sampler. Returns the JSON record."""
    lc, dc = cfg.label, cfg.signals.difficulty
    k, temp, mnt = lc.k, lc.temperature, args.max_new_tokens or lc.max_new_tokens
    n_lab = args.n_labelled or lc.n_prompts
    rng = np.random.default_rng(args.seed)
    reused: list[str] = []
    is_math = (prompts["source"] == "math500").to_numpy()
    mix = {"gsm8k": int((~is_math).sum()), "math500": int(is_math.sum())}
    N = len(prompts)

    # MATH-500: the labelled subset (levels) and the held-out rest; a slice of the held-out is rolled out.
    math = prompts[is_math].reset_index(drop=True)
    perm = rng.permutation(len(math))
    lab_m, held_m = math.iloc[np.sort(perm[:n_lab])], math.iloc[np.sort(perm[n_lab:])]
    roll_m = held_m.iloc[np.sort(rng.choice(len(held_m), size=min(args.n_cost_math, len(held_m)), replace=False))]
    gsm = prompts[~is_math]
    roll_g = gsm.iloc[np.sort(rng.choice(len(gsm), size=min(args.n_cost_gsm8k, len(gsm)), replace=False))]
    feat_rows = prompts.iloc[np.sort(rng.choice(N, size=min(args.n_features, N), replace=False))]
    as_rows = lambda df: df[["id", "prompt", "answer"]].to_dict("records")  # noqa: E731

    # 1. cost: the two routes' per-prompt work, interleaved.
    key = {"k": k, "t": temp, "mnt": mnt, "bs": lc.batch_size, "g": roll_g["id"].tolist(), "m": roll_m["id"].tolist(),
           "f": feat_rows["id"].tolist(), "seed": args.seed}
    cost = cached(out, "cost", key, lambda: interleaved_cost(
        sampler, featurize, {"gsm8k": as_rows(roll_g), "math500": as_rows(roll_m)}, feat_rows["prompt"].tolist(),
        k, temp, mnt, lc.batch_size, args.feature_block, args.seed), reused)
    lab = cost["label"]
    rollout_s = mix_rate({s: lab[s]["seconds"] for s in mix}, {s: lab[s]["prompts"] for s in mix}, mix)
    features_s = cost["features"]["seconds"] / cost["features"]["prompts"]

    # 2. (a) MATH-500 levels: SAE proxy fit on the labelled levels (timed: the SAE route's fit), all codes
    #    predicted (timed: its per-prompt prediction).
    X_all = codes_of(prompts["id"].tolist())
    chars_all = prompts["n_chars"].to_numpy(float)
    pos = {i: n for n, i in enumerate(prompts["id"])}
    rows_of = lambda df: np.asarray([pos[i] for i in df["id"]])  # noqa: E731
    model_m, metrics_m, fit_s, predict_s = fit_and_predict(
        X_all[rows_of(lab_m)], lab_m["difficulty"].to_numpy(float), lab_m["n_chars"].to_numpy(float), dc, args.seed,
        X_all, chars_all)
    pred_held = predict(model_m, X_all[rows_of(held_m)], held_m["n_chars"].to_numpy(float))
    level_held = held_m["difficulty"].to_numpy(float)
    in_roll = held_m["id"].isin(roll_m["id"]).to_numpy()
    rate_m = dict(zip(lab["math500"]["ids"], np.asarray(lab["math500"]["correct"], float) / k))
    fail_m = 1.0 - np.asarray([rate_m[i] for i in held_m["id"][in_roll]])
    level_roll, pred_roll = level_held[in_roll], pred_held[in_roll]
    log_len = lambda c: np.log(np.maximum(c, 1.0))  # noqa: E731
    math_part = {
        "reference": "MATH-500 level (1-5)", "n_labelled_levels": len(lab_m), "n_heldout": len(held_m),
        "n_rolled_out": int(in_roll.sum()),
        "sae_proxy_all_heldout": spearman_ci(pred_held, level_held, n_boot=args.n_boot, seed=args.seed),
        "length_all_heldout": spearman_ci(log_len(held_m["n_chars"].to_numpy(float)), level_held, n_boot=args.n_boot, seed=args.seed),
        "sae_proxy_rolled_out": spearman_ci(pred_roll, level_roll, n_boot=args.n_boot, seed=args.seed),
        "rollout_rolled_out": spearman_ci(fail_m, level_roll, n_boot=args.n_boot, seed=args.seed),
        "sae_minus_rollout_rolled_out": paired_diff_ci(pred_roll, fail_m, level_roll, n_boot=args.n_boot, seed=args.seed),
        "rollout_mean_pass_rate": float(1 - fail_m.mean()) if len(fail_m) else None,
        "rollout_all_wrong": int((fail_m == 1).sum()),
        "fit": {"nonzero_coef": metrics_m.get("nonzero_coef"), "alpha": metrics_m.get("alpha"),
                "holdout": metrics_m.get("holdout")},
    }

    # 3. (b) GSM8K calculations: k-sample labels on a labelled subset -> SAE proxy; held-out: k samples
    #    (the rollout route) and ref_k more (the reference), drawn apart.
    calc = gsm8k_calculations(args.max_operand)
    random.Random(args.seed).shuffle(calc)
    t_lab, t_held = calc[: args.task_labelled], calc[args.task_labelled : args.task_labelled + args.task_heldout]
    tmnt = args.task_new_tokens
    tkey = {"k": k, "t": temp, "mnt": tmnt, "bs": args.task_batch, "ids": [r["id"] for r in t_lab + t_held],
            "ref_k": args.ref_k, "seed": args.seed}

    def task_rollouts() -> dict:
        return {"labelled": rollouts(sampler, t_lab, k, temp, tmnt, args.task_batch, args.seed + 1, "task: labelled"),
                "route": rollouts(sampler, t_held, k, temp, tmnt, args.task_batch, args.seed + 2, "task: held-out k"),
                "reference": rollouts(sampler, t_held, args.ref_k, temp, tmnt, args.task_batch, args.seed + 3,
                                      "task: reference")}

    tr = cached(out, "task", tkey, task_rollouts, reused)
    X_task = featurize([r["prompt"] for r in t_lab + t_held])
    y_lab = 1.0 - np.asarray(tr["labelled"]["correct"], float) / k
    model_t, metrics_t, _, _ = fit_and_predict(X_task[: len(t_lab)], y_lab, n_chars(t_lab), dc, args.seed)
    pred_t = predict(model_t, X_task[len(t_lab):], n_chars(t_held))
    route_t = 1.0 - np.asarray(tr["route"]["correct"], float) / k
    ref_t = 1.0 - np.asarray(tr["reference"]["correct"], float) / args.ref_k
    task_part = {
        "reference": f"1 - pass rate from {args.ref_k} samples", "task": f"GSM8K-train calculations, operands <= {args.max_operand}",
        "n_labelled": len(t_lab), "n_heldout": len(t_held), "max_new_tokens": tmnt,
        "labelled_mean_pass_rate": float(1 - y_lab.mean()), "labelled_all_wrong": int((y_lab == 1).sum()),
        "reference_mean_pass_rate": float(1 - ref_t.mean()), "reference_all_wrong": int((ref_t == 1).sum()),
        "sae_proxy": spearman_ci(pred_t, ref_t, n_boot=args.n_boot, seed=args.seed),
        "rollout": spearman_ci(route_t, ref_t, n_boot=args.n_boot, seed=args.seed),
        "length": spearman_ci(log_len(n_chars(t_held)), ref_t, n_boot=args.n_boot, seed=args.seed),
        "sae_minus_rollout": paired_diff_ci(pred_t, route_t, ref_t, n_boot=args.n_boot, seed=args.seed),
        "fit": {"nonzero_coef": metrics_t.get("nonzero_coef"), "alpha": metrics_t.get("alpha"),
                "holdout": metrics_t.get("holdout")},
    }

    per_prompt = {"features": features_s, "rollout": rollout_s, "predict": predict_s,
                  "rollout_by_source": {s: lab[s]["seconds"] / lab[s]["prompts"] for s in mix}}
    at_main = route_costs(features_s, rollout_s, fit_s, predict_s, n_lab, N)
    at_103k = route_costs(features_s, rollout_s, fit_s, predict_s, n_lab, DEEPMATH_PROMPTS)
    return {
        "seconds_per_prompt": per_prompt, "fit_s": fit_s,
        "main_run": at_main, "extrapolated_103k": at_103k,
        "ratio_main_run": at_main["ratio_rollout_over_sae"], "ratio_103k": at_103k["ratio_rollout_over_sae"],
        "paper_claim": PAPER,
        "settings": {"k": k, "temperature": temp, "max_new_tokens": mnt, "label_batch_size": lc.batch_size,
                     "n_labelled": n_lab, "main_run_prompts": N, "main_run_mix": mix,
                     "cost_sample": {"rollout_gsm8k": lab["gsm8k"]["prompts"], "rollout_math500": lab["math500"]["prompts"],
                                     "features": cost["features"]["prompts"]},
                     "estimator": dc.estimator, "length_covariate": dc.length_covariate, "seed": args.seed,
                     "threads": getattr(args, "threads", None)},
        "ordering_math500": math_part, "ordering_calculations": task_part,
        "cached": reused,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/gsm8k_math500", help="the finished main run (read only)")
    p.add_argument("--config", default="configs/gsm8k_math500.yaml")
    p.add_argument("--out", default="runs/bench_difficulty_cost", help="cache of rollouts and the JSON")
    p.add_argument("--n-cost-gsm8k", type=int, default=8, help="GSM8K prompts rolled out for the cost")
    p.add_argument("--n-cost-math", type=int, default=8,
                   help="held-out MATH-500 prompts rolled out (the cost and ordering (a))")
    p.add_argument("--n-features", type=int, default=512, help="main-run prompts featurised for the cost")
    p.add_argument("--feature-block", type=int, default=64, help="prompts per featurise call")
    p.add_argument("--n-labelled", type=int, default=None, help="labelled subset; default label.n_prompts")
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout route; default label.max_new_tokens")
    p.add_argument("--max-operand", type=int, default=20, help="task (b): largest operand (780 calculations)")
    p.add_argument("--task-labelled", type=int, default=64)
    p.add_argument("--task-heldout", type=int, default=32)
    p.add_argument("--task-new-tokens", type=int, default=32)
    p.add_argument("--task-batch", type=int, default=8)
    p.add_argument("--ref-k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help=(
        "torch threads; 1: on a 2-core box shared with other jobs, 2 threads ran generate 3x and the encoder 2x slower"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of each interval")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the wiring, not the claim")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cost_gsm8k, args.n_cost_math, args.n_features = 4, 4, 64
        args.max_new_tokens = args.max_new_tokens or 32
        args.task_labelled, args.task_heldout, args.ref_k, args.task_new_tokens = 32, 8, 8, 16
        args.out = args.out + "_quick"

    import torch

    from saerl_ray.core import storage
    from saerl_ray.core.config import load_config, signal_codes
    from saerl_ray.core.featureio import code_columns, keep_columns, load_features
    from saerl_ray.core.reward import prompt_style
    from saerl_ray.stages.features import featurize_texts
    from saerl_ray.stages.label import HFSampler

    torch.set_num_threads(args.threads)
    # The difficulty route reads the codes alone: the lens, not the whole model that surprisal needs.
    cfg = load_config(args.config, {"run_dir": args.run, "features.surprisal": False})
    cols = code_columns(args.run, signal_codes(cfg, "difficulty"))
    prompts = storage.read_parquet(storage.join(args.run, "ingest", "prompts.parquet")).to_pandas()
    t = time.perf_counter()
    featurize_texts(["warm-up"], args.run, cfg)  # loads the lens + SAE once (cached)
    load_features_s = time.perf_counter() - t
    model_name = cfg.label.model or cfg.train.policy or cfg.model.name
    t = time.perf_counter()
    sampler = HFSampler(model_name, cfg.model.dtype, cfg.model.trust_remote_code, prompt_style(cfg.prompt))
    load_sampler_s = time.perf_counter() - t
    out = Path(args.out)
    t0 = time.perf_counter()
    res = benchmark(
        prompts=prompts, cfg=cfg, args=args, out=out, sampler=sampler,
        codes_of=lambda ids: keep_columns(load_features(args.run, ids)[1], cols),
        featurize=lambda texts: keep_columns(featurize_texts(list(texts), args.run, cfg), cols),
    )
    main_summary = storage.read_json(storage.join(args.run, "features", "summary.json"))
    res["model_load_s"] = {"features_encoder": load_features_s, "label_sampler": load_sampler_s}
    res["main_run_features_stage_prompts_per_s"] = main_summary.get("prompts_per_s")
    res["wall_s"] = time.perf_counter() - t0
    res["quick"] = args.quick
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    m = res["main_run"]
    print(f"per prompt: features {res['seconds_per_prompt']['features']:.3f} s, rollout (k={res['settings']['k']}, "
          f"{res['settings']['max_new_tokens']} tokens) {res['seconds_per_prompt']['rollout']:.1f} s; fit {res['fit_s']:.1f} s")
    print(f"{m['prompts']} prompts: SAE route {m['sae_route_s'] / 60:.1f} min, rollout route {m['rollout_route_s'] / 3600:.1f} h, "
          f"ratio {res['ratio_main_run']:.0f}x (103k: {res['ratio_103k']:.0f}x)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
