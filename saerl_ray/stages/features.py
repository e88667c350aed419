"""features stage: one sparse pooled SAE code per prompt, extracted by a Ray Data actor pool.

    saerl-ray features -c configs/gsm8k_math500.yaml
    saerl-ray features -c cfg.yaml --features.num_actors 4 --features.pooling max

Reads `<run_dir>/ingest/prompts.parquet` and the committed SAE + lens in `<run_dir>/sae/`; writes
`<run_dir>/features/part-NNNNN.parquet` (id, n_tokens, l0, idx, val, peak_start, peak_end; see
docs/run_dir.md) and `summary.json`. Each actor loads the model truncated at the hook layer and the SAE once.

Resume: the prompts are cut into blocks of `block_rows` rows up front; one Ray Data row = one
block, and the actor that finishes a block writes its part file in one atomic write (a local rename
or a single object-store PUT; `saerl_ray.core.storage`) into `features/`, whose `_DONE.json` comes last. A
killed run leaves only whole part files; the rerun (same fingerprint) computes only the blocks that
have none. `run_dir` may be an object-store URI: each actor's node fetches the SAE folder once.

Columns: one d_sae-wide band per entry of `features.codes`, in that order (code i = columns
i*d_sae..(i+1)*d_sae-1): `pooled` (top-k of the pooled code: topic, difficulty), `last` (the last prompt
token's code: whole question or cut off?), `mean` (top-k of the mean code), `halves` (latents present in
both halves of the prompt: coherence). Each signal reads the codes it names (docs/decisions.md).

Surprisal (`features.surprisal: true`): each actor runs the whole model instead of the lens cut at the
hook layer (~2.4x the lens's cost on CPU) and the part's `surprisal` column holds, per prompt, the mean of
its 3 largest per-token surprisals -log p(token | the tokens before it), over the pooled tokens after its
first 3 (a prompt's opening tokens have almost no context and are surprising whatever its quality): the
`surprisal` quality signal (a spliced, blanked or markup-ridden problem has a few tokens the model did
not expect; docs/decisions.md). NaN when off; parts written before the column existed read as null.

Peak tokens: `peak_start` / `peak_end` are parallel to the `pooled` band's entries of `idx` (those in
its column range, in the same ascending order): the character span, in the prompt text, of the pooled
token at which that latent's token code is largest. The report explains a latent by these tokens
without a model. Empty lists when `pooled` is not stored; readers treat parts without the two columns
(written before they existed, or synthetic ones) as having no peaks (`featureio.read_pooled`).

In-process (no Ray) codes for new texts, with the same lens/pooling/top-k:
    X = featurize_texts(["What is 2+3?"], run_dir, cfg)     # csr_matrix (1, n_columns) float32
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from saerl_ray.core import storage
from saerl_ray.core.config import Code, FeaturesConfig, RunConfig, fingerprint
from saerl_ray.core.device import (
    Placement,
    auto_tokens_per_batch,
    batch_limits,
    current_placement,
)
from saerl_ray.core.lens import encode_prompts, iter_residuals, load_lens_model
from saerl_ray.core.models import load_tokenizer
from saerl_ray.core.stage import Stage, marker_of
from saerl_ray.stages.sae import load_sae, read_lens

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("n_tokens", pa.int32()),
    ("l0", pa.int32()),
    ("idx", pa.list_(pa.int32())),
    ("val", pa.list_(pa.float32())),
])
# What the features stage adds to SCHEMA (optional for readers: see the module docstring).
PEAK_FIELDS = [("peak_start", pa.list_(pa.int32())), ("peak_end", pa.list_(pa.int32()))]
PART_SCHEMA = pa.schema([*SCHEMA, *PEAK_FIELDS, ("surprisal", pa.float32())])
# Per-token surprisals averaged into a prompt's `surprisal`: its SURPRISAL_TOP most surprising tokens.
SURPRISAL_TOP = 3
# ... after each prompt's first SURPRISAL_SKIP pooled tokens, which have almost no context: counting them
# lowered validate's leave-one-family-out AUROC (docs/decisions.md, surprisal).
SURPRISAL_SKIP = 3


def top_surprisal(surprisal: torch.Tensor, mask: torch.Tensor, top: int = SURPRISAL_TOP,
                  skip: int = SURPRISAL_SKIP) -> torch.Tensor:
    """(B, T) per-token surprisal + (B, T) mask -> (B,): the mean of each row's `top` largest masked
    surprisals after its first `skip` masked tokens (all of them when it has fewer; 0 with none left: a
    prompt of `skip` tokens or fewer is left to the other signals)."""
    mask = mask & (mask.cumsum(1) > skip)
    x = torch.where(mask, surprisal.float(), torch.tensor(-torch.inf, device=surprisal.device))
    k = min(top, x.shape[1])
    vals = x.topk(k, dim=1).values if k else x.new_zeros((x.shape[0], 0))
    finite = torch.isfinite(vals)
    return torch.where(finite, vals, 0.0).sum(1) / finite.sum(1).clamp(min=1)


def _masked_low(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) codes with the tokens outside the (B, T) mask at -inf: what a max over tokens needs."""
    return torch.where(mask.unsqueeze(-1), codes, codes.new_full((), -torch.inf))


