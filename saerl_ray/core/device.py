"""Where a stage computes: the GPUs this process holds, the lens's device_map, and GPU batch sizes.

    from saerl_ray.core.device import current_placement, model_device_map
    p = current_placement()                 # Placement(device="cuda:0", n_gpus=4) in a 4-GPU actor
    load_model(name, num_layers=13, device_map=model_device_map(p, config))

A Ray worker uses exactly the GPUs Ray assigned it (`ray.get_gpu_ids()`; Ray also narrows
CUDA_VISIBLE_DEVICES to them, so they are cuda:0..n-1 inside the worker). A worker with none runs on
the CPU even on a GPU node: the GPU belongs to whichever actor reserved it. A driver process (the sae
stage with `sae.num_gpus: 0`, HF labelling with `label.num_gpus: 0`, eval) uses every CUDA device it can
see; `sae.num_gpus` and `label.num_gpus` instead reserve GPUs for a Ray task or actor. Everything here but the two functions that
ask the process is pure, so it is tested on CPU (tests/test_device_on_cpu.py) without faking CUDA.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saerl_ray.core.config import UserError

# Padded tokens per lens forward on a GPU when features/sae.max_tokens_per_batch is unset. Estimated,
# not measured: 16k tokens of SmolLM2 cut at layer 12 is 1.4 TFLOP, ~7 ms at 20% of an H100's bf16
# peak, long enough that kernel launches do not dominate; a 70B-class MLP (28,672 wide) holds
# ~3 x 0.9 GB of intermediates for it in bf16.
GPU_TOKENS_PER_BATCH = 16384


@dataclass(frozen=True)
class Placement:
    """`device`: where inputs start, the SAE lives and outputs are gathered; `n_gpus`: GPUs held."""

    device: str = "cpu"
    n_gpus: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def select_device(gpu_ids: Sequence, cuda_available: bool) -> str:
    """'cuda:0' when the process holds a GPU, else 'cpu'. Holding GPUs that torch cannot see (a CPU
    wheel of torch on a GPU node) is an error: silently featurising a 100k-prompt set on the CPU of a
    GPU actor costs hours and the reserved GPU sits idle."""
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        raise RuntimeError(
            f"this process holds GPU(s) {list(gpu_ids)} but torch {torch.__version__} has no CUDA: install a "
            "CUDA build of torch on GPU nodes, or set num_gpus to 0 to run on CPU"
        )
    return "cuda:0"


def _in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def held_gpu_ids() -> list:
    """GPU ids this process may use: Ray's assignment inside a Ray task/actor, else every visible device."""
    # Ask Ray, not torch: Ray 2.55 still hides the GPUs from zero-GPU workers (CUDA_VISIBLE_DEVICES="")
    # but warns that future versions will not, and then torch would see GPUs this actor never reserved.
    if _in_ray_worker():
        import ray

        return list(ray.get_gpu_ids())
    return list(range(torch.cuda.device_count()))


# --- the NVIDIA driver a CUDA build of torch needs ------------------------------------------------
# The oldest driver that runs a CUDA major's runtime (NVIDIA's CUDA release notes, "CUDA minor version
# compatibility"): any 12.x on >= 525.60.13, any 13.x on >= 580. torch's pip wheels bring their CUDA
# runtime but not a forward-compatibility driver, so the host's driver must be at least this.
MIN_DRIVER_FOR_CUDA_MAJOR = {11: "450.80.02", 12: "525.60.13", 13: "580"}
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def min_driver(cuda: str | None) -> str | None:
    """The oldest NVIDIA driver for torch's CUDA version ('13.0' -> '580'); None for a CPU build."""
    if not cuda:
        return None
    major = int(cuda.split(".")[0])
    if major not in MIN_DRIVER_FOR_CUDA_MAJOR:
        raise ValueError(f"no known minimum NVIDIA driver for CUDA {cuda}; add it to MIN_DRIVER_FOR_CUDA_MAJOR")
    return MIN_DRIVER_FOR_CUDA_MAJOR[major]


def driver_error(driver: str | None, cuda: str | None) -> str | None:
    """The one-line error for a driver too old for torch's CUDA, or None when it is new enough (or when
    there is no driver or no CUDA build: then nothing here can use a GPU anyway)."""
    need = min_driver(cuda)
    if not driver or need is None or _version_tuple(driver) >= _version_tuple(need):
        return None
    return (f"NVIDIA driver {driver} is too old for torch {torch.__version__} (CUDA {cuda}): it needs driver "
            f">= {need}; run this on nodes with a newer driver (the image declares NVIDIA_REQUIRE_CUDA) or "
            "install a torch built for an older CUDA")


