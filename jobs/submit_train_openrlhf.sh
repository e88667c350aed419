#!/usr/bin/env bash
# Submit GRPO/DAPO training with OpenRLHF, fed by the curriculum (needs a finished `plan` stage).
#   jobs/submit_train_openrlhf.sh configs/gsm8k_math500.yaml --train.algo dapo --train.num_workers 8 \
#     --train.extra_args '["--vllm.gpu_memory_utilization", "0.6"]'
# The driver holds no GPU (OpenRLHF's actors and vLLM engines request theirs from the autoscaler), but it
# imports OpenRLHF, vLLM, DeepSpeed and flash-attn: every node runs the OpenRLHF image,
# ghcr.io/your-org/saerl-ray:0.1.0-ray2.55.0-cu130 (docker/Dockerfile's default target);
# jobs/runtime_env_gpu.yaml adds only the working dir and env vars.
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [dotted flags...]" >&2; exit 2; }
IMAGE="$(image_of gpu)"
echo "this job needs a cluster whose nodes run $IMAGE" >&2
STAGED="$(stage_config "$@" --train.backend openrlhf)"
ray job submit --no-wait --submission-id "${SAERL_SUBMISSION_ID:-$(submission_id openrlhf)}" \
  --metadata-json "{\"image\": \"$IMAGE\"}" \
  --runtime-env jobs/runtime_env_gpu.yaml --entrypoint-num-cpus 1 \
  -- python jobs/stage.py train --config "$STAGED"
