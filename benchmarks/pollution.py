"""Benchmark: the quality filter on a polluted pool, clean references from the pool itself
(`signals.quality.reference: []`) vs from a trusted curated set (the default, the shipped GSM8K-train +
MATH-500), and the default's combination (probe, neighbors and surprisal, the largest z-score) vs the codes
alone (probe + neighbors summed, the default with features.surprisal false), in the same run.

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pollution.py                           # ~40 min, 2 cores
    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pollution.py --pool 60 --n-train 100  # smoke

Needs a finished `make run` in --src (runs/gsm8k_math500: its SAE and features are read, never written);
the SAE is copied into --out, where the new texts are featurised with the run's lens, pooling and codes
(codes and surprisal kept in --out/text_codes.*: a rerun on the same SAE featurises nothing).

Pools: `--pool` prompts (300: 15, 60 and 100 bad rows; a bigger pool costs 3 more featurised negatives per
prompt and rate for the in-pool filter), clean rows
from GSM8K-test (in neither the run's pool nor the reference), bad rows at 5%, 20% and 33%: corruptions of
other GSM8K-test prompts by the families in HELD_OUT, which every filter's probe is trained without, so
the bad kinds are unnamed to the filter (a scraped pool's would be). A lower rate's pool is a prefix of
the larger one's clean and bad rows. Every filter runs the signals stage's quality body (quality.run_quality:
same signals, bands, `last`-code neighbors, threshold rule and defaults), `corruptions` = every kind
outside HELD_OUT:
  in_pool      reference []: positives = the pool itself (n_train 1200 > pool: all of it), their
               corruptions, the in-pool default combination (probe, novelty, neighbors, surprisal; max)
  codes_only   the default reference (1,200 positives sampled evenly from GSM8K-train and MATH-500, codes
               and surprisal taken from --src's features as the stage reuses a pool's, their corruptions),
               combine [probe, neighbors] summed: the default with features.surprisal false
  reference    the default: the reference, combine [probe, neighbors, surprisal], the largest z-score
Per rate and filter: AUROC of quality_score (clean rows vs bad rows), share of bad rows dropped, share of
clean rows dropped, per held-out family the share dropped, the AUROC of each signal alone (and of probe +
neighbors) under the filter's own model; the reference's differences / ratios vs
in-pool; each fit's own leave-one-family-out AUROC (2 folds over its positives and the 8 named families:
`lofo_mean` / `lofo_min`, the stage's `auroc_lofo_*`). Every new text is featurised once (a cache by text).

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from saerl_ray.core import storage
from saerl_ray.core.config import COMBINE_WITH_REFERENCE, load_config, signal_codes
from saerl_ray.core.data import rows as data_rows
from saerl_ray.core.featureio import (
    code_columns,
    load_features,
    load_surprisal,
    stored_codes,
)
from saerl_ray.signal_models.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    FAMILY_OF,
    make_negatives,
)
from saerl_ray.signal_models.quality import (
    auroc,
    combine,
    raw_signals,
    run_quality,
    zscores,
)
from saerl_ray.stages.features import featurize_pair
from saerl_ray.stages.ingest import prompt_id
from saerl_ray.stages.signals import read_reference

HELD_OUT = ("truncated", "markup", "missing_values", "multi_problem", "repetition")  # scraping-like damage
RATES = (0.05, 0.20, 0.33)


class CachedFeaturizer:
    """featurize_texts with a cache by text, pre-filled with --src's stored codes and surprisal (a reference
    prompt that the run already featurised is not featurised again, as in the stage). New texts' codes and
    surprisal are kept in <run_dir>/text_codes.{json,npz} under the SAE's fingerprint, so a rerun featurises
    nothing. With features.surprisal it returns (codes, surprisal), as the stage's featurizer does; a cached
    text without surprisal (featurised through the lens alone) is featurised again."""

    def __init__(self, run_dir: str, cfg, src: str):
        self.run_dir, self.cfg, self.cache, self.calls, self.new = run_dir, cfg, {}, 0, 0
        self.surprisal = cfg.features.surprisal
        prompts = storage.read_parquet(storage.join(src, "ingest", "prompts.parquet"), columns=["id", "prompt"]).to_pandas()
        ids, X, _ = load_features(src, order=list(prompts["id"]))
        self.seed = dict(zip(prompts["prompt"], range(len(prompts))))
        self.X_src = X.tocsr()
        self.s_src = load_surprisal(src, list(prompts["id"]))
        if self.surprisal and not np.isfinite(self.s_src).all():
            raise SystemExit(f"{src}'s features have no surprisal: rerun it with features.surprisal true (the default)")
        self.sae = json.loads((Path(run_dir) / "sae" / "_DONE.json").read_text())["fingerprint"]
        self.file = Path(run_dir) / "text_codes"
        meta = self.file.with_suffix(".json")
        kept = json.loads(meta.read_text()) if meta.exists() else {}
        if kept.get("sae") == self.sae:
            with np.load(self.file.with_suffix(".npz"), allow_pickle=False) as z:
                M = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
                s = z["surprisal"] if "surprisal" in z else np.full(M.shape[0], np.nan)
            self.cache = {t: (M[i], float(s[i])) for i, t in enumerate(kept["texts"])}
            print(f"  {len(self.cache)} texts' codes reused from {meta} ({int(np.isfinite(s).sum())} with surprisal)",
                  flush=True)

    def save(self) -> None:
        texts = list(self.cache)
        M = sp.vstack([self.cache[t][0] for t in texts]).tocsr()
        np.savez(self.file.with_suffix(".npz"), data=M.data, indices=M.indices, indptr=M.indptr, shape=np.array(M.shape),
                 surprisal=np.array([self.cache[t][1] for t in texts], float))
        self.file.with_suffix(".json").write_text(json.dumps({"sae": self.sae, "texts": texts}))

    def _missing(self, t: str) -> bool:
        if t in self.seed:
            return False
        return t not in self.cache or (self.surprisal and not np.isfinite(self.cache[t][1]))

    def __call__(self, texts: list[str]):
        """The stage's featurizer protocol: codes, or (codes, surprisal) with features.surprisal."""
        X, s = self.pair(texts)
        return (X, s) if self.surprisal else X

    def pair(self, texts: list[str]) -> tuple[sp.csr_matrix, np.ndarray | None]:
        texts = list(texts)
        todo = list(dict.fromkeys(t for t in texts if self._missing(t)))
        if todo:
            t0 = time.time()
            X, s = featurize_pair(todo, self.run_dir, self.cfg)
            s = np.full(len(todo), np.nan) if s is None else s
            self.cache.update({t: (X[i], float(s[i])) for i, t in enumerate(todo)})
            self.new += len(todo)
            print(f"  featurised {len(todo)} texts in {time.time() - t0:.0f} s ({self.new} new so far)", flush=True)
            self.save()
        self.calls += 1
        rows = [(self.X_src[self.seed[t]], self.s_src[self.seed[t]]) if t in self.seed else self.cache[t] for t in texts]
        X = sp.vstack([r[0] for r in rows]).tocsr() if rows else sp.csr_matrix((0, self.X_src.shape[1]), dtype=np.float32)
        return X, (np.array([r[1] for r in rows], float) if self.surprisal else None)


