"""Scale benchmark: signals -> plan -> sampler load on 100k / 300k / 1M synthetic prompts, against a
baseline that loads every code onto the driver.

    .venv/bin/python benchmarks/scale.py --n 1000000                   # one size (the issue's bar)
    .venv/bin/python benchmarks/scale.py --n 100000 300000 1000000     # the RESULTS.md table
    .venv/bin/python benchmarks/scale.py --n 300000 --sides baseline   # rerun one side; the row reuses
                                                                       # the other's saved <work>/<side>-<N>.json
Generating 1M prompts takes ~13 min (4.2 GB under --work); each side ~12-25 min on a busy 2-core box,
most of it N-independent fitting on the 2,000 labelled rows and 1,200 x 3 probe rows (with the
ElasticNet estimator, before 2026-12-02, the difficulty CV's 75 fits dominated).

Data (written once per N under --work, reused by later runs): a run dir in the stored formats of
docs/run_dir.md, written through saerl_ray.core.storage + saerl_ray.core.stage:
  - ingest/prompts.parquet: N prompts (ids = ingest.prompt_id of the text, ~300 characters each),
    sources deepmath / numina / math; only the `math` rows (10%) carry a `difficulty` level 1-5;
  - features/part-NNNNN.parquet: parts of 512 prompts (features.block_rows), the four default codes
    at the main run's density: pooled top-128, last token 32 (the SAE's k), mean top-128, halves
    ~210 (20-600, fewer for short prompts): ~500 stored entries per prompt, d_sae 4608. Latents come
    from 16 topics (250 common + 450 topic latents each, Zipf-like weights); 40 common latents grow
    with a hidden difficulty that also sets the `math` rows' level; values are log-normal.
The quality probe's negatives are featurised by a cheap synthetic featurizer (the same generator,
with fewer `halves` latents and another last-token distribution), not the lens model: the lens
model's cost does not depend on N (1,200 x 3 texts), and the benchmark measures what does.

Measured, each side in its own fresh process (so ru_maxrss is that side's own peak):
  ours       signals.run + plan.run + sampler.CurriculumState(plan) with the default config (k=16,
             2,000 labelled rows, 1,200 x 3 probe rows), Ray started by the stage (2 CPUs).
             Driver RSS sampled every 50 ms (and ru_maxrss); object-store bytes used, polled every
             0.25 s from the raylet's store stats; PSS of every Ray process (driver included), 1 s.
  baseline   the same signals on the driver: the whole feature table as one CSR (the stage's
             design before this benchmark), sklearn KMeans(k, n_init=1, max_iter=50) on the cosine-
             normalised cluster codes, the same difficulty fit (the configured estimator and length term)
             and LogisticRegression probe + novelty + neighbors fits (their CV folds as the same Ray
             tasks as ours: that fixed cost, ~2,000 labelled rows whatever N, is not what is
             compared), every row scored on the driver. Run under a
             memory cap (--baseline-cap-gb, a watchdog): past it, it is killed and reported as "oom"
             with the RSS it reached.
Agreement: ARI of the two clusterings, and the largest difference in difficulty_pred / quality_score
(same rows, same fitting code: should be 0 up to float rounding).

Last stdout line per N: one JSON object (`n`, `seconds`, `driver_peak_rss_mb`, `object_store_peak_mb`,
`baseline`: {...}, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("CI", "1")  # no Ray Data progress bars in the logs

import numpy as np
import psutil

D_SAE = 4608
CODES = ["pooled", "last", "mean", "halves"]
TOP_K = 128
LAST_K = 32
BLOCK_ROWS = 512
TOPICS = 16  # = signals.cluster.k: a planted partition the two clusterings can agree on
POOL = 700  # latents a topic's prompts draw from (250 common + 450 of its own)
VERSION = "scale-v1"
WORDS = ("the of a and to is in that for be on with as by at an are this from or which find let value "
         "number sum product integer real prime root square triangle circle angle side length area "
         "probability expected function derivative integral limit sequence series matrix vector "
         "polynomial equation solve compute show prove determine smallest largest positive greater "
         "remainder divided digits distinct ordered pairs points plane line radius chord tangent").split()


# ---------------------------------------------------------------- synthetic codes


class Codes:
    """Sparse four-code rows at the main run's density; deterministic given the seed (see the module doc)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        common = rng.choice(D_SAE, 250, replace=False)
        rest = np.setdiff1d(np.arange(D_SAE), common)
        self.pools = np.stack([np.r_[common, rng.choice(rest, POOL - 250, replace=False)] for _ in range(TOPICS)])
        self.weights = np.stack([-0.9 * np.log1p(rng.permutation(POOL)) for _ in range(TOPICS)]).astype(np.float32)
        self.hard = np.isin(self.pools, rng.choice(common, 40, replace=False))
        self.last_pool = rng.choice(D_SAE, 600, replace=False)
        self.last_w = (-0.7 * np.log1p(np.arange(600))).astype(np.float32)

    def rows(self, rng: np.random.Generator, topic: np.ndarray, hidden: np.ndarray, n_tokens: np.ndarray,
             corrupt: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets int32 (B+1), columns int32, values float32): CSR rows, columns ascending."""
        import scipy.sparse as sp

        def gumbel(shape):  # float32 all the way: this is most of the generator's time at 1M rows
            return -np.log(-np.log(rng.random(shape, dtype=np.float32) * 0.9999999 + 1e-7))

        B = len(topic)
        logit = self.weights[topic] + 2.5 * hidden[:, None] * self.hard[topic]
        logit += gumbel((B, POOL))
        top = lambda x, k: np.argpartition(-x, k, axis=1)[:, :k]  # noqa: E731 - the k largest, any order
        pooled = top(logit, TOP_K)
        mean = top(logit + 0.5 * gumbel((B, POOL)), TOP_K)
        h = np.clip(rng.normal(210, 50, B) * np.sqrt(np.clip(n_tokens, 8, 400) / 80), 20, 600).astype(int)
        if corrupt:
            h //= 3
        noisy = logit + 0.7 * gumbel((B, POOL))
        cut = np.take_along_axis(np.sort(noisy, axis=1), (POOL - h)[:, None], 1)
        hr, hc = np.nonzero(noisy >= cut)  # each row's h largest
        lw = self.last_w[::-1] if corrupt else self.last_w
        last = top(lw + gumbel((B, 600)), LAST_K)
        take = lambda a: np.take_along_axis(self.pools[topic], a, 1)  # noqa: E731
        val = lambda a, s: np.exp(0.5 * np.take_along_axis(logit, a, 1)) * s * rng.lognormal(0, 0.3, a.shape)  # noqa: E731
        rep = lambda k: np.repeat(np.arange(B), k)  # noqa: E731
        rows = np.concatenate([rep(TOP_K), rep(LAST_K), rep(TOP_K), hr])
        cols = np.concatenate([take(pooled).ravel(), (self.last_pool[last] + D_SAE).ravel(),
                               (take(mean) + 2 * D_SAE).ravel(), self.pools[topic[hr], hc] + 3 * D_SAE])
        vals = np.concatenate([val(pooled, 1.0).ravel(), rng.lognormal(0, 0.6, B * LAST_K), val(mean, 0.3).ravel(),
                               np.exp(0.5 * logit[hr, hc]) * 0.7 * rng.lognormal(0, 0.3, len(hr))]).astype(np.float32)
        X = sp.csr_matrix((vals, (rows, cols)), shape=(B, len(CODES) * D_SAE))
        X.sort_indices()
        return X.indptr.astype(np.int32), X.indices.astype(np.int32), X.data.astype(np.float32)


class SyntheticFeaturizer:
    """Quality negatives' codes without the lens model: the generator, fewer `halves`, another last token."""

    def __init__(self, seed: int = 0):
        self.codes = Codes(seed)

    def __call__(self, texts: list[str]):
        import scipy.sparse as sp

        rng = np.random.default_rng(zlib.crc32("\n".join(texts).encode()))
        n = len(texts)
        tok = np.array([max(4, len(t) // 4) for t in texts])
        offs, cols, vals = self.codes.rows(rng, rng.integers(0, TOPICS, n), rng.beta(2, 2, n).astype(np.float32),
                                           tok, corrupt=True)
        return sp.csr_matrix((vals, cols, offs), shape=(n, len(CODES) * D_SAE))


# ---------------------------------------------------------------- data


def generate(run_dir: str, n: int, seed: int) -> dict:
    import pyarrow as pa

    from saerl_ray.core import storage
    from saerl_ray.core.config import load_config
    from saerl_ray.core.stage import Stage
    from saerl_ray.stages.features import SCHEMA, part_path
    from saerl_ray.stages.ingest import PROMPT_SCHEMA, prompt_id

    t0 = time.perf_counter()
    cfg = load_config(None, {"run_dir": run_dir, "features.surprisal": False})  # synthetic codes: no LM
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, TOPICS, n)
    hidden = rng.beta(2, 2, n).astype(np.float32)
    n_tokens = np.clip(rng.lognormal(np.log(80), 0.5, n), 8, 1024).astype(np.int32)
    source = rng.choice(np.array(["deepmath", "numina", "math"]), n, p=[0.45, 0.45, 0.10])
    level = np.clip(np.round(1 + 4 * hidden + rng.normal(0, 0.6, n)), 1, 5)
    # Real prompts compress ~2-3x in parquet; 60% common words + 40% of 20,000 random "words" keeps the
    # prompts file near that (the common words alone would dictionary-encode to a tenth).
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    junk = np.array(["".join(letters[rng.integers(0, 26, rng.integers(3, 10))]) for _ in range(20_000)])
    words = np.array(WORDS)
    prompts = []
    for i in range(n):
        k = max(4, int(n_tokens[i] * 0.7))
        w = np.where(rng.random(k) < 0.6, words[rng.integers(0, len(words), k)], junk[rng.integers(0, len(junk), k)])
        prompts.append(f"Problem {i}: " + " ".join(w.tolist()) + "?")
    table = pa.table({
        "id": [prompt_id(p) for p in prompts], "prompt": prompts,
        "answer": [str(i % 1009) for i in range(n)], "source": source.tolist(), "split": ["train"] * n,
        "row": np.arange(n, dtype=np.int64), "difficulty": pa.array(np.where(source == "math", level, np.nan), from_pandas=True),
        "topic": [f"t{t}" for t in topic], "quality": pa.nulls(n, pa.float64()),
        "n_chars": np.array([len(p) for p in prompts], np.int32),
    }, schema=PROMPT_SCHEMA)
    ids = table["id"].to_pylist()
    del prompts
    st = Stage(run_dir, "ingest", f"{VERSION}-{n}-{seed}")
    storage.write_parquet(table, storage.join(st.begin(keep_partial=False), "prompts.parquet"))
    st.commit({"rows": n})
    del table

    codes = Codes(seed)
    st = Stage(run_dir, "features", f"{VERSION}-{n}-{seed}")
    out = st.begin(keep_partial=False)
    n_blocks = -(-n // BLOCK_ROWS)
    entries = 0
    for b in range(n_blocks):
        a, e = b * BLOCK_ROWS, min(n, (b + 1) * BLOCK_ROWS)
        offs, cols, vals = codes.rows(np.random.default_rng([seed, b]), topic[a:e], hidden[a:e], n_tokens[a:e])
        entries += len(cols)
        part = pa.table({
            "id": pa.array(ids[a:e], pa.string()), "n_tokens": pa.array(n_tokens[a:e], pa.int32()),
            "l0": pa.array(np.clip(rng.normal(680, 150, e - a), 128, 2000).astype(np.int32)),
            "idx": pa.ListArray.from_arrays(pa.array(offs), pa.array(cols)),
            "val": pa.ListArray.from_arrays(pa.array(offs), pa.array(vals)),
        }, schema=SCHEMA)
        storage.write_parquet(part, part_path(out, b))
    f = cfg.features
    st.commit({"rows": n, "d_sae": D_SAE, "pooling": f.pooling, "top_k": f.top_k, "codes": CODES,
               "n_columns": len(CODES) * D_SAE, "prompts_per_s": None, "tokens": int(n_tokens.sum()),
               "block_nodes": {}, "blocks": n_blocks, "blocks_computed": n_blocks, "blocks_resumed": 0,
               "seconds": 0.0, "layer": 12, "synthetic": VERSION})
    return {"n": n, "seconds": round(time.perf_counter() - t0, 1), "entries_per_prompt": round(entries / n, 1),
            "parts": n_blocks}


# ---------------------------------------------------------------- measurement


class Monitor:
    """Peak driver RSS (every 50 ms), Ray object-store bytes used (0.25 s) and PSS of the driver + all its
    descendant processes, i.e. the whole local Ray cluster (1 s), per phase and overall."""

    def __init__(self):
        self.proc = psutil.Process()
        self.phase = "start"
        self.rss: dict[str, int] = {}
        self.store: dict[str, int] = {}
        self.pss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._state = None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _bump(d: dict[str, int], key: str, v: int) -> None:
        d[key] = max(d.get(key, 0), v)

    def _store_bytes(self) -> int | None:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        if self._state is None:
            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return int(get_memory_info_reply(self._state).store_stats.object_store_bytes_used)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._bump(self.rss, self.phase, self.proc.memory_info().rss)
            if tick % 5 == 0 and "ray" in sys.modules:
                try:
                    used = self._store_bytes()
                    if used is not None:
                        self._bump(self.store, self.phase, used)
                except Exception:  # noqa: BLE001 - Ray starting or stopping: skip this sample
                    self._state = None
            if tick % 20 == 0:
                total = 0
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                self._bump(self.pss, self.phase, total)
            tick += 1
            self._stop.wait(0.05)


def mb(x: float) -> float:
    return round(x / 2**20, 1)


def run_ours(run_dir: str, seed: int) -> dict:
    from saerl_ray.core import storage
    from saerl_ray.core.config import load_config
    from saerl_ray.sampler.state import CurriculumState
    from saerl_ray.stages import plan, signals

    # synthetic prompts: the quality positives come from the pool (`reference: []`), as the baseline reimplements;
    # synthetic codes have no surprisal
    cfg = load_config(None, {"run_dir": run_dir, "seed": seed, "signals.quality.reference": [],
                             "features.surprisal": False})
    for stage in ("signals", "plan"):
        storage.delete(storage.join(run_dir, stage))
    featurize = SyntheticFeaturizer(seed)
    secs, disk = {}, {}
    with Monitor() as mon:
        for name, fn in (("signals", lambda: signals.run(cfg, featurize=featurize)), ("plan", lambda: plan.run(cfg)),
                         ("sampler_load", lambda: CurriculumState(storage.join(run_dir, "plan", "plan.parquet"), cfg.sampler))):
            mon.phase = name
            t, io = time.perf_counter(), psutil.disk_io_counters().read_bytes
            out = fn()
            secs[name] = round(time.perf_counter() - t, 2)
            # System-wide (other jobs' reads too): whether the part files came from disk or the page cache.
            disk[name] = round((psutil.disk_io_counters().read_bytes - io) / 2**30, 2)
            if name == "signals":
                sig = out
            elif name == "plan":
                pl = out
            else:
                served = out.n
                del out
        mon.phase = "end"
    import ray

    ray.shutdown()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": round(sum(secs.values()), 2), "stage_seconds": secs, "disk_read_gb": disk,
        "driver_peak_rss_mb": mb(max(max(mon.rss.values()), ru)),
        "driver_peak_rss_mb_by_stage": {k: mb(v) for k, v in mon.rss.items() if k in secs},
        "object_store_peak_mb": mb(max(mon.store.values(), default=0)),
        "ray_processes_peak_pss_mb": mb(max(mon.pss.values(), default=0)),
        "signals_phase_seconds": sig.get("phase_seconds"),
        "signals": {"clusters": sig["cluster"]["sizes"], "kmeans_rounds": sig["cluster"]["n_iter"],
                    "inertia": sig["cluster"]["inertia"],
                    "difficulty_holdout_spearman": sig["difficulty"].get("holdout", {}).get("spearman"),
                    "quality_auroc": sig["quality"]["auroc_overall"], "kept": sig["kept"]},
        "plan": {"planned": pl["planned"], "batches": pl["batches"], "purity_mean": pl["purity_mean"]},
        "sampler_prompts": served,
    }


def run_baseline(run_dir: str, seed: int, out_dir: str) -> dict:
    """Everything on the driver: the feature table -> one CSR, sklearn KMeans, the same fits (their CV grid
    as the same Ray tasks, so the fixed cost matches ours), every row scored here."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    from saerl_ray.core import storage
    from saerl_ray.core.config import load_config, signal_codes
    from saerl_ray.core.featureio import (
        code_columns,
        keep_columns,
        read_feature_table,
        table_to_csr,
    )
    from saerl_ray.core.ray_init import init_ray
    from saerl_ray.signal_models import difficulty as dif
    from saerl_ray.signal_models import quality as qual

    # synthetic prompts: the quality positives come from the pool (`reference: []`), as the baseline reimplements;
    # synthetic codes have no surprisal
    cfg = load_config(None, {"run_dir": run_dir, "seed": seed, "signals.quality.reference": [],
                             "features.surprisal": False})
    sc = cfg.signals
    secs = {}
    with Monitor() as mon:
        t = time.perf_counter()
        mon.phase = "load"
        init_ray(cfg.ray)
        prompts = storage.read_parquet(storage.join(run_dir, "ingest", "prompts.parquet")).to_pandas()
        table = read_feature_table(storage.join(run_dir, "features"))
        if table.column("id").to_pylist() != prompts["id"].tolist():
            raise AssertionError("feature rows are not in prompts order")
        X = table_to_csr(table, len(CODES) * D_SAE)
        del table
        secs["load"] = round(time.perf_counter() - t, 2)

        mon.phase = "kmeans"
        t = time.perf_counter()
        Z = normalize(X[:, code_columns(run_dir, signal_codes(cfg, "cluster"))].astype(np.float32))
        km = KMeans(sc.cluster.k, n_init=1, max_iter=sc.cluster.max_iter, tol=sc.cluster.tol, random_state=seed).fit(Z)
        labels = km.labels_.astype(np.int32)
        del Z
        secs["kmeans"] = round(time.perf_counter() - t, 2)

        mon.phase = "fit"
        t = time.perf_counter()
        d_setup = dif.difficulty_setup(prompts, sc.difficulty, seed)
        d_cols = code_columns(run_dir, signal_codes(cfg, "difficulty"))
        d_model, _ = dif.fit_setup(d_setup, keep_columns(X[d_setup.train], d_cols), sc.difficulty, seed, use_ray=True)
        q_setup = qual.quality_setup(prompts, sc.quality, seed)
        q_cols = code_columns(run_dir, signal_codes(cfg, "quality"))
        sub = prompts.iloc[q_setup.pos]
        featurize = SyntheticFeaturizer(seed)
        q_bands = [(int(code_columns(run_dir, [c])[0]), int(code_columns(run_dir, [c])[0]) + D_SAE)
                   for c in signal_codes(cfg, "quality")]  # as the stage: one novelty band per code
        n_chars = sub_chars = None
        if "n_chars" in prompts.columns:
            n_chars = prompts["n_chars"].fillna(0).to_numpy(float)
            sub_chars = n_chars[q_setup.pos]
        q_model, _ = qual.fit_setup(q_setup, keep_columns(X[q_setup.pos], q_cols), None, sub["prompt"].tolist(),
                                    sub["answer"].fillna("").tolist(), lambda tx: keep_columns(featurize(tx), q_cols),
                                    sc.quality, seed, use_ray=True, bands=q_bands, pos_len=sub_chars,
                                    neighbor_band=q_bands[signal_codes(cfg, "quality").index(sc.quality.neighbors_code)])
        secs["fit"] = round(time.perf_counter() - t, 2)
        mon.phase = "score"
        t = time.perf_counter()
        # Scored in row chunks: the design of all rows at once would be a dense copy per model.
        step = 65_536
        pred = np.concatenate([dif.linear_score(d_model, X[a:a + step]) for a in range(0, X.shape[0], step)])
        pred = pred + dif.length_term(d_model, d_setup.n_chars)
        score = np.concatenate([qual.quality_scores(q_model, X[a:a + step], None if n_chars is None else n_chars[a:a + step])[0]
                                for a in range(0, X.shape[0], step)])
        qual.keep_mask(score, sc.quality.keep_fraction, qual.filter_rule(q_model, sc.quality)[1])
        secs["score"] = round(time.perf_counter() - t, 2)
        mon.phase = "end"
    del X
    import ray

    ray.shutdown()
    np.save(Path(out_dir) / "baseline_labels.npy", labels)
    np.save(Path(out_dir) / "baseline_difficulty.npy", pred.astype(np.float32))
    np.save(Path(out_dir) / "baseline_quality.npy", score.astype(np.float32))
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "seconds": round(sum(secs.values()), 2), "stage_seconds": secs,
            "driver_peak_rss_mb": mb(max(max(mon.rss.values()), ru)),
            "driver_peak_rss_mb_by_stage": {k: mb(v) for k, v in mon.rss.items() if k in secs},
            "inertia": float(km.inertia_), "kmeans_rounds": int(km.n_iter_)}


# ---------------------------------------------------------------- orchestration


def child(args: list[str], cap_bytes: int | None = None, timeout_s: float = 7200,
          log: Path | None = None) -> tuple[dict | None, dict]:
    """Run this script's subcommand in a fresh process; with a cap, SIGKILL it once its RSS passes the cap
    (sampled every 50 ms: gigabytes take longer than that to fault in). stderr goes to `log`."""
    t0 = time.perf_counter()
    err = open(log, "w") if log else None
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=err, text=True)
    peak, killed = 0, False
    ps = psutil.Process(proc.pid)
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if (cap_bytes and peak > cap_bytes) or time.perf_counter() - t0 > timeout_s:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=10)
    if err:
        err.close()
    info = {"rc": proc.returncode, "killed_at_cap": killed, "watchdog_peak_rss_mb": mb(peak),
            "wall_s": round(time.perf_counter() - t0, 1)}
    result = None
    for line in reversed(out_lines):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return result, info


def bench(n: int, work: Path, seed: int, cap_gb: float, sides: list[str]) -> dict:
    """Run the requested sides for N (each result kept as <work>/<side>-<N>.json); one row from what is there."""
    from saerl_ray.core.stage import Stage

    run_dir = str(work / f"n{n}")
    if not Stage(run_dir, "features", f"{VERSION}-{n}-{seed}").done():
        gen, info = child(["_generate", run_dir, str(n), str(seed)], log=work / f"generate-{n}.log")
        if gen is None:
            raise RuntimeError(f"generating {n} prompts failed: {info}")
        print(f"[scale] generated {n}: {gen}", file=sys.stderr, flush=True)
    saved = {side: work / f"{side}-{n}.json" for side in ("ours", "baseline")}
    if "ours" in sides:
        load_before = os.getloadavg()[0]  # the machine is shared: context for the timings
        ours, info = child(["_ours", run_dir, str(seed)], log=work / f"ours-{n}.log")
        if ours is None:
            raise RuntimeError(f"ours failed at n={n}: {info} (log: {work / f'ours-{n}.log'})")
        saved["ours"].write_text(json.dumps({**ours, "load_avg_1min_before": round(load_before, 1)}))
    if "baseline" in sides:
        log = work / f"baseline-{n}.log"
        load_before = os.getloadavg()[0]
        base, info = child(["_baseline", run_dir, str(seed), run_dir], cap_bytes=int(cap_gb * 2**30), log=log)
        if base is None:
            oom = info["killed_at_cap"] or "MemoryError" in log.read_text()
            base = {"status": "oom" if oom else f"failed (see {log})", "cap_gb": cap_gb,
                    "rss_reached_mb": info["watchdog_peak_rss_mb"], "seconds_until_stopped": info["wall_s"]}
        else:
            base["watchdog_peak_rss_mb"] = info["watchdog_peak_rss_mb"]
        saved["baseline"].write_text(json.dumps({**base, "load_avg_1min_before": round(load_before, 1)}))
    if not saved["ours"].exists():
        raise RuntimeError(f"no result for ours at n={n}: run with --sides ours")
    ours = json.loads(saved["ours"].read_text())
    row = {"n": n, **ours}
    base = json.loads(saved["baseline"].read_text()) if saved["baseline"].exists() else {"status": "not run"}
    row["baseline"] = base
    if base.get("status") == "ok":
        row.update(agreement(run_dir))
        row["agreement"]["inertia_ratio_ours_over_sklearn"] = round(ours["signals"]["inertia"] / base["inertia"], 4)
        row["ratio_signals_seconds_baseline_over_ours"] = round(base["seconds"] / ours["stage_seconds"]["signals"], 2)
        row["ratio_driver_rss_baseline_over_ours"] = round(base["driver_peak_rss_mb"] / ours["driver_peak_rss_mb"], 2)
    return row


def agreement(run_dir: str) -> dict:
    import pyarrow.parquet as pq
    from sklearn.metrics import adjusted_rand_score

    sig = pq.read_table(Path(run_dir) / "signals" / "assignments.parquet",
                        columns=["cluster", "difficulty_pred", "quality_score"])
    d = Path(run_dir)
    return {"agreement": {
        "ari_clusters_vs_baseline": round(float(adjusted_rand_score(sig["cluster"].to_numpy(), np.load(d / "baseline_labels.npy"))), 4),
        "max_abs_diff_difficulty": float(np.abs(sig["difficulty_pred"].to_numpy() - np.load(d / "baseline_difficulty.npy")).max()),
        "max_abs_diff_quality": float(np.abs(sig["quality_score"].to_numpy() - np.load(d / "baseline_quality.npy")).max()),
    }}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        cmd, *a = sys.argv[1:]
        if cmd == "_generate":
            out = generate(a[0], int(a[1]), int(a[2]))
        elif cmd == "_ours":
            out = run_ours(a[0], int(a[1]))
        else:
            out = run_baseline(a[0], int(a[1]), a[2])
        print(json.dumps(out), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "saerl_scale",
                    help="where the synthetic run dirs are written (and reused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-cap-gb", type=float, default=8.0,
                    help="the baseline is stopped (reported as oom) once its RSS passes this")
    ap.add_argument("--sides", nargs="+", choices=["ours", "baseline"], default=["ours", "baseline"],
                    help="run only these; the row takes the other side's last saved result")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        print(json.dumps(bench(n, args.work, args.seed, args.baseline_cap_gb, args.sides)), flush=True)


if __name__ == "__main__":
    main()
