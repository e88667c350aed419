"""The curriculum sampler: state (the pure serving logic), store (its durable log and checkpoints) and
actor (the named Ray actor and the trainer's client). Contract: docs/sampler_api.md."""
