#!/usr/bin/env bash
# Submit the whole data pipeline (ingest -> report) to a running Ray cluster.
#   jobs/submit_pipeline.sh configs/gsm8k_math500.yaml [--features.num_actors 8 ...]
# Then: ray job logs -f <id>   ray job status <id>   ray job stop <id>
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
CONFIG="${1:?usage: $0 CONFIG.yaml [dotted flags...]}"; shift
ray job submit --no-wait --submission-id "saerl-pipeline-$(date +%Y%m%d-%H%M%S)" \
  --runtime-env jobs/runtime_env_core.yaml --entrypoint-num-cpus 1 \
  -- python jobs/pipeline.py --config "$CONFIG" "$@"
