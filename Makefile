# Two commands from a fresh clone: `make demo` and `make test`. Each creates
# .venv with Python 3.12 (a plain python3.12, else pyenv's) on first use,
# installs the pinned dependencies and builds jax_ep (with its CUDA extension
# when nvcc is on PATH; JAX_EP_ENABLE_CUDA=OFF skips it).

VENV := .venv
PY := $(VENV)/bin/python
# JAX's CUDA plugin where there is a GPU; CPU-only JAX elsewhere.
JAX := jax$(if $(shell command -v nvidia-smi 2>/dev/null),[cuda13])==0.11.2
DEPS := "$(JAX)" flax==0.12.10 optax==0.2.8 pytest==9.2.0 pytest-xdist==3.8.0 \
	nanobind==3.1.0 scikit-build-core==1.1.2 cmake==4.4.4 ninja==1.13.2 \
	nvidia-nvshmem-cu13==3.4.5
STAMP := $(VENV)/.installed
SOURCES := $(shell git ls-files CMakeLists.txt pyproject.toml csrc xla_ffi 2>/dev/null)

.PHONY: demo test bench gpu-check clean

demo: $(STAMP)
	$(PY) -m jax_ep.launch -n 2 --timeout 1800 -- $(PY) examples/moe/main.py

# pytest processes: 2 fit CI's 2 cores (about 4 minutes there, 7 in one).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) tests -q

# Figures for bench/results/: one process per GPU on every local GPU.
bench: $(STAMP)
	$(PY) -m jax_ep.launch -n $$(nvidia-smi -L | wc -l) -- $(PY) -m bench

# On a GPU machine: build, GPU tests and benchmark, logs under $(OUT).
gpu-check:
	scripts/gpu_check.sh $(or $(OUT),gpu_check_out)

$(STAMP): $(SOURCES) Makefile
	test -x $(PY) || scripts/python312.sh -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build
