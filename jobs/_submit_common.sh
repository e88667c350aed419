# Sourced by the submit_*.sh scripts: where to submit, and token auth when the cluster uses it.
# RAY_ADDRESS: the dashboard's Job API; keep it on loopback and port-forward
# (`ray dashboard cluster_configs/aws.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265`).
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Token auth (RAY_AUTH_MODE=token on the cluster): the CLI sends RAY_AUTH_TOKEN, or the token in
# RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token. Print the cluster's with `ray get-auth-token` on the head.
if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The python that has saerl_ray installed (the one `make` builds, else whatever is on PATH).
PY="${SAERL_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
# stage_config CONFIG [flags...]: put every input where the cluster's nodes can read it and print the
# staged config's path (under run_dir). A relative run_dir or a missing input fails here, not on a node.
stage_config() { "$PY" -m saerl_ray.submit "$@"; }
# A unique, readable submission id: <kind>-<time>-<random>.
submission_id() { echo "saerl-$1-$(date +%Y%m%d-%H%M%S)-$RANDOM"; }
# image_of SET: the image a job of that set needs on every node (docker/deps.py: gpu = OpenRLHF, verl).
# A job cannot change the cluster's image: the submit scripts print it and record it in the job's metadata.
image_of() { "$PY" docker/deps.py image "$1"; }