def pool(codes: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, d) token codes + (B, T) bool mask -> (B, d) one code per prompt, masked tokens ignored.
    mean / sum / max of the codes; binary = fraction of the prompt's tokens on which a latent fires.
    A prompt with no pooled token gets the zero vector."""
    m = mask.unsqueeze(-1)
    # where, not multiply: padded positions of an all-pad row can hold NaN (fully masked attention).
    x = torch.where(m, codes, codes.new_zeros(()))
    n = mask.sum(1, keepdim=True).clamp(min=1).to(codes.dtype)
    if how == "mean":
        return x.sum(1) / n
    if how == "sum":
        return x.sum(1)
    if how == "max":
        return _masked_low(codes, mask).amax(1).clamp(min=0)
    if how == "binary":
        return (x > 0).to(codes.dtype).sum(1) / n
    raise ValueError(f"unknown pooling {how!r} (mean, sum, max, binary)")


def top_k_dense(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, d) -> (B, d) with all but each row's k largest entries set to 0."""
    vals, idx = torch.topk(x, min(k, x.shape[1]), dim=1)
    return torch.zeros_like(x).scatter_(1, idx, vals)


CODES = get_args(Code)


def n_columns(d_sae: int, codes: list[str]) -> int:
    """Width of the stored feature matrix: one d_sae-wide band per stored code."""
    return d_sae * len(codes)


def last_token_code(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) token codes + (B, T) mask -> (B, d): the code of each row's last masked token (0 if none)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, pos, -1).amax(1)
    out = codes[torch.arange(codes.shape[0], device=codes.device), last.clamp(min=0)]
    return torch.where((last >= 0).unsqueeze(1), out, codes.new_zeros(()))


def halves_code(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) + (B, T) -> (B, d): min(max code over the first half of the masked tokens, max over the
    second half). Non-zero only for latents that fire in both halves (a one-token prompt: all zero)."""
    rank = torch.cumsum(mask.long(), 1) - 1
    half = (mask.sum(1, keepdim=True) // 2)
    first, second = mask & (rank < half), mask & (rank >= half)
    return torch.minimum(pool(codes, first, "max"), pool(codes, second, "max"))


def code_of(name: str, codes: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """One per-prompt code from the (B, T, d) token codes; `pooled` = their features.pooling, computed once."""
    if name == "pooled":
        return pooled
    if name == "last":
        return last_token_code(codes, mask)
    if name == "mean":
        return pool(codes, mask, "mean")
    if name == "halves":
        return halves_code(codes, mask)
    raise ValueError(f"unknown code {name!r}; features.codes must be among {CODES}")


def peak_positions(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) token codes + (B, T) mask -> (B, d): the position of the masked token at which each
    latent's code is largest (meaningful where the latent fires on some masked token)."""
    return _masked_low(codes, mask).argmax(1)


