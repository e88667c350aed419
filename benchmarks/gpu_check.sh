#!/usr/bin/env bash
# GPU check, one command, on the bare GPU host as it is: features stage tokens/s on one GPU in bf16 and its
# fraction of a bf16 matmul measured in the same run, cosine of the stored codes against the CPU path, SAE
# training tokens/s, one TRL GRPO step in bf16; progress on stderr, then one JSON line (also $OUT/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh prepare     # here (registry + .venv): builds gpu_bundle/ (<= 60 MiB, git-ignored)
#   bash benchmarks/gpu_check.sh             # on the GPU host, with gpu_bundle/ carried beside the repo
#   bash benchmarks/gpu_check.sh --cpu       # CPU mode, same script on a small sample (tests/test_gpu_check_on_cpu.py)
#
# The command for the device tool (gpu_bundle/ is the one carried ignored path; ~30 MiB; < 8 min):
#   run(command="bash benchmarks/gpu_check.sh", carry=["gpu_bundle"], timeout_s=540)
#
# The host (docs: DESIGN.md) is offline: Python 3.12 at /opt/torch/.venv/bin/python3 with torch 2.11 (CUDA 13.0),
# transformers 5.17, accelerate, safetensors, pyarrow, pandas, scikit-learn, scipy, numpy; no Ray, sae-lens or TRL.
# `prepare` (benchmarks/gpu_check/prepare.py) fetches cp312 wheels of what the check imports and the host lacks,
# SmolLM2's config + tokenizer (its weights do not fit: the host runs a random-init model of that exact config,
# and the JSON says so) and the two data files. Ray does not fit (73.8 MB): the features stage runs its actor's
# code in-process and the JSON says `ray_data_actor_path: "skipped: ..."`.
#
# Environment: PY (default /opt/torch/.venv/bin/python3 when it exists, else .venv/bin/python, else python3),
# GPU_CHECK_BUNDLE (default gpu_bundle), GPU_CHECK_SITE (where it is unpacked; default .gpu_check/site-packages,
# git-ignored), SAERL_DATA (read before the bundle's data/), WORK (scratch dir), OUT, and the sizes of
# benchmarks/gpu_check/run.py as upper-case variables (N_GSM, N_MATH, N_CPU, SAE_TOKENS, BUDGET_S, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export GPU_CHECK_START="${GPU_CHECK_START:-$(date +%s)}"
BUNDLE="${GPU_CHECK_BUNDLE:-$ROOT/gpu_bundle}"
log() { printf '[gpu_check %5ss] %s\n' "$(( $(date +%s) - GPU_CHECK_START ))" "$*" >&2; }

if [ "${1:-}" = prepare ]; then
  shift
  PREP_PY="${PREP_PY:-$ROOT/.venv/bin/python}"
  [ -x "$PREP_PY" ] || PREP_PY=python3
  exec "$PREP_PY" benchmarks/gpu_check/prepare.py "$BUNDLE" "$@"
fi

if [ -z "${PY:-}" ]; then
  for p in /opt/torch/.venv/bin/python3 "$ROOT/.venv/bin/python" python3; do
    if command -v "$p" >/dev/null 2>&1; then PY="$p"; break; fi
  done
fi
log "python: $PY; bundle: $BUNDLE"
# Unpacked outside the bundle (git-ignored, never carried): gpu_bundle/ must stay within the carry limit.
SITE="$("$PY" benchmarks/gpu_check/install.py "$BUNDLE" "${GPU_CHECK_SITE:-$ROOT/.gpu_check/site-packages}")" \
  || { log "FAILED: bundle install"; exit 1; }
log "bundle installed into $SITE"
export GPU_CHECK_BUNDLE="$BUNDLE" GPU_CHECK_SITE="$SITE"
# The bundle comes before the host's site-packages: the check runs the versions tested together here.
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check/run.py "$@"
