"""The stage table and the order `saerl-ray run` executes it in; the CLI, jobs, validate and tests
all run stages through here.

    from saerl_ray.pipeline import run_pipeline
    run_pipeline(load_config("configs/gsm8k_math500.yaml"))          # ingest -> ... -> report
    run_pipeline(cfg, ["features", "signals"])                         # a subset, in that order
"""

from __future__ import annotations

import importlib
import time

from saerl_ray.core.config import RunConfig

# stage name -> "module:function"; each function takes a RunConfig and returns a summary dict.
STAGES: dict[str, str] = {
    "ingest": "saerl_ray.stages.ingest:run",
    "sae": "saerl_ray.stages.sae:run",
    "features": "saerl_ray.stages.features:run",
    "signals": "saerl_ray.stages.signals:run",
    "plan": "saerl_ray.stages.plan:run",
    "report": "saerl_ray.stages.report:run",
    "label": "saerl_ray.stages.label:run",
    "train": "saerl_ray.trainers.train:run",
    "eval": "saerl_ray.stages.evaluate:run",
}
# What `saerl-ray run` executes, in order.
PIPELINE = ["ingest", "sae", "features", "signals", "plan", "report"]


def call_stage(name: str, cfg: RunConfig) -> dict:
    mod_name, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(mod_name), fn)(cfg)


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None) -> dict[str, dict]:
    results = {}
    for name in stages or PIPELINE:
        t = time.time()
        results[name] = call_stage(name, cfg)
        print(f"[saerl-ray] {name}: done in {time.time() - t:.1f}s", flush=True)
    return results
