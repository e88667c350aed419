"""A quality filter on a polluted pool (signals.quality.reference): with clean prompts taken from the pool
itself, a third of bad rows teaches the filter that bad is normal; with a trusted reference file the same
rows are dropped. Plus: a reference prompt that is in the pool reuses its codes, a missing or empty reference
file is an error naming it, `reference: null` is the in-pool behaviour, and the reference's content enters
the signals stage's fingerprint."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saerl_ray.core.config import QualityConfig, load_config
from saerl_ray.signal_models.quality import run_quality
from saerl_ray.stages.ingest import IngestError, prompt_id
from saerl_ray.stages.signals import read_reference

D = 60


def codes(rng, m, lo=0, hi=40, marker=None):
    """m random sparse codes on latents lo..hi-1 (6 active each), plus a marker latent at 3.0."""
    X = np.zeros((m, D), np.float32)
    for r in range(m):
        X[r, lo + rng.choice(hi - lo, 6, replace=False)] = rng.exponential(1.0, 6)
    if marker is not None:
        X[:, marker] = 3.0
    return X


def write_jsonl(path, texts):
    with gzip.open(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"question": t, "answer": "#### 1"}) + "\n")
    return str(path)


class Planted:
    """A pool of `n` rows, the first `bad` of them low-quality of a kind no corruption names (latents 44..57,
    which no clean prompt has), the rest clean (latents 0..39); a reference file of `n_ref` clean prompts (the
    first `shared` of them also in the pool); the featurizer: reference texts -> their clean codes, any other
    text (a corruption) -> a negative of family A/B/C (marker latent 40/41/42), dealt in order."""

    def __init__(self, tmp_path, n=600, bad=200, n_ref=600, shared=0, seed=0):
        rng = np.random.default_rng(seed)
        self.n, self.bad = n, bad
        ref_texts = [f"Reference problem {i}: compute {i} plus {i + 1}." for i in range(n_ref)]
        pool_texts = [f"Pool problem {i}: " + "x" * (40 + i % 7) for i in range(n)]
        X = np.r_[codes(rng, bad, lo=44, hi=58), codes(rng, n - bad)]
        ref_X = codes(rng, n_ref)
        for j in range(shared):  # pool rows bad..bad+shared are reference prompts (same text, same codes)
            pool_texts[bad + j] = ref_texts[j]
            X[bad + j] = ref_X[j]
        self.X = sp.csr_matrix(X)
        self.prompts = pd.DataFrame({"id": [prompt_id(t) for t in pool_texts], "prompt": pool_texts, "answer": "1"})
        self.file = write_jsonl(tmp_path / "reference.jsonl.gz", ref_texts)
        self.ref = {t: ref_X[i] for i, t in enumerate(ref_texts)}
        neg = codes(rng, 3 * n_ref)
        for j in range(3):
            neg[j::3, 40 + j] = 3.0
        self.neg, self.dealt, self.featurised = neg, {}, []

    def featurize(self, texts):
        self.featurised += list(texts)
        rows = [self.ref[t] if t in self.ref else self.neg[self.dealt.setdefault(t, len(self.dealt)) % len(self.neg)]
                for t in texts]
        return sp.csr_matrix(np.asarray(rows, np.float32).reshape(len(texts), D))

    def cfg(self, reference, **kw):
        spec = [{"path": self.file, "preset": "gsm8k"}] if reference is True else reference
        return QualityConfig(n_train=600, C=0.1, negatives_per_prompt=1, max_false_positive_rate=0.01,
                             reference=spec, **kw)

    def run(self, cfg, path):
        """run_quality on this pool, the reference's rows read as the signals stage reads them."""
        ref = read_reference(cfg.reference) if cfg.reference else None
        return run_quality(self.prompts, self.X, cfg, 0, self.featurize, str(path), use_ray=False, reference=ref)


