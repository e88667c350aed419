"""Trainer integrations. Nothing here imports OpenRLHF at package import time: the core install
never needs it (it needs GPUs, vLLM and DeepSpeed). `openrlhf_launch.run(cfg)` imports it lazily.

    saerl-ray train --backend openrlhf -c configs/gsm8k_math500.yaml     # on a GPU cluster
"""