def sparse_rows(x: torch.Tensor, at: torch.Tensor | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(B, n) -> per row: the columns of its positive entries (ascending) and their values (with `at`,
    a (B, n) tensor: its entries at those places instead, e.g. peak positions)."""
    # Selected on x's device: only the non-zeros (a few hundred per row) cross to host memory.
    rows, cols = torch.nonzero(x > 0, as_tuple=True)
    counts = torch.bincount(rows, minlength=x.shape[0]).tolist()
    cols_np = cols.cpu().numpy().astype(np.int32)
    if at is None:
        vals_np = x[rows, cols].float().cpu().numpy().astype(np.float32)
    else:
        vals_np = at[rows, cols].cpu().numpy()
    bounds = np.cumsum([0] + counts)
    return ([cols_np[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [vals_np[a:b] for a, b in zip(bounds[:-1], bounds[1:])])


@dataclass
class Codes:
    n_tokens: np.ndarray
    l0: np.ndarray
    idx: list[np.ndarray]
    val: list[np.ndarray]
    # Per prompt, (m, 2) int32: the character span of the peak token of each `pooled`-band entry.
    peaks: list[np.ndarray] | None = None
    # Per prompt: the mean of its top-3 token surprisals (features.surprisal), else None.
    surprisal: np.ndarray | None = None


# Dense (tokens, d_sae) tensors alive at once in `Featurizer.encode`: the SAE's pre-activations and
# codes, and the masked copy each pooling makes; sizes the GPU token budget next to a wide SAE.
CODE_COPIES = 4


class Featurizer:
    """Lens model + SAE loaded once; texts -> sparse pooled codes (the core the actor wraps).

    Placement (default: what this process holds, saerl_ray.core.device): on CPU the lens runs in the lens
    dtype and the SAE in float32, `batch_size` prompts per forward (plus `max_tokens_per_batch` padded
    tokens when set); on GPU the lens goes onto the held GPUs (split by bytes over several), the SAE
    runs in bf16 on cuda:0, and forwards are sized by the token budget alone (default: 16,384 or what
    fits half the free memory next to the SAE's dense codes)."""

    def __init__(self, sae_dir: str, pooling: str, top_k: int, max_tokens: int, batch_size: int,
                 codes: tuple[str, ...] = ("pooled",), max_tokens_per_batch: int | None = None,
                 placement: Placement | None = None, surprisal: bool = False):
        bad = [c for c in codes if c not in CODES]
        if bad:
            raise ValueError(f"unknown code {bad[0]!r}; features.codes must be among {CODES}")
        self.lens, record = read_lens(sae_dir)
        self.d_sae = int(record["d_sae"])
        self.codes = tuple(codes)
        self.n_columns = n_columns(self.d_sae, list(codes))
        self.pooling, self.top_k, self.max_tokens, self.batch_size = pooling, top_k, max_tokens, batch_size
        self.tok = load_tokenizer(self.lens.model, self.lens.trust_remote_code)
        self.placement = placement or current_placement()
        self.device = self.placement.device
        self.surprisal = surprisal
        self.model = load_lens_model(self.lens, self.placement, full=surprisal)
        self.sae = load_sae(sae_dir, device=self.device, dtype="bfloat16" if self.placement.is_cuda else None)
        self.max_rows, self.max_batch_tokens = batch_limits(self.placement, batch_size, max_tokens_per_batch)
        if self.placement.is_cuda and max_tokens_per_batch is None:
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            per_token = CODE_COPIES * self.d_sae * self.sae.W_enc.element_size()
            self.max_batch_tokens = auto_tokens_per_batch(free, per_token, max_tokens, cap=self.max_batch_tokens)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Codes:
        enc = encode_prompts(self.tok, texts, self.lens.chat_template, self.max_tokens)
        n = len(texts)
        idx: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        val: list[np.ndarray] = [np.zeros(0, np.float32)] * n
        l0 = np.zeros(n, np.int32)
        n_tokens = np.zeros(n, np.int32)
        peaks: list[np.ndarray] = [np.zeros((0, 2), np.int32)] * n
        surprisal = np.full(n, np.nan, np.float32)
        for rows, acts, mask, *surp in iter_residuals(self.model, self.lens.layer, enc, self.max_rows,
                                                      self.tok.pad_token_id, self.max_batch_tokens, self.device,
                                                      surprisal=self.surprisal):
            if surp:
                surprisal[rows] = top_surprisal(surp[0], mask).cpu().numpy()
            tokens = self.sae.encode(acts.to(self.sae.W_enc.dtype))
            pooled = pool(tokens, mask, self.pooling)
            b_l0 = (pooled > 0).sum(1).cpu().numpy().astype(np.int32)
            b_tokens = mask.sum(1).cpu().numpy()
            bands = []
            for name in self.codes:
                code = code_of(name, tokens, mask, pooled)
                # pooled codes are dense (hundreds of latents): keep the top_k
                bands.append(top_k_dense(code, self.top_k) if name in ("pooled", "mean") else code)
            b_idx, b_val = sparse_rows(torch.cat(bands, dim=1))
            b_pos = self._peak_positions(bands, tokens, mask)
            for j, i in enumerate(rows):  # scatter back: bucketing sorted the rows by length
                idx[i], val[i], l0[i] = b_idx[j], b_val[j], b_l0[j]
                n_tokens[i] = int(b_tokens[j])
                if b_pos is not None:
                    peaks[i] = enc.spans[i][b_pos[j]]
        return Codes(n_tokens, l0, idx, val, peaks, surprisal if self.surprisal else None)

    def _peak_positions(self, bands: list[torch.Tensor], tokens: torch.Tensor,
                        mask: torch.Tensor) -> list[np.ndarray] | None:
        """Per row, the token position where each entry of the pooled band peaks (None: no pooled band)."""
        if "pooled" not in self.codes:
            return None
        return sparse_rows(bands[self.codes.index("pooled")], at=peak_positions(tokens, mask))[1]


def codes_table(ids: list[str], c: Codes) -> pa.Table:
    peaks = c.peaks if c.peaks is not None else [np.zeros((0, 2), np.int32)] * len(ids)
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "n_tokens": pa.array(c.n_tokens, pa.int32()),
        "l0": pa.array(c.l0, pa.int32()),
        "idx": pa.array([x.tolist() for x in c.idx], pa.list_(pa.int32())),
        "val": pa.array([x.tolist() for x in c.val], pa.list_(pa.float32())),
        "peak_start": pa.array([p[:, 0].tolist() for p in peaks], pa.list_(pa.int32())),
        "peak_end": pa.array([p[:, 1].tolist() for p in peaks], pa.list_(pa.int32())),
        "surprisal": pa.array(c.surprisal if c.surprisal is not None else np.full(len(ids), np.nan, np.float32),
                              pa.float32()),
    }, schema=PART_SCHEMA)