def pools(seed: int, n_pool: int):
    """GSM8K-test, shuffled: the clean bank (enough for the 5% pool), then the bad bank (the 33% pool's bad
    rows), each bad row a held-out-family corruption of its own GSM8K-test prompt."""
    rows = data_rows("gsm8k_test")
    order = np.random.default_rng(seed).permutation(len(rows))
    texts = [str(rows[i]["question"]).strip() for i in order]
    answers = [str(rows[i]["answer"]).split("####")[-1].strip() for i in order]
    n_bad = {r: int(round(r * n_pool)) for r in RATES}
    n_clean = n_pool - min(n_bad.values())
    src = slice(n_clean, n_clean + max(n_bad.values()))
    kinds = [k for f in HELD_OUT for k in FAMILIES[f]]
    bad, bad_kinds, _ = make_negatives(texts[src], answers[src], seed=seed, types=kinds)
    return texts[:n_clean], answers[:n_clean], bad, answers[src], [FAMILY_OF[k] for k in bad_kinds], n_bad


def signal_aurocs(model: dict, X: sp.csr_matrix, is_bad: np.ndarray, surprisal: np.ndarray | None) -> dict:
    """AUROC of each signal's z-score alone and of the probe + neighbors sum, under the filter's own model."""
    z = zscores(raw_signals(model, X, surprisal=surprisal if "surprisal" in model["reference"] else None),
                model["reference"])
    z["probe+neighbors"] = combine(z, ["probe", "neighbors"], "sum")[0]
    return {s: auroc(-v[~is_bad], -v[is_bad]) for s, v in z.items()}


