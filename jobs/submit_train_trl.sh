#!/usr/bin/env bash
# Submit GRPO training with TRL under Ray Train (CPU or single-node GPU), fed by the curriculum.
#   jobs/submit_train_trl.sh configs/gsm8k_math500.yaml --run_dir s3://bucket/runs/main --train.steps 200
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [dotted flags...]" >&2; exit 2; }
STAGED="$(stage_config "$@" --train.backend trl)"
ray job submit --no-wait --submission-id "${SAERL_SUBMISSION_ID:-$(submission_id trl)}" \
  --runtime-env jobs/runtime_env_core.yaml --entrypoint-num-cpus 1 \
  -- python jobs/stage.py train --config "$STAGED"
