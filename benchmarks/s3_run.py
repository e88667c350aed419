"""The main job with `run_dir` on an S3-compatible server: every stage's output lands in the bucket,
nothing under the working directory (issue 10's check of "the same config runs on real S3").

    make run-s3                                   # same as:
    .venv/bin/python benchmarks/s3_run.py --config configs/gsm8k_math500.yaml

Starts moto's S3 server on a free localhost port (testkit.S3Server, which sets the standard
AWS_* variables), runs `saerl-ray run -c CONFIG --run_dir s3://runs/<name>` as a subprocess, then lists
the bucket. Compared in the same run: the working directory's files (git status, ignored files
included) before and after. Extra arguments after `--` go to `saerl-ray run`. Last stdout line: one
JSON object (wall time, objects and bytes per stage, whether the working dir stayed untouched).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The test helpers (tests/testkit.py: the S3 server, a hand-made plan) live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def working_dir_files() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                         capture_output=True, text=True, check=True).stdout
    # __pycache__ comes from importing the code, not from the stages
    return {line for line in out.splitlines() if "__pycache__" not in line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default="configs/gsm8k_math500.yaml")
    ap.add_argument("--name", default="gsm8k_math500")
    ap.add_argument("extra", nargs="*", help="more `saerl-ray run` flags (after --)")
    args = ap.parse_args()

    from testkit import S3Server

    from saerl_ray.core import storage
    from saerl_ray.pipeline import PIPELINE

    before = working_dir_files()
    with S3Server() as s3:
        s3.create_bucket("runs")
        run_dir = f"s3://runs/{args.name}"
        cmd = [os.path.join(os.path.dirname(sys.executable), "saerl-ray"), "run", "-c", args.config,
               "--run_dir", run_dir, *args.extra]
        print("+", " ".join(cmd), f"(AWS_ENDPOINT_URL={s3.endpoint})", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        seconds = time.perf_counter() - t
        stages = {}
        for name in PIPELINE:
            files = storage.list_dir(storage.join(run_dir, name), recursive=True)
            stages[name] = {"done": "_DONE.json" in files, "objects": len(files),
                            "bytes": sum(storage.stat(storage.join(run_dir, name, f))[0] for f in files)}
    created = sorted(working_dir_files() - before)
    result = {"run_dir": run_dir, "rc": rc, "seconds": round(seconds, 1), "stages": stages,
              "all_done": all(s["done"] for s in stages.values()), "working_dir_new_files": created[:20]}
    print(json.dumps(result))
    sys.exit(0 if rc == 0 and result["all_done"] and not created else 1)


if __name__ == "__main__":
    main()
