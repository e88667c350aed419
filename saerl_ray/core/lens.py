"""The lens: (model, hook layer, prompt template) -> residual-stream activations of prompt tokens.

Shared by the `sae` stage (training activations) and the `features` stage (pooled SAE codes), so
both see exactly the same tokens through exactly the same truncated model.

    from saerl_ray.core.lens import Lens, load_lens_model, encode_prompts, iter_residuals
    lens = Lens(model="smollm2", layer=12)
    tok, model = load_tokenizer(lens.model), load_lens_model(lens)
    batch = encode_prompts(tok, ["What is 2+3?"], chat_template=False, max_tokens=512)
    for rows, acts, mask in iter_residuals(model, lens.layer, batch, batch_size=32):
        ...  # acts: (b, T, d_model) at the output of decoder block `layer`; mask: pooled tokens
    # on a GPU: load_lens_model(lens, current_placement()) and iter_residuals(..., batch_size=None,
    # max_tokens_per_batch=16384, device="cuda:0") (saerl_ray.core.device.batch_limits picks these)

The hook is the output of HF module `model.layers.{layer}` (residual stream after that block,
before the final norm). The model is built with only `layer + 1` blocks and run through its base
model (no LM head), so nothing above the hook is computed. With `surprisal` (features.surprisal) the
whole model runs instead: the same hook, plus each token's surprisal -log p(token | the tokens before
it) under the full model, a quality signal the cut lens cannot give (docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from saerl_ray.core.device import (
    Placement,
    decoder_layers,
    input_device,
    model_device_map,
)
from saerl_ray.core.models import DTYPES, hook_name, load_model, model_config


@dataclass(frozen=True)
class Lens:
    model: str
    layer: int
    chat_template: bool = False
    dtype: str = "float32"
    trust_remote_code: bool = False

    @property
    def hook_name(self) -> str:
        return hook_name(self.layer)

    def to_json(self) -> dict:
        return {**asdict(self), "hook_name": self.hook_name}

    @classmethod
    def from_json(cls, d: dict) -> Lens:
        return cls(**{k: d[k] for k in ("model", "layer", "chat_template", "dtype", "trust_remote_code") if k in d})


@dataclass
class EncodedPrompts:
    """Token ids per prompt (unpadded), which of them are pooled (the prompt's own text), and each
    token's character span [start, end) in the prompt text ((T, 2) int32, clipped to the text: 0-width
    for template scaffolding), so a token position can be shown as the text it covers."""

    ids: list[np.ndarray]
    keep: list[np.ndarray]
    spans: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def compute_dtype(dtype: str, placement: Placement | None = None) -> str:
    """`auto`: bfloat16 where this process's hardware computes it natively (a GPU, or a CPU with
    AVX-512-bf16 / AMX), else float32: emulated bf16 matmuls on an AVX2-only CPU run ~40x slower than
    fp32 (docs/decisions.md), natively ~2x faster."""
    if dtype != "auto":
        return dtype
    if (placement or Placement()).is_cuda:
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def load_lens_model(lens: Lens, placement: Placement | None = None, full: bool = False):
    """The model truncated to `layer + 1` decoder blocks (blocks above the hook are never built; `full`:
    every block and the LM head, for surprisal), on the placement's GPUs (split over several by
    parameter bytes) or, by default, the CPU."""
    dtype = compute_dtype(lens.dtype, placement)
    if dtype not in DTYPES:
        raise ValueError(f"lens dtype {lens.dtype!r} not in {sorted(DTYPES)} or auto")
    config = model_config(lens.model, lens.trust_remote_code, num_layers=None if full else lens.layer + 1)
    device_map = model_device_map(placement or Placement(), config)
    return load_model(lens.model, dtype=dtype, trust_remote_code=lens.trust_remote_code,
                      device_map=device_map, config=config)


def _template_span(tok, text: str) -> tuple[str, int]:
    """Render `text` as a user turn; return the rendered string and where `text` starts in it."""
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    start = rendered.rfind(text)
    if start < 0:
        raise ValueError(f"chat template of {tok.name_or_path!r} does not contain the prompt verbatim")
    return rendered, start


def encode_prompts(tok, texts: list[str], chat_template: bool, max_tokens: int) -> EncodedPrompts:
    """Tokenize prompts (truncated to `max_tokens`). Pooled tokens = the prompt's own characters:
    template scaffolding (system prompt, role markers) and special tokens are context, not content."""
    if chat_template:
        spans = [_template_span(tok, t) for t in texts]
        rendered = [r for r, _ in spans]
        bounds = [(s, s + len(t)) for (_, s), t in zip(spans, texts)]
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    else:
        bounds = [(0, len(t)) for t in texts]
        enc = tok(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    special = np.asarray(sorted(set(tok.all_special_ids)), dtype=np.int64)
    ids_out, keep_out, spans_out = [], [], []
    for ids, offs, (lo, hi) in zip(enc["input_ids"], enc["offset_mapping"], bounds):
        ids = np.asarray(ids[:max_tokens], dtype=np.int64)
        offs = np.asarray(offs[:max_tokens], dtype=np.int64).reshape(-1, 2)
        inside = (offs[:, 1] > lo) & (offs[:, 0] < hi) & (offs[:, 1] > offs[:, 0])
        keep = inside & ~np.isin(ids, special)
        # Position 0 is the attention sink: its residual norm is ~100x the others in SmolLM2 and
        # would dominate both SAE training and any pooled code.
        keep[:1] = False
        ids_out.append(ids)
        keep_out.append(keep)
        spans_out.append((offs - lo).clip(0, hi - lo).astype(np.int32))
    return EncodedPrompts(ids_out, keep_out, spans_out)


def length_buckets(lengths: np.ndarray, batch_size: int | None,
                   max_tokens_per_batch: int | None = None) -> list[np.ndarray]:
    """Row indices grouped into sub-batches of similar length (sorted), so padding stays small.
    Callers scatter results back by these indices, which restores the input order.

    A batch holds at most `batch_size` rows (None: no row cap) and, with `max_tokens_per_batch`, at
    most that many padded tokens (rows x its longest row); a row longer than the budget alone is a
    batch of its own. Sorted ascending, each row added sets the batch's length, so the greedy fill
    never has to look back."""
    if batch_size is None and max_tokens_per_batch is None:
        raise ValueError("length_buckets needs batch_size or max_tokens_per_batch")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    if max_tokens_per_batch is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    buckets, current = [], []
    for i in order:
        grown = (len(current) + 1) * max(1, int(lengths[i]))
        if current and (len(current) == batch_size or grown > max_tokens_per_batch):
            buckets.append(np.asarray(current, dtype=order.dtype))
            current = []
        current.append(i)
    if current:
        buckets.append(np.asarray(current, dtype=order.dtype))
    return buckets


def pad_right(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: with causal attention the real tokens never see the pads and keep their
    positions 0..n-1 (left padding would shift RoPE positions in HF Llama without position_ids)."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
        att[i, : len(s)] = 1
    return ids, att


@torch.inference_mode()
def residuals(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d_model) output of decoder block `layer` (pre final-norm), via a forward hook."""
    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(grab)
    try:
        # The base model skips the LM head, which on SmolLM2 costs as much as ~8 decoder blocks.
        base = getattr(model, "model", model)
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


