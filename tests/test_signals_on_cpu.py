"""signals stage on a real local Ray cluster: the output contract of docs/run_dir.md, model files that
reproduce the stored columns, idempotent reruns. Prompts are real (MATH-500 + GSM8K); codes come from a
cheap deterministic stand-in for the SAE (hashed character trigrams, top-k, mean-pooled), written in
the features stage's file format."""

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file

from saerl_ray.core.config import ConfigError, load_config, signal_codes
from saerl_ray.core.featureio import code_columns, load_features, stored_codes
from saerl_ray.core.stage import Stage
from saerl_ray.signal_models.corruptions import FAMILIES
from saerl_ray.signal_models.difficulty import predict_from_json
from saerl_ray.signal_models.kmeans import clustering_space
from saerl_ray.signal_models.quality import score_from_json
from saerl_ray.stages import signals
from saerl_ray.stages.ingest import prompt_id

D_SAE, TOP_K = 256, 24


def hashed_trigrams(texts: list[str]) -> sp.csr_matrix:
    """Bag of hashed character trigrams per text, mean-pooled, top-k kept: deterministic and cheap."""
    rows, cols, vals = [], [], []
    for r, t in enumerate(texts):
        grams = [t[i : i + 3] for i in range(max(1, len(t) - 2))]
        counts = np.bincount([zlib.crc32(g.encode()) % D_SAE for g in grams], minlength=D_SAE) / len(grams)
        top = np.argsort(-counts, kind="stable")[:TOP_K]
        top = top[counts[top] > 0]
        rows += [r] * len(top)
        cols += top.tolist()
        vals += counts[top].tolist()
    return sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(len(texts), D_SAE))


def two_codes(texts: list[str]) -> sp.csr_matrix:
    """Stand-in for features.codes [pooled, last]: trigrams of the whole text | of its last 12 characters."""
    return sp.hstack([hashed_trigrams(texts), hashed_trigrams([t[-12:] for t in texts])]).tocsr()