def test_a_third_of_the_pool_bad_in_pool_lets_it_through_a_trusted_reference_drops_it(tmp_path):
    p = Planted(tmp_path, bad=200)  # 33% of 600
    _, keep_pool, _, m_pool = p.run(p.cfg([]), str(tmp_path / "pool.json"))
    # In-pool: the bad kind is a third of the "clean" sample; its latent is common, its rows have bad
    # neighbours, and the threshold is set on them: most of it is kept.
    assert keep_pool[:200].mean() > 0.5
    assert m_pool["label_source"].startswith("synthetic") and "reference" not in m_pool
    p.featurised.clear()
    score, keep, flags, m = p.run(p.cfg(True), str(tmp_path / "ref.json"))
    assert (~keep[:200]).mean() >= 0.95  # the bad rows dropped
    assert (~keep[200:]).mean() <= 0.03  # the clean rows kept (the 1% rate + sampling noise)
    assert (flags[:200][~keep[:200]] != "").all()
    assert m["label_source"].startswith(f"reference {p.file}")
    assert m["reference"] == {"files": {p.file: {"rows": 600, "accepted": 600, "rejected": 0}}, "sampled": 600,
                              "in_pool": 0, "featurised": 600}
    assert m["kept"] + m["dropped"] == p.n  # every pool row scored and counted
    # the positives are the reference: the 600 reference texts were featurised, then their 600 corruptions
    assert set(p.featurised[:600]) == set(p.ref) and not set(p.featurised[600:]) & set(p.ref)


@pytest.mark.parametrize("bad", [30, 120])
def test_the_trusted_reference_does_not_depend_on_how_polluted_the_pool_is(tmp_path, bad):
    """5% and 20% bad: the reference's model is fit without the pool, so the same rows get the same scores."""
    p = Planted(tmp_path, bad=bad)
    score, keep, _, _ = p.run(p.cfg(True), str(tmp_path / "r.json"))
    assert (~keep[:bad]).mean() >= 0.95 and (~keep[bad:]).mean() <= 0.03
    clean = Planted(tmp_path, bad=bad)
    clean.X = clean.X[bad:]  # the same clean rows without the pollution: scored the same
    clean.prompts = clean.prompts.iloc[bad:].reset_index(drop=True)
    score_clean, _, _, _ = clean.run(clean.cfg(True), str(tmp_path / "c.json"))
    np.testing.assert_allclose(score[bad:], score_clean, atol=1e-5)


def test_reference_prompts_in_the_pool_reuse_the_pool_codes(tmp_path):
    p = Planted(tmp_path, bad=60, shared=50)
    _, _, _, m = p.run(p.cfg(True), str(tmp_path / "r.json"))
    assert m["reference"]["in_pool"] == 50 and m["reference"]["featurised"] == 550
    shared = set(p.prompts["prompt"][60:110])
    assert not shared & set(p.featurised)  # never featurised again


def test_a_missing_or_empty_reference_file_is_an_error_naming_it(tmp_path):
    p = Planted(tmp_path, n=60, bad=10, n_ref=20)
    missing = str(tmp_path / "no_such_reference.jsonl")
    with pytest.raises(IngestError, match="signals.quality.reference.*no_such_reference.jsonl"):
        read_reference(p.cfg([{"path": missing, "preset": "gsm8k"}]).reference)
    empty = write_jsonl(tmp_path / "empty_reference.jsonl.gz", [])
    with pytest.raises(IngestError, match="signals.quality.reference: .*empty_reference.jsonl.gz holds no usable prompt"):
        read_reference(p.cfg([{"path": empty, "preset": "gsm8k"}]).reference)
    no_prompt = tmp_path / "wrong_columns.jsonl"  # rows, but none with the preset's prompt column
    no_prompt.write_text('{"problem": "x"}\n')
    with pytest.raises(IngestError, match="wrong_columns.jsonl holds no usable prompt.*missing_prompt"):
        read_reference(p.cfg([{"path": str(no_prompt), "preset": "gsm8k"}]).reference)


