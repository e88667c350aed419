"""validate's difficulty measurements: the shipped estimator's out-of-fold protocol, its spread over SAE
seeds, and how its predictions order benchmarks of known hardness.

    pred = difficulty_oof(X, y, cfg.signals.difficulty, seed=0)          # every row predicted once
    pairwise_auroc({"easy": a, "hard": b}, [["easy"], ["hard"]])          # {"pairs": {"easy<hard": ..}, "mean": ..}
    res.update(difficulty_extras(cfg, math, y, oof, X_math, n_tokens))   # the keys below

The protocol (every representation, every seed): 5 outer folds over MATH-500; on each training split the
signals stage's own estimator (`difficulty.fit_config`: its column selection, log1p design, the length
term on log n_chars when `signals.difficulty.length_covariate`, ridge with a leave-one-out alpha or the
ElasticNet CV grid per `signals.difficulty.estimator`, holdout) is fit and scores the left-out fold;
Spearman of those out-of-fold predictions vs `level`. Baselines take the same path with the design's
log1p off (`transform="none"`: TF-IDF SVD and Gaussian features can be negative).

Keys added to validate's JSON:
  difficulty_spearman_seeds  the SAE row over `validation.sae_seeds` SAEs: the run's own (seed `seed`) and
                             ones trained like it with seeds seed+1, ... (<run_dir>/validate/seeds/<k>/: a
                             copy of the run's ingest, its own `sae/`, MATH-500 codes in `math500/`).
                             {"mean", "min", "std" (ddof=1), "per_seed", "ensemble" (Spearman of the
                             per-seed out-of-fold predictions averaged), "explained_variance" per seed}
  difficulty_ood_auroc       {"sae", "length"}: mean over the benchmark pairs of P(pred(harder) > pred(easier))
                             (ties count 1/2), the regression fit on every MATH-500 level; MATH-500's own
                             prompts are scored out-of-fold. null when `validation.ood` is false.
  difficulty_ood_detail      per pair and representation, mean prediction per benchmark, prompts per benchmark.
Side runs are stages with markers (ingest and sae mirrored from the run, then the usual stages), so a rerun
of validate reuses every SAE and every code it already computed.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from saerl_ray.core import storage
from saerl_ray.core.config import (
    ConfigError,
    DifficultyConfig,
    FeaturesConfig,
    IngestConfig,
    InputSpec,
    RunConfig,
    fingerprint,
)
from saerl_ray.core.data import find as find_data
from saerl_ray.core.stage import MARKER, PARTIAL, Stage, marker_of
from saerl_ray.signal_models import difficulty as dif
from saerl_ray.signal_models import quality

# Benchmark file stem -> ingest preset (files in validation.data_dir; data/README.md).
OOD_PRESETS = {
    "gsm8k_test": "gsm8k", "gsm8k_train": "gsm8k", "math500": "math", "amc23": "amc",
    "olympiadbench": "olympiadbench", "aime24": "aime", "minerva_math": "minerva",
}


# ---------------------------------------------------------------- protocol
def _use_ray() -> bool:
    import ray

    return ray.is_initialized()


def difficulty_oof(X, y: np.ndarray, dc: DifficultyConfig | None = None, seed: int = 0, folds: int = 5,
                   transform: str = "log1p", n_chars: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold predictions of the shipped estimator (dif.out_of_fold; its length term when given the
    prompts' n_chars and dc.length_covariate is on), on Ray when it is running."""
    return dif.out_of_fold(X, y, dc or DifficultyConfig(), seed, folds, use_ray=_use_ray(), transform=transform,
                           n_chars=n_chars)