def read_jsonl(path, n):
    return pd.read_json(path, lines=True).head(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    run = tmp_path_factory.mktemp("signals_run")
    math500 = read_jsonl(shared_data / "math500.jsonl", 100)
    gsm = read_jsonl(shared_data / "gsm8k_train.jsonl", 40)
    prompts = pd.DataFrame({
        "prompt": math500["problem"].tolist() + gsm["question"].tolist(),
        "answer": math500["answer"].astype(str).tolist() + gsm["answer"].str.split("####").str[-1].str.strip().tolist(),
        "source": ["math500"] * 100 + ["gsm8k_train"] * 40,
        "split": "train",
        "row": list(range(100)) + list(range(40)),
        "difficulty": math500["level"].astype(float).tolist() + [None] * 40,
        "topic": math500["subject"].tolist() + [None] * 40,
        "quality": None,
    })
    prompts.insert(0, "id", [prompt_id(p) for p in prompts["prompt"]])
    prompts["n_chars"] = prompts["prompt"].str.len().astype("int32")
    st = Stage(run, "ingest", "ingest-fp")
    pq.write_table(pa.Table.from_pandas(prompts, preserve_index=False), Path(st.begin()) / "prompts.parquet")
    st.commit({"rows": len(prompts)})

    X = two_codes(prompts["prompt"].tolist())
    st = Stage(run, "features", "features-fp")
    tmp = Path(st.begin())
    for part, (a, b) in enumerate([(0, 70), (70, 140)]):  # two blocks, written in reverse order
        block = X[a:b]
        idx = [block.indices[block.indptr[i] : block.indptr[i + 1]].astype(np.int32) for i in range(b - a)]
        val = [block.data[block.indptr[i] : block.indptr[i + 1]] for i in range(b - a)]
        pq.write_table(pa.table({
            "id": prompts["id"][a:b].tolist(), "n_tokens": pa.array(prompts["n_chars"][a:b] // 4, pa.int32()),
            "l0": pa.array([len(i) for i in idx], pa.int32()),
            "idx": pa.array(idx, pa.list_(pa.int32())), "val": pa.array(val, pa.list_(pa.float32())),
        }), tmp / f"part-{1 - part:05d}.parquet")
    (tmp / "summary.json").write_text(json.dumps({"rows": 140, "d_sae": D_SAE, "codes": ["pooled", "last"],
                                                  "n_columns": 2 * D_SAE, "pooling": "max", "top_k": 128}))
    st.commit()
    return run


def config(run_dir, **extra):
    return load_config(None, {
        "run_dir": str(run_dir),
        "features.codes": ["pooled", "last"],
        "signals.cluster.codes": ["pooled"],
        "signals.difficulty.codes": ["pooled"],
        "signals.quality.codes": ["pooled", "last"],
        "signals.cluster.k": 5,
        "signals.difficulty.n_labelled": None,
        "signals.difficulty.alphas": [1e-2, 1e-1],
        "signals.difficulty.l1_ratios": [0.5],
        "signals.difficulty.folds": 3,
        "signals.quality.n_train": 60,
        "signals.quality.keep_fraction": 0.9,
        "features.surprisal": False,  # the parts here are synthetic codes; the surprisal test turns it on
        **extra,
    })


def test_signals_stage_contract(run_dir, ray_cluster, capsys):
    summary = signals.run(config(run_dir), featurize=two_codes)
    out = run_dir / "signals"
    prompts = pq.read_table(run_dir / "ingest/prompts.parquet").to_pandas()
    table = pq.read_table(out / "assignments.parquet")
    assert table.schema.equals(signals.ASSIGNMENTS_SCHEMA)
    sig = table.to_pandas()
    assert sig["id"].tolist() == prompts["id"].tolist()  # prompts order, every prompt once

    # Clusters: every label used, distances are the distances to the stored centroids.
    C = load_file(str(out / "centroids.safetensors"))["centroids"]
    assert C.shape == (5, D_SAE) and C.dtype == np.float32
    _, X, _ = load_features(run_dir, order=prompts["id"].tolist())
    Z = clustering_space(X[:, :D_SAE], "cosine").toarray()  # signals.cluster.codes: the pooled band only
    assert sorted(sig["cluster"].unique()) == list(range(5))
    d = np.linalg.norm(Z - C[sig["cluster"]], axis=1)
    np.testing.assert_allclose(sig["cluster_dist"], d, atol=1e-4)
    assert (d[:, None] <= np.linalg.norm(Z[:, None] - C[None], axis=2) + 1e-5).all()  # nearest centroid
    assert summary["cluster"]["sizes"] == np.bincount(sig["cluster"], minlength=5).tolist()

    # Each model reads only its codes' columns; quality got some of the last-token band.
    assert max(json.loads((out / "difficulty.json").read_text())["columns"]) < D_SAE
    assert max(json.loads((out / "quality.json").read_text())["columns"]) >= D_SAE
    # The JSON models reproduce the stored columns; difficulty was fit on the MATH levels.
    n_chars = prompts["prompt"].str.len().to_numpy()  # the difficulty model's length term reads them
    np.testing.assert_allclose(predict_from_json(out / "difficulty.json", X, n_chars), sig["difficulty_pred"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_from_json(out / "quality.json", X), sig["quality_score"], rtol=1e-5, atol=1e-6)
    assert summary["difficulty"]["n_labelled"] == 100 and not summary["difficulty"]["fallback"]
    assert summary["difficulty"]["label_source"] == "prompts.difficulty"
    q = summary["quality"]
    assert set(q["auroc_leave_one_family_out"]) == set(FAMILIES) and q["n_pos"] == 60 and q["n_families"] == 13
    assert q["rule"] == "keep_fraction"  # set in config(): the legacy quota still works
    # Every dropped prompt says which signal flagged it; kept ones carry "".
    assert (sig.loc[sig["keep"], "quality_flag"] == "").all()
    assert set(sig.loc[~sig["keep"], "quality_flag"]) <= {"probe", "novelty", "neighbors"} and (sig.loc[~sig["keep"], "quality_flag"] != "").all()
    assert sum(q["dropped_by_signal"].values()) == (~sig["keep"]).sum()
    assert sig["keep"].sum() == summary["kept"] == math.ceil(0.9 * 140)
    assert sig.loc[sig["keep"], "quality_score"].min() >= sig.loc[~sig["keep"], "quality_score"].max()
    assert "[signals] 140 prompts" in capsys.readouterr().out


def test_signals_rerun_is_a_noop_and_config_change_recomputes(run_dir, ray_cluster):
    cfg = config(run_dir)
    signals.run(cfg, featurize=two_codes)
    marker = (run_dir / "signals/_DONE.json").read_text()
    signals.run(cfg, featurize=lambda texts: pytest.fail("a finished stage must not featurize again"))
    assert (run_dir / "signals/_DONE.json").read_text() == marker
    # The fingerprint holds the resolved codes: spelling out the default is the same run.
    spelled = config(run_dir, **{"signals.difficulty.codes": signal_codes(cfg, "difficulty")})
    signals.run(spelled, featurize=lambda texts: pytest.fail("same resolved codes must not recompute"))
    summary = signals.run(config(run_dir, **{"signals.quality.keep_fraction": 0.5}), featurize=two_codes)
    assert (run_dir / "signals/_DONE.json").read_text() != marker
    assert summary["kept"] == 70


def test_signal_codes_follow_the_stored_codes_and_must_be_among_them():
    cfg = load_config(None, {})
    assert cfg.signals.quality.codes is None  # unset stays unset: resolved where it is used
    assert signal_codes(cfg, "difficulty") == cfg.features.codes  # unset: every stored code
    assert signal_codes(cfg, "cluster") == ["pooled", "last"]
    assert signal_codes(cfg, "quality") == cfg.features.codes == ["pooled", "last", "mean", "halves"]
    cfg = load_config(None, {"features.codes": ["pooled", "mean"], "signals.quality.neighbors_code": "mean"})
    assert signal_codes(cfg, "cluster") == ["pooled"] and signal_codes(cfg, "quality") == ["pooled", "mean"]
    with pytest.raises(ConfigError, match="neighbors_code 'last' is not among the probe's codes"):
        load_config(None, {"features.codes": ["pooled", "mean"]})  # the default neighbors code is not stored
    load_config(None, {"features.codes": ["pooled"], "signals.quality.combine": ["probe", "novelty"]})
    with pytest.raises(ConfigError, match=r"signals.quality.codes .*'halves'.* features.codes"):
        load_config(None, {"features.codes": ["pooled", "last"], "signals.quality.codes": ["pooled", "halves"]})
    with pytest.raises(ConfigError, match="without repeats"):
        load_config(None, {"signals.cluster.codes": ["pooled", "pooled"]})
    with pytest.raises(ConfigError, match="features.codes"):
        load_config(None, {"features.codes": ["pooled", "median"]})
    with pytest.raises(ConfigError, match="replaced by features.codes"):
        load_config(None, {"features.last_token": True})
    with pytest.raises(ConfigError, match="eval_folds"):
        load_config(None, {"signals.quality.eval_folds": 1})


def test_signals_refuses_features_computed_with_other_codes(run_dir):
    # The fixture stores [pooled, last]; negatives featurised with the default four codes would not line up.
    with pytest.raises(ValueError, match="rerun the features stage"):
        signals.run(load_config(None, {"run_dir": str(run_dir)}), featurize=two_codes)


def test_stored_codes_reads_runs_from_before_codes_existed(tmp_path):
    (tmp_path / "features").mkdir()
    for summary, codes in (({"last_token": True}, ["pooled", "last"]), ({"last_token": False}, ["pooled"]), ({}, ["pooled"])):
        (tmp_path / "features/summary.json").write_text(json.dumps({"d_sae": 8, **summary}))
        assert stored_codes(tmp_path) == (codes, 8)
    assert code_columns(tmp_path, ["pooled"]).tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"code\(s\) \['last'\] not in"):
        code_columns(tmp_path, ["last"])


def test_outputs_do_not_depend_on_how_features_are_cut_and_the_driver_never_reads_codes(
        run_dir, tmp_path, ray_cluster, monkeypatch):
    """The same codes re-cut into 7 shuffled parts, each group of parts read by its own Ray task: the
    same assignments. The driver's own feature readers are disabled: codes reach it only as the few
    training rows the tasks return."""
    import shutil

    from saerl_ray.core import featureio

    reference = signals.run(config(run_dir), featurize=two_codes)
    ref = pq.read_table(run_dir / "signals/assignments.parquet").to_pandas()
    recut = tmp_path / "recut"
    shutil.copytree(run_dir / "ingest", recut / "ingest")
    st = Stage(recut, "features", "recut-fp")
    tmp = Path(st.begin())
    table = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "features").glob("part-*.parquet"))])
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    for part in range(7):
        pq.write_table(table.slice(part * 20, 20), tmp / f"part-{part:05d}.parquet")
    shutil.copy(run_dir / "features/summary.json", tmp / "summary.json")
    st.commit()

    def driver_must_not(*a, **k):
        raise AssertionError("the driver read feature codes")

    for name in ("read_parts", "table_to_csr", "load_features", "read_feature_table"):
        monkeypatch.setattr(featureio, name, driver_must_not)
    monkeypatch.setattr(signals, "read_parts", driver_must_not)
    monkeypatch.setattr(signals, "GROUP_ROWS", 30)  # 7 parts of 20 rows -> 5 groups, tasks of 1-2 parts
    summary = signals.run(config(recut), featurize=two_codes)
    monkeypatch.undo()

    got = pq.read_table(recut / "signals/assignments.parquet").to_pandas()
    assert got["id"].tolist() == ref["id"].tolist()
    np.testing.assert_array_equal(got["cluster"], ref["cluster"])
    np.testing.assert_allclose(got["cluster_dist"], ref["cluster_dist"], rtol=1e-5, atol=1e-6)
    for col in ("difficulty_pred", "quality_score", "keep"):  # per-row scores: exact whatever the blocks
        np.testing.assert_array_equal(got[col], ref[col])
    assert summary["cluster"]["sizes"] == reference["cluster"]["sizes"]
    assert summary["difficulty"]["holdout"] == reference["difficulty"]["holdout"]
    assert set(summary["phase_seconds"]) == {"read", "kmeans", "fit", "score"}


