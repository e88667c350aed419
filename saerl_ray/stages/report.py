"""report stage: one self-contained HTML page (plots inlined as PNG) describing a run.

    saerl-ray report --config configs/gsm8k_math500.yaml     # -> <run_dir>/report/report.html

Reads only committed stage outputs: ingest, features, signals, plan (and validate/ or eval/ results
when present). Sections: counts, clusters (a table, a 2-D map, then per cluster what it is about: its
most distinctive SAE latents, each explained by the prompt tokens it peaks on, its most distinctive
words, three typical prompts, its sources, size, difficulty and quality), difficulty and quality per
cluster, filtered examples, the curriculum over batch index, validation and evaluation tables. Wide
tables wrap inside the page width (tests/test_report_browser_on_cpu.py renders it in headless Chromium).

How a cluster is described (no model is needed here):
- a latent is distinctive for a cluster by its mean `pooled` activation there minus its mean over all
  prompts, in units of its standard deviation over all prompts;
- a latent is explained by the prompts it activates most (over all prompts), each with the token where
  it peaks: the features stage stores that token's character span (features.py, "Peak tokens");
- a word (CountVectorizer, English stop words dropped) is distinctive by the share of the cluster's
  prompts that contain it over its share of all prompts, counted when at least MIN_WORD_HITS prompts and
  MIN_WORD_SHARE of the cluster contain it;
- the example prompts are the three closest to the cluster's centroid (`cluster_dist`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from saerl_ray.core import storage
from saerl_ray.core.config import RunConfig, fingerprint
from saerl_ray.core.featureio import iter_band, stored_codes
from saerl_ray.core.stage import Stage, marker_of
from saerl_ray.signal_models.quality import SIGNALS


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
    head = "".join(_cell("th", c) for c in cols)
    body = "".join("<tr>" + "".join(_cell("td", _fmt(r.get(c))) for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(tag: str, text: str) -> str:
    """A cell; a short value without spaces (a number, a name) stays on one line, longer text wraps."""
    short = len(text) <= 16 and " " not in text
    return f"<{tag}{' class=nw' if short else ''}>{html.escape(text)}</{tag}>"


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

    from saerl_ray.core.featureio import code_columns, load_features

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


# ------------------------------------------------------------------ what each cluster is about

LATENTS_PER_CLUSTER = 5
PROMPTS_PER_LATENT = 20  # top-activating prompts read per latent: its peak tokens are counted over these
WORDS_PER_CLUSTER = 10
EXAMPLES_PER_CLUSTER = 3
MIN_WORD_HITS = 3
MIN_WORD_SHARE = 0.05
WORD_SAMPLE = 50_000  # prompts the word counts read at most (a seeded sample of a bigger run)


def _one_hot(labels: np.ndarray, k: int) -> sp.csr_matrix:
    """(k, n) sparse indicator of each row's cluster: `_one_hot(c, k) @ X` sums X per cluster."""
    n = len(labels)
    return sp.csr_matrix((np.ones(n, np.float32), (labels, np.arange(n))), shape=(k, n))


def _rows(index: pd.Index, ids: np.ndarray) -> np.ndarray:
    rows = index.get_indexer(ids)
    if (rows < 0).any():
        raise KeyError(f"prompt {ids[rows < 0][0]} has features but no signals row")
    return rows


