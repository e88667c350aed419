"""The pipeline's stages, in order: ingest, sae, features, signals, plan, report; and the side stages
label (rollout pass rates) and evaluate (benchmark accuracy). Each reads and writes only files under the
run_dir (docs/run_dir.md)."""
