"""validate: do SAE features carry difficulty, topic and quality beyond cheap baselines? (MATH-500)

    saerl-ray validate -c configs/gsm8k_math500.yaml           # table
    saerl-ray validate -c configs/gsm8k_math500.yaml --json    # one JSON object

Uses the run's MATH-500 prompts (runs ingest/sae/features first if needed) and scores five
representations with one protocol each, so the numbers are comparable:
  difficulty_spearman  5-fold out-of-fold Spearman vs `level` of the estimator the signals stage ships
                       (saerl_ray.signal_models.difficulty via validate_difficulty: its column selection, log1p design
                       (off for the baselines), the length term on log n_chars (sae row only, when
                       signals.difficulty.length_covariate), ridge alpha by leave-one-out or the ElasticNet
                       grid by inner CV, holdout), fit on each 4/5; difficulty_spearman_codes_only: the
                       sae row without the length term
  topic_nmi            k-means with K=7 (cosine), NMI vs `subject`
  quality_auroc        logistic probe (the signals stage's, its C and negatives per prompt), 5-fold
                       out-of-fold AUROC on corruptions of held-out prompts
  quality_auroc_loto   alias of quality_auroc_lofo's mean (kept for old readers)
  quality_auroc_lofo   {rep: {"mean", "min", "families"}}: each corruption FAMILY (13) held out of
                       training in turn, AUROC on that family + held-out prompts. `sae` = the stage's
                       combined score (signals.quality.combine / combine_rule); the baselines
                       their own probe. quality_auroc_lofo_parts: the sae row per signal and combination
  quality_auroc_lofo_seeds  the sae row's quality_auroc_lofo over `validation.quality_seeds` corruption seeds
                       (the table's, then seed+1, ...: new negatives, folds and fits each): {"per_seed":
                       {seed: {"mean", "min"}}, "mean", "min" (over seeds), "lowest_mean", "lowest_min"}
  filter_rate_clean    the share of GSM8K-test (all 1,319, featurised here) and MATH-500 prompts the run's
                       own quality filter (signals/quality.json, the signals stage run if needed) drops;
                       filter_rate_clean_detail: per source, the rule, threshold and flags
Representations: `sae` (the features stage's codes, each metric on the codes its signal reads:
signals.difficulty/cluster/quality.codes), `length`
(token count), `dense` (the hook layer's residual, pooled with features.pooling over the tokens the codes
pool: the input the SAE encodes; standardised, split into positive and negative parts for the probe),
`tfidf` (word 1-2 grams; SVD-128 for the regression and k-means, the sparse TF-IDF
itself for the probe), `random` (Gaussian features: the control that must score ~0 / ~0.5).
  sae_minus_dense      {row: {"sae", "dense", "diff", "lo", "hi"}}: the SAE minus dense per row (difficulty,
                       codes-only difficulty, topic, quality overall and leave-one-family-out mean / min;
                       the SAE's quality score is that of the codes: the combination's code signals summed,
                       without surprisal or length, which no representation gives)
                       with a paired-bootstrap 95% interval over prompts (validate_dense.py). No dense
                       filter_rate_clean: that row is the run's own filter, trained on the codes of its
                       whole pool by the signals stage; a dense filter would need the pool's residuals.
Beyond the table (saerl_ray/validation/validate_difficulty.py; `validation.*` config fields):
  difficulty_spearman_seeds  the SAE difficulty row over `validation.sae_seeds` SAE seeds (the run's SAE
                       and ones trained with seeds seed+1, ... in <run_dir>/validate/seeds/<k>/):
                       {"mean", "min", "std", "per_seed", "ensemble", "explained_variance"}
  difficulty_ood_auroc {"sae", "length"}: mean pairwise AUROC with which the regression fit on every
                       MATH-500 level orders benchmarks of known hardness (`validation.ood_tiers`, default
                       GSM8K-test < MATH-500 < AMC23 < OlympiadBench, AIME24; features of a seeded subset in
                       <run_dir>/validate/ood/); difficulty_ood_detail: per pair, mean prediction, counts
Writes `<run_dir>/validate/results.json` (the report shows it).
"""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler, normalize

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig
from saerl_ray.core.data import expand as expand_data
from saerl_ray.core.data import find as find_data
from saerl_ray.validation.validate_difficulty import (  # noqa: F401
    difficulty_extras,
    difficulty_oof,
    difficulty_spearman,
    spearman,
)