# Tokens whose logits are materialised at once: (chunk, vocab) fp32 is ~200 MB for SmolLM2's 49k vocab.
SURPRISAL_CHUNK = 1024


@torch.inference_mode()
def residuals_and_surprisal(model, layer: int, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hook layer's output (as `residuals`) and the (B, T) surprisal of each token given the ones
    before it under the whole model (nats; 0 at position 0 and on padding). Needs the full model
    (`load_lens_model(..., full=True)`); logits are formed `SURPRISAL_CHUNK` tokens at a time."""
    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    layers = decoder_layers(model)
    if layer >= len(layers) - 1 or not hasattr(model, "lm_head"):
        raise ValueError("surprisal needs the whole model with its LM head: load_lens_model(lens, full=True)")
    handle = layers[layer].register_forward_hook(grab)
    try:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        handle.remove()
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = input_ids[:, 1:].reshape(-1).to(h.device)
    nll = torch.cat([torch.nn.functional.cross_entropy(model.lm_head(h[i:i + SURPRISAL_CHUNK]).float(),
                                                       target[i:i + SURPRISAL_CHUNK], reduction="none")
                     for i in range(0, h.shape[0], SURPRISAL_CHUNK)]) if h.shape[0] else h.new_zeros(0)
    surprisal = torch.zeros(input_ids.shape, dtype=torch.float32, device=nll.device)
    surprisal[:, 1:] = nll.view(input_ids.shape[0], -1)
    return captured[0], surprisal * attention_mask.to(surprisal.device)


# Tokens whose residual norm exceeds this multiple of their prompt's median are "massive
# activations" (secondary attention sinks): in SmolLM2 at layer 12 a few tokens reach norm ~24,000
# against a median of ~140, carry 99% of the variance along one dimension and left a trained SAE
# with explained variance 0.04; excluding them, 0.36 from the same SAE. They are never pooled.
MASSIVE_FACTOR = 10.0


def drop_massive(acts: torch.Tensor, mask: torch.Tensor, factor: float = MASSIVE_FACTOR) -> torch.Tensor:
    """Mask without the tokens whose norm is > factor x the median norm of their prompt's pooled
    tokens. Per prompt, so a prompt's code never depends on which prompts share its batch."""
    norms = acts.float().norm(dim=-1)
    med = torch.where(mask, norms, norms.new_full((), torch.nan)).nanmedian(dim=1, keepdim=True).values
    return mask & ~(norms > factor * med)


def iter_residuals(
    model, layer: int, prompts: EncodedPrompts, batch_size: int | None, pad_id: int = 0,
    max_tokens_per_batch: int | None = None, device: str | torch.device | None = None, surprisal: bool = False,
) -> Iterator[tuple]:
    """Yield (row indices, activations (b, T, d), pooled-token mask (b, T)) per length bucket
    (`length_buckets`: at most `batch_size` rows and `max_tokens_per_batch` padded tokens); the mask
    is the prompt text minus massive-activation tokens. Activations and mask are on `device` (default:
    where the hook layer ran; a model split over GPUs ends on its last one). `surprisal` (the model
    loaded `full`): a 4th item, the (b, T) per-token surprisal (`residuals_and_surprisal`)."""
    lengths = prompts.lengths()
    first = input_device(model)
    for rows in length_buckets(lengths, batch_size, max_tokens_per_batch):
        ids, att = pad_right([prompts.ids[i] for i in rows], pad_id)
        mask = torch.zeros_like(att, dtype=torch.bool)
        for j, i in enumerate(rows):
            mask[j, : len(prompts.keep[i])] = torch.from_numpy(prompts.keep[i])
        if surprisal:
            acts, surp = residuals_and_surprisal(model, layer, ids.to(first), att.to(first))
        else:
            acts = residuals(model, layer, ids.to(first), att.to(first))
        if device is not None:
            acts = acts.to(device)
        mask = mask.to(acts.device)
        yield (rows, acts, drop_massive(acts, mask)) + ((surp.to(acts.device),) if surprisal else ())
