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

.PHONY: venv run test test-slow test-openrlhf bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing later can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/saerl-ray models pull smollm2
	$(BIN)/saerl-ray run --config $(CONFIG)

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/saerl-ray models pull smollm2
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs/
