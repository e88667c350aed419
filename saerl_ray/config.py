"""One run, one YAML file: pydantic models for every stage, mirrored by the CLI.

Every field is reachable from the command line as a dotted flag (`--features.batch_size 64`), the
same spelling OpenRLHF 0.11 uses, so a YAML key and a flag never disagree. Unknown keys are errors.

    from saerl_ray.config import load_config
    cfg = load_config("configs/gsm8k_math500.yaml", overrides={"features.batch_size": 64})
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    # None starts (or joins, under `ray job submit`) a local cluster; "auto" joins a running one.
    address: str | None = None
    # Logical CPUs for a local cluster; None lets Ray count the machine's cores.
    num_cpus: int | None = None
    # Keep the dashboard on loopback: a public dashboard executes arbitrary code.
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    # Seconds to wait for a configured address to answer before failing with a clear error.
    connect_timeout_s: float = 60.0


class ModelConfig(Section):
    # "smollm2" (the packaged SmolLM2-135M-Instruct), an HF model id already in the cache, or a local dir.
    name: str = "smollm2"
    # Executing a repo's Python is opt-in, never a default.
    trust_remote_code: bool = False
    # Compute dtype on CPU; bfloat16 halves matmul time on AVX-512-bf16 machines.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Feed prompts through the chat template (as the policy sees them) or as raw problem text.
    chat_template: bool = False


class InputSpec(Section):
    # jsonl / json / parquet file, a directory of them, or an HF `save_to_disk` dir; local or s3:// gs:// URI.
    path: str
    # Column mapping preset: deepmath | math | gsm8k | olympiadbench | aime | amc | minerva | none.
    preset: str = "none"
    # Name recorded in the `source` column; defaults to the file stem.
    source: str | None = None
    # Split recorded in the `split` column.
    split: str = "train"
    # Explicit mapping from our field name to the file's column; overrides the preset.
    columns: dict[str, str] = Field(default_factory=dict)
    # Read at most this many rows (quick runs); None reads all.
    limit: int | None = None


class IngestConfig(Section):
    inputs: list[InputSpec] = Field(default_factory=list)
    # Drop prompts whose normalised text repeats an earlier one (kept in `rejected` as duplicate).
    dedup: bool = True
    # Prompts longer than this many characters are rejected (a guard against pasted documents).
    max_chars: int = 8000
    # Reject rows with no gold answer (`missing_answer`): an RL prompt without one cannot be rewarded.
    # Set false to keep them for label-free uses (features, clusters only).
    require_answer: bool = True


class SAEConfig(Section):
    # train: fit a TopK SAE with sae-lens on this run's prompts; pretrained: sae-lens release/sae_id
    # (needs the hub cache); disk: a folder written by `save_inference_model`.
    source: Literal["train", "pretrained", "disk"] = "train"
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    # Residual stream after decoder block `layer` (HF module `model.layers.{layer}`).
    layer: int = 12
    # Latents = expansion * d_model.
    expansion: int = 8
    # TopK sparsity per token.
    k: int = 32
    # SAE training samples (repeats included). SmolLM2 L12, 200k: 133 s on 2 cores, held-out EV 0.75.
    training_tokens: int = 200_000
    batch_size_tokens: int = 4096
    # 2e-3 suits these short runs: held-out EV 0.75 vs 0.39 at 4e-4 (same 200k samples, SmolLM2 L12).
    lr: float = 2e-3
    # Prompts per forward pass while streaming activations on CPU (on GPU the token budget decides).
    prompt_batch_size: int = 32
    max_tokens_per_batch: int | None = Field(None, ge=1, description=(
        "Padded tokens per lens forward while streaming activations (length-sorted prompts packed up to "
        "this budget). None: on CPU prompt_batch_size prompts decide (the measured default), on GPU "
        "16,384 tokens. Must be >= max_tokens_per_prompt."))
    # Token activations kept in the shuffle buffer (memory = buffer * d_model * 4 bytes).
    buffer_tokens: int = 65536
    max_tokens_per_prompt: int = 256
    # Each streamed activation is served this many times: a lens forward costs ~3x an SAE step per token.
    reuse: int = 2
    # Prompts of this split train the SAE (eval sets must not shape the features).
    split: str = "train"
    # Train-split prompts held out for the reported metrics (never trained on).
    holdout_prompts: int = 200
    # Lens compute dtype (SAE activations and features); bf16 ran 2-4x faster, pooled codes cos 0.99 vs fp32.
    lens_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    hf_cache: str | None = Field(None, description=(
        "Hugging Face hub cache folder holding the pretrained release (source=pretrained), e.g. on shared "
        "storage that every node mounts; None: the HF_HUB_CACHE / HF_HOME of the environment. Nothing is "
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
    # Prompts per forward pass inside a CPU actor (after length bucketing); on GPU the token budget decides.
    batch_size: int = 32
    max_tokens_per_batch: int | None = Field(None, ge=1, description=(
        "Padded tokens per lens forward (length-sorted prompts packed up to this budget). None: on CPU "
        "batch_size prompts decide (the measured default); on GPU 16,384 tokens, lowered to what fits half "
        "the free GPU memory next to the SAE's dense codes. Must be >= max_tokens."))
    # Actor pool size; on GPU one actor per GPU.
    num_actors: int = 2
    # Fractional CPUs: whole-CPU actors on a 2-CPU cluster starve the read task (Ray Data deadlock).
    num_cpus_per_actor: float = 0.5
    num_gpus_per_actor: float = 0.0
    # Torch threads inside each actor.
    threads_per_actor: int = 1
    # How token codes become one vector per prompt. max: on MATH-500 it lifts difficulty Spearman
    # 0.40 -> 0.50 over mean at equal topic NMI and probe AUROC (docs/decisions.md).
    pooling: Literal["mean", "max", "sum", "binary"] = "max"
    # Codes stored per prompt, each a d_sae-wide band of columns in this order (docs/run_dir.md):
    #   pooled  the `pooling` of the token codes, top_k latents (topic, difficulty)
    #   last    the last prompt token's code: does the prompt end like a whole question (truncation, leaks)
    #   mean    mean-pooled token codes, top_k latents: how much of the prompt a latent covers
    #   halves  min(max over the first half, max over the second half): latents present in both halves,
    #           a coherence signal (a problem spliced onto another one shares few)
    # Each signal reads only the codes it names (signals.*.codes); see docs/decisions.md for the numbers.
    codes: list[Literal["pooled", "last", "mean", "halves"]] = Field(
        default_factory=lambda: ["pooled", "last", "mean", "halves"])
    # Sparse latents kept per prompt in the pooled and mean codes (largest values).
    top_k: int = 128
    # Truncate prompts longer than this many tokens.
    max_tokens: int = 512
    # Rows per output block; a block is the unit of resume.
    block_rows: int = 512

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
    k: int = 16
    # Codes clustered (of features.codes); None = pooled + last: topic lives in the pooled code.
    codes: list[str] | None = None
    # cosine: L2-normalise codes, then Euclidean k-means (spherical geometry).
    metric: Literal["cosine", "euclidean"] = "cosine"
    # TruncatedSVD components to cluster in (0 = the sparse codes as they are: exact and cheap, nnz x K).
    projection: int = 0
    # Lloyd rounds at most; stops earlier once the relative inertia change is below `tol`.
    max_iter: int = 50
    tol: float = 1e-4
    # Points used for k-means++ seeding (a sample: seeding cost grows with it, quality barely does).
    init_sample: int = 5000
    # k-means++ seedings tried on the sample (best after a few Lloyd rounds): one run often leaves a
    # cluster unseeded, which Lloyd never repairs (benchmarks/RESULTS.md).
    init_trials: int = 4
    # Ray tasks per Lloyd round (0 = one per CPU of the cluster; 1 = in-process, no Ray).
    num_tasks: int = 0


class DifficultyConfig(Section):
    # Column of `prompts` holding the label (MATH level, DeepMath difficulty) ...
    label_column: str | None = "difficulty"
    # ... or a parquet/jsonl file of measured pass rates (id, pass_rate) from `saerl-ray label`.
    label_file: str | None = None
    # Labelled subset size (the paper uses a small subset; None = all labelled rows).
    n_labelled: int | None = 2000
    # Codes the regression reads; None = pooled + halves: over three SAE seeds on MATH-500, Spearman 0.457
    # mean vs 0.408 for pooled + last (docs/decisions.md).
    codes: list[str] | None = None
    alphas: list[float] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    l1_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    folds: int = 5
    # Source whose prompts are held out as an out-of-distribution check (None = skip).
    ood_source: str | None = None
    # Latents active in fewer labelled rows than this fraction get no weight (too rare to estimate).
    min_support: float = 0.01
    # Cap on latents in the regression (most frequent first) so the dense design stays small.
    max_features: int = 4096
    # Fraction of the labelled subset never used for hyperparameter selection: the honest metric.
    holdout: float = 0.2


class QualityConfig(Section):
    # Column of `prompts` with 1 = good / 0 = bad, used instead of synthetic corruptions when present.
    label_column: str | None = None
    corruptions: list[str] = Field(
        default_factory=lambda: ["truncate", "shuffle", "mismatch", "leak", "offdomain", "garble"]
    )
    # Positives sampled for the probe. Featurising their negatives dominates the signals stage
    # (~30 texts/s on 2 cores): 1,200 x 3 negatives, aiming at the 10-minute `make run` (10 min 07 s; 10 min 26 s
    # at 1,500). Main-run AUROC 0.986 at 1,200 and at 1,500, 0.988 at 2,000.
    n_train: int = 1200
    # Synthetic negatives per positive (round-robin types; each round gives a prompt another type).
    negatives_per_prompt: int = 3
    # Codes the probe reads; None = all of features.codes: mean + halves lift AUROC 0.937 -> 0.960 on MATH-500.
    codes: list[str] | None = None
    # Held-out AUROC: positives cut into this many folds, every fold scored out-of-fold once.
    eval_folds: int = Field(2, ge=2)
    # Keep the top fraction by score, or everything above `threshold` when it is set.
    keep_fraction: float = 0.95
    threshold: float | None = None
    # Inverse L2 strength of the logistic probe on standardised features. Strong: the probe has far
    # more latents than training rows; 0.01 beats 1.0 on held-out corruption types (docs/decisions.md).
    C: float = 0.01
    # Latents active in fewer training rows than this fraction get no weight (as in difficulty).
    min_support: float = 0.01
    # Cap on latents in the probe (most frequent first).
    max_features: int = 4096


class SignalsConfig(Section):
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)


class PlanConfig(Section):
    # Prompts per training batch (the trainer's rollout batch).
    batch_size: int = 32
    # Fraction of each batch's tail swapped with the next batch ("moderate batch mixing").
    mixing_ratio: float = 0.125
    # saerl: the full method; the rest are ablations built by the same code.
    variant: Literal["saerl", "shuffled", "length", "no_mix", "full_mix", "no_filter"] = "saerl"
    # Only prompts of this split are planned.
    split: str = "train"

    @field_validator("mixing_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v <= 0.5:
            raise ValueError("mixing_ratio must be in [0, 0.5] (0.5 already swaps half of every batch)")
        return v


class SamplerConfig(Section):
    mode: Literal["static", "online"] = "online"
    # A prompt whose whole group was correct is postponed this many batches.
    postpone_batches: int = 8
    # A prompt all-wrong this many times in a row is retired for the rest of the run.
    retire_after: int = 3
    # Cluster pass rate above which the sampler advances faster through that cluster.
    fast_pass_rate: float = 0.8
    # Cluster pass rate drop (vs its best) that triggers a revisit.
    revisit_drop: float = 0.2
    # Compact the sampler's call log into <run_dir>/sampler/state.json every this many batches, skipped
    # while one is in flight (0 = on demand). Every call is durable anyway; this bounds restore time.
    checkpoint_every: int = 10
    # ... and at most once per this many seconds: a tight serving loop must not spend its p99 on
    # snapshots (raise it on an object store, where a base of a large run is tens of MB per write).
    checkpoint_min_seconds: float = 2.0
    # Weight of the newest group in a cluster's pass-rate EMA (0.2 ~ the last five groups matter).
    ema_alpha: float = 0.2
    # Groups a cluster must have reported before pacing reads its EMA (one lucky group is not a trend).
    pace_min_groups: int = 4
    # While a cluster is fast, this many of its easiest waiting prompts are deferred per prompt served.
    pace_skip: int = 1
    # Detached actors outlive the driver (long runs resumed by another driver); default dies with it.
    detached: bool = False

    @field_validator("ema_alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("ema_alpha must be in (0, 1]")
        return v


class TrainConfig(Section):
    backend: Literal["trl", "openrlhf"] = "trl"
    algo: Literal["grpo", "dapo"] = "grpo"
    # Policy model; None = model.name.
    policy: str | None = None
    steps: int = 20
    num_generations: int = 4
    max_new_tokens: int = 64
    learning_rate: float = 1e-6
    num_workers: int = 1
    use_gpu: bool = False
    # Extra flags passed through to the backend untouched (OpenRLHF dotted flags).
    extra_args: list[str] = Field(default_factory=list)
    # Prompts per optimisation step over all workers; None = plan.batch_size (one plan batch per step).
    prompts_per_step: int | None = None
    # Sampling temperature of the rollouts (GRPO needs diverse groups).
    temperature: float = 1.0
    # KL coefficient to the reference model; 0 skips the reference forward (TRL's default too).
    kl_coef: float = 0.0
    # Ray Train checkpoint (model + optimizer + sampler state) every this many steps.
    save_every: int = 10
    # CPUs per Ray Train worker; fractional so N workers fit a small machine next to Ray's controller.
    cpus_per_worker: float = 1.0
    # Continue from the latest Ray Train checkpoint of an interrupted run with the same config.
    resume: bool = True
    # RL recipes keep the learning rate flat; "linear" decays it to 0 at `steps`.
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    # Held-out accuracy curve: a jsonl of {"prompt", "answer"} rows graded greedily every N steps (0 = off).
    heldout_file: str | None = None
    heldout_every: int = 0

    @field_validator("num_generations")
    @classmethod
    def _groups(cls, v: int) -> int:
        if v < 2:
            raise ValueError("num_generations must be >= 2 (GRPO normalises rewards within a group)")
        return v


class LabelConfig(Section):
    # Size of the labelled subset (the paper labels a small subset, then the proxy predicts the rest).
    n_prompts: int = 256
    # Completions sampled per prompt; pass_rate = correct / k.
    k: int = 8
    # Sampling temperature: pass rates are only informative with sampled (not greedy) rollouts.
    temperature: float = 1.0
    max_new_tokens: int = 256
    # Prompts per generate call (each yields k sequences) and per resumable chunk.
    batch_size: int = 4
    # Only prompts of this split are labelled.
    split: str = "train"
    # Model whose pass rates define difficulty; None = train.policy, else model.name.
    model: str | None = None


class EvalConfig(Section):
    benchmarks: list[str] = Field(
        default_factory=lambda: ["math500", "gsm8k", "aime24", "amc23", "minerva", "olympiadbench"]
    )
    data_dir: str = "../shared/data"
    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    # Model or checkpoint dir to evaluate; None = model.name.
    model: str | None = None


class RunConfig(Section):
    # Every stage reads and writes under this directory.
    run_dir: str = "runs/default"
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _signal_codes(self) -> RunConfig:
        for name in ("cluster", "difficulty", "quality"):
            signal_codes(self, name)  # raises on a code features.codes lacks
        return self


# Codes read when signals.<signal>.codes is unset (the probe reads every stored code); docs/decisions.md.
DEFAULT_CODES = {"cluster": ("pooled", "last"), "difficulty": ("pooled", "halves")}


def signal_codes(cfg: RunConfig, signal: str) -> list[str]:
    """The codes `signals.<signal>` reads: its own list, or when unset pooled + halves for the regression,
    pooled + last for k-means and every stored code for the probe. Each must be among features.codes."""
    stored = list(cfg.features.codes)
    own = getattr(cfg.signals, signal).codes
    if own is None:
        if signal == "quality":
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
        from saerl_ray import storage  # a config may sit beside its run, in object storage

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


def fingerprint(*parts: Any) -> str:
    """Stable hash of config sections and input markers: what decides whether a stage reruns."""
    blob = json.dumps(
        [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