def part_path(out_dir: str | Path, block: int) -> str:
    return storage.join(out_dir, f"part-{block:05d}.parquet")


class FeatureExtractor:
    """Ray Data actor: one input row = one block of prompts; writes that block's part file."""

    def __init__(self, sae_dir: str, out_dir: str, pooling: str, top_k: int, max_tokens: int,
                 batch_size: int, threads: int, codes: tuple[str, ...] = ("pooled",), sae_marker: str = "",
                 max_tokens_per_batch: int | None = None, surprisal: bool = False):
        # One thread per actor: actors, not threads, share the cores (matmuls at this size scale badly).
        torch.set_num_threads(threads)
        self.out_dir = out_dir
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        # The SAE folder may sit in object storage: each node fetches it once into its local cache.
        sae_dir = str(storage.local_dir(sae_dir, version=sae_marker))
        # The GPUs Ray assigned this actor (num_gpus_per_actor), or the CPU.
        self.featurizer = Featurizer(sae_dir, pooling, top_k, max_tokens, batch_size, codes, max_tokens_per_batch,
                                     surprisal=surprisal)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blocks, n_rows, n_tok, secs = [], [], [], []
        for block, ids, prompts in zip(batch["block"], batch["ids"], batch["prompts"]):
            t = time.perf_counter()
            codes = self.featurizer.encode(list(prompts))
            # A part file exists whole or not at all (storage writes are atomic): a killed run resumes.
            storage.write_parquet(codes_table(list(ids), codes), part_path(self.out_dir, int(block)))
            blocks.append(int(block))
            n_rows.append(len(ids))
            n_tok.append(int(codes.n_tokens.sum()))
            secs.append(time.perf_counter() - t)
        return {"block": np.asarray(blocks), "rows": np.asarray(n_rows), "tokens": np.asarray(n_tok),
                "seconds": np.asarray(secs), "node": np.asarray([self.node] * len(blocks))}


