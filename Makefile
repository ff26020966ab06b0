# Two commands on a fresh machine:
#   make demo   -> creates .venv/, installs the pack, keys the shipped samples (RGBA PNGs + contact sheet)
#   make test   -> creates .venv/ if needed and runs the test suite (what .ci/run calls)
# Override the torch build with e.g. `make demo TORCH=torch` (the default is the CPU build this project
# is developed on; ComfyUI users keep their own torch - the pack never pins it).

PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-comfyui bench samples clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffusion-matting demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

# Tier 2: COMFYUI_PATH=/path/to/ComfyUI COMFY_PY=/path/to/comfy-venv/bin/python make test-comfyui
test-comfyui:
	COMFYUI_PATH=$(COMFYUI_PATH) $(COMFY_PY) -m pytest -q -p no:cacheprovider --rootdir . tests/comfy

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_greenpost.py
	$(VENV)/bin/python benchmarks/bench_trimap.py

samples: $(STAMP)
	$(VENV)/bin/python scripts/make_samples.py

clean:
	rm -rf $(VENV) out