def _best(score: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the n highest positive entries of a 1-D score, best first (ties: higher tiebreak)."""
    order = np.lexsort((-tiebreak, -score)) if tiebreak is not None else np.argsort(-score, kind="stable")
    order = order[:n]
    return order[score[order] > 0]


def _top_per_group(group: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores of each group, ordered by group, then score descending."""
    order = np.lexsort((-score, group))
    g = group[order]
    rank = np.arange(len(g)) - np.searchsorted(g, g, side="left")
    return order[rank < n]


def _latent_moments(run_dir: str, index: pd.Index, clusters: np.ndarray, k: int):
    """Mean `pooled` activation of every latent per cluster (k, d_sae), and its mean and standard
    deviation over all prompts (d_sae,). Reads the features part by part."""
    sums, sumsq = 0.0, 0.0
    for ids, X, _ in iter_band(run_dir, "pooled"):
        sums = sums + (_one_hot(clusters[_rows(index, ids)], k) @ X).toarray()
        sumsq = sumsq + np.asarray(X.multiply(X).sum(0)).ravel()
    n = len(clusters)
    mean = sums.sum(0) / n
    per_cluster = sums / np.maximum(np.bincount(clusters, minlength=k), 1)[:, None]
    return per_cluster, mean, np.sqrt(np.maximum(sumsq / n - mean**2, 0.0))


def _top_activations(run_dir: str, index: pd.Index, latents: np.ndarray, n: int) -> dict[int, list]:
    """For each latent: its n largest `pooled` activations over all prompts, best first, as
    (value, prompt row, (start, end) of its peak token in the prompt, or None when not stored)."""
    found = []  # columns: latent, value, row, start, end
    for ids, X, peaks in iter_band(run_dir, "pooled"):
        coo = X.tocoo()  # entries in X.data order, which `peaks` follows
        hit = np.flatnonzero(np.isin(coo.col, latents))
        spans = peaks[hit] if peaks is not None else np.full((len(hit), 2), -1)
        part = np.column_stack([coo.col[hit], coo.data[hit], _rows(index, ids[coo.row[hit]]), spans])
        found.append(part[_top_per_group(part[:, 0], part[:, 1], n)])
    top = np.concatenate(found) if found else np.zeros((0, 5))
    top = top[_top_per_group(top[:, 0], top[:, 1], n)]
    return {int(lat): [(v, int(r), (int(s), int(e)) if s >= 0 else None)
                       for _, v, r, s, e in top[top[:, 0] == lat]] for lat in latents}


def _word_shares(texts: list[str], clusters: np.ndarray, k: int):
    """(words, share of each cluster's prompts containing each word (k, V), share of all prompts (V,),
    prompts of each cluster containing it (k, V)); a seeded sample of WORD_SAMPLE prompts at most."""
    from sklearn.feature_extraction.text import CountVectorizer

    if len(texts) > WORD_SAMPLE:
        take = np.sort(np.random.default_rng(0).choice(len(texts), WORD_SAMPLE, replace=False))
        texts, clusters = [texts[i] for i in take], clusters[take]
    vec = CountVectorizer(binary=True, stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b",
                          min_df=MIN_WORD_HITS)
    try:
        D = vec.fit_transform(texts)
    except ValueError:  # no word in MIN_WORD_HITS prompts
        return np.array([], dtype=object), np.zeros((k, 0)), np.zeros(0), np.zeros((k, 0))
    hits = (_one_hot(clusters, k) @ D).toarray()
    share_c = hits / np.maximum(np.bincount(clusters, minlength=k), 1)[:, None]
    return vec.get_feature_names_out(), share_c, hits.sum(0) / len(texts), hits


def _distinctive_words(texts: list[str], clusters: np.ndarray, k: int) -> list[list[tuple[str, float, float]]]:
    """Per cluster: up to WORDS_PER_CLUSTER (word, share in the cluster, share in all prompts), by lift."""
    words, share_c, share, hits = _word_shares(texts, clusters, k)
    out = []
    for c in range(k):
        counted = (hits[c] >= MIN_WORD_HITS) & (share_c[c] >= MIN_WORD_SHARE)
        lift = np.where(counted, share_c[c] / np.maximum(share, 1e-12), 0.0)
        best = _best(np.where(lift > 1, lift, 0.0), WORDS_PER_CLUSTER, tiebreak=hits[c])
        out.append([(str(words[j]), float(share_c[c, j]), float(share[j])) for j in best])
    return out


def _token(text: str, span: tuple[int, int]) -> str:
    return text[span[0]:span[1]].strip() or repr(text[span[0]:span[1]])


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _snippet(text: str, span: tuple[int, int] | None, width: int = 70) -> str:
    """HTML: the text around `span` with the span marked (no span: the start of the text)."""
    if span is None:
        return html.escape(_clip(text, 2 * width))
    s, e = span
    before, after = html.escape(text[max(0, s - width):s]), html.escape(text[e:e + width])
    return (("…" if s > width else "") + before + f"<mark>{html.escape(text[s:e])}</mark>" + after
            + ("…" if e + width < len(text) else ""))


def _latent_item(latent: int, z: float, acts: list, prompts: list[str]) -> str:
    tokens = Counter(_token(prompts[r], span) for _, r, span in acts if span is not None)
    peaks = ", ".join(f"<code>{html.escape(t)}</code>&nbsp;×{n}" for t, n in tokens.most_common(5))
    peaks = (f"peaks on {peaks} (top {len(acts)} prompts)" if peaks
             else "<em>peak tokens not stored: rerun the features stage</em>")
    examples = " · ".join(f"“{_snippet(prompts[r], span)}”" for _, r, span in acts[:2])
    return f"<li><b>latent {latent}</b> (+{z:.1f} sd): {peaks}<br><span class='ex'>e.g. {examples}</span></li>"


def _words_html(words: list[tuple[str, float, float]]) -> str:
    if not words:
        return "<p class='words'><b>Distinctive words:</b> <em>none above the pool's rate</em></p>"
    items = ", ".join(f"<b>{html.escape(w)}</b> {100 * c:.0f}% (all {100 * a:.0f}%)" for w, c, a in words)
    return f"<p class='words'><b>Distinctive words</b> (share of the cluster's prompts): {items}</p>"


def _sources(df: pd.DataFrame) -> dict[int, str]:
    """Per cluster: its sources with their shares, largest first."""
    shares = df.groupby("cluster")["source"].value_counts(normalize=True)
    return {int(c): ", ".join(f"{src} {100 * v:.0f}%" for (_, src), v in s.items()) for c, s in shares.groupby(level=0)}


class ClusterProfiles:
    """What each cluster is about: distinctive latents (explained), words, examples, sources, signals."""

    def __init__(self, run: _Run):
        df, k = run.df, int(run.df["cluster"].max()) + 1
        self.df, self.k, self.clusters = df, k, df["cluster"].to_numpy()
        self.present = [int(c) for c in sorted(df["cluster"].unique())]
        self.prompts = df["prompt"].tolist()
        self.sources = _sources(df)
        self.words = _distinctive_words(self.prompts, self.clusters, k)
        self.latents, self.z, self.acts = self._latents(run)

    def _latents(self, run: _Run):
        codes, _ = stored_codes(run.dir)
        if "pooled" not in codes:
            return [np.zeros(0, int)] * self.k, None, {}
        index = pd.Index(self.df["id"])
        per_cluster, mean, std = _latent_moments(run.dir, index, self.clusters, self.k)
        z = (per_cluster - mean) / (std + 1e-6)
        latents = [_best(z[c], LATENTS_PER_CLUSTER) for c in range(self.k)]
        chosen = np.unique(np.concatenate(latents)) if latents else np.zeros(0, int)
        return latents, z, _top_activations(run.dir, index, chosen, PROMPTS_PER_LATENT)

    def about(self, c: int, n: int = 4) -> str:
        return ", ".join(w for w, _, _ in self.words[c][:n])

    def table(self) -> str:
        g = self.df.groupby("cluster")
        stats = g.agg(n=("id", "size"), difficulty=("difficulty_pred", "mean"), quality=("quality_score", "mean"),
                      kept=("keep", "mean"))
        return _table([{"cluster": c, "prompts": int(r.n), "share": f"{100 * r.n / len(self.df):.1f}%",
                        "about (distinctive words)": self.about(c), "sources": self.sources[c],
                        "difficulty": r.difficulty, "quality": r.quality, "kept": r.kept}
                       for c, r in stats.iterrows()])

    def section(self, c: int) -> str:
        rows = self.df[self.clusters == c]
        title = html.escape(self.about(c, 3) or "no distinctive words")
        return (f"<section class='cluster' id='cluster-{c}' data-cluster='{c}'><h3>Cluster {c}: {title}</h3>"
                f"{self._facts(c, rows)}{self._latents_html(c)}{_words_html(self.words[c])}"
                f"{_examples_html(rows)}</section>")

    def _facts(self, c: int, rows: pd.DataFrame) -> str:
        return (f"<p class='facts'><b>{len(rows)}</b> prompts ({100 * len(rows) / len(self.df):.1f}%) · sources: "
                f"{html.escape(self.sources[c])} · difficulty {rows['difficulty_pred'].mean():.3f} "
                f"(all {self.df['difficulty_pred'].mean():.3f}) · quality {rows['quality_score'].mean():.3f} · "
                f"kept {100 * rows['keep'].mean():.0f}%</p>")

    def _latents_html(self, c: int) -> str:
        items = "".join(_latent_item(int(lat), float(self.z[c, lat]), self.acts[int(lat)], self.prompts)
                        for lat in self.latents[c])
        return (f"<p><b>Distinctive SAE latents</b> (mean activation here vs all prompts, in sd), each with the "
                f"tokens it peaks on:</p><ul class='latents'>{items or '<li><em>none</em></li>'}</ul>")


def _examples_html(rows: pd.DataFrame) -> str:
    items = "".join(f"<li>{html.escape(_clip(t, 400))}</li>"
                    for t in rows.nsmallest(EXAMPLES_PER_CLUSTER, "cluster_dist")["prompt"])
    return f"<p><b>Typical prompts</b> (closest to the centroid):</p><ol class='examples'>{items}</ol>"


# ------------------------------------------------------------------ the page


class _Run:
    """A run dir's committed outputs the report reads: prompts joined with their signals, summaries."""

    def __init__(self, run_dir: str | Path):
        self.dir = storage.resolve(run_dir)
        prompts = self.table("ingest", "prompts.parquet")
        self.df = prompts.merge(self.table("signals", "assignments.parquet"), on="id", how="inner")
        self.clusters = self.df["cluster"].to_numpy()

    def table(self, *parts: str) -> pd.DataFrame:
        return storage.read_parquet(storage.join(self.dir, *parts)).to_pandas()

    def summary(self, stage: str) -> dict:
        path = storage.join(self.dir, stage, "summary.json")
        return storage.read_json(path) if storage.exists(path) else {}


def _data_section(run: _Run) -> str:
    return "<h2>Data</h2>" + _table([
        {"input": k, **{c: v[c] for c in ("rows", "accepted", "rejected")}, "reasons": v["by_reason"]}
        for k, v in run.summary("ingest")["inputs"].items()
    ])


def _features_section(run: _Run) -> str:
    scalars = {**{f"sae.{k}": v for k, v in run.summary("sae").items()},
               **{f"features.{k}": v for k, v in run.summary("features").items()}}
    scalars = {k: v for k, v in scalars.items() if not isinstance(v, (dict, list))}
    return "<h2>SAE and features</h2>" + _kv_table(scalars)


def _clusters_section(run: _Run) -> str:
    profiles = ClusterProfiles(run)
    return ("<h2>Diversity: clusters</h2>" + profiles.table()
            + _cluster_map(run.dir, run.df["id"].to_numpy(), run.clusters)
            + "<h3>What each cluster is about</h3>" + "".join(profiles.section(c) for c in profiles.present))


def _difficulty_section(run: _Run) -> str:
    return ("<h2>Difficulty</h2>" + _kv_table(_flat(run.summary("signals").get("difficulty", {})))
            + _per_cluster_box(run.df["difficulty_pred"].to_numpy(float), run.clusters,
                               "Predicted difficulty per cluster", "difficulty"))


# The filtered-prompts table lists every dropped prompt up to this many (the count is always stated).
FILTERED_ROWS = 500


def _quality_section(run: _Run) -> str:
    df = run.df
    kept = df["keep"].to_numpy(bool)
    cut = float(df.loc[kept, "quality_score"].min()) if kept.any() and (~kept).any() else None
    flag = df["quality_flag"] if "quality_flag" in df.columns else pd.Series("", index=df.index)
    dropped = df.assign(flag=flag.fillna(""))[~kept].sort_values("quality_score")
    q = run.summary("signals").get("quality", {})
    lofo = q.get("auroc_lofo_table") or {}
    shown = dropped.head(FILTERED_ROWS)
    by_flag = ", ".join(f"{k or 'unflagged'} {v}" for k, v in dropped["flag"].value_counts().items())
    note = (f"<p>{len(dropped)} of {len(df)} prompts filtered ({q.get('rule', 'rule n/a')}, threshold "
            f"{_fmt(q.get('threshold'))}; by signal: {by_flag or 'none'})"
            + (f"; the {FILTERED_ROWS} lowest-scored are listed" if len(dropped) > FILTERED_ROWS else "; all listed")
            + ". score = quality_score (higher = cleaner, 0 = a typical clean prompt); flag = the signal whose "
              "z-score against clean held-out prompts was highest.</p>")
    return ("<h2>Quality</h2>" + _kv_table(_flat(q))
            + ("<h3>AUROC with each corruption family held out of training</h3>"
               + _table([{"family": f, **v} for f, v in lofo.items()], _lofo_columns(lofo)) if lofo else "")
            + _hist(df["quality_score"].to_numpy(float), "Quality score (all prompts)", "score", cut)
            + _per_cluster_box(df["quality_score"].to_numpy(float), run.clusters, "Quality score per cluster", "score")
            + "<h3>Filtered prompts</h3>" + note
            + _table([{"score": r.quality_score, "flag": r.flag, "source": r.source, "prompt": r.prompt[:300]}
                      for r in shown.itertuples()]))


def _lofo_columns(lofo: dict) -> list[str]:
    """Each signal alone, the stage's combination and the codes' part of it; the other combinations
    (signals/summary.json has them) would widen the table past a laptop's window."""
    have = next(iter(lofo.values()))
    return ["family", *[c for c in (*SIGNALS, "combined", "codes") if c in have]]


def _plan_section(run: _Run) -> str:
    return ("<h2>Curriculum plan</h2>" + _kv_table(_flat(run.summary("plan")))
            + _curriculum_plot(run.table("plan", "plan.parquet")))


def _results_sections(run: _Run) -> list[str]:
    out = []
    for name, title in (("validate", "Validation (MATH-500)"), ("eval", "Evaluation")):
        p = storage.join(run.dir, name, "results.json")
        if storage.exists(p):
            out.append(f"<h2>{title}</h2>" + _results_table(storage.read_json(p)))
    return out


# Tables and long words wrap inside the page (overflow-wrap: anywhere also lets a table column shrink
# below its longest word); images scale down to it.
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;overflow-wrap:anywhere}"
         "table{border-collapse:collapse;margin:.5em 0;font-size:13px;max-width:100%}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere}"
         ".nw{overflow-wrap:normal;white-space:nowrap}"
         "img{max-width:100%;height:auto}code{overflow-wrap:anywhere}mark{background:#ffe08a}"
         "section.cluster{border-top:1px solid #ddd;margin-top:1em}.ex{font-size:13px;color:#444}"
         ".facts,.words,ol.examples{font-size:14px}")


def build_report(run_dir: str | Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    run = _Run(run_dir)
    parts = [f"<h1>saerl-ray report</h1><p>run dir: <code>{html.escape(str(run.dir))}</code></p>",
             _data_section(run), _features_section(run), _clusters_section(run), _difficulty_section(run),
             _quality_section(run), _plan_section(run), *_results_sections(run)]
    return ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>saerl-ray report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def _kv_table(d: dict) -> str:
    """A one-record summary as rows of (field, value): many fields wrap down the page, not across it."""
    return _table([{"field": k, "value": v} for k, v in d.items()])


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
