#!/usr/bin/env bash
# Submit GRPO/DAPO training with verl 0.9.1, fed by the curriculum (needs a finished `plan` stage).
#   jobs/submit_train_verl.sh configs/gsm8k_math500.yaml --train.algo dapo --train.num_workers 8 \
#     --train.extra_args '["actor_rollout_ref.rollout.gpu_memory_utilization=0.6"]'
# train.extra_args are Hydra overrides of verl's ppo_trainer config (key=value), applied last.
# The driver holds no GPU (verl's TaskRunner, FSDP workers and vLLM replicas request theirs), but it
# imports verl: every node runs the verl image, ghcr.io/your-org/saerl-ray-verl:0.1.0-ray2.55.0-cu130
# (`docker build -f docker/Dockerfile --target verl ...`; verl 0.9.1, hydra, vllm, flash-attn,
# transformers 5.10.4), not the OpenRLHF one; jobs/runtime_env_verl.yaml adds only the working dir and
# env vars.
set -euo pipefail
source "$(dirname "$0")/_submit_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [dotted flags...]" >&2; exit 2; }
IMAGE="$(image_of verl)"
echo "this job needs a cluster whose nodes run $IMAGE" >&2
STAGED="$(stage_config "$@" --train.backend verl)"
ray job submit --no-wait --submission-id "${SAERL_SUBMISSION_ID:-$(submission_id verl)}" \
  --metadata-json "{\"image\": \"$IMAGE\"}" \
  --runtime-env jobs/runtime_env_verl.yaml --entrypoint-num-cpus 1 \
  -- python jobs/stage.py train --config "$STAGED"