def missing_blocks(n_rows: int, block_rows: int, out_dir: str) -> list[int]:
    n_blocks = -(-n_rows // block_rows)
    have = set(storage.list_dir(out_dir, suffix=".parquet"))
    return [b for b in range(n_blocks) if storage.name(part_path(out_dir, b)) not in have]


def extract_blocks(ids: list[str], prompts: list[str], blocks: list[int], sae_dir: str, out_dir: str,
                   f: FeaturesConfig, sae_marker: str = "") -> list[dict]:
    """Run the actor pool over the given blocks; returns one record per block computed."""
    import ray

    if not blocks:
        return []
    items = [{"block": b, "ids": ids[b * f.block_rows : (b + 1) * f.block_rows],
              "prompts": prompts[b * f.block_rows : (b + 1) * f.block_rows]} for b in blocks]
    ds = ray.data.from_items(items).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=dict(sae_dir=str(sae_dir), out_dir=str(out_dir), pooling=f.pooling,
                                   top_k=f.top_k, max_tokens=f.max_tokens, batch_size=f.batch_size,
                                   threads=f.threads_per_actor, codes=tuple(f.codes),
                                   sae_marker=sae_marker, max_tokens_per_batch=f.max_tokens_per_batch,
                                   surprisal=f.surprisal),
        batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(f.num_actors, len(blocks))),
        num_cpus=f.num_cpus_per_actor, num_gpus=f.num_gpus_per_actor or None,
    )
    return ds.take_all()


def read_prompts(path: str) -> tuple[list[str], list[str]]:
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} missing: run `saerl-ray ingest` first")
    t = storage.read_parquet(path, columns=["id", "prompt"])
    return t.column("id").to_pylist(), t.column("prompt").to_pylist()


def features_fingerprint(f: FeaturesConfig, ingest_marker: str, sae_marker: str) -> str:
    """What decides whether the stage reruns. The surprisal summary's constants are part of what a run with
    surprisal stored, and not of a lens-only run, whose fingerprint they leave as it was."""
    return fingerprint(f, ingest_marker, sae_marker, *([SURPRISAL_TOP, SURPRISAL_SKIP] if f.surprisal else []))