def spearman(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman(pred, y); None where undefined (constant predictions)."""
    return dif._corr(np.asarray(pred, float), np.asarray(y, float))["spearman"]


def difficulty_spearman(X, y: np.ndarray, dc: DifficultyConfig | None = None, seed: int = 0, folds: int = 5,
                        transform: str = "log1p", n_chars: np.ndarray | None = None) -> float | None:
    return spearman(difficulty_oof(X, y, dc, seed, folds, transform, n_chars), y)


# ---------------------------------------------------------------- summaries
def auroc(hard: np.ndarray, easy: np.ndarray) -> float:
    """P(a random `hard` score > a random `easy` score), ties 1/2 (Mann-Whitney U / (n_hard n_easy))."""
    hard, easy = np.asarray(hard, float).ravel(), np.asarray(easy, float).ravel()
    if not len(hard) or not len(easy):
        raise ValueError("auroc needs scores on both sides")
    return quality.auroc(hard, easy)  # roc_auc_score: the same U statistic, ties 1/2


def pairwise_auroc(scores: dict[str, np.ndarray], tiers: list[list[str]]) -> dict[str, Any]:
    """For every benchmark pair in different tiers (tiers run easiest to hardest): "easier<harder" ->
    auroc(harder, easier); and their unweighted mean."""
    pairs = {}
    for i, easier in enumerate(tiers):
        for harder in tiers[i + 1:]:
            for e in easier:
                for h in harder:
                    pairs[f"{e}<{h}"] = auroc(scores[h], scores[e])
    return {"pairs": pairs, "mean": float(np.mean(list(pairs.values()))) if pairs else None}


def seeds_summary(per_seed: dict[int, float | None], ensemble: float | None = None,
                  explained_variance: dict[int, float | None] | None = None) -> dict[str, Any]:
    """{"mean", "min", "std" (sample, ddof=1; 0 for one seed), "per_seed", "ensemble", "explained_variance"}
    of one metric over SAE seeds; an undefined value (None) counts as 0 for mean/min/std."""
    v = np.array([0.0 if x is None else float(x) for x in per_seed.values()])
    return {
        "mean": float(v.mean()), "min": float(v.min()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "per_seed": {str(k): x for k, x in per_seed.items()}, "ensemble": ensemble,
        "explained_variance": {str(k): x for k, x in (explained_variance or {}).items()},
    }


# ---------------------------------------------------------------- side runs
def mirror_stage(src_run: str, dst_run: str, name: str) -> str:
    """Copy a finished stage of `src_run` into `dst_run`, marker last and with the same fingerprint, so the
    stages after it in `dst_run` see the same input; a copy already up to date is left alone."""
    fp = marker_of(src_run, name)
    st = Stage(dst_run, name, fp)
    if st.done():
        return fp
    out = st.begin(keep_partial=False)
    src = storage.join(src_run, name)
    for rel in storage.list_dir(src, recursive=True):
        if rel not in (MARKER, PARTIAL) and storage.PARTIAL_TAG not in rel:
            storage.write_bytes(storage.join(out, rel), storage.read_bytes(storage.join(src, rel)))
    st.commit()
    return fp


def _save_csr(X: sp.csr_matrix, path: str) -> None:
    buf = io.BytesIO()
    sp.save_npz(buf, sp.csr_matrix(X))
    storage.write_bytes(path, buf.getvalue())


def _load_csr(path: str) -> sp.csr_matrix:
    return sp.load_npz(io.BytesIO(storage.read_bytes(path))).tocsr()


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def codes_only(cfg: RunConfig) -> FeaturesConfig:
    """The run's features settings without surprisal: the difficulty side runs need codes only, and the
    whole model would cost them ~2.4x the lens (the codes are the same either way)."""
    return cfg.features.model_copy(update={"surprisal": False})


def seed_codes(cfg: RunConfig, k: int, ids: list[str], texts: list[str]) -> tuple[sp.csr_matrix, float | None]:
    """MATH-500 codes (rows in `ids` order, the run's columns) from an SAE trained like the run's with seed
    `cfg.seed + k`, in <run_dir>/validate/seeds/<k>/; and that SAE's held-out explained variance."""
    from saerl_ray.stages import sae
    from saerl_ray.stages.features import featurize_texts

    side = storage.join(cfg.run_dir, "validate", "seeds", str(k))
    scfg = cfg.model_copy(update={"run_dir": side, "seed": cfg.seed + k, "features": codes_only(cfg)})
    mirror_stage(cfg.run_dir, side, "ingest")  # the same training prompts as the run's SAE
    summary = sae.run(scfg)
    # the settings the codes are computed with: toggling features.surprisal does not redo them
    st = Stage(side, "math500", fingerprint(scfg.features, marker_of(side, "sae"), _ids_digest(ids)))
    path = storage.join(side, "math500", "codes.npz")
    if st.done():
        return _load_csr(path), summary.get("explained_variance")
    out = st.begin(keep_partial=False)
    X = featurize_texts(texts, side, scfg)
    _save_csr(X, storage.join(out, "codes.npz"))
    st.commit({"rows": X.shape[0], "n_columns": X.shape[1], "sae_seed": scfg.seed})
    return X, summary.get("explained_variance")


def _subset_lines(path: str, n: int, seed: int) -> str:
    lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
    keep = np.arange(len(lines)) if len(lines) <= n else np.sort(
        np.random.default_rng(seed).choice(len(lines), n, replace=False))
    return "".join(lines[i] + "\n" for i in keep)


def ood_codes(cfg: RunConfig) -> dict[str, tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
    """Codes, token counts and lengths in characters of every benchmark in validation.ood_tiers but math500: a seeded subset of
    each file (<run_dir>/validate/ood/inputs/, rewritten only when it changes), ingested and featurised
    by the usual stages in <run_dir>/validate/ood/ with the run's SAE mirrored there."""
    from saerl_ray.core.featureio import load_features
    from saerl_ray.stages import features, ingest

    vc = cfg.validation
    names = [n for tier in vc.ood_tiers for n in tier if n != "math500"]
    unknown = [n for n in names if n not in OOD_PRESETS]
    if unknown:
        raise ConfigError(f"validation.ood_tiers: no ingest preset for {unknown}; known: {sorted(OOD_PRESETS)}")
    if not names:
        return {}
    side = storage.join(cfg.run_dir, "validate", "ood")
    specs = []
    for name in names:
        src = find_data(vc.data_dir, name)
        if src is None:
            raise ConfigError(f"validation.ood_tiers names {name!r} but {vc.data_dir} holds no {name}.jsonl or "
                              f"{name}.jsonl.gz (set validation.data_dir or SAERL_DATA)")
        text = _subset_lines(src, vc.ood_max_prompts, cfg.seed)
        dst = storage.join(side, "inputs", f"{name}.jsonl")
        if not storage.exists(dst) or storage.read_text(dst) != text:  # unchanged: ingest's fingerprint holds
            storage.write_text(dst, text)
        specs.append(InputSpec(path=dst, preset=OOD_PRESETS[name], source=name, split="ood"))
    ocfg = cfg.model_copy(update={"run_dir": side, "ingest": IngestConfig(inputs=specs, require_answer=False),
                                  "features": codes_only(cfg)})
    ingest.run(ocfg)
    mirror_stage(cfg.run_dir, side, "sae")
    features.run(ocfg)
    prompts = storage.read_parquet(storage.join(side, "ingest", "prompts.parquet"),
                                   columns=["id", "source", "n_chars"]).to_pandas()
    _, X, n_tokens = load_features(side, order=list(prompts["id"]))
    src, n_chars = prompts["source"].to_numpy(), prompts["n_chars"].to_numpy(float)
    return {name: (X[src == name], n_tokens[src == name], n_chars[src == name]) for name in names}


# ---------------------------------------------------------------- the keys validate adds
def log_len(n_tokens: np.ndarray) -> np.ndarray:
    """validate's length feature: log token count, one column."""
    return dif.log_chars(n_tokens)[:, None]  # the same clipped log as the length term


def difficulty_extras(cfg: RunConfig, math: pd.DataFrame, y: np.ndarray, oof: dict[str, np.ndarray],
                      X_math: sp.csr_matrix, n_tokens: np.ndarray, d_cols: np.ndarray) -> dict[str, Any]:
    """difficulty_spearman_seeds, difficulty_ood_auroc, difficulty_ood_detail (module docstring).
    oof: the out-of-fold predictions of validate's `sae` and `length` rows; X_math: the run's MATH-500 codes
    (all columns, `math` order); d_cols: the columns the regression reads."""
    dc, vc = cfg.signals.difficulty, cfg.validation
    stage_sum = Stage(cfg.run_dir, "sae", "").summary()
    per_seed = {cfg.seed: spearman(oof["sae"], y)}
    ev = {cfg.seed: stage_sum.get("explained_variance")}
    preds = [oof["sae"]]
    extra = vc.sae_seeds - 1 if cfg.sae.source == "train" else 0  # a loaded SAE has no seed to vary
    n_chars = dif.prompt_chars(math) if extra or vc.ood else None  # the length term's input
    for k in range(1, extra + 1):
        X_k, ev[cfg.seed + k] = seed_codes(cfg, k, list(math["id"]), math["prompt"].tolist())
        preds.append(difficulty_oof(X_k[:, d_cols], y, dc, cfg.seed, n_chars=n_chars))
        per_seed[cfg.seed + k] = spearman(preds[-1], y)
        print(f"[validate] difficulty, SAE seed {cfg.seed + k}: Spearman {per_seed[cfg.seed + k] or 0.0:.3f}", flush=True)
    out: dict[str, Any] = {"difficulty_spearman_seeds": seeds_summary(
        per_seed, spearman(np.mean(preds, axis=0), y) if len(preds) > 1 else None, ev)}
    if not vc.ood:
        return {**out, "difficulty_ood_auroc": None, "difficulty_ood_detail": None}

    use_ray = _use_ray()
    m_sae, _ = dif.fit_config(X_math[:, d_cols], y, dc, cfg.seed, use_ray, n_chars=n_chars)
    m_len, _ = dif.fit_config(log_len(n_tokens), y, dc, cfg.seed, use_ray, transform="none")
    scores: dict[str, dict[str, np.ndarray]] = {"sae": {"math500": oof["sae"]}, "length": {"math500": oof["length"]}}
    counts = {"math500": len(y)}
    for name, (X, n, chars) in ood_codes(cfg).items():
        if not len(n):
            raise ValueError(f"validate: no prompt of benchmark {name} survived ingest in {cfg.run_dir}/validate/ood")
        scores["sae"][name] = dif.predict(m_sae, X[:, d_cols], chars)
        scores["length"][name] = dif.linear_score(m_len, log_len(n))
        counts[name] = len(n)
    tiers = [[n for n in tier if n in counts] for tier in vc.ood_tiers]
    ordered = {rep: pairwise_auroc(s, [t for t in tiers if t]) for rep, s in scores.items()}
    return {
        **out,
        "difficulty_ood_auroc": {rep: r["mean"] for rep, r in ordered.items()},
        "difficulty_ood_detail": {
            "pairs": {rep: r["pairs"] for rep, r in ordered.items()},
            "mean_pred": {rep: {b: float(np.mean(v)) for b, v in s.items()} for rep, s in scores.items()},
            "n": counts, "tiers": tiers,
        },
    }