def measure(score: np.ndarray, keep: np.ndarray, is_bad: np.ndarray, fams: np.ndarray, m: dict) -> dict:
    out = {"auroc": auroc(score[~is_bad], score[is_bad]), "bad_dropped": float((~keep[is_bad]).mean()),
           "clean_dropped": float((~keep[~is_bad]).mean()), "n_bad_dropped": int((~keep[is_bad]).sum()),
           "n_clean_dropped": int((~keep[~is_bad]).sum()), "n_bad": int(is_bad.sum()), "n_clean": int((~is_bad).sum()),
           "lofo_mean": m.get("auroc_lofo_mean"), "lofo_min": m.get("auroc_lofo_min"), "threshold": m["threshold"]}
    out["bad_dropped_by_family"] = {f: float((~keep[is_bad][fams == f]).mean()) for f in HELD_OUT if (fams == f).any()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default="runs/gsm8k_math500", help="a finished `make run` (read only)")
    ap.add_argument("--out", default="runs/bench_pollution")
    ap.add_argument("--config", default="configs/gsm8k_math500.yaml")
    ap.add_argument("--pool", type=int, default=300, help="prompts per pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=None, help="signals.quality.n_train (default: the config's)")
    args = ap.parse_args()
    t_start = time.time()
    out = Path(args.out)
    (out / "quality").mkdir(parents=True, exist_ok=True)
    if not (out / "sae" / "_DONE.json").exists():  # the run's SAE, so featurize_texts reads this run dir only
        shutil.copytree(Path(args.src) / "sae", out / "sae", dirs_exist_ok=True)
    (out / "features").mkdir(exist_ok=True)
    shutil.copy(Path(args.src) / "features" / "summary.json", out / "features" / "summary.json")
    cfg = load_config(args.config, {"run_dir": str(out), "seed": args.seed})
    # Each filter's section as load_config resolves it (its default combination and rule)
    in_pool_q = load_config(args.config, {"run_dir": str(out), "signals.quality.reference": []}).signals.quality
    qc = cfg.signals.quality
    if args.n_train:
        qc, in_pool_q = (q.model_copy(update={"n_train": args.n_train}) for q in (qc, in_pool_q))
    named = [k for k in CORRUPTIONS if FAMILY_OF[k] not in HELD_OUT]
    featurize = CachedFeaturizer(str(out), cfg, args.src)

    clean, clean_answers, bad, bad_answers, bad_fams, n_bad = pools(args.seed, args.pool)
    print(f"pool {args.pool}: clean bank {len(clean)} GSM8K-test prompts, bad bank {len(bad)} "
          f"({', '.join(HELD_OUT)}); named families {len(FAMILIES) - len(HELD_OUT)}", flush=True)
    (X_clean, s_clean), (X_bad, s_bad) = featurize.pair(clean), featurize.pair(bad)
    # The stage's bands: each quality code its own d_sae-wide band; neighbors on the `last` band.
    codes = signal_codes(cfg, "quality")
    d_sae = stored_codes(str(out))[1]
    bands = [(int(code_columns(str(out), [c])[0]), int(code_columns(str(out), [c])[0]) + d_sae) for c in codes]
    nb_band = bands[codes.index(qc.neighbors_code)]
    # Baselines: the pool's own positives (in_pool, with the in-pool default combination) and the reference
    # read through the codes alone (codes_only: probe + neighbors summed, the default with features.surprisal
    # false).
    filters = {"in_pool": in_pool_q.model_copy(update={"corruptions": named}),
               "codes_only": qc.model_copy(update={"combine": list(COMBINE_WITH_REFERENCE), "combine_rule": "sum",
                                                   "corruptions": named}),
               "reference": qc.model_copy(update={"corruptions": named})}
    ref_rows = read_reference(qc.reference) if qc.reference else None  # the same files for every reference filter
    res: dict = {"held_out_families": list(HELD_OUT), "named_kinds": named, "pool": args.pool,
                 "reference": [s.path for s in qc.reference], "rates": {}}
    for rate in RATES:
        nb = n_bad[rate]
        nc = args.pool - nb
        texts = clean[:nc] + bad[:nb]
        is_bad = np.r_[np.zeros(nc, bool), np.ones(nb, bool)]
        fams = np.asarray(bad_fams[:nb])
        X = sp.vstack([X_clean[:nc], X_bad[:nb]]).tocsr()
        S = None if s_clean is None else np.r_[s_clean[:nc], s_bad[:nb]]
        prompts = pd.DataFrame({"id": [prompt_id(t) for t in texts], "prompt": texts,
                                "answer": clean_answers[:nc] + bad_answers[:nb],
                                "source": "pool", "n_chars": [len(t) for t in texts]})
        row = {}
        for name, fq in filters.items():
            t0 = time.time()
            score, keep, _, m = run_quality(prompts, X, fq, args.seed, featurize, str(out / "quality" / f"{name}_{rate}.json"),
                                            use_ray=False, bands=bands, neighbor_band=nb_band, surprisal=S,
                                            reference=ref_rows if fq.reference else None)
            row[name] = {**measure(score, keep, is_bad, fams[: nb], m), "combine": fq.combine, "rule": fq.combine_rule,
                         "seconds": round(time.time() - t0, 1),
                         "auroc_by_signal": signal_aurocs(storage.read_json(str(out / "quality" / f"{name}_{rate}.json")),
                                                          X, is_bad, S)}
            r = row[name]
            print(f"rate {rate:.2f} {name:25s}: AUROC {r['auroc']:.3f}, bad dropped {r['n_bad_dropped']}/{r['n_bad']} "
                  f"({r['bad_dropped']:.3f}), clean dropped {r['n_clean_dropped']}/{r['n_clean']} "
                  f"({r['clean_dropped']:.4f}), lofo {r['lofo_mean']:.3f} / {r['lofo_min']:.3f}, {r['seconds']} s; by signal "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["auroc_by_signal"].items()), flush=True)
        old, new = row["in_pool"], row["reference"]
        row["reference_vs_in_pool"] = {
            "auroc_diff": new["auroc"] - old["auroc"], "bad_dropped_diff": new["bad_dropped"] - old["bad_dropped"],
            "bad_dropped_ratio": new["n_bad_dropped"] / max(old["n_bad_dropped"], 1),
            "clean_dropped_diff": new["clean_dropped"] - old["clean_dropped"]}
        res["rates"][f"{rate:.2f}"] = row
    res.update(featurised=featurize.new, seconds=round(time.time() - t_start, 1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