METRICS = ("difficulty_spearman", "topic_nmi", "quality_auroc", "quality_auroc_loto")
REPS = ("sae", "dense", "length", "tfidf", "random")


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def sae_design(X: sp.csr_matrix) -> np.ndarray:
    """SAE codes as regression inputs: log1p compresses heavy-tailed activations, then the latents
    active in >=1% of prompts (rarer ones only add variance on 500 rows)."""
    X = X.tocsc()
    keep = np.flatnonzero(np.diff(X.indptr) >= max(2, int(0.01 * X.shape[0])))
    return np.log1p(np.maximum(_dense(X[:, keep]), 0))


def topic_labels(X: np.ndarray, k: int = 7, seed: int = 0) -> np.ndarray:
    """k-means (K=k) cluster of each row, cosine on standardised columns."""
    Z = normalize(StandardScaler().fit_transform(X)) if X.shape[1] > 1 else X
    return KMeans(k, n_init=4, random_state=seed).fit_predict(Z)


def topic_nmi(X: np.ndarray, topics: np.ndarray, k: int = 7, seed: int = 0) -> float:
    return float(normalized_mutual_info_score(topics, topic_labels(X, k, seed)))


def quality_auroc(X_pos: np.ndarray, X_neg: np.ndarray, neg_types: np.ndarray, neg_source: np.ndarray, C: float,
                  seed: int = 0, folds: int = 5, combine: tuple[str, ...] = ("probe",), bands=None,
                  pos_len: np.ndarray | None = None, neg_len: np.ndarray | None = None, rule: str = "max",
                  neighbor_band: tuple[int, int] | None = None, neighbor_k: int = 10,
                  pos_surprisal: np.ndarray | None = None, neg_surprisal: np.ndarray | None = None,
                  scores_out: dict | None = None) -> dict:
    """The signals stage's own model and splits (quality.fit_quality_probe), `folds`-fold: `overall` tests
    on corruptions of held-out prompts; `lofo` also holds the corruption's family out of training
    (neg_types: corruption kinds, grouped by corruptions.FAMILIES; other labels are their own group).
    `combine` / `rule`: the signals scored and how they add up (the baselines: their probe alone);
    `neighbor_band`: the columns the neighbors signal compares. neg_source[j] = the positive
    negative j was made from (each pair stays in one fold). `scores_out`: filled with each split's
    out-of-fold scores (quality.pooled_signal_aurocs), for the bootstrap."""
    import ray

    from saerl_ray.signal_models.corruptions import families_of
    from saerl_ray.signal_models.quality import fit_quality_probe

    _, m = fit_quality_probe(sp.csr_matrix(X_pos), sp.csr_matrix(X_neg), families_of(neg_types), C=C, seed=seed,
                             neg_source=neg_source, folds=folds, use_ray=ray.is_initialized(), bands=bands,
                             pos_len=pos_len, neg_len=neg_len, combine_signals=combine, combine_rule=rule,
                             neighbor_band=neighbor_band, neighbor_k=neighbor_k,
                             pos_surprisal=pos_surprisal, neg_surprisal=neg_surprisal, scores_out=scores_out)
    lofo = {"mean": m["auroc_lofo_mean"], "min": m["auroc_lofo_min"], "families": m["n_families"]}
    parts = {k: {**v, "overall": m["auroc_overall_by_signal"][k]} for k, v in m["auroc_lofo_by_signal"].items()}
    return {"overall": m["auroc_overall"], "loto": lofo["mean"], "lofo": lofo,
            "by_type": m["auroc_leave_one_family_out"], "parts": parts}