def run(cfg: RunConfig) -> dict:
    from saerl_ray.core.ray_init import init_ray

    f = cfg.features
    run_dir = storage.resolve(cfg.run_dir)
    ingest_marker = marker_of(run_dir, "ingest")
    sae_marker = marker_of(run_dir, "sae")
    st = Stage(run_dir, "features", features_fingerprint(f, ingest_marker, sae_marker))
    if st.done():
        return st.summary()
    ids, prompts = read_prompts(storage.join(run_dir, "ingest", "prompts.parquet"))
    _, lens = read_lens(storage.join(run_dir, "sae"))
    tmp = st.begin(keep_partial=True)
    todo = missing_blocks(len(ids), f.block_rows, tmp)
    n_blocks = -(-len(ids) // f.block_rows)
    init_ray(cfg.ray)
    t = time.perf_counter()
    done = extract_blocks(ids, prompts, todo, storage.join(run_dir, "sae"), tmp, f, sae_marker)
    wall = time.perf_counter() - t
    if lost := missing_blocks(len(ids), f.block_rows, tmp):
        raise RuntimeError(f"features: blocks {lost} have no part file in {tmp}")
    # Computed blocks report their token counts; only resumed blocks are read back for theirs.
    block_tokens = {int(r["block"]): int(r["tokens"]) for r in done}
    computed_rows = int(sum(int(r["rows"]) for r in done))
    summary = {
        "rows": len(ids), "d_sae": int(lens["d_sae"]), "pooling": f.pooling, "top_k": f.top_k,
        "codes": list(f.codes), "n_columns": n_columns(int(lens["d_sae"]), f.codes),
        "prompts_per_s": computed_rows / wall if done else None,
        "tokens": sum(block_tokens[b] if b in block_tokens else
                      int(storage.read_parquet(part_path(tmp, b), columns=["n_tokens"]).column(0).to_numpy().sum())
                      for b in range(n_blocks)),
        # Which node computed each block of this run (resumed blocks keep no record): proof of spread.
        "block_nodes": {str(int(r["block"])): str(r["node"]) for r in done},
        "blocks": n_blocks, "blocks_computed": len(done), "blocks_resumed": n_blocks - len(todo),
        "seconds": wall, "layer": int(lens["layer"]), "surprisal": f.surprisal,
    }
    st.commit(summary)
    rate = f"{summary['prompts_per_s']:.1f} prompts/s" if done else "all blocks resumed"
    print(f"[features] {len(ids)} prompts, {len(done)}/{n_blocks} blocks computed, {rate}, "
          f"pooling={f.pooling}, top_k={f.top_k}")
    return summary


@functools.lru_cache(maxsize=2)
def _featurizer(sae_dir: str, marker: str, pooling: str, top_k: int, max_tokens: int, batch_size: int,
                codes: tuple[str, ...], max_tokens_per_batch: int | None = None, surprisal: bool = False) -> Featurizer:
    del marker  # part of the cache key only: a recommitted SAE must not reuse the old one
    return Featurizer(sae_dir, pooling, top_k, max_tokens, batch_size, codes, max_tokens_per_batch,
                      surprisal=surprisal)


def run_featurizer(run_dir: str, cfg: RunConfig) -> Featurizer:
    """The in-process Featurizer of the run's committed SAE and features settings (cached)."""
    f = cfg.features
    marker = marker_of(run_dir, "sae")
    sae_dir = storage.local_dir(storage.join(storage.resolve(run_dir), "sae"), version=marker)
    return _featurizer(str(sae_dir), marker, f.pooling, f.top_k, f.max_tokens, f.batch_size,
                       tuple(f.codes), f.max_tokens_per_batch, f.surprisal)


def pool_residuals(acts: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`pool` for signed residuals: max without pool's clamp at 0 (SAE codes are >= 0, residuals are
    not, and the clamp would erase every dimension whose max is negative); a row with no pooled token: 0."""
    if how != "max":
        return pool(acts, mask, how)
    x = _masked_low(acts, mask).amax(1)
    return torch.where(mask.any(1, keepdim=True), x, x.new_zeros(()))


@torch.inference_mode()
def dense_texts(texts: list[str], run_dir: str, cfg: RunConfig) -> np.ndarray:
    """(n, d_model) float32: each text's hook-layer residual pooled with features.pooling, over the
    tokens the features stage pools (the same lens model, tokenisation, template and massive-token
    exclusion: `iter_residuals`), without the SAE: validate's `dense` control."""
    fz = run_featurizer(run_dir, cfg)
    enc = encode_prompts(fz.tok, list(texts), fz.lens.chat_template, fz.max_tokens)
    out: np.ndarray | None = None
    for rows, acts, mask in iter_residuals(fz.model, fz.lens.layer, enc, fz.max_rows, fz.tok.pad_token_id,
                                           fz.max_batch_tokens, fz.device):
        pooled = pool_residuals(acts.float(), mask, fz.pooling).cpu().numpy()
        if out is None:
            out = np.zeros((len(texts), pooled.shape[1]), np.float32)
        out[rows] = pooled
    return out if out is not None else np.zeros((0, 0), np.float32)


def featurize_texts(texts: list[str], run_dir: str, cfg: RunConfig, with_surprisal: bool = False):
    """In-process SAE codes for new texts: same lens, pooling and top-k as the features stage.
    `with_surprisal` (needs features.surprisal): returns (codes, per-text surprisal) instead."""
    if with_surprisal and not cfg.features.surprisal:
        raise ValueError("surprisal of new texts needs features.surprisal: true (the whole model runs)")
    fz = run_featurizer(run_dir, cfg)
    c = fz.encode(list(texts))
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in c.idx])]).astype(np.int64)
    cols = np.concatenate(c.idx) if texts else np.zeros(0, np.int32)
    vals = np.concatenate(c.val) if texts else np.zeros(0, np.float32)
    X = sp.csr_matrix((vals.astype(np.float32), cols, indptr), shape=(len(texts), fz.n_columns))
    return (X, c.surprisal.astype(float)) if with_surprisal else X


def featurize_pair(texts: list[str], run_dir: str, cfg: RunConfig) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """featurize_texts as (codes, surprisal), surprisal None without features.surprisal."""
    if cfg.features.surprisal:
        return featurize_texts(texts, run_dir, cfg, with_surprisal=True)
    return featurize_texts(texts, run_dir, cfg), None