def test_default_reference_is_the_shipped_curated_sets_and_null_is_in_pool():
    cfg = load_config(None, {})
    assert [(s.path, s.preset) for s in cfg.signals.quality.reference] == [
        ("${SAERL_DATA}/gsm8k_train.jsonl.gz", "gsm8k"), ("${SAERL_DATA}/math500.jsonl.gz", "math")]
    assert load_config(None, {"signals.quality.reference": None}).signals.quality.reference == []


def test_combine_default_follows_the_reference_and_the_features_surprisal(tmp_path):
    q = load_config(None, {}).signals.quality
    assert (q.combine, q.combine_rule) == (["probe", "neighbors", "surprisal"], "max")
    q = load_config(None, {"features.surprisal": False}).signals.quality
    assert (q.combine, q.combine_rule) == (["probe", "neighbors"], "sum")
    for none in (None, []):
        q = load_config(None, {"signals.quality.reference": none}).signals.quality
        assert (q.combine, q.combine_rule) == (["probe", "novelty", "neighbors", "surprisal"], "max")
        q = load_config(None, {"signals.quality.reference": none, "features.surprisal": False}).signals.quality
        assert (q.combine, q.combine_rule) == (["probe", "novelty", "neighbors"], "sum")
    # the section alone cannot see the features: no surprisal
    assert QualityConfig(reference=[]).combine == ["probe", "novelty", "neighbors"]
    # features given as a section object, not as YAML, are read too
    from saerl_ray.core.config import FeaturesConfig, RunConfig

    assert RunConfig(features=FeaturesConfig()).signals.quality.combine == ["probe", "neighbors", "surprisal"]
    q = RunConfig(features=FeaturesConfig(surprisal=False)).signals.quality
    assert (q.combine, q.combine_rule) == (["probe", "neighbors"], "sum")
    # a combination or rule the user names is kept whatever the reference and the features
    cfg = load_config(None, {"signals.quality.reference": [], "signals.quality.combine": ["probe"]})
    assert (cfg.signals.quality.combine, cfg.signals.quality.combine_rule) == (["probe"], "sum")
    cfg = load_config(None, {"signals.quality.combine_rule": "sum"})
    assert (cfg.signals.quality.combine, cfg.signals.quality.combine_rule) == (["probe", "neighbors", "surprisal"], "sum")


def test_the_reference_content_enters_the_signals_fingerprint(tmp_path):
    from saerl_ray.stages.ingest import input_versions

    f = tmp_path / "ref.jsonl"
    f.write_text('{"question": "What is 1 + 1?"}\n')
    spec = QualityConfig(reference=[{"path": str(f)}]).reference
    before = input_versions(spec)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(f.read_bytes())
    assert input_versions(QualityConfig(reference=[{"path": str(copy)}]).reference)[0][1:] == before[0][1:]
    f.write_text('{"question": "What is 2 + 2?"}\n')
    assert input_versions(spec) != before  # an edited reference refits the filter
    assert input_versions(QualityConfig(reference=[{"path": str(tmp_path / "gone.jsonl")}]).reference) == [
        [str(tmp_path / "gone.jsonl")]]


def test_a_key_added_at_its_neutral_value_leaves_the_signals_fingerprint_alone():
    """novelty_by_source arrived after runs existed; false reproduces them, so at false it is left out of
    the fingerprint (finished signals stages stay finished) and true makes the stage new."""
    from saerl_ray.core.config import content_of, fingerprint

    off = load_config(None, {"signals.quality.reference": []})
    on = load_config(None, {"signals.quality.reference": [], "signals.quality.novelty_by_source": True})
    assert "novelty_by_source" not in content_of(off.signals)["quality"]
    assert content_of(on.signals)["quality"]["novelty_by_source"] is True
    assert fingerprint(off.signals) != fingerprint(on.signals)
    assert content_of(off.signals)["quality"] == {k: v for k, v in content_of(on.signals)["quality"].items()
                                                  if k != "novelty_by_source"}
