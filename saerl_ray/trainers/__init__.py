"""The train stage (train) and its three backends: TRL GRPO under Ray Train (trl_backend), OpenRLHF
(openrlhf_launch, _trainer, _reward) and verl (verl_launch, _trainer, _sampler, _reward), with what they
share in common. Nothing here imports OpenRLHF or verl at package import time: the core install never needs
them (they need GPUs, vLLM and DeepSpeed/FSDP). `openrlhf_launch.run(cfg)` and `verl_launch.run(cfg)` import
them lazily (`verl_sampler` and `verl_reward` never import verl).

    saerl-ray train --train.backend openrlhf -c configs/gsm8k_math500.yaml     # on a GPU cluster
    saerl-ray train --train.backend verl -c configs/gsm8k_math500.yaml   # on a GPU cluster
"""
