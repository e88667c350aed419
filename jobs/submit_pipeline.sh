#!/usr/bin/env bash
# Submit the whole data pipeline (ingest -> report) to a running Ray cluster.
#   jobs/submit_pipeline.sh configs/gsm8k_math500.yaml --run_dir s3://bucket/runs/main [--features.num_actors 8 ...]
# run_dir must be an object-store URI or a path every node mounts; local inputs are staged there first.
# GPU work gets its own Ray GPUs: --sae.num_gpus 1 trains the SAE in a GPU task that exits before features,
# --features.num_gpus_per_actor 1 puts each feature actor on one. label and eval are not pipeline stages:
# submit them one by one with jobs/stage.py (its docstring), eval with --entrypoint-num-gpus 1 (it runs in
# the driver). SAERL_DRIVER_GPUS=N gives this job's driver N GPUs.
# Then: ray job logs -f <id>   ray job status <id>   ray job stop <id>
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [dotted flags...]" >&2; exit 2; }
STAGED="$(stage_config "$@")"
ray job submit --no-wait --submission-id "${SAERL_SUBMISSION_ID:-$(submission_id pipeline)}" \
  --runtime-env jobs/runtime_env_core.yaml --entrypoint-num-cpus 1 --entrypoint-num-gpus "${SAERL_DRIVER_GPUS:-0}" \
  -- python jobs/pipeline.py --config "$STAGED"
