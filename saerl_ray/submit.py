"""Stage a run for a Ray job: every file the job will read is put where every node can read it, and
the resolved config is written beside the run. Used by jobs/submit_*.sh before `ray job submit`.

    python -m saerl_ray.submit configs/gsm8k_math500.yaml --run_dir s3://bucket/runs/main
    # -> prints s3://bucket/runs/main/_jobs/config-<hash>.yaml ; the job runs `--config` that

Why: a job's working directory is a per-node copy of the uploaded repo, so a relative `run_dir`
would land in a folder that vanishes with the job, and an input outside the repo (`../shared/...`)
is not uploaded at all. So `run_dir` must be an object-store URI or an absolute path on a filesystem
every node mounts; with a URI, local inputs (data files, label files, the eval data dir, an SAE or
model folder, a packaged model alias) are copied under `<run_dir>/_inputs/<content hash>/` once and
the config points there. With a shared path, local inputs are made absolute.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import yaml

from saerl_ray.core import storage
from saerl_ray.core.config import ConfigError, RunConfig, UserError
from saerl_ray.core.data import expand as expand_data


class SubmitError(UserError, ValueError):
    """The run cannot work as a cluster job as configured; the message says what to change."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _expanded(path: str) -> str:
    """`path` with ${SAERL_DATA} expanded, or as written when there is no data folder here."""
    try:
        return expand_data(path)
    except FileNotFoundError:
        return path


def stage_path(path: str, run_dir: str, what: str) -> str:
    """Where the job should read `path`: a URI stays, a local file or folder is copied under run_dir."""
    try:
        path = expand_data(path)
    except FileNotFoundError as e:
        raise SubmitError(f"{what}: {e}") from None
    if storage.is_uri(path):
        return path
    local = Path(path).expanduser()
    if not local.exists():
        raise SubmitError(f"{what}: {path} does not exist on this machine (resolved {local.resolve()})")
    if not storage.is_uri(run_dir):
        return str(local.resolve())
    dest = storage.join(run_dir, "_inputs", _digest(local), local.resolve().name)
    if local.is_dir():
        if not storage.exists(storage.join(dest, "_STAGED")):  # content-addressed: once is enough
            storage.copy_tree(local, dest)
            storage.write_text(storage.join(dest, "_STAGED"), str(local.resolve()))
    elif not storage.exists(dest):
        storage.write_bytes(dest, local.read_bytes())
    print(f"[submit] {what}: {path} -> {dest}", file=sys.stderr)
    return dest


def stage_model(name: str, run_dir: str) -> str:
    """An alias (packaged model) or local folder becomes a URI every node can fetch; HF ids stay."""
    from saerl_ray.core import models

    if name in models.PACKAGED and storage.is_uri(run_dir):
        dest = storage.join(run_dir, "_inputs", "models", name)
        if not storage.exists(storage.join(dest, "config.json")):
            models.push(name, dest)
        return dest
    return stage_path(name, run_dir, "model.name") if Path(name).exists() else name


def stage_config(cfg: RunConfig) -> dict[str, Any]:
    """The config tree with every input rewritten to a path the job's nodes can read."""
    run_dir = cfg.run_dir
    if not storage.is_uri(run_dir) and not Path(run_dir).is_absolute():
        raise SubmitError(
            f"run_dir={run_dir!r} is relative: in a Ray job it would resolve inside each node's temporary "
            "copy of the working dir and be lost. Pass --run_dir s3://bucket/prefix (or gs://...), or an "
            "absolute path on a filesystem every node mounts."
        )
    tree = cfg.model_dump(mode="json")
    for i, spec in enumerate(tree["ingest"]["inputs"]):
        spec["path"] = stage_path(spec["path"], run_dir, f"ingest.inputs[{i}].path")
    if cfg.sae.source == "disk" and cfg.sae.path:
        tree["sae"]["path"] = stage_path(cfg.sae.path, run_dir, "sae.path")
    if cfg.signals.difficulty.label_file:
        tree["signals"]["difficulty"]["label_file"] = stage_path(
            cfg.signals.difficulty.label_file, run_dir, "signals.difficulty.label_file")
    if cfg.train.heldout_file:
        tree["train"]["heldout_file"] = stage_path(cfg.train.heldout_file, run_dir, "train.heldout_file")
    if storage.is_uri(cfg.eval.data_dir) or Path(_expanded(cfg.eval.data_dir)).exists():
        tree["eval"]["data_dir"] = stage_path(cfg.eval.data_dir, run_dir, "eval.data_dir")
    tree["model"]["name"] = stage_model(cfg.model.name, run_dir)
    if cfg.train.policy:
        tree["train"]["policy"] = stage_model(cfg.train.policy, run_dir)
    return tree


def write_staged(tree: dict[str, Any]) -> str:
    text = yaml.safe_dump(tree, sort_keys=False)
    path = storage.join(tree["run_dir"], "_jobs", f"config-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    storage.write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    from saerl_ray.cli import build_parser, overrides
    from saerl_ray.core.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m saerl_ray.submit CONFIG.yaml [dotted flags...]", file=sys.stderr)
        return 2
    ns = build_parser().parse_args(["run", "--config", argv[0], *argv[1:]])
    try:
        cfg = load_config(ns.config, overrides(ns))
        print(write_staged(stage_config(cfg)))
    except (ConfigError, SubmitError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
