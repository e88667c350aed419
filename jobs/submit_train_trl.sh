#!/usr/bin/env bash
# Submit GRPO training with TRL under Ray Train (CPU or single-node GPU), fed by the curriculum.
#   jobs/submit_train_trl.sh configs/gsm8k_math500.yaml --train.steps 200 --train.use_gpu true
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
CONFIG="${1:?usage: $0 CONFIG.yaml [dotted flags...]}"; shift
ray job submit --no-wait --submission-id "saerl-trl-$(date +%Y%m%d-%H%M%S)" \
  --runtime-env jobs/runtime_env_core.yaml --entrypoint-num-cpus 1 \
  -- python jobs/stage.py train --config "$CONFIG" --train.backend trl "$@"
