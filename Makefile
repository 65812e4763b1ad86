# Set-up and the two commands of the README. The first use creates .venv with the CPU build of
# torch pinned (any other torch spec pulls gigabytes of CUDA packages); for a GPU install, run
# `make TORCH=torch` (or any CUDA build) on a machine with CUDA, and `pip install -e .[gpu]`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
.PHONY: train test bench

$(BIN)/dsire: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "kronfluence==1.0.1"  # without its torchvision requirement
	touch $@

# The main job: fit and evaluate DSiRe on the bundled zoo (W&B offline unless you are logged in).
train: $(BIN)/dsire
	$(BIN)/python train.py

test: $(BIN)/dsire
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(BIN)/dsire
	$(BIN)/python -m benchmarks.spectra
	$(BIN)/python -m benchmarks.zoo
	$(BIN)/python -m benchmarks.size_regression
	$(BIN)/python -m benchmarks.featurise
	$(BIN)/python -m benchmarks.index
	$(BIN)/python -m benchmarks.train_e2e
