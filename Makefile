# fused_flat: `make test` and `make bench` work on a fresh machine with only Python,
# gcc and (optionally) nvcc installed. Everything goes into .venv.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# CUDA sources are compiled whenever nvcc is found (SASS for sm_80 and sm_90 plus PTX for
# newer GPUs, no GPU needed); fused_flat.backends.cuda_arch refuses GPUs this list cannot serve.
# nvcc may be a wrapper script (here: /usr/local/bin/nvcc), so ask for the toolkit dir.
CUDA_HOME ?= $(shell for d in "$$CUDA_PATH" /usr/local/cuda; do [ -n "$$d" ] && [ -x "$$d/bin/nvcc" ] && [ -f "$$d/include/cuda.h" ] && { echo $$d; exit; }; done; n=$$(command -v nvcc) && d=$$(dirname $$(dirname $$(readlink -f $$n))) && [ -f "$$d/include/cuda.h" ] && echo $$d)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export TRITON_CACHE_DIR ?= $(CURDIR)/build/triton_cache
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: venv build test docs wheel-test bench bench-micro gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_PIN) numpy pytest matplotlib tqdm ninja setuptools wheel pybind11 safetensors scipy scikit-learn torchmetrics
	$(VPY) -m pip install -q hypothesis expecttest lightning transformers accelerate
	$(VPY) -m pip install -q mkdocs-material 'mkdocstrings[python]' build
	touch $@

venv: $(VENV)/.installed

build: venv
	CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=$(if $(CUDA_HOME),1,0) $(VPY) setup.py -q build_ext --inplace
	$(VPY) -c "import fused_flat, fused_flat.backends._native as n; print('fused_flat extension:', n.build_info() or n.load_error)"

test: build
	$(VPY) -m pytest -q tests

# The docs site (mkdocs-material + mkdocstrings), strict: a broken reference or link fails.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# sdist + wheel, then the wheel installed into a fresh venv and an FSGLD step taken there.
wheel-test: venv
	$(VPY) tests/wheel_check.py

bench: build
	$(VPY) -m fused_flat bench e2e

bench-micro: build
	$(VPY) -m fused_flat bench micro

# The GPU report: build for this GPU only (all cores), GPU tests, micro (fraction of copy
# bandwidth) and e2e benchmarks, each stage with a time budget (about 9 minutes in all),
# results/gpu-report.md with verdicts. Without a GPU: one line, exit 0. Never creates a venv
# nor installs: Python = GPU_PY=..., else PY=... if given, else $(VPY) if it has torch, else
# python3 on PATH (checked for torch>=2.6,<2.15). GPU_CHECK_ARGS="--dry-run --assume-capability
# 9.0" prints the plan; TORCH_CUDA_ARCH_LIST=... on the command line overrides this GPU's arch.
gpu-check:
	@py='$(or $(GPU_PY),$(if $(filter command line environment override,$(origin PY)),$(PY)))'; \
	if [ -z "$$py" ]; then \
	  if [ -x '$(VPY)' ] && '$(VPY)' -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' >/dev/null 2>&1; \
	  then py='$(VPY)'; else py=python3; fi; \
	fi; \
	CUDA_HOME='$(CUDA_HOME)' "$$py" benchmarks/gpu_check.py $(if $(filter command line,$(origin TORCH_CUDA_ARCH_LIST)),--arch-list '$(TORCH_CUDA_ARCH_LIST)') $(GPU_CHECK_ARGS)

clean:
	rm -rf build fused_flat/*.so
