"""Lens, pooling and the features stage on a real local Ray cluster with a tiny random model."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from saerl_ray.core import storage
from saerl_ray.core.config import fingerprint, load_config
from saerl_ray.core.featureio import load_features
from saerl_ray.core.lens import (
    Lens,
    drop_massive,
    encode_prompts,
    iter_residuals,
    length_buckets,
    load_lens_model,
    pad_right,
    residuals,
)
from saerl_ray.core.models import load_model, load_tokenizer
from saerl_ray.core.stage import Stage, marker_of
from saerl_ray.stages import features, sae

# --- pure functions ---------------------------------------------------------------------------


def _codes_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.relu(torch.randn(3, 5, 7, generator=g))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return codes, mask


@pytest.mark.parametrize("how", ["mean", "sum", "max", "binary"])
def test_pool_matches_per_row_reduction_over_masked_tokens(how):
    codes, mask = _codes_and_mask()
    codes[~mask] = 1e6  # anything outside the mask must not leak into the result
    out = features.pool(codes, mask, how)
    for b in range(codes.shape[0]):
        sel = codes[b][mask[b]]
        if len(sel) == 0:
            expected = torch.zeros(codes.shape[2])
        else:
            expected = {"mean": sel.mean(0), "sum": sel.sum(0), "max": sel.amax(0),
                        "binary": (sel > 0).float().mean(0)}[how]
        torch.testing.assert_close(out[b], expected)


def test_pool_ignores_nan_at_padded_positions():
    codes, mask = _codes_and_mask()
    codes[~mask] = float("nan")
    for how in ("mean", "sum", "max", "binary"):
        assert torch.isfinite(features.pool(codes, mask, how)).all(), how


def test_pool_rejects_unknown_method():
    codes, mask = _codes_and_mask()
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        features.pool(codes, mask, "median")


def test_last_token_code_takes_each_rows_last_masked_token():
    codes = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, True, False, True]])
    out = features.last_token_code(codes, mask)
    torch.testing.assert_close(out, torch.stack([codes[0, 1], codes[1, 3]]))
    assert features.last_token_code(codes, torch.zeros(2, 4, dtype=torch.bool)).abs().sum() == 0


def test_top_k_dense_keeps_each_rows_largest_values_and_zeroes_the_rest():
    pooled = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    out = features.top_k_dense(pooled, 3)
    assert out[0].tolist() == [0.0, 3.0, 0.0, 0.0, 2.0, 5.0]
    assert out[1].tolist() == pooled[1].tolist()  # fewer than k positives: nothing to drop
    idx, val = features.sparse_rows(torch.cat([torch.zeros(2, 6), out], dim=1))  # a second band at column 6
    assert idx[0].tolist() == [7, 10, 11] and val[0].tolist() == [3.0, 2.0, 5.0] and idx[1].tolist() == [11]
    assert idx[0].dtype == np.int32 and val[0].dtype == np.float32


def test_halves_code_keeps_latents_present_in_both_halves_at_the_weaker_half():
    # One prompt of 4 masked tokens (+1 pad); latent 0 fires in both halves, 1 only in the first, 2 only
    # in the second (and on the pad, which must not count).
    codes = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 4.0, 0.0], [0.5, 0.0, 3.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert features.halves_code(codes, mask).tolist() == [[0.5, 0.0, 0.0]]
    # A one-token prompt has an empty first half: nothing is in both.
    assert features.halves_code(codes[:, :1], mask[:, :1]).abs().sum() == 0
    # Halves split the masked tokens, not the positions: with position 0 dropped (the attention sink)
    # the kept tokens 1, 2, 3 split 1 | 2, 3, so latent 1 (4.0 on token 1, 1.5 on token 3) is in both.
    codes[0, 3, 1] = 1.5
    assert features.halves_code(codes, torch.tensor([[False, True, True, True, False]])).tolist() == [[0.0, 1.5, 0.0]]


def test_length_buckets_cover_every_row_once_sorted_by_length():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2])
    buckets = length_buckets(lengths, 3)
    flat = np.concatenate(buckets)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert (np.diff(lengths[flat]) >= 0).all()
    assert all(len(b) <= 3 for b in buckets)


# --- the lens on a tiny model -------------------------------------------------------------------


def test_hook_output_equals_full_models_hidden_state_before_final_norm(tiny_model_dir):
    layer = 1
    tok = load_tokenizer(str(tiny_model_dir))
    enc = encode_prompts(tok, ["What is 2+3?", "A longer prompt about triangles and circles."], False, 64)
    ids, att = pad_right(enc.ids, tok.pad_token_id)
    truncated = load_lens_model(Lens(str(tiny_model_dir), layer))
    assert len(truncated.model.layers) == layer + 1
    full = load_model(str(tiny_model_dir))
    got = residuals(truncated, layer, ids, att)
    with torch.inference_mode():
        hs = full.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    real = att.bool()
    torch.testing.assert_close(got[real], hs[layer + 1][real])
    # The padded batch gives each prompt the same activations as running it alone (right padding).
    alone = residuals(truncated, layer, torch.from_numpy(enc.ids[0])[None], None)
    torch.testing.assert_close(got[0, : len(enc.ids[0])], alone[0], atol=1e-5, rtol=1e-5)


def test_drop_massive_removes_only_outlier_tokens_per_prompt():
    acts = torch.ones(2, 6, 4)
    acts[0, 2] *= 500.0  # a massive activation in prompt 0
    acts[1] *= 1000.0  # prompt 1 is uniformly large: nothing is an outlier within it
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = drop_massive(acts, mask)
    assert out.tolist() == [[False, True, False, True, True, False], [False, True, True, True, False, False]]


def test_iter_residuals_masks_follow_their_rows(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    texts = ["x" * n for n in (9, 2, 15, 4, 11)]
    enc = encode_prompts(tok, texts, False, 64)
    model = load_lens_model(Lens(str(tiny_model_dir), 0))
    seen = []
    for rows, acts, mask in iter_residuals(model, 0, enc, 2, tok.pad_token_id):
        assert acts.shape[:2] == mask.shape
        for j, i in enumerate(rows):
            keep = torch.from_numpy(enc.keep[i])
            assert not (mask[j, : len(keep)] & ~keep).any() and not mask[j, len(keep):].any()
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(texts)))


def test_encode_prompts_pools_only_the_prompt_text(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    text = "Solve x+1=3."
    def kept(chat):
        enc = encode_prompts(tok, [text], chat, 512)
        return "".join(tok.convert_ids_to_tokens(enc.ids[0][enc.keep[0]].tolist()))

    assert kept(False) == text[1:]  # position 0 is the attention sink, never pooled
    assert kept(True) == text  # inside the template the prompt starts later
    templated = encode_prompts(tok, [text], True, 512)
    assert len(templated.ids[0]) > len(text)  # the model still sees the template around it
    assert len(encode_prompts(tok, ["y" * 100], False, 10).ids[0]) == 10


# --- the features stage on Ray ------------------------------------------------------------------


def _config(run_dir, model_dir, **extra):
    return load_config(None, {
        "run_dir": str(run_dir), "model.name": str(model_dir),
        "sae.layer": 1, "sae.expansion": 4, "sae.k": 8, "sae.training_tokens": 4096,
        "sae.batch_size_tokens": 512, "sae.buffer_tokens": 2048, "sae.holdout_prompts": 4,
        "features.block_rows": 8, "features.top_k": 16, "features.batch_size": 4,
        "features.num_actors": 2, "features.surprisal": False, **extra,
    })


def _ingest(run_dir, shared_data, n=36):
    rows = [json.loads(line) for line in open(shared_data / "math500.jsonl")][:n]
    st = Stage(run_dir, "ingest", "test-ingest")
    tmp = Path(st.begin())
    pq.write_table(pa.table({
        "id": [f"{i:016x}" for i in range(n)], "prompt": [r["problem"] for r in rows],
        "split": ["train"] * n,
    }), tmp / "prompts.parquet")
    st.commit({"rows": n})


@pytest.fixture(scope="module")
def featured_run(tmp_path_factory, tiny_model_dir, shared_data, ray_cluster):
    run_dir = tmp_path_factory.mktemp("features") / "run"
    _ingest(run_dir, shared_data)
    cfg = _config(run_dir, tiny_model_dir)
    sae.run(cfg)
    summary = features.run(cfg)
    return cfg, summary


def test_features_contract_one_sorted_row_per_prompt(featured_run):
    cfg, summary = featured_run
    run_dir = cfg.run_dir
    prompts = pq.read_table(f"{run_dir}/ingest/prompts.parquet").to_pandas()
    parts = sorted(os.listdir(f"{run_dir}/features"))
    assert [p for p in parts if p.startswith("part-")] == [f"part-{b:05d}.parquet" for b in range(5)]
    ids, X, n_tokens = load_features(run_dir)
    assert list(ids) == list(prompts["id"])  # part order = block order = prompts order
    d = summary["d_sae"]
    assert summary["codes"] == cfg.features.codes == ["pooled", "last", "mean", "halves"]
    assert summary["n_columns"] == 4 * d and X.shape == (len(prompts), 4 * d) and summary["rows"] == len(prompts)
    t = pq.read_table(f"{run_dir}/features/part-00000.parquet")
    assert t.schema.equals(features.PART_SCHEMA)
    for idx, val, l0 in zip(t.column("idx").to_pylist(), t.column("val").to_pylist(), t.column("l0").to_pylist()):
        band = {c: {i - k * d: v for i, v in zip(idx, val) if k * d <= i < (k + 1) * d}
                for k, c in enumerate(summary["codes"])}
        assert len(idx) == len(val) == len(set(idx)) and min(val) > 0
        assert len(band["pooled"]) == min(cfg.features.top_k, l0) and 0 < len(band["mean"]) <= cfg.features.top_k
        # the last token's code: some of the SAE's k active latents (TopK)
        assert 0 < len(band["last"]) <= cfg.sae.k
        # a latent's mean, last-token and both-halves values never exceed its max over the prompt, which
        # is its pooled value, or (not in the pooled top-k) at most the smallest pooled value
        floor = min(band["pooled"].values())
        for c in ("last", "mean", "halves"):
            assert all(v <= band["pooled"].get(i, floor) * (1 + 1e-5) for i, v in band[c].items()), c
    tok = load_tokenizer(cfg.model.name)
    enc = encode_prompts(tok, list(prompts["prompt"]), False, cfg.features.max_tokens)
    assert (n_tokens > 0).all() and (n_tokens <= [int(k.sum()) for k in enc.keep]).all()
    assert summary["tokens"] == int(n_tokens.sum()) and summary["blocks_computed"] == 5


def test_peak_positions_are_the_argmax_over_masked_tokens():
    codes, mask = _codes_and_mask()
    codes[~mask] = 1e6  # a masked-out token is never the peak
    pos = features.peak_positions(codes, mask)
    for b in (0, 1):  # row 2 has no masked token
        rows = torch.nonzero(mask[b]).ravel()
        assert torch.equal(pos[b], rows[codes[b, rows].argmax(0)])


def test_peak_spans_are_parallel_to_the_pooled_band(featured_run):
    """peak_start/peak_end: one span per pooled-band entry, a non-empty piece of the prompt text, which
    is the prompt token where that latent peaks: encoding the prompt alone gives the same spans."""
    cfg, summary = featured_run
    d = summary["d_sae"]
    texts = pq.read_table(f"{cfg.run_dir}/ingest/prompts.parquet").column("prompt").to_pylist()[:8]
    t = pq.read_table(f"{cfg.run_dir}/features/part-00000.parquet").to_pydict()
    for text, idx, start, end in zip(texts, t["idx"], t["peak_start"], t["peak_end"]):
        assert len(start) == len(end) == sum(i < d for i in idx) > 0  # pooled = band 0
        assert all(0 <= s < e <= len(text) for s, e in zip(start, end))
    f = cfg.features
    fz = features.Featurizer(str(Path(cfg.run_dir) / "sae"), f.pooling, f.top_k, f.max_tokens, 1, tuple(f.codes))
    one = fz.encode(texts[:1])
    assert one.peaks[0].tolist() == [[s, e] for s, e in zip(t["peak_start"][0], t["peak_end"][0])]


def test_each_code_lands_in_its_own_band_whatever_the_order(featured_run):
    cfg, summary = featured_run
    prompts = pq.read_table(f"{cfg.run_dir}/ingest/prompts.parquet").column("prompt").to_pylist()[:6]
    d, sae_dir, f = summary["d_sae"], str(Path(cfg.run_dir) / "sae"), cfg.features
    bands = {}
    for codes in (("pooled", "last", "mean", "halves"), ("halves", "mean", "pooled")):
        c = features.Featurizer(sae_dir, f.pooling, f.top_k, f.max_tokens, 4, codes).encode(prompts)
        X = sp.csr_matrix((np.concatenate(c.val), np.concatenate(c.idx),
                           np.cumsum([0] + [len(i) for i in c.idx])), shape=(6, len(codes) * d)).toarray()
        for k, name in enumerate(codes):
            bands.setdefault(name, []).append(X[:, k * d:(k + 1) * d])
    for name in ("pooled", "mean", "halves"):
        np.testing.assert_allclose(*bands[name], rtol=1e-5)
    # and the bands differ from each other (a swap would show)
    assert not np.allclose(bands["mean"][0], bands["halves"][0])
    assert not np.allclose(bands["mean"][0], bands["pooled"][0])


def test_featurize_texts_matches_the_stage(featured_run):
    cfg, _ = featured_run
    prompts = pq.read_table(f"{cfg.run_dir}/ingest/prompts.parquet").column("prompt").to_pylist()
    _, X, _ = load_features(cfg.run_dir)
    Y = features.featurize_texts(prompts[:10], cfg.run_dir, cfg)
    assert Y.shape == (10, X.shape[1]) and Y.dtype == np.float32
    np.testing.assert_allclose(Y.toarray(), X[:10].toarray(), rtol=1e-4, atol=1e-6)


def test_features_resume_computes_only_missing_blocks(featured_run, tmp_path, tiny_model_dir, shared_data):
    ref_cfg, _ = featured_run
    run_dir = tmp_path / "run"
    _ingest(run_dir, shared_data)
    # Same SAE as the reference run, so the outputs must agree.
    shutil.copytree(f"{ref_cfg.run_dir}/sae", run_dir / "sae")
    cfg = _config(run_dir, tiny_model_dir, **{"features.num_actors": 1})
    # What a run killed after two blocks leaves behind: whole part files, plus a torn `.partial`.
    ids, prompts = features.read_prompts(run_dir / "ingest/prompts.parquet")
    fp = features.features_fingerprint(cfg.features, marker_of(run_dir, "ingest"), marker_of(run_dir, "sae"))
    st = Stage(run_dir, "features", fp)
    tmp = Path(st.begin())
    fz = features.Featurizer(str(run_dir / "sae"), cfg.features.pooling, cfg.features.top_k, cfg.features.max_tokens, 4,
                             tuple(cfg.features.codes))
    for b in (0, 3):
        sl = slice(b * 8, (b + 1) * 8)
        storage.write_parquet(features.codes_table(ids[sl], fz.encode(prompts[sl])), features.part_path(tmp, b))
    (tmp / "part-00001.parquet.partial-0badf00d").write_bytes(b"torn write")
    before = {b: os.stat(features.part_path(tmp, b)).st_mtime_ns for b in (0, 3)}
    summary = features.run(cfg)
    assert summary["blocks_resumed"] == 2 and summary["blocks_computed"] == 3
    out = run_dir / "features"
    assert {b: os.stat(features.part_path(out, b)).st_mtime_ns for b in (0, 3)} == before
    assert not list(out.glob("*.partial*"))
    got, ref = features_rows(run_dir), features_rows(ref_cfg.run_dir)
    assert got["id"] == ref["id"] and got["idx"] == ref["idx"]
    np.testing.assert_allclose(np.concatenate(got["val"]), np.concatenate(ref["val"]), rtol=1e-4)
    # Done is done: a rerun with the same config is a no-op.
    marker = (out / "_DONE.json").read_text()
    assert features.run(cfg) == summary and (out / "_DONE.json").read_text() == marker


def features_rows(run_dir):
    from saerl_ray.core.featureio import read_feature_table

    return read_feature_table(f"{run_dir}/features").to_pydict()


def test_features_without_sae_stage_names_the_missing_stage(tmp_path, tiny_model_dir, shared_data):
    _ingest(tmp_path / "run", shared_data, n=4)
    with pytest.raises(FileNotFoundError, match="stage 'sae' has not finished"):
        features.run(_config(tmp_path / "run", tiny_model_dir))


# --- surprisal (features.surprisal) -----------------------------------------------------------


def test_top_surprisal_averages_the_largest_masked_tokens():
    s = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0, 100.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0] * 6], dtype=torch.bool)
    # row 0: top 3 of the masked (5, 1, 9, 2) -> (9 + 5 + 2) / 3; the unmasked 100 never counts
    np.testing.assert_allclose(features.top_surprisal(s, mask, skip=0).numpy(), [16 / 3, 3.0, 0.0], rtol=1e-6)
    # the first `skip` masked tokens never count either (the unmasked position 0 is not one of them):
    # row 0 skips 5 and 1 -> (9 + 2) / 2; row 1 has nothing left
    np.testing.assert_allclose(features.top_surprisal(s, mask, skip=2).numpy(), [5.5, 0.0, 0.0], rtol=1e-6)
    assert features.SURPRISAL_SKIP == 3  # the default the stage stores


def test_the_surprisal_summary_enters_the_fingerprint_of_surprisal_runs_only(monkeypatch):
    from saerl_ray.core.config import FeaturesConfig

    off, on = FeaturesConfig(surprisal=False), FeaturesConfig(surprisal=True)
    # a lens-only run keeps the fingerprint it had before the summary's constants existed
    assert features.features_fingerprint(off, "i", "s") == fingerprint(off, "i", "s")
    before = features.features_fingerprint(on, "i", "s")
    monkeypatch.setattr(features, "SURPRISAL_SKIP", 0)
    assert features.features_fingerprint(on, "i", "s") != before  # a changed summary recomputes the column
    assert features.features_fingerprint(off, "i", "s") == fingerprint(off, "i", "s")


def test_surprisal_is_the_whole_models_next_token_loss_and_the_hook_is_unchanged(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    texts = ["What is 2+3?", "A train leaves at noon and travels 60 miles.", "x"]
    enc = encode_prompts(tok, texts, False, 64)
    lens = Lens(str(tiny_model_dir), 1)
    full = load_lens_model(lens, full=True)
    cut = load_lens_model(lens)
    reference = load_model(str(tiny_model_dir)).eval()
    with pytest.raises(ValueError, match="whole model"):
        next(iter_residuals(cut, 1, enc, 2, tok.pad_token_id, surprisal=True))
    cut_acts = {}
    for rows, acts, _ in iter_residuals(cut, 1, enc, 2, tok.pad_token_id):
        for j, i in enumerate(rows):
            cut_acts[i] = acts[j, : len(enc.ids[i])]
    seen = 0
    for rows, acts, mask, surp in iter_residuals(full, 1, enc, 2, tok.pad_token_id, surprisal=True):
        for j, i in enumerate(rows):
            n = len(enc.ids[i])
            ids = torch.from_numpy(enc.ids[i])[None]
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=ids).logits[0].float(), -1)
            want = torch.zeros(n)
            want[1:] = -logp[torch.arange(n - 1), ids[0, 1:]]
            torch.testing.assert_close(surp[j, :n], want, atol=1e-4, rtol=1e-4)
            assert not surp[j, n:].any()  # padding
            torch.testing.assert_close(acts[j, :n], cut_acts[i], atol=1e-5, rtol=1e-5)  # the hook is the lens's
            seen += 1
    assert seen == len(texts)


def test_surprisal_column_is_written_by_the_stage_and_matches_featurize_texts(featured_run, tmp_path, tiny_model_dir,
                                                                               shared_data):
    from saerl_ray.core.featureio import load_surprisal, part_paths, read_surprisal

    ref_cfg, _ = featured_run
    # the lens-only run stores NaN: no surprisal was computed
    assert np.isnan(read_surprisal(part_paths(ref_cfg.run_dir))).all()
    run_dir = tmp_path / "run"
    _ingest(run_dir, shared_data)
    shutil.copytree(f"{ref_cfg.run_dir}/sae", run_dir / "sae")  # same SAE: the codes must agree
    cfg = _config(run_dir, tiny_model_dir, **{"features.surprisal": True})
    summary = features.run(cfg)
    assert summary["surprisal"] is True
    ids, X, _ = load_features(run_dir)
    _, X_ref, _ = load_features(ref_cfg.run_dir)
    np.testing.assert_allclose(X.toarray(), X_ref.toarray(), rtol=1e-4, atol=1e-6)
    s = load_surprisal(run_dir, list(ids))
    assert np.isfinite(s).all() and (s > 0).all() and s.std() > 0
    prompts = pq.read_table(f"{run_dir}/ingest/prompts.parquet").column("prompt").to_pylist()
    Y, s_new = features.featurize_texts(prompts[:6], cfg.run_dir, cfg, with_surprisal=True)
    np.testing.assert_allclose(s_new, s[:6], rtol=1e-4)
    np.testing.assert_allclose(Y.toarray(), X[:6].toarray(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load_surprisal(run_dir, list(ids[::-1])), s[::-1])
    with pytest.raises(ValueError, match="features.surprisal"):
        features.featurize_texts(prompts[:2], ref_cfg.run_dir, ref_cfg, with_surprisal=True)
