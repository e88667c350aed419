"""saerl-ray: SAE-guided curriculum for RL post-training, on Ray."""
__version__ = "0.1.0"