def filter_rate_clean(cfg: RunConfig, math, X_math: sp.csr_matrix) -> dict:
    """The run's own filter (signals/quality.json: trained the way the signals stage does, on
    signals.quality.reference or, with `reference: []`, on the run's pool; the stage runs here if it has
    not) applied to curated prompts: MATH-500 (the run's codes) and
    GSM8K-test (gsm8k_test.jsonl or .jsonl.gz beside an ingest input; all rows, featurised here). Their share dropped."""
    from pathlib import Path

    from saerl_ray.core.featureio import load_surprisal
    from saerl_ray.pipeline import run_pipeline
    from saerl_ray.signal_models.quality import flags_for, keep_mask, quality_scores
    from saerl_ray.stages.features import featurize_pair

    run_pipeline(cfg, ["signals"])
    model = storage.read_json(storage.join(cfg.run_dir, "signals", "quality.json"))
    cut = float(model["threshold"])
    sets = {"math500": (X_math, math["prompt"].str.len().to_numpy(float),
                        load_surprisal(cfg.run_dir, list(math["id"])) if cfg.features.surprisal else None)}
    found = [f for f in (find_data(str(Path(expand_data(i.path)).parent), "gsm8k_test") for i in cfg.ingest.inputs) if f]
    if found:
        gsm = [str(row["question"]).strip() for _, row in storage.iter_jsonl(found[0])]
        X_gsm, s_gsm = featurize_pair(gsm, cfg.run_dir, cfg)
        sets["gsm8k_test"] = (X_gsm, np.array([len(t) for t in gsm], float), s_gsm)
    detail: dict = {"rule": model.get("metrics", {}).get("rule"), "threshold": cut, "combine": model.get("combine")}
    dropped = total = 0
    for name, (X, n_chars, surprisal) in sets.items():
        score, flag = quality_scores(model, X, n_chars, surprisal)
        keep, _ = keep_mask(score, None, cut)  # the filter's own rule and flags, applied to clean prompts
        flags = flags_for(keep, flag, model.get("combine", ["probe"]))
        drop = ~keep
        detail[name] = {"n": int(len(score)), "dropped": int(drop.sum()), "rate": float(drop.mean()),
                        "by_flag": {str(k): int((flags == k).sum()) for k in np.unique(flags[drop])}}
        dropped, total = dropped + int(drop.sum()), total + len(score)
    detail["gsm8k_test_file"] = str(found[0]) if found else None
    return {"rate": dropped / max(total, 1), "detail": detail}


def negatives(cfg: RunConfig, texts: list[str], answers: list[str], seed: int, q_cols: np.ndarray):
    """The quality rows' corruptions of `texts` with `seed`: (texts, kinds, source row, codes in the probe's
    columns, surprisal or None), featurised with the run's lens and SAE (the whole model with surprisal)."""
    from saerl_ray.signal_models.corruptions import make_negatives
    from saerl_ray.stages.features import featurize_pair

    qc = cfg.signals.quality
    neg_texts, kinds, source = make_negatives(texts, answers, seed=seed, types=qc.corruptions,
                                              per_prompt=qc.negatives_per_prompt)
    X, surprisal = featurize_pair(neg_texts, cfg.run_dir, cfg)
    return neg_texts, np.asarray(kinds), source, X[:, q_cols], surprisal


def quality_lofo_seeds(cfg: RunConfig, math, q_cols: np.ndarray, X_pos, sae_q: dict, first: dict) -> dict:
    """The sae row's quality_auroc_lofo over validation.quality_seeds corruption seeds: the table's (`first`,
    seed) and seed+1, ...: each its own corruptions, folds and fits. One seed's mean moves by ~0.01."""
    per = {cfg.seed: first}
    texts, answers = math["prompt"].tolist(), math["answer"].tolist()
    for k in range(1, cfg.validation.quality_seeds):
        seed = cfg.seed + k
        neg_texts, kinds, source, X_neg, neg_sur = negatives(cfg, texts, answers, seed, q_cols)
        q = quality_auroc(X_pos, X_neg, kinds, source, cfg.signals.quality.C, seed,
                          **{**sae_q, "neg_len": np.array([len(t) for t in neg_texts], float), "neg_surprisal": neg_sur})
        per[seed] = q["lofo"]
        print(f"[validate] quality, corruption seed {seed}: leave-one-family-out {per[seed]['mean']:.3f} / "
              f"{per[seed]['min']:.3f}", flush=True)
    means, mins = [v["mean"] for v in per.values()], [v["min"] for v in per.values()]
    return {"per_seed": {str(k): {"mean": v["mean"], "min": v["min"]} for k, v in per.items()},
            "mean": float(np.mean(means)), "lowest_mean": float(min(means)), "min": float(np.mean(mins)),
            "lowest_min": float(min(mins))}


def _load(cfg: RunConfig):
    from saerl_ray.core.featureio import check_stored, load_features
    from saerl_ray.core.ray_init import init_ray
    from saerl_ray.pipeline import run_pipeline

    run_pipeline(cfg, ["ingest", "sae", "features"])
    check_stored(cfg.run_dir, cfg.features)
    init_ray(cfg.ray)  # the probe's folds run as Ray tasks
    prompts = storage.read_parquet(storage.join(cfg.run_dir, "ingest", "prompts.parquet")).to_pandas()
    math = prompts[prompts["source"] == "math500"].reset_index(drop=True)
    if len(math) < 100:
        raise ValueError(f"validate needs MATH-500 in the run (source 'math500'); {cfg.run_dir} has {len(math)} rows")
    _, X, n_tokens = load_features(cfg.run_dir, order=list(math["id"]))
    return math, X, n_tokens


