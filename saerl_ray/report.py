"""report stage: one self-contained HTML page (plots inlined as PNG) describing a run.

    saerl-ray report --config configs/gsm8k_math500.yaml     # -> <run_dir>/report/report.html

Reads only committed stage outputs: ingest, features, signals, plan (and validate/ or eval/ results
when present). Sections: counts, cluster sizes + 2-D map, difficulty and quality per cluster,
filtered examples, the curriculum over batch index, validation and evaluation tables.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path

import numpy as np

from saerl_ray import storage
from saerl_ray.config import RunConfig, fingerprint
from saerl_ray.stage import Stage, marker_of


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = cols or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "" if v is None else str(v)


def _cluster_map(run_dir: str, ids: np.ndarray, clusters: np.ndarray) -> str:
    """2-D map of the clustering space: TruncatedSVD of the L2-normalised codes, a sample of points."""
    import matplotlib.pyplot as plt
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    from saerl_ray.featureio import code_columns, load_features

    rng = np.random.default_rng(0)
    take = np.sort(rng.choice(len(ids), size=min(3000, len(ids)), replace=False))
    _, X, _ = load_features(run_dir, order=list(ids[take]))
    clustered = storage.read_json(storage.join(run_dir, "signals", "summary.json")).get("codes", {}).get("cluster")
    if clustered:  # the codes k-means saw, not every stored one
        X = X[:, code_columns(run_dir, clustered)]
    xy = TruncatedSVD(n_components=2, random_state=0).fit_transform(normalize(X))
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=clusters[take], cmap="tab20", s=6, alpha=0.7)
    ax.set_title("SAE feature space (SVD of L2-normalised codes), colour = cluster")
    fig.colorbar(sc, ax=ax, label="cluster")
    return _png(fig)


def _per_cluster_box(values: np.ndarray, clusters: np.ndarray, title: str, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    ks = np.unique(clusters)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(ks)), 3.5))
    ax.boxplot([values[clusters == k] for k in ks], showfliers=False)
    ax.set_xticks(range(1, len(ks) + 1), [str(k) for k in ks])
    ax.set_xlabel("cluster")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig)


def _curriculum_plot(plan) -> str:
    import matplotlib.pyplot as plt

    batch = np.asarray(plan["batch"])
    diff = np.asarray(plan["difficulty_pred"], dtype=float)
    clus = np.asarray(plan["cluster"])
    nb = batch.max() + 1
    mean_d = np.bincount(batch, weights=diff, minlength=nb) / np.maximum(np.bincount(batch, minlength=nb), 1)
    major = np.array([np.bincount(clus[batch == b]).argmax() for b in range(nb)])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    a1.plot(mean_d, lw=0.8)
    w = max(1, nb // 50)
    a1.plot(np.convolve(mean_d, np.ones(w) / w, mode="same"), lw=2, label=f"moving mean ({w} batches)")
    a1.set_ylabel("predicted difficulty")
    a1.legend(loc="upper left")
    a2.scatter(np.arange(nb), major, s=4, c=major, cmap="tab20")
    a2.set_ylabel("majority cluster")
    a2.set_xlabel("batch index")
    a1.set_title("Curriculum: difficulty and cluster over training batches")
    return _png(fig)


def _hist(values: np.ndarray, title: str, xlabel: str, cut: float | None = None) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values[np.isfinite(values)], bins=50)
    if cut is not None:
        ax.axvline(cut, color="red", ls="--", label=f"keep threshold {cut:.3f}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _png(fig)


def build_report(run_dir: str | Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    run_dir = storage.resolve(run_dir)

    def table(*parts: str):
        return storage.read_parquet(storage.join(run_dir, *parts)).to_pandas()

    def summary(stage: str) -> dict:
        path = storage.join(run_dir, stage, "summary.json")
        return storage.read_json(path) if storage.exists(path) else {}

    prompts = table("ingest", "prompts.parquet")
    sig = table("signals", "assignments.parquet")
    plan = table("plan", "plan.parquet")
    ingest_s, sig_s, feat_s, sae_s = summary("ingest"), summary("signals"), summary("features"), summary("sae")
    df = prompts.merge(sig, on="id", how="inner")
    clusters = df["cluster"].to_numpy()

    parts = [f"<h1>saerl-ray report</h1><p>run dir: <code>{html.escape(str(run_dir))}</code></p>"]
    parts.append("<h2>Data</h2>" + _table([
        {"input": k, **{c: v[c] for c in ("rows", "accepted", "rejected")}, "reasons": v["by_reason"]}
        for k, v in ingest_s["inputs"].items()
    ]))
    parts.append("<h2>SAE and features</h2>" + _table([{**{f"sae.{k}": v for k, v in sae_s.items() if not isinstance(v, (dict, list))},
                                                          **{f"features.{k}": v for k, v in feat_s.items() if not isinstance(v, (dict, list))}}]))
    sizes = df.groupby("cluster").agg(n=("id", "size"), difficulty=("difficulty_pred", "mean"),
                                      quality=("quality_score", "mean"), kept=("keep", "mean"),
                                      top_source=("source", lambda s: s.value_counts().index[0]))
    parts.append("<h2>Diversity: clusters</h2>" + _table(sizes.reset_index().to_dict("records")))
    parts.append(_cluster_map(run_dir, df["id"].to_numpy(), clusters))
    parts.append("<h2>Difficulty</h2>" + _table([_flat(sig_s.get("difficulty", {}))]))
    parts.append(_per_cluster_box(df["difficulty_pred"].to_numpy(float), clusters, "Predicted difficulty per cluster", "difficulty"))
    parts.append("<h2>Quality</h2>" + _table([_flat(sig_s.get("quality", {}))]))
    kept = df["keep"].to_numpy(bool)
    cut = float(df.loc[kept, "quality_score"].min()) if kept.any() and (~kept).any() else None
    parts.append(_hist(df["quality_score"].to_numpy(float), "Quality probe score (all prompts)", "score", cut))
    parts.append(_per_cluster_box(df["quality_score"].to_numpy(float), clusters, "Quality score per cluster", "score"))
    low = df[~df["keep"]].sort_values("quality_score").head(15)
    parts.append("<h3>Filtered prompts (lowest scores)</h3>" + _table(
        [{"score": r.quality_score, "source": r.source, "prompt": r.prompt[:300]} for r in low.itertuples()]))
    parts.append("<h2>Curriculum plan</h2>" + _table([_flat(summary("plan"))]))
    parts.append(_curriculum_plot(plan))
    for name, title in (("validate", "Validation (MATH-500)"), ("eval", "Evaluation")):
        p = storage.join(run_dir, name, "results.json")
        if storage.exists(p):
            parts.append(f"<h2>{title}</h2>" + _results_table(storage.read_json(p)))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>saerl-ray report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and len(v) <= 12:
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, (list, dict)):
            out[f"{prefix}{k}"] = v
    return out


def _results_table(res: dict) -> str:
    """Rows = metrics, columns = feature sets / benchmarks; nested dicts become a grid."""
    rows = []
    for k, v in res.items():
        rows.append({"metric": k, **v} if isinstance(v, dict) else {"metric": k, "value": v})
    cols = ["metric"] + sorted({c for r in rows for c in r} - {"metric"})
    return _table(rows, cols)


def run(cfg: RunConfig) -> dict:
    upstream = [marker_of(cfg.run_dir, s) for s in ("ingest", "features", "signals", "plan")]
    # validate/eval results are shown when present: their contents are inputs too.
    extra = [hashlib.sha256(storage.read_bytes(p)).hexdigest()[:16]
             for p in (storage.join(cfg.run_dir, s, "results.json") for s in ("validate", "eval")) if storage.exists(p)]
    st = Stage(cfg.run_dir, "report", fingerprint(upstream, extra))
    if st.done():
        return st.summary()
    tmp = st.begin(keep_partial=False)
    page = build_report(cfg.run_dir)
    storage.write_text(storage.join(tmp, "report.html"), page)
    summary = {"path": storage.join(st.out, "report.html"), "bytes": len(page)}
    st.commit(summary)
    print(f"[report] {summary['path']} ({len(page) / 1e6:.1f} MB)")
    return summary