def test_load_features_in_a_given_order_reads_only_those_rows(run_dir):
    prompts = pq.read_table(run_dir / "ingest/prompts.parquet", columns=["id"]).column("id").to_pylist()
    _, X, n_tokens = load_features(run_dir, order=prompts)
    pick = [prompts[i] for i in (139, 3, 70, 69)]
    ids, Xp, tp = load_features(run_dir, order=pick)
    assert ids.tolist() == pick
    assert (Xp != X[[139, 3, 70, 69]]).nnz == 0
    np.testing.assert_array_equal(tp, n_tokens[[139, 3, 70, 69]])
    with pytest.raises(KeyError, match="1 ids have no features"):
        load_features(run_dir, order=pick + ["nope"])


def pseudo_surprisal(texts: list[str]) -> np.ndarray:
    """Stand-in for the features' surprisal column: deterministic per text, higher for texts with '___'."""
    return np.array([2.0 + (zlib.crc32(t.encode()) % 1000) / 1000 + 3.0 * ("___" in t) for t in texts])


def test_signals_stage_with_the_surprisal_signal(run_dir, tmp_path, ray_cluster):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir / "ingest", run / "ingest")
    shutil.copytree(run_dir / "features", run / "features")
    cfg = config(run, **{"features.surprisal": True, "signals.quality.keep_fraction": None,
                         "signals.quality.combine": ["probe", "novelty", "neighbors", "surprisal"]})
    # parts written without features.surprisal: the signal refuses them by name
    with pytest.raises(ValueError, match="features.surprisal"):
        signals.run(cfg, featurize=lambda t: (two_codes(t), pseudo_surprisal(t)))
    for part in sorted((run / "features").glob("part-*.parquet")):
        t = pq.read_table(part)
        texts = pd.DataFrame({"id": t.column("id").to_pylist()}).merge(
            pq.read_table(run / "ingest/prompts.parquet", columns=["id", "prompt"]).to_pandas(), on="id")["prompt"]
        pq.write_table(t.append_column("surprisal", pa.array(pseudo_surprisal(texts.tolist()), pa.float32())), part)
    seen = []

    def featurize(texts):
        seen.extend(texts)
        return two_codes(texts), pseudo_surprisal(texts)

    summary = signals.run(cfg, featurize=featurize)
    q = summary["quality"]
    assert q["combine"] == ["probe", "novelty", "neighbors", "surprisal"]
    # blank_numbers negatives carry '___': the surprisal signal alone finds that family, held out
    assert q["auroc_lofo_table"]["missing_values"]["surprisal"] > 0.9 and any("___" in t for t in seen)
    prompts = pq.read_table(run / "ingest/prompts.parquet").to_pandas()
    sig = pq.read_table(run / "signals/assignments.parquet").to_pandas()
    _, X, _ = load_features(run, order=prompts["id"].tolist())
    s = pseudo_surprisal(prompts["prompt"].tolist()).astype(np.float32)
    np.testing.assert_allclose(score_from_json(run / "signals/quality.json", X, surprisal=s), sig["quality_score"],
                               rtol=1e-5, atol=1e-5)
    assert "surprisal" in json.loads((run / "signals/quality.json").read_text())["reference"]
