# wsi_pipeline: the front door. `make demo` and `make test` each work as the only command on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

# Stage arguments (override on the command line): make preprocess SLIDES=/data/slides OUT=/data/out
SLIDES ?= slides
OUT ?= out
ENCODER ?= uni
WEIGHTS ?=
TASK ?= panda
MODEL ?= mamba2d
# (the timm encoder writes features/timm_<model_name>: pass FEATURES= for it)
FEATURES ?= $(OUT)/features/$(ENCODER)
RUN ?=
ARGS ?=

.PHONY: setup test demo preprocess features train report bench bench-preprocess bench-ops bench-extract bench-train build-ops clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m wsi_pipeline.demo $(ARGS)

preprocess: setup
	$(PY) -m wsi_pipeline.preprocess slides=$(SLIDES) out=$(OUT) $(ARGS)

features: setup
	$(PY) -m wsi_pipeline.extract slides=$(SLIDES) patches=$(OUT)/patches out=$(OUT)/features encoder=$(ENCODER) $(if $(WEIGHTS),encoder.weights=$(WEIGHTS)) $(ARGS)

train: setup
	$(PY) -m wsi_pipeline.train task=$(TASK) model=$(MODEL) features=$(FEATURES) $(ARGS)

report: setup
	$(if $(strip $(RUN)),,$(error RUN= is required: make report RUN=runs/<task>/<model> [ARGS="..."]))
	$(PY) -m wsi_pipeline.report run=$(RUN) $(ARGS)

bench-preprocess: setup
	$(PY) scripts/bench_preprocess.py $(ARGS)

# The scan operator's CUDA extension (ops/csrc), built ahead of time into build/ops (else JIT on first use).
build-ops: setup
	$(PY) -c "from ops import build; build.main()"

# Forward and forward+backward times of the 2D scan next to the 1D scan and the reference, and of the lattice
# conv + SiLU kernels next to PyTorch's (needs a GPU).
bench-ops: build-ops
	$(PY) scripts/bench_scan.py --out bench_out/scan.json $(ARGS)
	$(PY) scripts/bench_conv.py

# Feature-extraction throughput (reader-only, model-only, end-to-end) on a generated 40x JPEG slide cached
# in bench_out/. CPU-sized by default; on a GPU machine: make bench-extract ARGS="--size 61440 --copies 8 --encoder uni --random-weights"
bench-extract: setup
	$(PY) scripts/bench_extract.py $(ARGS)

# Training-step benchmark (2DMambaMIL, MambaMIL, ABMIL on a 200x200-cell slide); on a CPU pass e.g.
# ARGS="--side 24 --cells 300 --dim 64 --steps 5"
bench-train: setup
	$(PY) scripts/bench_train.py $(ARGS)

# Every benchmark this machine can run: the CPU ones always, the GPU ones when CUDA is available.
bench: bench-preprocess bench-extract
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(MAKE) bench-ops bench-train; \
	else echo "no CUDA device: bench-ops and bench-train skipped (run them on a GPU machine)"; fi

clean:
	rm -rf build demo_out bench_out outputs multirun runs .pytest_cache
