#!/usr/bin/env bash
# Submit GRPO/DAPO training with OpenRLHF, fed by the curriculum (needs a finished `plan` stage).
#   jobs/submit_train_openrlhf.sh configs/gsm8k_math500.yaml --train.algo dapo --train.num_workers 8 \
#     --train.extra_args '["--vllm.gpu_memory_utilization", "0.6"]'
# The driver holds no GPU (OpenRLHF's actors and vLLM engines request theirs from the autoscaler), but it
# imports OpenRLHF, vLLM, DeepSpeed and flash-attn: it runs on the cluster image (docker/Dockerfile), which
# every node runs; jobs/runtime_env_gpu.yaml adds only the working dir and env vars.
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [dotted flags...]" >&2; exit 2; }
STAGED="$(stage_config "$@" --train.backend openrlhf)"
ray job submit --no-wait --submission-id "${SAERL_SUBMISSION_ID:-$(submission_id openrlhf)}" \
  --runtime-env jobs/runtime_env_gpu.yaml --entrypoint-num-cpus 1 \
  -- python jobs/stage.py train --config "$STAGED"