def parse_driver_version(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ('NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  580.65.06  ...', or '... Open Kernel Module for x86_64  580.65.06  ...')."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def installed_driver() -> str | None:
    """This host's NVIDIA driver version, or None without one. Read from the kernel module, not through
    CUDA: on a driver too old for torch's CUDA, torch.cuda reports no GPU at all instead of why."""
    try:
        return parse_driver_version(NVIDIA_DRIVER_VERSION_FILE.read_text())
    except OSError:
        pass
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:  # no NVIDIA library or driver: nothing to check
        return None
    return version.decode() if isinstance(version, bytes) else version


class DriverError(UserError, RuntimeError):
    """The NVIDIA driver is older than torch's CUDA needs (the CLI prints it as one line)."""


def require_driver() -> None:
    """Stop a GPU stage at once, with one line, when the host's driver cannot run torch's CUDA (it would
    otherwise see no GPU and fall back to the CPU, or fail later inside a GPU actor). A process whose GPUs
    are hidden on purpose (CUDA_VISIBLE_DEVICES="") runs on the CPU and is not checked."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return
    problem = driver_error(installed_driver(), torch.version.cuda)
    if problem:
        raise DriverError(problem)


def current_placement() -> Placement:
    ids = held_gpu_ids()
    # A Ray worker that holds no GPU runs on the CPU whatever the driver; every other caller (a GPU actor,
    # a driver process that would use every visible GPU) checks the driver first.
    if ids or not _in_ray_worker():
        require_driver()
    device = select_device(ids, torch.cuda.is_available())
    return Placement(device, len(ids) if device != "cpu" else 0)


def generation_dtype(requested: str, placement: Placement) -> str:
    """model.dtype is the CPU compute dtype (float32 by default); a GPU generates in bf16 unless a
    half-precision dtype was asked for."""
    return "bfloat16" if placement.is_cuda and requested == "float32" else requested


def batch_limits(placement: Placement, batch_size: int, max_tokens_per_batch: int | None,
                 gpu_default: int = GPU_TOKENS_PER_BATCH) -> tuple[int | None, int | None]:
    """(max prompts, max padded tokens) per forward. CPU: `batch_size` prompts, plus the token budget
    when one is set (unset keeps the measured CPU behaviour). GPU: the token budget alone, so short
    prompts fill a forward instead of stopping at a prompt count sized for 2 CPU cores."""
    if placement.is_cuda:
        return None, max_tokens_per_batch or gpu_default
    return batch_size, max_tokens_per_batch


def auto_tokens_per_batch(free_bytes: int, bytes_per_token: int, longest: int,
                          cap: int = GPU_TOKENS_PER_BATCH, fraction: float = 0.5) -> int:
    """A token budget whose per-token working set fits `fraction` of the free GPU memory, at most `cap`
    and at least one prompt of `longest` tokens. With a 131k-latent SAE the dense codes alone are
    ~260 kB per token in bf16, so the default budget would not fit next to a large lens."""
    fit = int(free_bytes * fraction) // max(1, bytes_per_token)
    return max(longest, min(cap, fit))


# --- device_map for a model cut at the hook layer ---------------------------------------------------


def meta_model(config):
    """The model of `config` with parameters on the meta device: shapes and names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _unique_bytes(module: torch.nn.Module, seen: set[int]) -> int:
    """Bytes of the module's parameters not already counted (tied weights are counted once)."""
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks for the common HF causal-LM layouts."""
    base = getattr(model, "model", model)
    for attr in ("layers", "h", "blocks"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def module_sizes(model) -> list[tuple[str, int, bool]]:
    """(device_map key, parameter bytes, is a decoder layer) in forward order: the base model's
    children before the layer list, each layer, the children after it, then the CausalLM's own
    children (lm_head). Tied parameters count towards the first module that holds them."""
    layers = decoder_layers(model)
    base_name, base = next(((n, m) for n, m in model.named_children() if any(c is layers for c in m.children())),
                           (None, None))
    if base is None:
        raise ValueError(f"cannot plan a device_map for {type(model).__name__}: its decoder layers are not "
                         "a child of its base model")
    seen: set[int] = set()
    items: list[tuple[str, int, bool]] = []
    for name, child in base.named_children():
        if child is layers:
            items += [(f"{base_name}.{name}.{i}", _unique_bytes(layer, seen), True) for i, layer in enumerate(child)]
        else:
            items.append((f"{base_name}.{name}", _unique_bytes(child, seen), False))
    items += [(name, _unique_bytes(child, seen), False) for name, child in model.named_children() if child is not base]
    covered = {p for name, _, _ in items for p, _ in model.get_submodule(name).named_parameters(prefix=name)}
    stray = [n for n, _ in model.named_parameters() if n not in covered]
    if stray:
        raise ValueError(f"cannot plan a device_map for {type(model).__name__}: parameters outside its "
                         f"modules ({stray[:3]})")
    return items


def split_contiguous(sizes: Sequence[int], n: int) -> list[int]:
    """Device index per item: `n` contiguous, non-empty runs (fewer only when there are fewer items)
    whose heaviest device is as light as possible, and among those, whose lightest is as heavy as
    possible, so no GPU is left nearly idle while another holds one layer more than it needs to.
    Both by binary search: the lightest maximum by greedy filling, the heaviest minimum by a
    reachability sweep over prefix sums."""
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    sizes_a = np.asarray(sizes, dtype=np.int64)
    m = len(sizes_a)
    if m <= n:
        return list(range(m))
    prefix = np.concatenate([[0], np.cumsum(sizes_a)])
    total = int(prefix[-1])

    def runs_needed(cap: int) -> int:
        runs, load = 1, 0
        for s in sizes_a.tolist():
            if load + s > cap:
                runs, load = runs + 1, 0
            load += s
        return runs

    lo, hi = max(int(sizes_a.max()), -(-total // n)), max(total, 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if runs_needed(mid) > n else (lo, mid)
    cap = lo

    ends = np.arange(m + 1)
    first = np.searchsorted(prefix, prefix - cap, side="left")  # earliest start of a run ending at j

    def sweep(floor: int) -> list[np.ndarray]:
        """reach[d][j]: the first j items split into d runs, each weighing floor..cap."""
        last = np.minimum(np.searchsorted(prefix, prefix - floor, side="right") - 1, ends - 1)
        reach = [np.zeros(m + 1, dtype=bool)]
        reach[0][0] = True
        for _ in range(n):
            count = np.concatenate([[0], np.cumsum(reach[-1])])
            ok = last >= first
            hits = np.where(ok, count[np.maximum(last, 0) + 1] - count[np.minimum(first, m)], 0)
            reach.append(ok & (hits > 0))
        return reach

    lo_f, hi_f = 0, cap
    while lo_f < hi_f:
        mid = (lo_f + hi_f + 1) // 2
        lo_f, hi_f = (mid, hi_f) if sweep(mid)[n][m] else (lo_f, mid - 1)
    reach = sweep(lo_f)
    last = np.minimum(np.searchsorted(prefix, prefix - lo_f, side="right") - 1, ends - 1)
    out, j = [0] * m, m
    for d in range(n, 0, -1):
        i = next(i for i in range(int(first[j]), int(last[j]) + 1) if reach[d - 1][i])
        out[i:j] = [d - 1] * (j - i)
        j = i
    return out


def plan_device_map(model, n_devices: int) -> dict[str, int]:
    """device_map for `model` (a meta or real model, already cut at the hook layer) over `n_devices`
    GPUs: the embeddings on device 0, the decoder layers split into contiguous runs balanced by
    parameter bytes, the modules after the layers (final norm, untied lm_head) behind the last layer.
    Modules without parameters of their own (rotary embeddings, an lm_head tied to the embeddings)
    go with the embeddings on device 0, where the forward starts."""
    items = module_sizes(model)
    sized = [(name, size) for name, size, is_layer in items if size > 0 or is_layer]
    devices = split_contiguous([size for _, size in sized], n_devices)
    plan = dict(zip((name for name, _ in sized), devices))
    return {name: plan.get(name, 0) for name, _, _ in items}


def device_loads(model, device_map: dict[str, int]) -> dict[int, int]:
    """Parameter bytes per device under `device_map` (tied weights counted once)."""
    loads: dict[int, int] = {}
    for name, size, _ in module_sizes(model):
        loads[device_map[name]] = loads.get(device_map[name], 0) + size
    return loads


def model_device_map(placement: Placement, config) -> dict | None:
    """What `load_model(..., device_map=)` gets: None on CPU (plain load, unchanged CPU numbers), the
    whole model on cuda:0 with one GPU, a balanced split over the held GPUs with more."""
    if not placement.is_cuda:
        return None
    if placement.n_gpus <= 1:
        return {"": 0}
    return plan_device_map(meta_model(config), placement.n_gpus)


def input_device(model) -> torch.device:
    """Where token ids must go: the embedding's device (device 0 of a split model)."""
    return model.get_input_embeddings().weight.device
