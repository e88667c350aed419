"""The whole SaeRL pipeline (ingest -> sae -> features -> signals -> plan -> report) as one Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env_core.yaml -- python jobs/pipeline.py --config configs/gsm8k_math500.yaml
    python jobs/pipeline.py --config configs/gsm8k_math500.yaml --stages ingest,sae --features.batch_size 64

Every config field is a dotted flag, as with `saerl-ray`. Under `ray job submit` RAY_ADDRESS is set,
so the stages join the cluster the job runs on. Finished stages with an unchanged config are skipped,
so resubmitting after a failure resumes. The last stdout line is one JSON object (stage summaries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python jobs/pipeline.py` from a working_dir upload: the package sits next to jobs/, maybe uninstalled.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saerl_ray.cli import build_parser, overrides  # noqa: E402
from saerl_ray.core.config import ConfigError, load_config  # noqa: E402
from saerl_ray.core.ray_init import init_ray  # noqa: E402
from saerl_ray.pipeline import PIPELINE, run_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stages", default=",".join(PIPELINE), help=f"comma-separated subset of {PIPELINE}")
    ns_pre, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    stages = [s for s in ns_pre.stages.split(",") if s]
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        print(f"error: --stages: unknown stage(s) {unknown}; known: {PIPELINE}", file=sys.stderr)
        return 2
    ns = build_parser().parse_args(["run", *rest])
    try:
        cfg = load_config(ns.config, overrides(ns))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg.ray)  # under `ray job submit` this also moves the driver out of Ray's working-dir copy
    results = run_pipeline(cfg, stages)
    print(json.dumps({"run_dir": cfg.run_dir, "stages": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