def validate(cfg: RunConfig) -> dict:
    from saerl_ray.core.config import signal_codes
    from saerl_ray.core.featureio import code_columns, load_surprisal
    from saerl_ray.stages.features import dense_texts
    from saerl_ray.validation.validate_dense import dense_inputs, sae_minus_dense

    math, X_all, n_tokens = _load(cfg)
    q_cols = code_columns(cfg.run_dir, signal_codes(cfg, "quality"))
    texts = math["prompt"].tolist()
    y = math["difficulty"].to_numpy(float)
    topics = math["topic"].to_numpy()
    rng = np.random.default_rng(cfg.seed)

    qc = cfg.signals.quality
    neg_texts, neg_types, neg_source, X_neg_sae, neg_sur = negatives(cfg, texts, math["answer"].tolist(), cfg.seed,
                                                                     q_cols)
    # With features.surprisal, the run's MATH-500 surprisal and the negatives' (the whole model runs here).
    pos_sur = load_surprisal(cfg.run_dir, list(math["id"])) if cfg.features.surprisal else None
    # The stage's quality model reads each of its codes as a band (novelty) and prompt lengths in chars.
    n_q = len(signal_codes(cfg, "quality"))
    q_bands = [(k * len(q_cols) // n_q, (k + 1) * len(q_cols) // n_q) for k in range(n_q)]
    q_len = (np.array([len(t) for t in texts], float), np.array([len(t) for t in neg_texts], float))

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts + neg_texts)
    svd = TruncatedSVD(128, random_state=cfg.seed).fit(tfidf.transform(texts + neg_texts))
    tok = __import__("saerl_ray.core.models", fromlist=["load_tokenizer"]).load_tokenizer(
        cfg.model.name, cfg.model.trust_remote_code)
    neg_len = np.array([len(tok(t).input_ids) for t in neg_texts], dtype=float)
    rand = rng.normal(size=(len(texts) + len(neg_texts), 128))
    # The residual the SAE encodes, pooled like its codes: does the SAE add anything, or only names?
    D_dense, P_dense, N_dense = dense_inputs(dense_texts(texts, cfg.run_dir, cfg), dense_texts(neg_texts, cfg.run_dir, cfg))
    # Per representation: (features for the regression, for k-means, and non-negative features of
    # prompts and negatives for the probe, which applies its own log1p design). The regression applies
    # its own design too: log1p of the SAE codes, the baselines as they are (transform none).
    D_tfidf = svd.transform(tfidf.transform(texts))
    D_len = np.log(n_tokens.astype(float))[:, None]
    d_cols = code_columns(cfg.run_dir, signal_codes(cfg, "difficulty"))
    reps = {
        "sae": (X_all[:, d_cols],
                sae_design(X_all[:, code_columns(cfg.run_dir, signal_codes(cfg, "cluster"))]), X_all[:, q_cols], X_neg_sae),
        "dense": (D_dense, D_dense, P_dense, N_dense),
        "length": (D_len, D_len, n_tokens.astype(float)[:, None], neg_len[:, None]),
        "tfidf": (D_tfidf, D_tfidf, tfidf.transform(texts), tfidf.transform(neg_texts)),
        "random": (rand[: len(texts)], rand[: len(texts)], np.abs(rand[: len(texts)]), np.abs(rand[len(texts):])),
    }
    # The sae row is scored by the stage's own combination; the baselines by their probe alone.
    sae_q = dict(combine=tuple(qc.combine), bands=q_bands, pos_len=q_len[0], neg_len=q_len[1], rule=qc.combine_rule,
                 neighbor_band=q_bands[signal_codes(cfg, "quality").index(qc.neighbors_code)], neighbor_k=qc.neighbors_k,
                 pos_surprisal=pos_sur, neg_surprisal=neg_sur)
    res: dict = {m: {} for m in METRICS}
    per_type: dict = {}
    oof: dict = {}  # out-of-fold difficulty predictions, reused by the seeds / benchmark-order keys
    held: dict = {}  # sae and dense: every fixed out-of-fold output the bootstrap resamples
    for name, (D, D_topic, Xp, Xn) in reps.items():
        # Only the sae row gets the stage's length term: the baselines are each representation alone.
        oof[name] = difficulty_oof(D, y, cfg.signals.difficulty, cfg.seed, transform="log1p" if name == "sae" else "none",
                                   n_chars=q_len[0] if name == "sae" else None)
        res["difficulty_spearman"][name] = spearman(oof[name], y)
        labels = topic_labels(D_topic, 7, cfg.seed)
        res["topic_nmi"][name] = float(normalized_mutual_info_score(topics, labels))
        scores: dict = {}
        q = quality_auroc(Xp, Xn, neg_types, neg_source, qc.C, cfg.seed, **(sae_q if name == "sae" else {}),
                          scores_out=scores)
        held[name] = {"difficulty_oof": oof[name], "topic_labels": labels, "quality_scores": scores}
        res["quality_auroc"][name] = q["overall"]
        res["quality_auroc_loto"][name] = q["loto"]
        res.setdefault("quality_auroc_lofo", {})[name] = q["lofo"]
        if name == "sae":
            res["quality_auroc_lofo_parts"] = q["parts"]
        per_type[name] = q["by_type"]
    res["quality_auroc_by_type"] = per_type  # per held-out corruption family
    res["quality_auroc_lofo_seeds"] = quality_lofo_seeds(cfg, math, q_cols, reps["sae"][2], sae_q,
                                                         res["quality_auroc_lofo"]["sae"])
    codes_only = cfg.signals.difficulty.model_copy(update={"length_covariate": False})
    held["sae"]["difficulty_oof_codes_only"] = difficulty_oof(reps["sae"][0], y, codes_only, cfg.seed)
    res["difficulty_spearman_codes_only"] = spearman(held["sae"]["difficulty_oof_codes_only"], y)
    res["sae_minus_dense"] = sae_minus_dense(held["sae"], held["dense"], y, topics, neg_source, cfg.seed)
    fr = filter_rate_clean(cfg, math, X_all)
    res["filter_rate_clean"], res["filter_rate_clean_detail"] = fr["rate"], fr["detail"]
    res["n"] = {"prompts": len(texts), "negatives": len(neg_texts)}
    res.update(difficulty_extras(cfg, math, y, oof, X_all, n_tokens, d_cols))
    return res


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="saerl-ray validate (MATH-500)")
    t.add_column("metric")
    for r in REPS:
        t.add_column(r, justify="right")
    for m in METRICS:
        t.add_row(m, *[f"{res[m][r]:.3f}" for r in REPS])
    if "quality_auroc_lofo" in res:
        t.add_row("quality_auroc_lofo min", *[f"{res['quality_auroc_lofo'][r]['min']:.3f}" for r in REPS])
    Console().print(t)
    for row, d in (res.get("sae_minus_dense") or {}).items():
        if row != "bootstrap":
            Console().print(f"sae - dense, {row}: {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    seeds, ood = res.get("difficulty_spearman_seeds"), res.get("difficulty_ood_auroc")
    if seeds:
        Console().print(f"difficulty_spearman over SAE seeds {list(seeds['per_seed'])}: mean {seeds['mean']:.3f}, "
                        f"min {seeds['min']:.3f}, std {seeds['std']:.3f} (length {res['difficulty_spearman']['length']:.3f})"
                        + (f", seed ensemble {seeds['ensemble']:.3f}" if seeds.get("ensemble") is not None else ""))
    if ood:
        Console().print("difficulty_ood_auroc (benchmark order, mean pairwise AUROC): "
                        + ", ".join(f"{r} {v:.3f}" for r, v in ood.items()))
    qs = res.get("quality_auroc_lofo_seeds")
    if qs and len(qs["per_seed"]) > 1:
        Console().print(f"quality_auroc_lofo over corruption seeds {list(qs['per_seed'])}: mean {qs['mean']:.3f} "
                        f"(lowest {qs['lowest_mean']:.3f}), min {qs['min']:.3f} (lowest {qs['lowest_min']:.3f})")
    if "filter_rate_clean" in res:
        Console().print(f"filter_rate_clean (GSM8K-test + MATH-500 dropped by the run's filter): "
                        f"{res['filter_rate_clean']:.4f}")


def main(cfg: RunConfig, as_json: bool = False) -> int:
    if as_json:  # stdout carries the JSON object only; stage progress lines go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            res = validate(cfg)
    else:
        res = validate(cfg)
    storage.write_json(storage.join(cfg.run_dir, "validate", "results.json"), res)
    if as_json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0
